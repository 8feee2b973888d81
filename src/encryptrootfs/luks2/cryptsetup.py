"""Running cryptsetup: the version gate, the one gateway (C locale, failures as sentences), and
the commands on headers, tokens, keyslots and mappings.

cryptsetup's exit codes (1 bad arguments / not LUKS, 2 no key matched, 3 out of memory, 4 wrong
device, 5 busy) and its messages are turned into sentences here, so callers never see a raw exit
code for a failure they could explain. Keys go on stdin or through
:func:`~encryptrootfs.run.secret_fd` only.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..errors import DeviceError, RefusedError, ToolError, VerifyError
from ..log import get_logger
from ..run import Arg, CommandError, Secret, run, run_streaming, secret_fd
from .header import DumpFields, LuksHeader, parse_dump_text, parse_header

log = get_logger("luks2")


CRYPTSETUP = "cryptsetup"
Version = tuple[int, int, int]
PathArg = Union[str, "os.PathLike[str]"]

# A KMS data key has full entropy: PBKDF2 at the minimum cryptsetup accepts costs nothing in
# security and keeps unlock at milliseconds without Argon2's memory in the initramfs.
PBKDF = "pbkdf2"
PBKDF_ITERATIONS = 1000

# cryptsetup exit codes (man cryptsetup, RETURN CODES).
_EXIT_NO_KEY = 2
_EXIT_NO_MEMORY = 3
_EXIT_WRONG_DEVICE = 4
_EXIT_BUSY = 5

# cryptsetup's messages are translated; everything parsed here is the C locale's wording.
# Set in one place: every cryptsetup call of the product goes through run_cryptsetup().
_ENV = {"LC_ALL": "C", "LANG": "C"}


def run_cryptsetup(args: Sequence[Arg], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """``cryptsetup ARGS`` through :func:`encryptrootfs.run.run`, in the C locale."""
    return run([CRYPTSETUP, *args], env=_ENV, **kwargs)


def stream_cryptsetup(args: Sequence[Arg], **kwargs: Any) -> None:
    """``cryptsetup ARGS`` through :func:`encryptrootfs.run.run_streaming`, in the C locale."""
    run_streaming([CRYPTSETUP, *args], env=_ENV, **kwargs)


_NOT_LUKS = re.compile(r"is not a valid LUKS device|Device type is not properly initialized")


# --- versions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    """A cryptsetup feature encryptrootfs uses, and the release that introduced it."""

    what: str
    since: Version


FEATURES: tuple[Feature, ...] = (
    Feature("the LUKS2 metadata as JSON (luksDump --dump-json-metadata)", (2, 4, 0)),
    Feature("in-place encryption in two steps (reencrypt --init-only, --resume-only)", (2, 4, 0)),
    Feature("the fix of CVE-2021-4122 (reencryption state authenticated)", (2, 4, 3)),
    Feature("progress as JSON lines (reencrypt --progress-json)", (2, 5, 0)),
    Feature("reencryption of image files (reencrypt --force-offline-reencrypt)", (2, 5, 0)),
)
# 2.4.3: CVE-2021-4122 (a forged decryption-in-progress state in an unauthenticated header
# made the next unlock write plaintext back); everything encryptrootfs uses exists in 2.4.0.
MINIMUM_VERSION: Version = (2, 4, 3)
PROGRESS_JSON_SINCE: Version = (2, 5, 0)

_VERSION = re.compile(r"cryptsetup\s+v?(\d+)\.(\d+)(?:\.(\d+))?")


def _dotted(version: Sequence[int]) -> str:
    return ".".join(str(p) for p in version)


def parse_version(text: str) -> Version:
    """``(major, minor, patch)`` from ``cryptsetup --version`` output (``cryptsetup 2.6.1 ...``).

    A missing patch level counts as 0; suffixes such as ``-rc0`` or ``flags: ...`` are ignored.
    """
    match = _VERSION.search(text)
    if match is None:
        first = text.strip().splitlines()[0] if text.strip() else "nothing"
        raise ToolError(
            f"Cannot tell which cryptsetup this is: `cryptsetup --version` printed {first!r}.",
            hint="check that `cryptsetup` on PATH is the cryptsetup from the distribution",
        )
    major, minor, patch = match.groups()
    return (int(major), int(minor), int(patch or 0))


def cryptsetup_version() -> Version:
    result = run_cryptsetup(["--version"])
    return parse_version(result.stdout.decode(errors="replace"))


def require_cryptsetup(minimum: Version = MINIMUM_VERSION) -> Version:
    """The installed cryptsetup's version; :class:`ToolError` when it is older than ``minimum``."""
    found = cryptsetup_version()
    if found < minimum:
        needs = [f.what for f in FEATURES if found < f.since <= minimum]
        why = f" for {'; '.join(needs)}" if needs else ""
        raise ToolError(
            f"cryptsetup {_dotted(found)} is too old: encryptrootfs needs {_dotted(minimum)} "
            f"or later{why}. Nothing was changed.",
            hint="install a newer cryptsetup (Debian 12, Ubuntu 22.04 and RHEL 9 ship one)",
        )
    return found


