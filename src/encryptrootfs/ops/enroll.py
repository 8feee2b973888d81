"""Key custody on an existing LUKS2 device: enroll a KMS-wrapped key, verify what is enrolled.

Order matters (DESIGN.md invariant 3): the wrapped key is proven to unwrap *before* it gets a
keyslot, and the keyslot is proven to open with it *after* the token is written. Whatever fails
half-way is rolled back, so the device is left as it was found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import __version__, luks2
from ..errors import DeviceError, EncryptrootfsError, RefusedError, VerifyError
from ..log import get_logger
from ..providers import KeyProvider
from ..providers.base import KeyWrapper, WrappedKey, new_proven_key, prove_round_trip, wipe
from ..run import Secret
from ..token import TOKEN_TYPE, KmsToken, read_tokens, token_from_json, token_to_json, utc_now

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
    """Every token but our damaged ones, which :func:`damaged_tokens` names (the policy of
    :func:`encryptrootfs.token.read_tokens`: skipped and named, never fatal)."""
    return [
        FoundToken(t.id, t.type, t.token) for t in read_tokens(header.tokens).all if not t.damaged
    ]


def damaged_tokens(header: luks2.LuksHeader) -> tuple[str, ...]:
    """``token N: why`` for each encryptrootfs token that cannot be read."""
    return read_tokens(header.tokens).damaged


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
    # Proven before the key is trusted with a keyslot.
    new = new_proven_key(provider, header.uuid, unchanged=f"nothing was changed on {device}")
    slot: Optional[int] = None
    token_id: Optional[int] = None
    try:
        slot = luks2.add_keyslot(
            device, existing_key=existing_key, new_key=new.plaintext, keyslot=keyslot
        )
        token = KmsToken(keyslots=(str(slot),), wrapped=new.wrapped, created=utc_now())
        token_id = luks2.import_token(device, token_to_json(token))
        if not luks2.test_keyslot(device, new.plaintext, slot):
            raise VerifyError(f"The new keyslot {slot} of {device} does not open with the key.")
        log.info(
            "enrolled %s: keyslot %d, token %d, key %s", device, slot, token_id, new.wrapped.key_id
        )
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
    for found in read_tokens(header.tokens).all:
        if found.damaged is not None:
            # Skipped and named, as the boot does: it cannot unlock, so it does not verify.
            slots = tuple(str(s) for s in found.keyslots)
            results.append(VerifyResult(found.id, slots, "?", False, found.why_skipped()))
        elif found.token is None:
            log.debug("token %d: foreign type %r, skipped", found.id, found.type)
        else:
            results.append(_verify_one(device, provider, found.id, found.token, header_path))
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
            s
            for s in token.keyslots
            if not luks2.test_keyslot(device, key, int(s), header=header_path)
        ]
    finally:
        wipe(key)
    if bad:
        return result(False, f"the unwrapped key does not open keyslot(s) {', '.join(bad)}")
    return result(True, "unwrapped through KMS and opened keyslot(s) " + ", ".join(token.keyslots))


def all_ok(results: Sequence[VerifyResult]) -> bool:
    return bool(results) and all(r.ok for r in results)


# --- several wrapped copies of one key --------------------------------------------------------
#
# A token's key opens its keyslot(s); another token may hold the same key wrapped by another
# KMS key or region, naming the same keyslot(s), so that any one of them unlocks. The keyslot
# and the volume key are never touched: a copy is one token import, and removing a copy is
# one token removal, each of which leaves a device that opens with the tokens it has.

# Which provider unwraps a token; in the CLI, providers.provider_for_token with the config.
ProviderFor = Callable[[WrappedKey], KeyProvider]


@dataclass(frozen=True)
class Copied:
    device: str
    source_token_id: int
    token_id: int
    keyslots: tuple[str, ...]
    wrapped: WrappedKey
    reused: bool = False  # an identical copy was already in the header (a resumed rewrap)


def our_tokens(header: luks2.LuksHeader) -> list[FoundToken]:
    return [f for f in find_tokens(header) if f.token is not None]


def pick_token(device: str, header: luks2.LuksHeader, token_id: Optional[int]) -> FoundToken:
    """The token a copy or rewrap starts from: ``token_id``, or the only one there is."""
    ours = our_tokens(header)
    if token_id is not None:
        for found in ours:
            if found.token_id == token_id:
                return found
        raise DeviceError(
            f"{device} has no encryptrootfs token {token_id}; nothing was changed.",
            hint=f"`encryptrootfs token show {device}` lists them",
        )
    if not ours:
        raise VerifyError(
            f"{device} has no encryptrootfs token; nothing was changed.",
            hint=f"enroll one with `encryptrootfs enroll {device}`",
        )
    if len(ours) > 1:
        ids = ", ".join(str(f.token_id) for f in ours)
        raise RefusedError(
            f"{device} has several encryptrootfs tokens ({ids}); nothing was changed.",
            hint="say which one with --token-id N",
        )
    return ours[0]


def require_no_pending(device: str, header: luks2.LuksHeader) -> None:
    if header.reencryption_pending:
        raise RefusedError(
            f"The in-place encryption of {device} has not finished; its tokens and keyslots "
            "are changed only after it has. Nothing was changed.",
            hint="boot the machine (the initramfs finishes the encryption), then run this again",
        )


def unwrap_token(device: str, found: FoundToken, provider_for: ProviderFor) -> bytearray:
    """The key of ``found``, unwrapped through its provider and proven to open its keyslots."""
    assert found.token is not None
    key = provider_for(found.token.wrapped).unwrap(found.token.wrapped)
    try:
        for slot in found.token.keyslots:
            if not luks2.test_keyslot(device, key, int(slot)):
                raise VerifyError(
                    f"Token {found.token_id} of {device} unwraps to a key that does not open "
                    f"its keyslot {slot}; nothing was changed.",
                    hint=f"`encryptrootfs token verify {device}` checks every token",
                )
    except BaseException:
        wipe(key)
        raise
    return key


def unwrap_any(
    device: str, header: luks2.LuksHeader, provider_for: ProviderFor
) -> tuple[bytearray, FoundToken]:
    """The key of the first encryptrootfs token that unwraps and opens its keyslots."""
    ours = our_tokens(header)
    if not ours:
        raise VerifyError(
            f"{device} has no encryptrootfs token, so there is no key to authorise the change; "
            "nothing was changed.",
            hint=f"enroll one with `encryptrootfs enroll {device}`",
        )
    failures = []
    for found in ours:
        try:
            return unwrap_token(device, found, provider_for), found
        except EncryptrootfsError as exc:
            log.warning("token %d of %s: %s", found.token_id, device, exc.message)
            failures.append(f"token {found.token_id}: {exc.message}")
    raise VerifyError(
        f"No encryptrootfs token of {device} unwrapped ({'; '.join(failures)}). Nothing was "
        "changed.",
        hint="`encryptrootfs kms check` shows credentials, region and key",
    )


def wrap_copy(key: bytearray, source: FoundToken, new_provider: KeyWrapper) -> WrappedKey:
    """``key`` wrapped by ``new_provider`` with the source token's context, round-trip proven.

    The context is the source token's (it binds the LUKS UUID, and maybe the instance), so a
    key policy written for this volume keeps matching.
    """
    assert source.token is not None
    wrapped = new_provider.wrap(key, source.token.wrapped.encryption_context)
    prove_round_trip(
        new_provider, wrapped, key, unchanged="the new copy was not stored; nothing was changed"
    )
    return wrapped


def copy_token(source: FoundToken, wrapped: WrappedKey) -> KmsToken:
    """The token for a new wrapped copy: same keyslots and filesystem names as ``source``."""
    assert source.token is not None
    return dataclasses.replace(
        source.token, wrapped=wrapped, created=utc_now(), created_by=f"encryptrootfs {__version__}"
    )


def find_same_copy(
    header: luks2.LuksHeader, source: FoundToken, wrapped: WrappedKey
) -> Optional[FoundToken]:
    """A token other than ``source`` already wrapped by the same key and region for the same
    keyslots (what an interrupted rewrap or copy leaves behind)."""
    assert source.token is not None
    for found in our_tokens(header):
        t = found.token
        assert t is not None
        if (
            found.token_id != source.token_id
            and t.keyslots == source.token.keyslots
            and t.wrapped.key_id == wrapped.key_id
            and t.wrapped.region == wrapped.region
        ):
            return found
    return None


def import_copy(device: str, source: FoundToken, wrapped: WrappedKey) -> int:
    """Store the new copy as a token of its own; its id."""
    return luks2.import_token(device, token_to_json(copy_token(source, wrapped)))


def verify_copy(device: str, token_id: int, provider_for: ProviderFor) -> None:
    """Read token ``token_id`` back from the header, unwrap it as a boot would, test its slots."""
    header = luks2.read_header(device)
    raw = header.tokens.get(str(token_id))
    token = token_from_json(raw) if raw is not None else None
    if token is None:
        raise VerifyError(f"Token {token_id} of {device} did not read back as written.")
    key = unwrap_token(device, FoundToken(token_id, TOKEN_TYPE, token), provider_for)
    wipe(key)


def enroll_copy(
    device: str,
    provider_for: ProviderFor,
    new_provider: KeyWrapper,
    *,
    token_id: Optional[int] = None,
) -> Copied:
    """Add a token holding the key of an existing token, wrapped by ``new_provider``'s key.

    Both tokens open the same keyslot(s); any one unlocks. The new token is proven to unwrap
    before it is stored and to open its keyslots after; if that fails it is removed again.
    """
    header = require_luks2(device)
    require_no_pending(device, header)
    source = pick_token(device, header, token_id)
    key = unwrap_token(device, source, provider_for)
    try:
        wrapped = wrap_copy(key, source, new_provider)
    finally:
        wipe(key)
    assert source.token is not None
    same = find_same_copy(header, source, wrapped)
    if same is not None or (source.token.wrapped.key_id, source.token.wrapped.region) == (
        wrapped.key_id,
        wrapped.region,
    ):
        existing = same.token_id if same is not None else source.token_id
        raise RefusedError(
            f"Token {existing} of {device} already wraps this key with {wrapped.key_id} in "
            f"{wrapped.region}; nothing was changed.",
        )
    new_id = import_copy(device, source, wrapped)
    try:
        verify_copy(device, new_id, provider_for)
    except BaseException:
        _roll_back(device, b"", None, new_id)
        raise
    log.info(
        "copied token %d of %s as token %d (%s in %s)",
        source.token_id,
        device,
        new_id,
        wrapped.key_id,
        wrapped.region,
    )
    return Copied(device, source.token_id, new_id, source.token.keyslots, wrapped)
