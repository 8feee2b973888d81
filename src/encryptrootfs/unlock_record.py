"""The last unlock, as the initramfs saw it: a small JSON record for ``encryptrootfs status``.

The initramfs writes it right after the root is opened; ``status`` on the running system reads
it. It lives under ``/run/encryptrootfs/``: /run is a tmpfs that systemd carries across the
switch to the real root, so the record describes exactly this boot and vanishes at shutdown.
It holds no secret: which token and key unwrapped, when, and how long it took.

    {"version": 1, "device": "/dev/nvme0n1p1", "luks_uuid": "...", "mapper": "/dev/mapper/root",
     "unlocked_at": "2026-11-28T04:39:22Z", "seconds": 1.84, "provider": "aws-kms",
     "key_id": "arn:aws:kms:...", "region": "eu-west-1", "keyslot": 0, "attempts": 1}

It is written atomically (a temporary file in the same folder, fsync, rename), so a reader sees
the old record or the new one, never half of one. Writing is best effort: a boot never fails
because the record could not be written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import EncryptrootfsError
from .log import get_logger
from .token import KmsToken, utc_now

log = get_logger("unlock_record")

DEFAULT_PATH = Path("/run/encryptrootfs/last-unlock.json")
RECORD_VERSION = 1


class UnlockRecordError(EncryptrootfsError):
    """The record exists but cannot be understood (damaged, or from a newer encryptrootfs)."""


@dataclass(frozen=True)
class UnlockRecord:
    """One unlock of one device."""

    device: str  # the LUKS2 device that was opened
    luks_uuid: str
    mapper: str  # /dev/mapper/<name>
    unlocked_at: str  # ISO 8601 UTC, whole seconds (token.utc_now)
    seconds: float  # from the start of the unwrap to the mapping being open
    provider: str  # the token's provider, e.g. aws-kms
    key_id: str  # the key that unwrapped (the token's key ARN)
    region: str
    keyslot: int  # the keyslot that opened
    attempts: Optional[int] = None  # unwrap rounds the boot needed, when known
    version: int = RECORD_VERSION

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_for(
    device: str,
    luks_uuid: str,
    mapper: str,
    token: KmsToken,
    seconds: float,
    *,
    attempts: Optional[int] = None,
    unlocked_at: Optional[str] = None,
) -> UnlockRecord:
    """The record of an unlock by ``token`` (the token that unwrapped)."""
    return UnlockRecord(
        device=device,
        luks_uuid=luks_uuid,
        mapper=mapper,
        unlocked_at=unlocked_at or utc_now(),
        seconds=round(seconds, 3),
        provider=token.wrapped.provider.value,
        key_id=token.wrapped.key_id,
        region=token.wrapped.region,
        keyslot=int(token.keyslots[0]),
        attempts=attempts,
    )


def write(record: UnlockRecord, path: Path = DEFAULT_PATH) -> bool:
    """Store ``record`` atomically at ``path``; False (and a warning) when it could not be.

    Never raises for an I/O failure: the record is information, and the root is already open
    when it is written.
    """
    data = json.dumps(record.as_dict(), indent=2, sort_keys=True).encode() + b"\n"
    tmp: Optional[str] = None
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        # Not tempfile: it would pull shutil and random into the initramfs for one name.
        tmp = str(path.with_name(f".{path.name}.{os.getpid()}"))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.warning("could not record the unlock in %s: %s", path, exc.strerror or exc)
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return True


def read(path: Path = DEFAULT_PATH) -> Optional[UnlockRecord]:
    """The record at ``path``; None when there is none (this boot did not unlock through
    encryptrootfs, or the system has not been rebooted since it was installed)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnlockRecordError(f"The unlock record {path} cannot be read: {exc.strerror}.") \
            from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UnlockRecordError(f"The unlock record {path} is not valid JSON.") from None
    return parse(obj, str(path))


def parse(obj: Any, where: str = "the unlock record") -> UnlockRecord:
    """An :class:`UnlockRecord` from its JSON object; unknown fields are ignored."""
    if not isinstance(obj, Mapping):
        raise UnlockRecordError(f"{where} is not a JSON object.")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UnlockRecordError(f"{where}: version must be a whole number >= 1.")
    if version > RECORD_VERSION:
        raise UnlockRecordError(
            f"{where} has version {version}; this encryptrootfs reads version "
            f"{RECORD_VERSION}.",
            hint="the initramfs is newer than the installed encryptrootfs: upgrade it",
        )

    def text(name: str) -> str:
        value = obj.get(name)
        if not isinstance(value, str) or not value:
            raise UnlockRecordError(f"{where}: {name} must be a non-empty string.")
        return value

    def whole(name: str, optional: bool = False) -> Optional[int]:
        value = obj.get(name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UnlockRecordError(f"{where}: {name} must be a whole number >= 0.")
        return value

    device, luks_uuid, mapper = text("device"), text("luks_uuid"), text("mapper")
    seconds = obj.get("seconds")
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds) or seconds < 0):
        raise UnlockRecordError(f"{where}: seconds must be a number >= 0.")
    keyslot = whole("keyslot")
    assert keyslot is not None
    return UnlockRecord(
        device=device,
        luks_uuid=luks_uuid,
        mapper=mapper,
        unlocked_at=text("unlocked_at"),
        seconds=float(seconds),
        provider=text("provider"),
        key_id=text("key_id"),
        region=text("region"),
        keyslot=keyslot,
        attempts=whole("attempts", optional=True),
        version=version,
    )