# --- running cryptsetup -----------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def _explain(exc: CommandError, device: str, changed: str = "Nothing was changed.") -> Exception:
    """The sentence for a cryptsetup failure that has a known cause; else the CommandError."""
    said = exc.stderr
    if _NOT_LUKS.search(said):
        return DeviceError(f"`{device}` is not a LUKS device. {changed}")
    if exc.returncode == _EXIT_WRONG_DEVICE or "does not exist or access denied" in said:
        detail = _last_line(said)
        detail = "" if "does not exist or access denied" in detail else f" ({detail})"
        return DeviceError(
            f"`{device}` does not exist or cannot be opened{detail}. {changed}",
            hint="check the device path and run as root",
        )
    if exc.returncode == _EXIT_NO_KEY:
        return VerifyError(f"No keyslot of `{device}` opened with this key. {changed}")
    if exc.returncode == _EXIT_NO_MEMORY:
        return ToolError(
            f"cryptsetup ran out of memory on `{device}` ({_last_line(said)}). {changed}",
            hint="a keyslot with Argon2 may need more memory than this machine has",
        )
    if exc.returncode == _EXIT_BUSY:
        return DeviceError(f"`{device}` is busy or already in use ({_last_line(said)}). {changed}")
    return exc


def _cryptsetup(
    args: Sequence[Arg],
    device: str,
    *,
    stdin: Optional[Secret] = None,
    pass_fds: Sequence[int] = (),
    changed: str = "Nothing was changed.",
) -> str:
    """Run cryptsetup, map its failure to a sentence, return its stdout."""
    try:
        result = run_cryptsetup(args, stdin=stdin, pass_fds=pass_fds)
    except CommandError as exc:
        raise _explain(exc, device, changed) from None
    return result.stdout.decode(errors="replace")


def _header_args(header: Optional[PathArg]) -> list[str]:
    return ["--header", os.fspath(header)] if header is not None else []


def _name(device: PathArg) -> str:
    return os.fspath(device)


# --- reading ----------------------------------------------------------------------------------


def is_luks(device: PathArg) -> bool:
    """True when ``device`` starts with a LUKS header (version 1 or 2)."""
    name = _name(device)
    try:
        run_cryptsetup(["isLuks", name])
    except CommandError as exc:
        if exc.returncode == 1:
            return False
        raise _explain(exc, name) from None
    return True


def luks_version(device: PathArg) -> Optional[int]:
    """1 or 2 for a LUKS device, None for anything else. A missing device raises DeviceError."""
    name = _name(device)
    try:
        result = run_cryptsetup(["luksDump", name])
    except CommandError as exc:
        error = _explain(exc, name)
        if isinstance(error, DeviceError) and _NOT_LUKS.search(exc.stderr):
            return None
        raise error from None
    return parse_dump_text(result.stdout.decode(errors="replace")).version


