"""luks2: parsing of recorded cryptsetup 2.6.1 outputs, and the argv/stdin of every command.

The fixtures under tests/fixtures/luks2/ were recorded on a real cryptsetup by record.sh there.
Commands never run: ``run_module._spawn`` / ``_popen`` are replaced by recorders that answer
with canned output, so each test sees exactly what would have been passed to cryptsetup.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from encryptrootfs import luks2
from encryptrootfs import run as run_module
from encryptrootfs.errors import DeviceError, RefusedError, ToolError, VerifyError
from encryptrootfs.luks2 import ReencryptionState
from encryptrootfs.run import CommandError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "luks2"
MIB = 1024 * 1024
KEY = bytes(range(1, 65))  # stands for a 64-byte KMS data key
OTHER_KEY = bytes(range(101, 165))
PENDING_UUID = "0f6b7a7e-8d33-4a4e-9a57-3c0e9b7d9a11"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def header(name: str) -> luks2.LuksHeader:
    return luks2.parse_header(fixture(f"{name}.json"), fixture(f"{name}.dump.txt"))


# --- versions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cryptsetup 2.6.1 flags: UDEV BLKID KEYRING KERNEL_CAPI \n", (2, 6, 1)),
        ("cryptsetup 2.3.7\n", (2, 3, 7)),
        ("cryptsetup 2.7.0-rc1 flags: UDEV BLKID KEYRING FIPS KERNEL_CAPI\n", (2, 7, 0)),
        ("cryptsetup 2.4\n", (2, 4, 0)),
        ("cryptsetup 10.12.3", (10, 12, 3)),
        ("WARNING: locking directory missing\ncryptsetup 2.5.0\n", (2, 5, 0)),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int]) -> None:
    assert luks2.parse_version(text) == expected


def test_parse_version_of_the_recorded_output() -> None:
    assert luks2.parse_version(fixture("version-2.6.1.txt")) == (2, 6, 1)


@pytest.mark.parametrize("text", ["", "veritysetup 2.6.1", "cryptsetup version unknown", "2.6.1"])
def test_parse_version_rejects_what_is_not_cryptsetup(text: str) -> None:
    with pytest.raises(ToolError, match="Cannot tell which cryptsetup"):
        luks2.parse_version(text)


# --- headers ----------------------------------------------------------------------------------


def test_fresh_pbkdf2_header() -> None:
    h = header("pbkdf2-fresh")
    assert h.uuid == "11111111-2222-4333-8444-555555555555"
    assert h.label == "fixture-fresh"
    assert h.subsystem is None
    assert h.version == 2
    assert list(h.keyslots) == ["0"]
    slot = h.keyslots["0"]
    assert (slot.id, slot.type, slot.key_size) == (0, "luks2", 64)
    assert (slot.kdf_type, slot.kdf_hash, slot.iterations) == ("pbkdf2", "sha256", 1000)
    assert slot.memory is None and slot.time_cost is None
    assert slot.priority == 1
    assert h.tokens == {}
    assert h.requirements == ()
    assert h.reencryption_state is ReencryptionState.NONE
    assert not h.reencryption_pending
    assert len(h.segments) == 1 and h.segments[0].size is None  # "dynamic"
    assert h.data_offset == 16 * MIB
    assert h.cipher == "aes-xts-plain64"
    assert h.json_size == 12288


def test_keyslots_with_different_pbkdfs_and_priorities() -> None:
    h = header("multi-kdf")
    assert [k.id for k in h.key_keyslots] == [0, 1, 3]
    pbkdf2, argon2id, argon2i = (h.keyslots[i] for i in ("0", "1", "3"))
    assert (pbkdf2.kdf_type, pbkdf2.iterations, pbkdf2.priority) == ("pbkdf2", 1000, 0)
    assert argon2id.kdf_type == "argon2id"
    assert (argon2id.time_cost, argon2id.memory, argon2id.parallel) == (4, 32768, 1)
    assert argon2id.iterations is None and argon2id.priority == 1
    assert (argon2i.kdf_type, argon2i.time_cost, argon2i.memory) == ("argon2i", 5, 16384)
    assert argon2i.priority == 2


def test_foreign_tokens_are_kept_raw() -> None:
    h = header("foreign-tokens")
    assert h.token_ids() == (0, 3, 5)
    assert h.token_ids("encryptrootfs") == (5,)
    assert h.tokens["0"]["type"] == "luks2-keyring"
    assert h.tokens["3"]["type"] == "clevis"
    recorded = json.loads(fixture("foreign-tokens.json"))["tokens"]
    assert {k: luks2.thaw(v) for k, v in h.tokens.items()} == recorded
    with pytest.raises(TypeError):
        h.tokens["5"]["type"] = "changed"  # type: ignore[index]


def test_header_with_encryption_initialised_but_not_run() -> None:
    h = header("reencrypt-pending")
    assert h.uuid == PENDING_UUID
    assert (h.label, h.subsystem) == ("fixture-root", "encryptrootfs")
    assert h.requirements == ("online-reencrypt-v2",)
    assert h.unknown_requirements == ()
    assert h.reencryption_state is ReencryptionState.PENDING
    assert h.reencryption_pending
    state = h.reencrypt_keyslot
    assert state is not None
    assert (state.mode, state.direction, state.resilience) == ("encrypt", "backward", "datashift")
    assert [k.id for k in h.key_keyslots] == [0]
    assert h.keyslots["0"].iterations == 1000
    # The data offset is the final segment's, not the linear segments' of the plain data.
    assert h.data_offset == 16 * MIB
    assert h.cipher == "aes-xts-plain64"
    moved = h.segment_with_flag("backup-moved-segment")
    assert moved is not None and moved.offset == 128 * MIB - 16 * MIB


def test_header_of_a_killed_data_pass_needs_recovery() -> None:
    h = header("reencrypt-interrupted")
    assert h.reencryption_state is ReencryptionState.INTERRUPTED
    assert h.reencryption_pending


def test_luks1_dump_gives_its_version_and_is_not_a_luks2_header() -> None:
    fields = luks2.parse_dump_text(fixture("luks1.dump.txt"))
    assert fields.version == 1
    assert fields.uuid == "44444444-5555-4666-8777-888888888888"
    with pytest.raises(DeviceError, match="LUKS1, not LUKS2"):
        luks2.parse_header("{}", fixture("luks1.dump.txt"))


def test_malformed_metadata_is_a_sentence() -> None:
    dump = fixture("pbkdf2-fresh.dump.txt")
    with pytest.raises(DeviceError, match="not valid JSON"):
        luks2.parse_header("{", dump)
    broken = json.loads(fixture("pbkdf2-fresh.json"))
    broken["segments"]["0"]["offset"] = "sixteen"
    with pytest.raises(DeviceError, match=r"segments\.0\.offset = 'sixteen'"):
        luks2.parse_header(json.dumps(broken), dump)
    with pytest.raises(DeviceError, match="no LUKS version"):
        luks2.parse_header(fixture("pbkdf2-fresh.json"), "garbage\n")


def test_progress_lines_of_a_resumed_pass() -> None:
    lines = fixture("progress-json.txt").splitlines()
    progress = [luks2.parse_progress_line(line) for line in lines]
    assert all(p is not None for p in progress)
    done = [p.done_bytes for p in progress if p is not None]
    assert done == sorted(done) and len(set(done)) == len(done)
    last = progress[-1]
    assert last is not None and last.done_bytes == last.total_bytes and last.eta_s == 0
    first = progress[0]
    raw = json.loads(lines[0])
    assert first is not None
    assert first.mib_per_s == pytest.approx(int(raw["speed"]) / MIB)
    # What is left over the speed, not cryptsetup's whole-device estimate.
    left = int(raw["device_size"]) - int(raw["device_bytes"])
    assert first.eta_s == pytest.approx(left / int(raw["speed"]))


@pytest.mark.parametrize("line", ["", "Finished, time 00m01s", "{not json", '{"device":"x"}'])
def test_other_lines_are_not_progress(line: str) -> None:
    assert luks2.parse_progress_line(line) is None


# --- commands, through a recorder -------------------------------------------------------------


@dataclass
class Call:
    argv: list[str]
    stdin: Optional[bytes]
    env: Mapping[str, str]
    fd_data: dict[int, bytes] = field(default_factory=dict)

    @property
    def args(self) -> list[str]:
        return self.argv[1:]


Answer = tuple[int, str, str]  # exit code, stdout, stderr
Responder = Callable[[list[str]], Answer]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.answers: list[tuple[Callable[[list[str]], bool], Responder]] = []

    def on(
        self, match: Callable[[list[str]], bool], code: int = 0, out: str = "", err: str = ""
    ) -> None:
        self.respond(match, lambda args: (code, out, err))

    def respond(self, match: Callable[[list[str]], bool], responder: Responder) -> None:
        self.answers.insert(0, (match, responder))  # the latest rule wins

    def spawn(
        self,
        argv: Sequence[str],
        stdin: Optional[bytes],
        timeout: Optional[float],
        env: Optional[Mapping[str, str]],
        pass_fds: Sequence[int],
    ) -> subprocess.CompletedProcess[bytes]:
        call = Call(list(argv), stdin, dict(env or {}))
        for fd in pass_fds:  # what the command would read from /dev/fd/N
            call.fd_data[fd] = os.read(fd, 4096)
        self.calls.append(call)
        for match, responder in self.answers:
            if match(call.args):
                code, out, err = responder(call.args)
                return subprocess.CompletedProcess(argv, code, out.encode(), err.encode())
        raise AssertionError(f"no canned answer for {call.args}")


def has(*words: str) -> Callable[[list[str]], bool]:
    return lambda args: all(w in args for w in words)


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    recorder = Recorder()
    monkeypatch.setattr(run_module, "_spawn", recorder.spawn)
    # run() checks that the program exists; any existing file stands in for cryptsetup here.
    monkeypatch.setattr(run_module, "which", lambda program: sys.executable)
    recorder.on(has("--version"), out=fixture("version-2.6.1.txt"))
    yield recorder


def answer_headers(rec: Recorder, *names: str) -> None:
    """luksDump answers that move to the next header with each text dump (before/after)."""
    index = [-1]

    def dump(args: list[str]) -> Answer:
        if "--dump-json-metadata" in args:
            return 0, fixture(f"{names[index[0]]}.json"), ""
        index[0] = min(index[0] + 1, len(names) - 1)
        return 0, fixture(f"{names[index[0]]}.dump.txt"), ""

    rec.respond(has("luksDump"), dump)


def answer_header(rec: Recorder, name: str) -> None:
    rec.on(
        lambda a: a[:1] == ["luksDump"] and "--dump-json-metadata" not in a,
        out=fixture(f"{name}.dump.txt"),
    )
    rec.on(has("luksDump", "--dump-json-metadata"), out=fixture(f"{name}.json"))


def assert_no_secret(calls: Sequence[Call], *secrets: bytes) -> None:
    for call in calls:
        text = " ".join(call.argv) + " " + " ".join(f"{k}={v}" for k, v in call.env.items())
        for secret in secrets:
            assert secret.hex() not in text
            assert secret.decode("latin-1") not in text
        assert call.env.get("LC_ALL") == "C"  # messages parsed in English


def test_require_cryptsetup_names_the_version_and_the_features(rec: Recorder) -> None:
    rec.on(has("--version"), out="cryptsetup 2.3.7\n")
    with pytest.raises(ToolError) as caught:
        luks2.require_cryptsetup()
    message = str(caught.value)
    assert "cryptsetup 2.3.7 is too old" in message and "2.4.3 or later" in message
    assert "--dump-json-metadata" in message
    rec.on(has("--version"), out="cryptsetup 2.4.2\n")
    with pytest.raises(ToolError, match=r"2\.4\.2 is too old.*CVE-2021-4122"):
        luks2.require_cryptsetup()
    rec.on(has("--version"), out="cryptsetup 2.4.3\n")
    with pytest.raises(ToolError, match=r"--progress-json.*--force-offline-reencrypt"):
        luks2.require_cryptsetup((2, 5, 0))
    rec.on(has("--version"), out=fixture("version-2.6.1.txt"))
    assert luks2.require_cryptsetup() == (2, 6, 1)


def test_read_header_runs_both_dumps(rec: Recorder) -> None:
    answer_header(rec, "foreign-tokens")
    h = luks2.read_header("/dev/vda1", header="/boot/hdr.img")
    assert h.uuid == "33333333-4444-4555-8666-777777777777"
    assert [c.args for c in rec.calls] == [
        ["luksDump", "--header", "/boot/hdr.img", "/dev/vda1"],
        ["luksDump", "--dump-json-metadata", "--header", "/boot/hdr.img", "/dev/vda1"],
    ]


def test_not_luks_and_missing_device_are_sentences(rec: Recorder) -> None:
    rec.on(has("luksDump"), code=1, err="Device /dev/vda1 is not a valid LUKS device.\n")
    with pytest.raises(DeviceError, match="`/dev/vda1` is not a LUKS device"):
        luks2.read_header("/dev/vda1")
    assert luks2.luks_version("/dev/vda1") is None
    rec.on(has("isLuks"), code=1)
    assert luks2.is_luks("/dev/vda1") is False
    rec.on(has("isLuks"), code=4, err="Device /dev/nope does not exist or access denied.\n")
    with pytest.raises(DeviceError, match="`/dev/nope` does not exist or cannot be opened"):
        luks2.is_luks("/dev/nope")


def test_luks1_is_detected_and_refused(rec: Recorder) -> None:
    rec.on(has("luksDump"), out=fixture("luks1.dump.txt"))
    assert luks2.luks_version("/dev/vda1") == 1
    with pytest.raises(DeviceError, match="is LUKS1; encryptrootfs needs LUKS2"):
        luks2.read_header("/dev/vda1")


def test_add_keyslot_keys_go_through_stdin_and_a_pipe(rec: Recorder) -> None:
    rec.on(has("luksAddKey"), out="Key slot 4 created.\nCommand successful.\n")
    slot = luks2.add_keyslot("/dev/vda1", existing_key=OTHER_KEY, new_key=KEY, keyslot=4)
    assert slot == 4
    (call,) = rec.calls
    args = call.args
    assert args[args.index("--pbkdf") + 1] == "pbkdf2"
    assert args[args.index("--pbkdf-force-iterations") + 1] == "1000"
    assert args[args.index("--key-file") + 1] == "-"
    assert args[args.index("--key-slot") + 1] == "4"
    new_keyfile = args[args.index("--new-keyfile") + 1]
    fd = int(new_keyfile.removeprefix("/dev/fd/"))
    assert call.stdin == OTHER_KEY
    assert call.fd_data == {fd: KEY}
    assert args[-1] == "/dev/vda1"
    assert_no_secret(rec.calls, KEY, OTHER_KEY)


def test_add_keyslot_with_a_wrong_existing_key(rec: Recorder) -> None:
    rec.on(has("luksAddKey"), code=2, err="No key available with this passphrase.\n")
    with pytest.raises(VerifyError, match="opens no keyslot of `/dev/vda1`; no keyslot was added"):
        luks2.add_keyslot("/dev/vda1", existing_key=OTHER_KEY, new_key=KEY)


def test_test_keyslot_maps_exit_codes(rec: Recorder) -> None:
    rec.on(has("--test-passphrase"), code=0)
    assert luks2.test_keyslot("/dev/vda1", KEY, 1) is True
    rec.on(has("--test-passphrase"), code=2, err="No key available with this passphrase.\n")
    assert luks2.test_keyslot("/dev/vda1", KEY, 1) is False
    assert luks2.test_any_keyslot("/dev/vda1", KEY) is False
    rec.on(has("--test-passphrase"), code=1, err="No usable keyslot is available.\n")
    with pytest.raises(DeviceError, match="has no usable keyslot 7"):
        luks2.test_keyslot("/dev/vda1", KEY, 7)
    assert rec.calls[0].args == [
        "open",
        "--test-passphrase",
        "--key-file",
        "-",
        "--key-slot",
        "1",
        "/dev/vda1",
    ]
    assert rec.calls[2].args == ["open", "--test-passphrase", "--key-file", "-", "/dev/vda1"]
    assert all(c.stdin == KEY for c in rec.calls)
    assert_no_secret(rec.calls, KEY)


def test_tokens_go_through_stdin_as_json(rec: Recorder) -> None:
    token = {"type": "encryptrootfs", "keyslots": ["1"], "version": 1}
    rec.on(has("token", "import"), out="Token 2 created.\nCommand successful.\n")
    assert luks2.import_token("/dev/vda1", token) == 2
    assert json.loads(rec.calls[-1].stdin or b"") == token
    assert rec.calls[-1].args == ["-v", "token", "import", "--json-file", "-", "/dev/vda1"]
    rec.on(has("token", "import"), code=1, err="Token 6 in use.\n")
    with pytest.raises(DeviceError, match="already has a token 6"):
        luks2.import_token("/dev/vda1", token, token_id=6)
    rec.on(has("token", "export"), out=json.dumps(token))
    assert luks2.export_token("/dev/vda1", 2) == token
    rec.on(has("token", "export"), code=1, err="Failed to get token 9 for export.\n")
    with pytest.raises(DeviceError, match="has no token 9"):
        luks2.export_token("/dev/vda1", 9)
    rec.on(has("token", "remove"), code=1, err="Token 9 is not in use.\n")
    with pytest.raises(DeviceError, match="has no token 9; nothing was changed"):
        luks2.remove_token("/dev/vda1", 9)
    with pytest.raises(ValueError, match="keyslots"):
        luks2.import_token("/dev/vda1", {"type": "x"})


def test_kill_keyslot_never_wipes_the_last_one(rec: Recorder) -> None:
    answer_header(rec, "pbkdf2-fresh")
    with pytest.raises(RefusedError, match="last keyslot"):
        luks2.kill_keyslot("/dev/vda1", 0)
    with pytest.raises(DeviceError, match="has no keyslot 5"):
        luks2.kill_keyslot("/dev/vda1", 5)
    assert not [c for c in rec.calls if "luksKillSlot" in c.args]


def test_kill_keyslot_authorised_by_another_key(rec: Recorder) -> None:
    answer_header(rec, "multi-kdf")
    rec.on(has("luksKillSlot"))
    luks2.kill_keyslot("/dev/vda1", 3, existing_key=OTHER_KEY)
    call = rec.calls[-1]
    assert call.args == ["luksKillSlot", "--batch-mode", "--key-file", "-", "/dev/vda1", "3"]
    assert call.stdin == OTHER_KEY
    rec.on(has("luksKillSlot"), code=2, err="No key available with this passphrase.\n")
    with pytest.raises(VerifyError, match="keyslot 1 was kept"):
        luks2.kill_keyslot("/dev/vda1", 1, existing_key=OTHER_KEY)


def test_open_and_close(rec: Recorder) -> None:
    rec.on(has("open"))
    assert luks2.open_device("/dev/vda1", "root", KEY, keyslot=1) == "/dev/mapper/root"
    assert rec.calls[-1].args == [
        "open",
        "--type",
        "luks2",
        "--key-file",
        "-",
        "--key-slot",
        "1",
        "/dev/vda1",
        "root",
    ]
    assert rec.calls[-1].stdin == KEY
    rec.on(has("open"), code=2, err="No key available with this passphrase.\n")
    with pytest.raises(VerifyError, match="No keyslot of `/dev/vda1` opened with this key"):
        luks2.open_device("/dev/vda1", "root", KEY, header="/boot/h")
    assert rec.calls[-1].args[-4:] == ["--header", "/boot/h", "/dev/vda1", "root"]
    rec.on(has("open"), code=5, err="Device root already exists.\n")
    with pytest.raises(DeviceError, match="a device named root already exists"):
        luks2.open_device("/dev/vda1", "root", KEY)
    rec.on(has("close"))
    luks2.close_device("root")
    assert rec.calls[-1].args == ["close", "root"]
    assert rec.calls[-1].stdin is None
    rec.on(has("close"), code=4, err="Device root is not active.\n")
    with pytest.raises(DeviceError, match="no open device named root"):
        luks2.close_device("root")
    assert_no_secret(rec.calls, KEY)


def test_encrypt_init_argv_and_uuid_check(rec: Recorder) -> None:
    rec.on(has("isLuks"), code=1)
    rec.on(has("reencrypt", "--encrypt"))
    answer_header(rec, "reencrypt-pending")
    slot = luks2.reencrypt_encrypt_init(
        "/dev/vda1", KEY, uuid=PENDING_UUID, reduce_device_size=32 * MIB, label="root"
    )
    assert slot == 0
    (init,) = [c for c in rec.calls if "reencrypt" in c.args]
    args = init.args
    for option, value in [
        ("--type", "luks2"),
        ("--uuid", PENDING_UUID),
        ("--reduce-device-size", str(32 * MIB)),
        ("--pbkdf", "pbkdf2"),
        ("--pbkdf-force-iterations", "1000"),
        ("--key-file", "-"),
        ("--label", "root"),
    ]:
        assert args[args.index(option) + 1] == value
    assert {"--encrypt", "--init-only", "--batch-mode"} <= set(args)
    assert args[-1] == "/dev/vda1" and init.stdin == KEY
    assert_no_secret(rec.calls, KEY)
    # cryptsetup writing another UUID than asked would break the key's encryption context.
    with pytest.raises(VerifyError, match="not the requested"):
        luks2.reencrypt_encrypt_init(
            "/dev/vda1",
            KEY,
            uuid="0f6b7a7e-8d33-4a4e-9a57-3c0e9b7d9a12",
            reduce_device_size=32 * MIB,
        )


def test_encrypt_init_refuses_bad_arguments_before_running_anything(rec: Recorder) -> None:
    with pytest.raises(ValueError, match="not a UUID"):
        luks2.reencrypt_encrypt_init("/dev/vda1", KEY, uuid="root", reduce_device_size=32 * MIB)
    with pytest.raises(ValueError, match="canonical"):
        luks2.reencrypt_encrypt_init(
            "/dev/vda1", KEY, uuid=PENDING_UUID.replace("-", ""), reduce_device_size=32 * MIB
        )
    with pytest.raises(ValueError, match="needs reduce_device_size"):
        luks2.reencrypt_encrypt_init("/dev/vda1", KEY, uuid=PENDING_UUID)
    with pytest.raises(ValueError, match="multiple of 512"):
        luks2.reencrypt_encrypt_init("/dev/vda1", KEY, uuid=PENDING_UUID, reduce_device_size=100)
    assert rec.calls == []


class FakeProcess:
    """What run_streaming sees of a cryptsetup that prints ``lines`` and exits with ``code``."""

    def __init__(self, lines: Sequence[str], code: int = 0, err: str = "") -> None:
        self.stdin = io.BytesIO()
        self.stdin.close = lambda: None  # type: ignore[method-assign]  # keep what was written
        self.stdout = io.BytesIO("".join(f"{line}\n" for line in lines).encode())
        self.stderr = io.BytesIO(err.encode())
        self.returncode: Optional[int] = None  # running until waited for
        self.final_code = code
        self.killed = False

    def wait(self) -> int:
        self.returncode = -9 if self.killed else self.final_code
        return self.returncode

    def poll(self) -> Optional[int]:
        return self.returncode

    def kill(self) -> None:
        self.killed = True


@dataclass
class Spawned:
    argv: list[str]
    env: Mapping[str, str]
    process: FakeProcess


def fake_popen(monkeypatch: pytest.MonkeyPatch, process: FakeProcess) -> list[Spawned]:
    spawned: list[Spawned] = []

    def popen(
        argv: Sequence[str], env: Optional[Mapping[str, str]], pass_fds: Sequence[int]
    ) -> Any:
        spawned.append(Spawned(list(argv), dict(env or {}), process))
        return process

    monkeypatch.setattr(run_module, "_popen", popen)
    return spawned


def test_resume_streams_progress_and_passes_the_key_on_stdin(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = ["Some notice", *fixture("progress-json.txt").splitlines()]
    process = FakeProcess(lines)
    spawned = fake_popen(monkeypatch, process)
    answer_headers(rec, "reencrypt-pending", "pbkdf2-fresh")  # before, then after the pass
    seen: list[luks2.ReencryptProgress] = []
    assert luks2.reencrypt_resume("/dev/vda1", KEY, force_offline=True, on_progress=seen.append)
    (call,) = spawned
    assert call.argv[1:] == [
        "reencrypt",
        "--resume-only",
        "--batch-mode",
        "--key-file",
        "-",
        "--force-offline-reencrypt",
        "--progress-json",
        "/dev/vda1",
    ]
    assert process.stdin.getvalue() == KEY
    assert KEY.hex() not in " ".join(call.argv) and call.env.get("LC_ALL") == "C"
    assert [p.done_bytes for p in seen] == [
        int(json.loads(line)["device_bytes"]) for line in lines[1:]
    ]
    assert not [c for c in rec.calls if "repair" in c.args]


def test_resume_recovers_a_killed_pass_first(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_popen(monkeypatch, FakeProcess([]))
    answer_headers(rec, "reencrypt-interrupted", "pbkdf2-fresh")
    rec.on(has("repair"))
    assert luks2.reencrypt_resume("/dev/vda1", KEY)
    (repair,) = [c for c in rec.calls if "repair" in c.args]
    assert repair.args == ["repair", "--batch-mode", "--key-file", "-", "/dev/vda1"]
    assert repair.stdin == KEY


def test_resume_with_a_wrong_key_is_a_sentence(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_popen(monkeypatch, FakeProcess([], code=2, err="No key available with this passphrase.\n"))
    answer_header(rec, "reencrypt-pending")
    with pytest.raises(VerifyError, match="No keyslot of `/dev/vda1` opened with this key"):
        luks2.reencrypt_resume("/dev/vda1", KEY)


def test_resume_when_nothing_is_pending_does_nothing(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = fake_popen(monkeypatch, FakeProcess([]))
    answer_header(rec, "pbkdf2-fresh")
    assert luks2.reencrypt_resume("/dev/vda1", KEY) is False
    assert spawned == []


def test_run_streaming_reports_a_killed_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_popen(monkeypatch, FakeProcess(["a", "b"], code=-9, err="partial\n"))
    monkeypatch.setattr(run_module, "which", lambda program: sys.executable)
    got: list[str] = []
    with pytest.raises(CommandError) as caught:
        run_module.run_streaming(["cryptsetup", "reencrypt"], on_line=got.append)
    assert got == ["a", "b"]
    assert caught.value.returncode == 128 + 9
    assert "killed by SIGKILL" in str(caught.value)


# --- the token writer for a header with pending encryption ------------------------------------


def header_copies(tmp_path: Path) -> Path:
    path = tmp_path / "device.img"
    path.write_bytes((FIXTURES / "reencrypt-pending.header-copies.bin").read_bytes())
    return path


def read_copies(path: Path) -> tuple[Any, Any]:
    fd = os.open(path, os.O_RDONLY)
    try:
        primary = luks2._read_copy(fd, 0, False, str(path))
        secondary = luks2._read_copy(fd, primary.hdr_size, True, str(path))
    finally:
        os.close(fd)
    return primary, secondary


def test_recorded_header_copies_check_out(tmp_path: Path) -> None:
    primary, secondary = read_copies(header_copies(tmp_path))
    assert (primary.hdr_size, primary.checksum_alg) == (16384, "sha256")
    assert primary.seqid == secondary.seqid
    assert primary.json_area == secondary.json_area
    metadata = json.loads(primary.json_area.split(b"\0", 1)[0])
    assert metadata == json.loads(fixture("reencrypt-pending.json"))


def test_a_damaged_copy_fails_its_checksum(tmp_path: Path) -> None:
    path = header_copies(tmp_path)
    with path.open("r+b") as f:
        f.seek(16384 + 4096 + 10)  # inside the secondary copy's JSON
        f.write(b"X")
    with pytest.raises(DeviceError, match=r"secondary LUKS2 header .* fails its checksum"):
        read_copies(path)


def test_token_written_into_both_copies(rec: Recorder, tmp_path: Path) -> None:
    path = header_copies(tmp_path)
    before, _ = read_copies(path)

    def dump(args: list[str]) -> Answer:
        # What cryptsetup would print: the JSON area as it now is on the "device".
        if "--dump-json-metadata" in args:
            primary, _ = read_copies(path)
            return 0, primary.json_area.split(b"\0", 1)[0].decode(), ""
        return 0, fixture("reencrypt-pending.dump.txt"), ""

    rec.respond(has("luksDump"), dump)
    token = {"type": "encryptrootfs", "keyslots": ["0"], "version": 1, "ciphertext": "AQI="}
    assert luks2.import_token_while_pending(path, token) == 0
    assert luks2.import_token_while_pending(path, {"type": "x", "keyslots": []}) == 1
    primary, secondary = read_copies(path)
    assert primary.seqid == secondary.seqid == before.seqid + 2
    assert primary.json_area == secondary.json_area
    assert len(primary.json_area) == len(before.json_area)
    metadata = json.loads(primary.json_area.split(b"\0", 1)[0])
    assert metadata["tokens"] == {"0": token, "1": {"type": "x", "keyslots": []}}
    unchanged = {k: v for k, v in metadata.items() if k != "tokens"}
    recorded = json.loads(fixture("reencrypt-pending.json"))
    assert unchanged == {k: v for k, v in recorded.items() if k != "tokens"}
    raw = path.read_bytes()  # labels, UUID and salts of the binary headers are kept
    fixture_raw = (FIXTURES / "reencrypt-pending.header-copies.bin").read_bytes()
    for offset in (0, 16384):
        assert raw[offset + 24 : offset + 448] == fixture_raw[offset + 24 : offset + 448]


def test_token_writer_refuses_a_header_without_pending_encryption(
    rec: Recorder, tmp_path: Path
) -> None:
    path = header_copies(tmp_path)
    before = path.read_bytes()
    answer_header(rec, "pbkdf2-fresh")
    with pytest.raises(RefusedError, match="no pending encryption"):
        luks2.import_token_while_pending(path, {"type": "x", "keyslots": []})
    answer_header(rec, "reencrypt-interrupted")
    with pytest.raises(RefusedError, match="must be recovered first"):
        luks2.import_token_while_pending(path, {"type": "x", "keyslots": []})
    assert path.read_bytes() == before


def test_data_pass_started_tells_whether_undo_is_possible(rec: Recorder) -> None:
    assert not header("reencrypt-pending").data_pass_started
    assert header("reencrypt-interrupted").data_pass_started
    assert not header("pbkdf2-fresh").data_pass_started
    for name in ("reencrypt-interrupted", "pbkdf2-fresh"):
        answer_header(rec, name)
        with pytest.raises(RefusedError, match="cannot be undone"):
            luks2.reencrypt_abort_init("/dev/vda1")


def test_a_failing_progress_callback_stops_cryptsetup(monkeypatch: pytest.MonkeyPatch) -> None:
    process = FakeProcess(["1", "2", "3"])
    fake_popen(monkeypatch, process)
    monkeypatch.setattr(run_module, "which", lambda program: sys.executable)

    def on_line(line: str) -> None:
        if line == "2":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_module.run_streaming(["cryptsetup", "reencrypt"], on_line=on_line, stdin=KEY)
    assert process.killed
    assert process.stdin.getvalue() == KEY


def test_resize_passes_the_key_on_stdin(rec: Recorder) -> None:
    rec.on(has("resize"))
    luks2.resize_device("root", KEY)
    luks2.resize_device("root", size_bytes=8 * MIB)
    assert rec.calls[0].args == ["resize", "--key-file", "-", "root"]
    assert rec.calls[0].stdin == KEY
    assert rec.calls[1].args == ["resize", "--size", str(8 * MIB // 512), "root"]
    assert rec.calls[1].stdin is None
    assert_no_secret(rec.calls, KEY)


def test_resume_progress_interval_and_detached_header(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = fake_popen(monkeypatch, FakeProcess([]))
    answer_headers(rec, "reencrypt-pending", "pbkdf2-fresh")
    luks2.reencrypt_resume("/dev/vda1", KEY, header="/boot/h", progress_interval_s=5)
    args = spawned[0].argv[1:]
    assert args[args.index("--progress-frequency") + 1] == "5"
    assert args[-3:] == ["--header", "/boot/h", "/dev/vda1"]
    assert "--force-offline-reencrypt" not in args
    assert all(c.args[-3:-1] == ["--header", "/boot/h"] for c in rec.calls if "luksDump" in c.args)
