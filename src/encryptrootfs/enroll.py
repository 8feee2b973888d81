"""Key custody on an existing LUKS2 device: enroll a KMS-wrapped key, verify what is enrolled.

Order matters (DESIGN.md invariant 3): the wrapped key is proven to unwrap *before* it gets a
keyslot, and the keyslot is proven to open with it *after* the token is written. Whatever fails
half-way is rolled back, so the device is left as it was found.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import luks2
from .errors import DeviceError, EncryptrootfsError, VerifyError
from .log import get_logger
from .providers import KeyProvider
from .providers.base import WrappedKey, wipe
from .run import Secret
from .token import KmsToken, token_from_json, token_to_json, utc_now

log = get_logger("enroll")


@dataclass(frozen=True)
class Enrolled:
    device: str
    keyslot: int
    token_id: int
    wrapped: WrappedKey


@dataclass(frozen=True)
class FoundToken:
    """A token in the header: ours (parsed) or a foreign one (type only)."""

    token_id: int
    type: str
    token: Optional[KmsToken]


@dataclass(frozen=True)
class VerifyResult:
    token_id: int
    keyslots: tuple[str, ...]
    key_id: str
    ok: bool
    reason: str


def same_key(a: Secret, b: Secret) -> bool:
    return hmac.compare_digest(bytes(a), bytes(b))


def require_luks2(device: str, header: Optional[Path] = None) -> luks2.LuksHeader:
    version = luks2.luks_version(str(header) if header else device)
    if version is None:
        raise DeviceError(
            f"{device} is not a LUKS device; nothing was changed.",
            hint="enroll works on a LUKS2 device; to encrypt a plain root in place, install "
            "encryptrootfs in the image and let the first boot do it",
        )
    if version != 2:
        raise DeviceError(
            f"{device} is LUKS{version}; tokens need LUKS2. Nothing was changed.",
            hint=f"convert it with `cryptsetup convert --type luks2 {device}` (back up first)",
        )
    return luks2.read_header(device, header=header)


def find_tokens(header: luks2.LuksHeader) -> list[FoundToken]:
    found = []
    for token_id, raw in sorted(header.tokens.items(), key=lambda kv: int(kv[0])):
        found.append(
            FoundToken(int(token_id), str(raw.get("type", "?")), token_from_json(raw))
        )
    return found


def enroll(
    device: str,
    provider: KeyProvider,
    existing_key: Secret,
    *,
    keyslot: Optional[int] = None,
) -> Enrolled:
    """Add a keyslot opened by a fresh KMS data key, and a token holding that key wrapped."""
    header = require_luks2(device)
    if not luks2.test_any_keyslot(device, existing_key):
        raise VerifyError(
            f"The existing key does not open any keyslot of {device}; nothing was changed.",
            hint="pass a passphrase or key file that unlocks the device today",
        )
    new = provider.new_key(header.uuid)
    slot: Optional[int] = None
    token_id: Optional[int] = None
    try:
        # Prove the round trip before the key is trusted with a keyslot.
        unwrapped = provider.unwrap(new.wrapped)
        try:
            if not same_key(unwrapped, new.plaintext):
                raise VerifyError(
                    "KMS returned a different key on unwrap; nothing was changed on "
                    f"{device}.",
                    hint="check that the endpoint really is AWS KMS (endpoint_url)",
                )
        finally:
            wipe(unwrapped)
        slot = luks2.add_keyslot(device, existing_key=existing_key, new_key=new.plaintext,
                                 keyslot=keyslot)
        token = KmsToken(keyslots=(str(slot),), wrapped=new.wrapped, created=utc_now())
        token_id = luks2.import_token(device, token_to_json(token))
        if not luks2.test_keyslot(device, new.plaintext, slot):
            raise VerifyError(f"The new keyslot {slot} of {device} does not open with the key.")
        log.info("enrolled %s: keyslot %d, token %d, key %s", device, slot, token_id,
                 new.wrapped.key_id)
        result = Enrolled(device, slot, token_id, new.wrapped)
        slot = token_id = None  # committed: nothing to roll back
        return result
    finally:
        new.wipe()
        _roll_back(device, existing_key, slot, token_id)


def _roll_back(
    device: str, existing_key: Secret, slot: Optional[int], token_id: Optional[int]
) -> None:
    if token_id is not None:
        try:
            luks2.remove_token(device, token_id)
        except EncryptrootfsError as exc:
            log.error("could not remove token %d of %s after a failure: %s", token_id, device, exc)
    if slot is not None:
        try:
            luks2.kill_keyslot(device, slot, existing_key=existing_key)
        except EncryptrootfsError as exc:
            log.error("could not remove keyslot %d of %s after a failure: %s", slot, device, exc)


def verify(
    device: str, provider: KeyProvider, *, header_path: Optional[Path] = None
) -> list[VerifyResult]:
    """Unwrap every encryptrootfs token and test its keyslots. Opens nothing, writes nothing."""
    header = require_luks2(device, header_path)
    results = []
    for found in find_tokens(header):
        if found.token is None:
            log.debug("token %d: foreign type %r, skipped", found.token_id, found.type)
            continue
        results.append(_verify_one(device, provider, found.token_id, found.token, header_path))
    if not results:
        raise VerifyError(
            f"{device} has no encryptrootfs token; nothing to verify.",
            hint=f"enroll one with `encryptrootfs enroll {device}`",
        )
    return results


def _verify_one(
    device: str,
    provider: KeyProvider,
    token_id: int,
    token: KmsToken,
    header_path: Optional[Path],
) -> VerifyResult:
    def result(ok: bool, reason: str) -> VerifyResult:
        return VerifyResult(token_id, token.keyslots, token.wrapped.key_id, ok, reason)

    try:
        key = provider.unwrap(token.wrapped)
    except EncryptrootfsError as exc:
        return result(False, exc.message)
    try:
        bad = [
            s for s in token.keyslots
            if not luks2.test_keyslot(device, key, int(s), header=header_path)
        ]
    finally:
        wipe(key)
    if bad:
        return result(False, f"the unwrapped key does not open keyslot(s) {', '.join(bad)}")
    return result(True, "unwrapped through KMS and opened keyslot(s) "
                  + ", ".join(token.keyslots))


def all_ok(results: Sequence[VerifyResult]) -> bool:
    return bool(results) and all(r.ok for r in results)