def read_dump(device: PathArg) -> DumpFields:
    """The fields of ``cryptsetup luksDump`` (LUKS1 too), read in the C locale."""
    name = _name(device)
    return parse_dump_text(_cryptsetup(["luksDump", name], name))


def format_device(
    device: PathArg,
    key: Secret,
    *,
    uuid: str,
    label: str,
    subsystem: str,
    hint: Optional[str] = None,
) -> None:
    """A fresh LUKS2 header on a blank ``device``: random volume key, one PBKDF2 keyslot for
    ``key`` (given on stdin), the ``uuid``, ``label`` and ``subsystem`` chosen beforehand."""
    args = [
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--pbkdf",
        PBKDF,
        "--pbkdf-force-iterations",
        str(PBKDF_ITERATIONS),
        "--uuid",
        uuid,
        "--label",
        label,
        "--subsystem",
        subsystem,
        "--key-file",
        "-",
        _name(device),
    ]
    run_cryptsetup(args, stdin=key, hint=hint)


def set_label(device: PathArg, label: str, subsystem: str) -> None:
    """Set the LUKS2 label and subsystem fields of ``device``."""
    # `cryptsetup config` clears the label when only --subsystem is given: pass both.
    name = _name(device)
    _cryptsetup(["config", "--label", label, "--subsystem", subsystem, name], name)


def read_header(device: PathArg, header: Optional[PathArg] = None) -> LuksHeader:
    """The LUKS2 header of ``device`` (or of the detached ``header`` file)."""
    name = _name(device)
    where = _name(header) if header is not None else name
    args = [*_header_args(header), name]
    dump = _cryptsetup(["luksDump", *args], where)
    fields = parse_dump_text(dump)
    if fields.version != 2:
        raise DeviceError(
            f"`{where}` is LUKS{fields.version}; encryptrootfs needs LUKS2. Nothing was changed.",
            hint=f"`cryptsetup convert --type luks2 {where}` converts it (back up the header "
            "first)",
        )
    metadata = _cryptsetup(["luksDump", "--dump-json-metadata", *args], where)
    return parse_header(metadata, dump)


# --- keyslots ---------------------------------------------------------------------------------

_KEYSLOT_CREATED = re.compile(r"Key slot (\d+) created")


def _add_key(
    name: str,
    pbkdf_args: Sequence[str],
    existing_key: Secret,
    new_secret: Secret,
    keyslot: Optional[int],
    header: Optional[PathArg],
) -> int:
    """``luksAddKey`` with the existing key on stdin and the new secret through a pipe as
    ``/dev/fd/N`` (read whole: no newline added or stripped); returns the new keyslot."""
    with secret_fd(new_secret) as fd:
        args = [
            "-v",
            "luksAddKey",
            "--batch-mode",
            *pbkdf_args,
            "--key-file",
            "-",
            "--new-keyfile",
            f"/dev/fd/{fd}",
        ]
        if keyslot is not None:
            # Alone, --key-slot names the new slot in every 2.x (2.6 keeps that meaning when
            # --new-key-slot is absent); --new-key-slot exists only from 2.6.
            args += ["--key-slot", str(keyslot)]
        try:
            out = run_cryptsetup(
                [*args, *_header_args(header), name],
                stdin=existing_key,
                pass_fds=(fd,),
            ).stdout
        except CommandError as exc:
            if exc.returncode == _EXIT_NO_KEY:
                raise VerifyError(
                    f"The existing key opens no keyslot of `{name}`; no keyslot was added."
                ) from None
            if "is full" in exc.stderr or "not available" in exc.stderr:
                raise DeviceError(
                    f"Keyslot {keyslot} of `{name}` is taken; no keyslot was added.",
                    hint="choose a free keyslot or let cryptsetup pick one",
                ) from None
            raise _explain(exc, name, "No keyslot was added.") from None
    match = _KEYSLOT_CREATED.search(out.decode(errors="replace"))
    if match:
        return int(match.group(1))
    if keyslot is not None:
        return keyslot
    raise ToolError(f"cryptsetup added a keyslot to `{name}` but did not say which.")


