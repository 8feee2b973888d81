"""The last unlock, as the initramfs saw it: a small JSON record for ``encryptrootfs status``.

The initramfs writes it right after the root is opened; ``status`` on the running system reads
it. It lives under ``/run/encryptrootfs/``: /run is a tmpfs that systemd carries across the
switch to the real root, so the record describes exactly this boot and vanishes at shutdown.
It holds no secret: how the root was opened (``method``: a key unwrapped by KMS, or the
recovery key typed at the console), which token and key unwrapped, when, and how long it took.

    {"version": 1, "method": "kms", "device": "/dev/nvme0n1p1", "luks_uuid": "...",
     "mapper": "/dev/mapper/root", "unlocked_at": "2026-11-28T04:39:22Z", "seconds": 1.84,
     "provider": "aws-kms", "key_id": "arn:aws:kms:...", "region": "eu-west-1", "keyslot": 0,
     "attempts": 1}

    {"version": 2, "method": "recovery-key", "device": "/dev/nvme0n1p1", "luks_uuid": "...",
     "mapper": "/dev/mapper/root", "unlocked_at": "2026-11-28T04:41:07Z", "seconds": 95.2,
     "provider": null, "key_id": null, "region": null, "keyslot": 1, "attempts": null}

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
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from .errors import EncryptrootfsError
from .log import get_logger
from .token import KmsToken, utc_now

log = get_logger("unlock_record")

DEFAULT_PATH = Path("/run/encryptrootfs/last-unlock.json")
# The newest version this module reads. Version 2 added ``method`` and the recovery-key record,
# whose provider, key_id and region are null: a version-1 reader would call that record damaged
# ("provider must be a non-empty string"), so it is written as version 2 and such a reader says
# "upgrade" instead. A KMS record means exactly what it meant in version 1 (``method`` is a
# field a version-1 reader ignores), so it is still written as version 1: an older
# encryptrootfs on the running system keeps reading what a newer initramfs wrote. A record
# without ``method`` (written before version 2) is a KMS unlock.
RECORD_VERSION = 2


class UnlockRecordError(EncryptrootfsError):
    """The record exists but cannot be understood (damaged, or from a newer encryptrootfs)."""


class UnlockMethod(str, Enum):
    KMS = "kms"  # a token's key, unwrapped by its key service
    RECOVERY_KEY = "recovery-key"  # the recovery key, typed at the console

    def __str__(self) -> str:
        return self.value


# The fields that describe the key service's unwrap; a recovery-key unlock has none of them.
KMS_FIELDS = ("provider", "key_id", "region", "attempts")


@dataclass(frozen=True)
class UnlockRecord:
    """One unlock of one device."""

    device: str  # the LUKS2 device that was opened
    luks_uuid: str
    mapper: str  # /dev/mapper/<name>
    unlocked_at: str  # ISO 8601 UTC, whole seconds (token.utc_now)
    # From the start of the unlock to the mapping being open. For a recovery-key unlock that
    # includes the KMS attempts before the question, the time the person took to answer and,
    # when an interrupted encryption was finished on the way, its data pass.
    seconds: float
    provider: Optional[str]  # the token's provider, e.g. aws-kms; None for a recovery key
    key_id: Optional[str]  # the key that unwrapped (the token's key ARN); None for a recovery key
    region: Optional[str]  # None for a recovery key
    keyslot: int  # the keyslot that opened
    attempts: Optional[int] = None  # unwrap rounds the boot needed, when known
    method: UnlockMethod = UnlockMethod.KMS

    @property
    def version(self) -> int:
        """The oldest record version that holds this record (see RECORD_VERSION)."""
        return 1 if self.method is UnlockMethod.KMS else 2

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "method": self.method.value, "version": self.version}


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


def recovery_record_for(
    device: str,
    luks_uuid: str,
    mapper: str,
    keyslot: int,
    seconds: float,
    *,
    unlocked_at: Optional[str] = None,
) -> UnlockRecord:
    """The record of an unlock by the recovery key typed at the console into ``keyslot``."""
    return UnlockRecord(
        device=device,
        luks_uuid=luks_uuid,
        mapper=mapper,
        unlocked_at=unlocked_at or utc_now(),
        seconds=round(seconds, 3),
        provider=None,
        key_id=None,
        region=None,
        keyslot=int(keyslot),
        attempts=None,
        method=UnlockMethod.RECOVERY_KEY,
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
        raise UnlockRecordError(
            f"The unlock record {path} cannot be read: {exc.strerror}."
        ) from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UnlockRecordError(f"The unlock record {path} is not valid JSON.") from None
    return parse(obj, str(path))


def parse(obj: Any, where: str = "the unlock record") -> UnlockRecord:
    """An :class:`UnlockRecord` from its JSON object; unknown fields are ignored, a missing
    ``method`` is ``kms`` (records written before version 2)."""
    if not isinstance(obj, Mapping):
        raise UnlockRecordError(f"{where} is not a JSON object.")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UnlockRecordError(f"{where}: version must be a whole number >= 1.")
    if version > RECORD_VERSION:
        raise UnlockRecordError(
            f"{where} has version {version}; this encryptrootfs reads version {RECORD_VERSION}.",
            hint="the initramfs is newer than the installed encryptrootfs: upgrade it",
        )

    raw_method = obj.get("method", UnlockMethod.KMS.value)
    try:
        method = UnlockMethod(raw_method)
    except ValueError:
        known = ", ".join(m.value for m in UnlockMethod)
        raise UnlockRecordError(
            f"{where}: method must be one of {known}, not {json.dumps(raw_method)}."
        ) from None
    if method is UnlockMethod.RECOVERY_KEY:
        # Nothing was unwrapped: a value here means the record is not what it claims to be.
        for name in KMS_FIELDS:
            if obj.get(name) is not None:
                raise UnlockRecordError(f"{where}: {name} must be null for a recovery-key unlock.")

    def text(name: str) -> str:
        value = obj.get(name)
        if not isinstance(value, str) or not value:
            raise UnlockRecordError(f"{where}: {name} must be a non-empty string.")
        return value

    def kms_text(name: str) -> Optional[str]:
        return text(name) if method is UnlockMethod.KMS else None

    def whole(name: str, optional: bool = False) -> Optional[int]:
        value = obj.get(name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UnlockRecordError(f"{where}: {name} must be a whole number >= 0.")
        return value

    device, luks_uuid, mapper = text("device"), text("luks_uuid"), text("mapper")
    seconds = obj.get("seconds")
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise UnlockRecordError(f"{where}: seconds must be a number >= 0.")
    keyslot = whole("keyslot")
    assert keyslot is not None
    return UnlockRecord(
        device=device,
        luks_uuid=luks_uuid,
        mapper=mapper,
        unlocked_at=text("unlocked_at"),
        seconds=float(seconds),
        provider=kms_text("provider"),
        key_id=kms_text("key_id"),
        region=kms_text("region"),
        keyslot=keyslot,
        attempts=whole("attempts", optional=True),
        method=method,
    )
