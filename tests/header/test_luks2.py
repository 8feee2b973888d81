"""luks2 against the real cryptsetup, on file-backed images (root, no device-mapper)."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import pytest

from encryptrootfs import luks2
from encryptrootfs import run as run_module
from encryptrootfs.errors import DeviceError, RefusedError, VerifyError
from encryptrootfs.luks2 import ReencryptionState, ReencryptProgress
from encryptrootfs.run import CommandError, run

if TYPE_CHECKING:  # the fixtures' types; conftest is not imported at run time
    from header.conftest import Ext4Image, ImageTools, LuksImage

MIB = 1024 * 1024


def digest(path: Path, start: int = 0, length: Optional[int] = None) -> str:
    with path.open("rb") as f:
        f.seek(start)
        return hashlib.sha256(f.read(length if length is not None else -1)).hexdigest()


def test_version_of_the_installed_cryptsetup() -> None:
    found = luks2.require_cryptsetup()
    assert found >= (2, 4, 0)
    assert luks2.cryptsetup_version() == found


def test_fresh_header_reads_back(luks_image: LuksImage) -> None:
    assert luks2.is_luks(luks_image.path)
    assert luks2.luks_version(luks_image.path) == 2
    header = luks2.read_header(luks_image.path)
    uuid.UUID(header.uuid)
    assert [k.id for k in header.key_keyslots] == [0]
    assert header.tokens == {}
    assert not header.reencryption_pending


def test_tokens_import_export_remove(luks_image: LuksImage) -> None:
    device = luks_image.path
    first = {"type": "encryptrootfs", "keyslots": ["0"], "version": 1, "note": "first"}
    second = {"type": "other-tool", "keyslots": [], "blob": "AAEC"}
    assert luks2.import_token(device, first) == 0
    assert luks2.import_token(device, second, token_id=4) == 4
    assert luks2.export_token(device, 0) == first
    assert luks2.export_token(device, 4) == second
    header = luks2.read_header(device)
    assert header.token_ids() == (0, 4)
    assert header.token_ids("encryptrootfs") == (0,)
    assert luks2.thaw(header.tokens["4"]) == second

    with pytest.raises(DeviceError, match="already has a token 4"):
        luks2.import_token(device, first, token_id=4)
    replaced = {**second, "blob": "BBBB"}
    assert luks2.import_token(device, replaced, token_id=4, replace=True) == 4
    assert luks2.export_token(device, 4) == replaced

    luks2.remove_token(device, 0)
    assert luks2.read_header(device).token_ids() == (4,)
    with pytest.raises(DeviceError, match="has no token 0"):
        luks2.export_token(device, 0)
    with pytest.raises(DeviceError, match="has no token 0; nothing was changed"):
        luks2.remove_token(device, 0)


def test_added_keyslot_is_pbkdf2_with_1000_iterations(luks_image: LuksImage) -> None:
    device = luks_image.path
    key = secrets.token_bytes(64)
    slot = luks2.add_keyslot(device, existing_key=luks_image.passphrase, new_key=key)
    assert slot == 1
    added = luks2.read_header(device).keyslots[str(slot)]
    assert (added.type, added.kdf_type, added.iterations) == ("luks2", "pbkdf2", 1000)
    assert added.memory is None

    assert luks2.test_keyslot(device, key, slot) is True
    assert luks2.test_keyslot(device, secrets.token_bytes(64), slot) is False
    assert luks2.test_keyslot(device, key, 0) is False  # the key is only in its own slot
    assert luks2.test_keyslot(device, luks_image.passphrase, 0) is True
    assert luks2.test_any_keyslot(device, key) is True

    chosen = luks2.add_keyslot(device, existing_key=key, new_key=secrets.token_bytes(64), keyslot=6)
    assert chosen == 6
    assert [k.id for k in luks2.read_header(device).key_keyslots] == [0, 1, 6]


def test_add_keyslot_with_a_wrong_key_changes_nothing(luks_image: LuksImage) -> None:
    before = digest(luks_image.path)
    with pytest.raises(VerifyError, match="no keyslot was added"):
        luks2.add_keyslot(luks_image.path, existing_key=b"wrong", new_key=secrets.token_bytes(64))
    assert digest(luks_image.path) == before


def test_kill_keyslot(luks_image: LuksImage) -> None:
    device = luks_image.path
    key = secrets.token_bytes(64)
    slot = luks2.add_keyslot(device, existing_key=luks_image.passphrase, new_key=key)
    with pytest.raises(VerifyError, match=f"keyslot {slot} was kept"):
        luks2.kill_keyslot(device, slot, existing_key=key)  # opens only the slot to kill
    luks2.kill_keyslot(device, slot, existing_key=luks_image.passphrase)
    assert [k.id for k in luks2.read_header(device).key_keyslots] == [0]
    with pytest.raises(DeviceError, match=f"has no usable keyslot {slot}"):
        luks2.test_keyslot(device, key, slot)
    with pytest.raises(RefusedError, match="last keyslot"):
        luks2.kill_keyslot(device, 0)
    assert luks2.test_keyslot(device, luks_image.passphrase, 0)
    # Without a key (a rollback that holds none), batch mode wipes a slot that is not last.
    other = luks2.add_keyslot(device, existing_key=luks_image.passphrase, new_key=key)
    luks2.kill_keyslot(device, other)
    assert str(other) not in luks2.read_header(device).keyslots


def test_luks1_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "luks1.img"
    path.write_bytes(b"")
    os.truncate(path, 32 * MIB)
    run(
        [
            "cryptsetup",
            "luksFormat",
            "--type",
            "luks1",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            "-",
            str(path),
        ],
        stdin=b"passphrase",
    )
    assert luks2.is_luks(path)
    assert luks2.luks_version(path) == 1
    with pytest.raises(DeviceError, match="is LUKS1; encryptrootfs needs LUKS2"):
        luks2.read_header(path)


def test_a_plain_file_is_not_luks(tmp_path: Path) -> None:
    path = tmp_path / "plain.img"
    path.write_bytes(b"")
    os.truncate(path, 8 * MIB)
    assert luks2.is_luks(path) is False
    assert luks2.luks_version(path) is None
    with pytest.raises(DeviceError, match=f"`{path}` is not a LUKS device"):
        luks2.read_header(path)
    missing = tmp_path / "missing.img"
    with pytest.raises(DeviceError, match="does not exist or cannot be opened"):
        luks2.is_luks(missing)
    with pytest.raises(DeviceError, match="does not exist or cannot be opened"):
        luks2.read_header(missing)


def test_encrypt_init_refuses_a_luks_device(luks_image: LuksImage) -> None:
    before = digest(luks_image.path)
    with pytest.raises(RefusedError, match="already has a LUKS header"):
        luks2.reencrypt_encrypt_init(
            luks_image.path,
            secrets.token_bytes(64),
            uuid=str(uuid.uuid4()),
            reduce_device_size=32 * MIB,
        )
    assert digest(luks_image.path) == before


def test_in_place_encryption(
    make_ext4_image: Callable[[int], Ext4Image],
    images: ImageTools,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="encryptrootfs")
    image = make_ext4_image(128 * MIB)
    path = image.path
    key = secrets.token_bytes(64)
    chosen = str(uuid.uuid4())
    assert images.contains(path, images.marker)
    plain_middle = digest(path, 16 * MIB, 64 * MIB)

    slot = luks2.reencrypt_encrypt_init(
        path, key, uuid=chosen, reduce_device_size=images.shrink, label="root"
    )
    header = luks2.read_header(path)
    assert header.uuid == chosen
    assert header.label == "root"
    assert header.reencryption_state is ReencryptionState.PENDING
    assert header.reencryption_pending
    assert [k.id for k in header.key_keyslots] == [slot]
    assert header.keyslots[str(slot)].kdf_type == "pbkdf2"
    assert header.keyslots[str(slot)].iterations == 1000
    assert header.data_offset == images.shrink // 2
    # Only the header area and the tail that took the first data changed; the rest is plain.
    assert digest(path, 16 * MIB, 64 * MIB) == plain_middle
    moved = header.segment_with_flag("backup-moved-segment")
    assert moved is not None
    with path.open("rb") as f:
        f.seek(moved.offset + 1024 + 56)
        assert f.read(2) == b"\x53\xef"  # the ext4 superblock, moved out of the header's way
    assert images.contains(path, images.marker)
    assert luks2.test_keyslot(path, key, slot) is True  # verifiable before any data pass

    seen: list[ReencryptProgress] = []
    assert luks2.reencrypt_resume(path, key, force_offline=True, on_progress=seen.append)
    header = luks2.read_header(path)
    assert header.reencryption_state is ReencryptionState.NONE
    assert not header.reencryption_pending
    assert header.uuid == chosen
    assert seen and seen[-1].done_bytes == seen[-1].total_bytes
    assert not images.contains(path, images.marker)
    assert luks2.reencrypt_resume(path, key, force_offline=True) is False  # nothing left

    assert "+ " in caplog.text  # the commands were logged ...
    for form in (key.hex(), base64.b64encode(key).decode(), key.decode("latin-1")):
        assert form not in caplog.text  # ... without the key in any form

    plain = images.decrypt(path, key, tmp_path)
    subprocess.run(["e2fsck", "-fn", str(plain)], check=True, capture_output=True)
    content = images.read_file_in_ext4(plain, image.marker_file)
    assert hashlib.sha256(content).hexdigest() == image.files[image.marker_file]


def test_interrupted_data_pass_resumes_and_loses_nothing(
    make_ext4_image: Callable[[int], Ext4Image],
    images: ImageTools,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Large enough that the pass takes seconds and reports progress several times.
    image = make_ext4_image(2048 * MIB)
    path = image.path
    key = secrets.token_bytes(64)
    luks2.reencrypt_encrypt_init(
        path, key, uuid=str(uuid.uuid4()), reduce_device_size=images.shrink
    )

    processes: list[subprocess.Popen[bytes]] = []
    real_popen = run_module._popen

    def keep(
        argv: Sequence[str], env: Optional[Mapping[str, str]], pass_fds: Sequence[int]
    ) -> subprocess.Popen[bytes]:
        processes.append(real_popen(argv, env, pass_fds))
        return processes[-1]

    monkeypatch.setattr(run_module, "_popen", keep)
    killed_at: list[int] = []

    def crash(progress: ReencryptProgress) -> None:
        # Power loss, as far as cryptsetup can tell: SIGKILL, no chance to clean up.
        if not killed_at and progress.done_bytes < progress.total_bytes:
            killed_at.append(progress.done_bytes)
            processes[-1].kill()

    try:
        luks2.reencrypt_resume(path, key, force_offline=True, on_progress=crash)
    except CommandError as exc:
        assert exc.returncode == 128 + 9
    else:
        assert not killed_at
        pytest.skip(
            "cryptsetup encrypted 2 GiB before its first progress report (0.5 s): "
            "too fast to interrupt here"
        )
    assert killed_at and killed_at[0] > 0
    assert luks2.read_header(path).reencryption_pending

    seen: list[ReencryptProgress] = []
    assert luks2.reencrypt_resume(path, key, force_offline=True, on_progress=seen.append)
    done = [p.done_bytes for p in seen]
    assert len(done) >= 2 and done == sorted(done) and len(set(done)) == len(done)
    assert done[0] >= killed_at[0]  # continued, not restarted
    assert done[-1] == seen[-1].total_bytes
    assert all(p.mib_per_s > 0 for p in seen)
    assert not luks2.read_header(path).reencryption_pending
    assert not images.contains(path, images.marker)

    plain = images.decrypt(path, key, tmp_path)
    subprocess.run(["e2fsck", "-fn", str(plain)], check=True, capture_output=True)
    for inside, sha in image.files.items():
        assert hashlib.sha256(images.read_file_in_ext4(plain, inside)).hexdigest() == sha


@pytest.fixture
def pending_image(tmp_path: Path) -> tuple[Path, bytes, int]:
    """An image whose in-place encryption is initialised (header written, no data pass)."""
    path = tmp_path / "pending.img"
    path.write_bytes(b"")
    os.truncate(path, 64 * MIB)
    key = secrets.token_bytes(64)
    slot = luks2.reencrypt_encrypt_init(
        path, key, uuid=str(uuid.uuid4()), reduce_device_size=32 * MIB
    )
    return path, key, slot


def test_token_goes_in_before_the_data_pass(pending_image: tuple[Path, bytes, int]) -> None:
    path, key, slot = pending_image
    token = {
        "type": "encryptrootfs",
        "keyslots": [str(slot)],
        "version": 1,
        "ciphertext": "AQID/+8=",
        "encryption_context": {"encryptrootfs:luks_uuid": "u"},
    }
    # cryptsetup itself refuses token changes while the encryption is pending ...
    refused = subprocess.run(
        ["cryptsetup", "token", "import", "--json-file", "-", str(path)],
        input=b'{"type":"x","keyslots":[]}',
        capture_output=True,
        check=False,
    )
    assert refused.returncode != 0
    # ... so the wrapper writes it into the JSON area itself.
    assert luks2.import_token(path, token) == 0
    with pytest.raises(DeviceError, match="not replaced behind its back"):
        luks2.import_token(path, token, token_id=0, replace=True)
    assert luks2.import_token_while_pending(path, {"type": "x", "keyslots": []}, token_id=9) == 9
    with pytest.raises(DeviceError, match="already has a token 9"):
        luks2.import_token_while_pending(path, {"type": "x", "keyslots": []}, token_id=9)
    with pytest.raises(ValueError, match="existing keyslots"):
        luks2.import_token_while_pending(path, {"type": "x", "keyslots": ["5"]})
    header = luks2.read_header(path)
    assert header.reencryption_state is ReencryptionState.PENDING
    assert luks2.thaw(header.tokens["0"]) == token
    assert luks2.test_keyslot(path, key, slot)

    assert luks2.reencrypt_resume(path, key, force_offline=True)
    assert not luks2.read_header(path).reencryption_pending
    assert luks2.export_token(path, 0) == token  # kept through the whole data pass
    with pytest.raises(RefusedError, match="no pending encryption"):
        luks2.import_token_while_pending(path, token)


@pytest.mark.parametrize("crash_at_write", [1, 2, 3, 4, 5, 6])
def test_token_write_survives_a_crash_at_any_write(
    pending_image: tuple[Path, bytes, int],
    monkeypatch: pytest.MonkeyPatch,
    crash_at_write: int,
) -> None:
    # Six writes: per copy (primary, then secondary) binary header, JSON area, checksum.
    path, key, slot = pending_image
    real_pwrite = os.pwrite
    writes = [0]

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        writes[0] += 1
        if writes[0] == crash_at_write:
            raise OSError("power lost")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    token = {"type": "encryptrootfs", "keyslots": [str(slot)]}
    with pytest.raises(OSError, match="power lost"):
        luks2.import_token_while_pending(path, token)
    monkeypatch.setattr(os, "pwrite", real_pwrite)

    # cryptsetup reads one consistent header: the old one until the primary copy is complete.
    header = luks2.read_header(path)
    assert header.reencryption_state is ReencryptionState.PENDING
    if crash_at_write <= 3:
        assert header.tokens == {}
        assert luks2.import_token_while_pending(path, token) == 0
    else:
        assert luks2.thaw(header.tokens["0"]) == token
    assert luks2.reencrypt_resume(path, key, force_offline=True)
    assert luks2.export_token(path, 0) == token


def test_in_place_encryption_with_a_detached_header(
    make_ext4_image: Callable[[int], Ext4Image], images: ImageTools, tmp_path: Path
) -> None:
    image = make_ext4_image(96 * MIB)
    path = image.path
    detached = tmp_path / "boot" / "root.luks"
    detached.parent.mkdir()
    key = secrets.token_bytes(64)
    chosen = str(uuid.uuid4())
    before = digest(path)

    slot = luks2.reencrypt_encrypt_init(path, key, uuid=chosen, header=detached)
    assert digest(path) == before  # the data device is untouched until the data pass
    header = luks2.read_header(path, header=detached)
    assert header.uuid == chosen and header.reencryption_pending
    assert header.data_offset == 0
    token = {"type": "encryptrootfs", "keyslots": [str(slot)]}
    assert luks2.import_token_while_pending(path, token, header=detached) == 0
    assert luks2.test_keyslot(path, key, slot, header=detached)

    assert luks2.reencrypt_resume(path, key, header=detached, force_offline=True)
    assert not luks2.read_header(path, header=detached).reencryption_pending
    assert luks2.export_token(path, 0, header=detached) == token
    assert not images.contains(path, images.marker)
    assert luks2.is_luks(path) is False  # nothing on the data device says LUKS


@pytest.mark.parametrize("crash_at_write", [None, 1, 8, 16])
def test_undo_an_initialised_encryption(
    make_ext4_image: Callable[[int], Ext4Image],
    images: ImageTools,
    monkeypatch: pytest.MonkeyPatch,
    crash_at_write: Optional[int],
) -> None:
    # The first boot's way back when the key cannot be made safe after init (e.g. the token
    # does not verify): the device is plain again. 16 writes of 1 MiB; the last one holds the
    # header copies.
    image = make_ext4_image(128 * MIB)
    path = image.path
    filesystem = digest(path, 0, 96 * MIB)
    luks2.reencrypt_encrypt_init(
        path, secrets.token_bytes(64), uuid=str(uuid.uuid4()), reduce_device_size=images.shrink
    )
    assert digest(path, 0, 96 * MIB) != filesystem

    if crash_at_write is not None:
        real_pwrite = os.pwrite
        writes = [0]

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            writes[0] += 1
            if writes[0] == crash_at_write:
                raise OSError("power lost")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
        with pytest.raises(OSError, match="power lost"):
            luks2.reencrypt_abort_init(path)
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        # Until the last write, the header still says what to do: run it again.
        assert luks2.read_header(path).reencryption_state is ReencryptionState.PENDING

    luks2.reencrypt_abort_init(path)
    assert luks2.is_luks(path) is False
    assert digest(path, 0, 96 * MIB) == filesystem
    subprocess.run(["e2fsck", "-fn", str(path)], check=True, capture_output=True)


def test_undo_is_refused_once_data_is_encrypted(
    make_ext4_image: Callable[[int], Ext4Image], images: ImageTools
) -> None:
    image = make_ext4_image(128 * MIB)
    key = secrets.token_bytes(64)
    luks2.reencrypt_encrypt_init(
        image.path, key, uuid=str(uuid.uuid4()), reduce_device_size=images.shrink
    )
    luks2.reencrypt_resume(image.path, key, force_offline=True)
    before = digest(image.path)
    with pytest.raises(RefusedError, match="cannot be undone"):
        luks2.reencrypt_abort_init(image.path)
    assert digest(image.path) == before