def add_keyslot(
    device: PathArg,
    *,
    existing_key: Secret,
    new_key: Secret,
    keyslot: Optional[int] = None,
    header: Optional[PathArg] = None,
) -> int:
    """Add a keyslot for ``new_key`` (PBKDF2, 1000 iterations), authorised by ``existing_key``.

    The existing key goes on stdin, the new one through a pipe as ``/dev/fd/N``. Returns the
    number of the new keyslot.
    """
    pbkdf = ["--pbkdf", PBKDF, "--pbkdf-force-iterations", str(PBKDF_ITERATIONS)]
    return _add_key(_name(device), pbkdf, existing_key, new_key, keyslot, header)


# A human passphrase gets Argon2id, capped so a small initramfs can afford to open it.
RECOVERY_PBKDF = "argon2id"
RECOVERY_MEMORY_KIB = 65536
RECOVERY_ITER_TIME_MS = 2000  # cryptsetup's own default unlock time


def add_passphrase_keyslot(
    device: PathArg,
    *,
    existing_key: Secret,
    passphrase: Secret,
    memory_kib: int = RECOVERY_MEMORY_KIB,
    iter_time_ms: int = RECOVERY_ITER_TIME_MS,
    keyslot: Optional[int] = None,
    header: Optional[PathArg] = None,
) -> int:
    """Add an Argon2id keyslot for a human ``passphrase``, authorised by ``existing_key``.

    ``memory_kib`` is the most cryptsetup may use (its benchmark may pick less, never more);
    ``iter_time_ms`` is the unlock time the benchmark aims for on this machine. The existing
    key goes on stdin, the passphrase through a pipe as ``/dev/fd/N`` (read whole: no newline
    is added or stripped). Returns the new keyslot's number.
    """
    if not 8 * 1024 <= memory_kib <= 4 * 1024 * 1024:
        raise ValueError("memory_kib must be between 8 MiB and 4 GiB")
    if iter_time_ms < 1:
        raise ValueError("iter_time_ms must be positive")
    pbkdf = [
        "--pbkdf",
        RECOVERY_PBKDF,
        "--pbkdf-memory",
        str(memory_kib),
        "--iter-time",
        str(iter_time_ms),
    ]
    return _add_key(_name(device), pbkdf, existing_key, passphrase, keyslot, header)


def kill_keyslot(
    device: PathArg,
    keyslot: int,
    *,
    existing_key: Optional[Secret] = None,
    header: Optional[PathArg] = None,
    allow_last: bool = False,
) -> None:
    """Wipe ``keyslot`` (rollbacks). With ``existing_key``, cryptsetup first checks that key
    opens another keyslot. The last key keyslot is never wiped unless ``allow_last``."""
    name = _name(device)
    current = read_header(device, header)
    slot = current.keyslots.get(str(keyslot))
    if slot is None:
        raise DeviceError(f"`{name}` has no keyslot {keyslot}; nothing was changed.")
    others = [k for k in current.key_keyslots if k.id != keyslot]
    if slot.type != "reencrypt" and not others and not allow_last:
        raise RefusedError(
            f"Keyslot {keyslot} is the last keyslot of `{name}`: wiping it would lose the data. "
            "Nothing was changed."
        )
    args = ["luksKillSlot", "--batch-mode"]
    if existing_key is not None:
        args += ["--key-file", "-"]
    try:
        # Without a key, stdin is empty: cryptsetup reads nothing and (in batch mode) proceeds.
        run_cryptsetup(
            [*args, *_header_args(header), name, str(keyslot)],
            stdin=existing_key,
        )
    except CommandError as exc:
        if exc.returncode == _EXIT_NO_KEY:
            raise VerifyError(
                f"The given key opens no other keyslot of `{name}`, so keyslot {keyslot} was kept."
            ) from None
        raise _explain(exc, name) from None


