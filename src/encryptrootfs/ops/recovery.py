"""The recovery key: a passphrase a person can type when the key service cannot be reached.

``encryptrootfs recovery-key add`` makes 8 groups of 5 characters from Crockford's base32
alphabet (no i, l, o, u: nothing to confuse), 200 bits of entropy, printed once, e.g.
``7kq2m-x9d4a-...``. The passphrase is exactly that text, dashes included, so it also opens the
device from any rescue system with plain ``cryptsetup open`` when typed as printed; the
encryptrootfs prompt also accepts it in upper case, without dashes, or with o/i/l for 0/1/1
(:func:`normalise`).

It gets a keyslot of its own with Argon2id, memory capped at 64 MiB so a small initramfs can
open it. The keyslot is authorised by the existing KMS-wrapped key (unwrapped through KMS); the
passphrase reaches cryptsetup through a pipe only. A token of type ``encryptrootfs-recovery``
names the keyslot, so ``recovery-key remove`` removes that keyslot and nothing else:

    {"type": "encryptrootfs-recovery", "keyslots": ["1"], "version": 1,
     "format": "crockford32-8x5", "created": "2026-...Z", "created_by": "encryptrootfs 0.1.0"}

Order: add = keyslot, then token, then the passphrase is tested against the keyslot (any
failure removes both again); remove = keyslot, then token (cryptsetup drops a killed keyslot
from the token's list, so a kill in between leaves an empty recovery token that the next
``remove`` takes away).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .. import __version__, luks2
from ..errors import DeviceError, EncryptrootfsError, RefusedError, VerifyError
from ..log import get_logger
from ..passphrase import FORMAT, new_passphrase
from ..providers.base import wipe
from ..token import (
    RECOVERY_TOKEN_TYPE,
    RECOVERY_TOKEN_VERSION,
    TOKEN_TYPE,
    read_tokens,
    utc_now,
)
from .enroll import ProviderFor, require_luks2, require_no_pending, unwrap_any

log = get_logger("recovery")


@dataclass(frozen=True)
class RecoveryAdded:
    device: str
    keyslot: int
    token_id: int
    memory_kib: Optional[int]
    passphrase: bytearray  # the caller prints it once and wipes it

    def __repr__(self) -> str:
        return (
            f"RecoveryAdded(device={self.device!r}, keyslot={self.keyslot}, "
            f"token_id={self.token_id}, memory_kib={self.memory_kib})"
        )


@dataclass(frozen=True)
class RecoveryRemoved:
    device: str
    keyslots: tuple[int, ...]
    token_ids: tuple[int, ...]


def recovery_tokens(header: luks2.LuksHeader) -> list[tuple[int, tuple[int, ...]]]:
    """(token id, keyslots) of every recovery token."""
    return list(read_tokens(header.tokens).recovery)


def recovery_token_json(keyslot: int) -> dict[str, Any]:
    return {
        "type": RECOVERY_TOKEN_TYPE,
        "keyslots": [str(keyslot)],
        "version": RECOVERY_TOKEN_VERSION,
        "format": FORMAT,
        "created": utc_now(),
        "created_by": f"encryptrootfs {__version__}",
    }


def add_recovery_key(
    device: str,
    provider_for: ProviderFor,
    *,
    memory_kib: int = luks2.RECOVERY_MEMORY_KIB,
    iter_time_ms: int = luks2.RECOVERY_ITER_TIME_MS,
) -> RecoveryAdded:
    """Add a recovery passphrase in a keyslot of its own; see the module text."""
    header = require_luks2(device)
    require_no_pending(device, header)
    existing = recovery_tokens(header)
    if existing:
        raise RefusedError(
            f"{device} already has a recovery key (token {existing[0][0]}); nothing was changed.",
            hint=f"remove it first with `encryptrootfs recovery-key remove {device}`",
        )
    key, _ = unwrap_any(device, header, provider_for)
    passphrase = new_passphrase()
    slot: Optional[int] = None
    token_id: Optional[int] = None
    try:
        slot = luks2.add_passphrase_keyslot(
            device,
            existing_key=key,
            passphrase=passphrase,
            memory_kib=memory_kib,
            iter_time_ms=iter_time_ms,
        )
        token_id = luks2.import_token(device, recovery_token_json(slot))
        written = luks2.read_header(device).keyslots.get(str(slot))
        if (
            written is None
            or written.kdf_type != luks2.RECOVERY_PBKDF
            or (written.memory or 0) > memory_kib
        ):
            raise VerifyError(
                f"cryptsetup wrote keyslot {slot} of {device} without Argon2id at most "
                f"{memory_kib} KiB; it was removed again."
            )
        if not luks2.test_keyslot(device, passphrase, slot):
            raise VerifyError(
                f"The new recovery keyslot {slot} of {device} does not open with the "
                "passphrase; it was removed again."
            )
        result = RecoveryAdded(device, slot, token_id, written.memory, passphrase)
        log.info("added a recovery key to %s: keyslot %d, token %d", device, slot, token_id)
        slot = token_id = None  # committed
        return result
    except BaseException:
        wipe(passphrase)
        raise
    finally:
        _undo(device, key, slot, token_id)
        wipe(key)


def _undo(device: str, key: bytearray, slot: Optional[int], token_id: Optional[int]) -> None:
    if token_id is not None:
        try:
            luks2.remove_token(device, token_id)
        except EncryptrootfsError as exc:
            log.error("could not remove token %d of %s after a failure: %s", token_id, device, exc)
    if slot is not None:
        try:
            luks2.kill_keyslot(device, slot, existing_key=key)
        except EncryptrootfsError as exc:
            log.error("could not remove keyslot %d of %s after a failure: %s", slot, device, exc)


def remove_recovery_key(device: str, provider_for: ProviderFor) -> RecoveryRemoved:
    """Remove the recovery keyslot(s) and their token(s), and nothing else.

    The removal is authorised by the KMS-wrapped key: cryptsetup checks that it opens another
    keyslot before it wipes the recovery one, so the device keeps a working key.
    """
    header = require_luks2(device)
    require_no_pending(device, header)
    found = recovery_tokens(header)
    if not found:
        raise DeviceError(
            f"{device} has no recovery key (no {RECOVERY_TOKEN_TYPE} token); nothing was changed.",
        )
    kms_slots = {
        int(s)
        for raw in header.tokens.values()
        if raw.get("type") == TOKEN_TYPE
        for s in raw.get("keyslots", ())
        if str(s).isdigit()
    }
    shared = sorted(kms_slots.intersection(s for _, slots in found for s in slots))
    if shared:
        raise RefusedError(
            f"Keyslot(s) {', '.join(map(str, shared))} of {device} are named by a recovery "
            "token and by a KMS token; nothing was changed.",
            hint="the header was edited by hand: inspect it with `encryptrootfs status`",
        )
    key, _ = unwrap_any(device, header, provider_for)
    killed: list[int] = []
    try:
        for token_id, slots in found:
            for slot in slots:
                if str(slot) in header.keyslots:
                    luks2.kill_keyslot(device, slot, existing_key=key)
                    killed.append(slot)
            luks2.remove_token(device, token_id)
    finally:
        wipe(key)
    log.info("removed the recovery key of %s: keyslot(s) %s", device, killed)
    return RecoveryRemoved(device, tuple(killed), tuple(t for t, _ in found))
