"""In-place encryption: init (header, no data), resume (the data pass, with progress), recover,
and abort of an init whose key could not be made safe."""

from __future__ import annotations

import json
import os
import uuid as uuid_module
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import DeviceError, RefusedError, VerifyError
from ..log import get_logger
from ..run import CommandError, Secret
from .cryptsetup import (
    PBKDF,
    PBKDF_ITERATIONS,
    PROGRESS_JSON_SINCE,
    PathArg,
    _cryptsetup,
    _dotted,
    _explain,
    _header_args,
    _name,
    cryptsetup_version,
    is_luks,
    read_header,
    require_cryptsetup,
    stream_cryptsetup,
)
from .header import ReencryptionState

log = get_logger("luks2")


# --- in-place encryption ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReencryptProgress:
    done_bytes: int
    total_bytes: int
    mib_per_s: float
    eta_s: Optional[float]  # None until cryptsetup has measured a speed

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0


def parse_progress_line(line: str) -> Optional[ReencryptProgress]:
    """One ``--progress-json`` line of cryptsetup >= 2.5; None for any other line.

    cryptsetup's own ``eta_ms`` divides the whole device by the speed of this run, which is
    wrong after a resume; the ETA here is what is left divided by the speed.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        raw = json.loads(text)
        done = int(raw["device_bytes"])
        total = int(raw["device_size"])
        speed = int(raw.get("speed", 0))  # bytes per second
    except (ValueError, KeyError, TypeError):
        return None
    eta = max(total - done, 0) / speed if speed > 0 else None
    return ReencryptProgress(done, total, speed / (1024 * 1024), eta)


def _check_uuid(value: str) -> str:
    try:
        canonical = str(uuid_module.UUID(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a UUID") from None
    if canonical != value.lower():
        raise ValueError(f"{value!r} is not a UUID in the canonical 8-4-4-4-12 form")
    return canonical


def reencrypt_encrypt_init(
    device: PathArg,
    key: Secret,
    *,
    uuid: str,
    reduce_device_size: Optional[int] = None,
    header: Optional[PathArg] = None,
    label: Optional[str] = None,
    subsystem: Optional[str] = None,
    cipher: Optional[str] = None,
    key_size_bits: Optional[int] = None,
    sector_size: Optional[int] = None,
) -> int:
    """Write a LUKS2 header with a pending encryption of ``device``; no data is encrypted yet.

    ``uuid`` is chosen by the caller beforehand (the wrapped key's encryption context binds to
    it). With the header on the device, ``reduce_device_size`` bytes at the end of the device
    must be unused (the filesystem shrunk or the partition grown): cryptsetup moves the first
    data there and puts the header (half of it) at the start. Returns the new keyslot's id.
    """
    name = _name(device)
    wanted = _check_uuid(uuid)
    if header is None and not reduce_device_size:
        raise ValueError("encryption with the header on the device needs reduce_device_size")
    if reduce_device_size is not None and (reduce_device_size <= 0 or reduce_device_size % 512):
        raise ValueError("reduce_device_size must be a positive multiple of 512 bytes")
    target = _name(header) if header is not None else name
    if os.path.exists(target) and is_luks(target):
        raise RefusedError(
            f"`{target}` already has a LUKS header; encryption was not started and nothing "
            "was changed.",
            hint="a pending encryption is resumed, not started again",
        )
    args = [
        "reencrypt",
        "--encrypt",
        "--type",
        "luks2",
        "--init-only",
        "--batch-mode",
        "--uuid",
        wanted,
        "--pbkdf",
        PBKDF,
        "--pbkdf-force-iterations",
        str(PBKDF_ITERATIONS),
        "--key-file",
        "-",
    ]
    if reduce_device_size is not None:
        args += ["--reduce-device-size", f"{reduce_device_size}"]
    for option, value in (
        ("--label", label),
        ("--subsystem", subsystem),
        ("--cipher", cipher),
        ("--key-size", key_size_bits),
        ("--sector-size", sector_size),
    ):
        if value is not None:
            args += [option, str(value)]
    _cryptsetup([*args, *_header_args(header), name], name, stdin=key)
    written = read_header(device, header)
    if written.uuid != wanted:
        raise VerifyError(
            f"cryptsetup wrote the LUKS header of `{name}` with UUID {written.uuid}, not the "
            f"requested {wanted}; no data was encrypted yet.",
        )
    if not written.reencryption_pending or not written.key_keyslots:
        raise VerifyError(
            f"cryptsetup wrote a header on `{name}` without a pending encryption; no data was "
            "encrypted yet."
        )
    return written.key_keyslots[0].id


def reencrypt_recover(device: PathArg, key: Secret, *, header: Optional[PathArg] = None) -> None:
    """Recover a reencryption that was killed mid-hotzone (``cryptsetup repair``)."""
    name = _name(device)
    log.info("recovering the interrupted encryption of %s", name)
    _cryptsetup(
        ["repair", "--batch-mode", "--key-file", "-", *_header_args(header), name],
        name,
        stdin=key,
        changed="The interrupted encryption was not recovered; the next attempt can retry.",
    )


_ABORT_CHUNK = 1024 * 1024


def reencrypt_abort_init(device: PathArg, *, header: Optional[PathArg] = None) -> None:
    """Undo :func:`reencrypt_encrypt_init` before any data was encrypted: the device is plain
    again, byte for byte over the filesystem's extent.

    Init with the header on the device moved the first ``data_offset`` bytes of the data to the
    freed tail and wrote the header where they were; nothing else changed. Those bytes are
    copied back, last chunk first and the chunk holding both header copies last: until that
    final write the header still describes the state, so a crash leaves a device on which this
    can simply run again. With a detached header the device was never written: delete the
    header file instead (this only checks that nothing was encrypted).
    """
    name = _name(device)
    current = read_header(device, header)
    state_slot = current.reencrypt_keyslot
    live = [s for s in current.segments if not any(f.startswith("backup-") for f in s.flags)]
    if (
        current.reencryption_state is not ReencryptionState.PENDING
        or state_slot is None
        or state_slot.mode != "encrypt"
        or current.data_pass_started
    ):
        raise RefusedError(
            f"`{name}` is not an initialised encryption with no data encrypted yet, so it "
            "cannot be undone; nothing was changed.",
            hint="a started encryption can only be finished (reencrypt_resume)",
        )
    if header is not None:
        return
    moved = current.segment_with_flag("backup-moved-segment")
    first = min(live, key=lambda s: s.id) if live else None
    if (
        moved is None
        or moved.size is None
        or first is None
        or (first.offset, first.size) != (moved.offset, moved.size)
    ):
        raise RefusedError(
            f"The header of `{name}` does not show where the moved data is; nothing was changed."
        )
    log.info("undoing the encryption set-up of %s (%d bytes back to the start)", name, moved.size)
    starts = list(range(0, moved.size, _ABORT_CHUNK))
    fd = os.open(name, os.O_RDWR)
    try:
        for start in [*reversed(starts[1:]), starts[0]]:
            if start == starts[0]:
                os.fsync(fd)  # everything else is down before the header goes
            length = min(_ABORT_CHUNK, moved.size - start)
            data = os.pread(fd, length, moved.offset + start)
            if len(data) != length:
                raise DeviceError(f"Short read from `{name}` at {moved.offset + start}.")
            os.pwrite(fd, data, start)
        os.fsync(fd)
    finally:
        os.close(fd)
    if is_luks(device):
        raise VerifyError(f"`{name}` still has a LUKS header after the set-up was undone.")


def reencrypt_resume(
    device: PathArg,
    key: Secret,
    *,
    header: Optional[PathArg] = None,
    force_offline: bool = False,
    on_progress: Optional[Callable[[ReencryptProgress], None]] = None,
    progress_interval_s: Optional[int] = None,
) -> bool:
    """Run (or continue) the pending data pass until the whole device is encrypted.

    Recovers first when the previous pass was killed mid-way. ``force_offline`` is needed for
    image files (cryptsetup cannot tell whether a file is in use). ``on_progress`` gets
    cryptsetup's progress (every ``progress_interval_s``, default half a second); an exception
    from it stops cryptsetup, which leaves a state the next resume recovers from. Returns False
    when there was nothing to do.
    """
    name = _name(device)
    state = read_header(device, header).reencryption_state
    if state is ReencryptionState.NONE:
        log.info("%s has no pending encryption; nothing to resume", name)
        return False
    if state is ReencryptionState.INTERRUPTED:
        reencrypt_recover(device, key, header=header)
    version = cryptsetup_version()
    if force_offline:
        require_cryptsetup(PROGRESS_JSON_SINCE)
    args = ["reencrypt", "--resume-only", "--batch-mode", "--key-file", "-"]
    if force_offline:
        args.append("--force-offline-reencrypt")
    if version >= PROGRESS_JSON_SINCE:
        args.append("--progress-json")
        if progress_interval_s is not None:
            args += ["--progress-frequency", str(progress_interval_s)]
    elif on_progress is not None:
        log.info("cryptsetup %s reports no progress in batch mode", _dotted(version))

    def on_line(line: str) -> None:
        progress = parse_progress_line(line)
        if progress is None:
            if line.strip():
                log.debug("cryptsetup: %s", line)
        elif on_progress is not None:
            on_progress(progress)

    changed = "The encryption stopped at its last checkpoint; resuming continues from there."
    try:
        stream_cryptsetup(
            [*args, *_header_args(header), name],
            stdin=key,
            on_line=on_line,
        )
    except CommandError as exc:
        raise _explain(exc, name, changed) from None
    if read_header(device, header).reencryption_pending:
        raise DeviceError(
            f"cryptsetup finished but `{name}` still has a pending encryption. " + changed
        )
    return True