def _test_passphrase(
    device: PathArg, key: Secret, keyslot: Optional[int], header: Optional[PathArg]
) -> bool:
    name = _name(device)
    args = ["open", "--test-passphrase", "--key-file", "-"]
    if keyslot is not None:
        args += ["--key-slot", str(keyslot)]
    try:
        run_cryptsetup([*args, *_header_args(header), name], stdin=key)
    except CommandError as exc:
        if exc.returncode == _EXIT_NO_KEY:
            return False
        if keyslot is not None and "No usable keyslot" in exc.stderr:
            raise DeviceError(f"`{name}` has no usable keyslot {keyslot}.") from None
        raise _explain(exc, name) from None
    return True


def test_keyslot(
    device: PathArg, key: Secret, keyslot: int, header: Optional[PathArg] = None
) -> bool:
    """True when ``key`` opens ``keyslot``; False for a wrong key. Opens nothing."""
    return _test_passphrase(device, key, keyslot, header)


def test_any_keyslot(device: PathArg, key: Secret, header: Optional[PathArg] = None) -> bool:
    """True when ``key`` opens some keyslot of ``device``. Opens nothing."""
    return _test_passphrase(device, key, None, header)


# Not collected as tests when a test module imports them.
test_keyslot.__test__ = False  # type: ignore[attr-defined]
test_any_keyslot.__test__ = False  # type: ignore[attr-defined]


# --- activation (needs device-mapper: exercised by the vm tier) -------------------------------


def open_device(
    device: PathArg,
    name: str,
    key: Secret,
    *,
    keyslot: Optional[int] = None,
    header: Optional[PathArg] = None,
) -> str:
    """Open ``device`` as ``/dev/mapper/<name>`` with ``key``; the mapper path."""
    dev = _name(device)
    args = ["open", "--type", "luks2", "--key-file", "-"]
    if keyslot is not None:
        args += ["--key-slot", str(keyslot)]
    try:
        run_cryptsetup([*args, *_header_args(header), dev, name], stdin=key)
    except CommandError as exc:
        if exc.returncode == _EXIT_BUSY:
            raise DeviceError(
                f"Cannot open `{dev}` as {name}: a device named {name} already exists or "
                f"`{dev}` is in use ({_last_line(exc.stderr)}).",
                hint=f"`cryptsetup status {name}` shows what holds the name",
            ) from None
        raise _explain(exc, dev, f"`{dev}` was not opened.") from None
    return f"/dev/mapper/{name}"


def resize_device(
    name: str, key: Optional[Secret] = None, *, size_bytes: Optional[int] = None
) -> None:
    """Grow (or set) the size of the open ``/dev/mapper/<name>`` to its backing device's.

    LUKS2 keeps the volume key in the kernel keyring by default, and then cryptsetup needs a
    key to resize: pass it (it goes on stdin).
    """
    args = ["resize"]
    if key is not None:
        args += ["--key-file", "-"]
    if size_bytes is not None:
        if size_bytes <= 0 or size_bytes % 512:
            raise ValueError("size_bytes must be a positive multiple of 512")
        args += ["--size", str(size_bytes // 512)]
    _cryptsetup(
        [*args, name],
        f"/dev/mapper/{name}",
        stdin=key,
        changed=f"/dev/mapper/{name} keeps its size.",
    )


def close_device(name: str) -> None:
    try:
        run_cryptsetup(["close", name])
    except CommandError as exc:
        if exc.returncode == _EXIT_WRONG_DEVICE or "is not active" in exc.stderr:
            raise DeviceError(f"There is no open device named {name}.") from None
        if exc.returncode == _EXIT_BUSY:
            raise DeviceError(
                f"/dev/mapper/{name} is still in use (mounted?) and stays open.",
                hint="unmount what is on it first",
            ) from None
        raise
    log.debug("closed /dev/mapper/%s", name)
