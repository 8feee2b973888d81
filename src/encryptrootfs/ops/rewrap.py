"""``encryptrootfs rewrap``: the token's key, wrapped for another KMS key or region.

Only the wrapping changes: the key in the token (the keyslot's key) is unwrapped and wrapped
again under the new KMS key, the new token names the same keyslot(s), and the old token is
removed last. The volume key and the keyslots are never touched. The steps, in order:

1. ``unwrap``     the old token through KMS; the key is proven to open its keyslots
2. ``wrap``       KMS Encrypt under the new key with the old token's encryption context, and a
                  Decrypt round trip (nothing written yet)
3. ``import``     the new token is written next to the old one (one header update)
4. ``verify``     the new token is read back, unwrapped as a boot would, and opens its keyslots
5. ``remove-old`` the old token is removed (one header update)

Each header update is atomic (cryptsetup writes both header copies), so a kill at any instant
leaves either the old token alone, or both (each of which unwraps and opens), or the new one
alone: the device always unlocks. Running rewrap again after a kill between 3 and 5, with
``--token-id`` naming the old token, finds the new token already there, verifies it and
finishes.

Unwrap + Encrypt rather than KMS ReEncrypt: the new copy has to be unwrapped and tested against
its keyslot anyway before the old one goes (step 4), so ReEncrypt would save no Decrypt and
would need two more IAM permissions (kms:ReEncryptFrom / ReEncryptTo).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

from .. import luks2
from ..errors import RefusedError
from ..log import get_logger
from ..providers.base import KeyWrapper, WrappedKey, wipe
from .enroll import (
    FoundToken,
    ProviderFor,
    find_same_copy,
    import_copy,
    pick_token,
    require_luks2,
    require_no_pending,
    unwrap_token,
    verify_copy,
    wrap_copy,
)

log = get_logger("rewrap")

STEPS = ("unwrap", "wrap", "import", "verify", "remove-old")


@dataclass(frozen=True)
class Rewrapped:
    device: str
    old_token_id: int
    old_key_id: str
    old_region: str
    token_id: int
    keyslots: tuple[str, ...]
    wrapped: WrappedKey
    resumed: bool  # the new token was already in the header (a rewrap killed after step 3)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[], None]


class Rewrap:
    """One rewrap of one token, as separate steps (so a test can stop after any of them).

    Use :func:`rewrap` to run them all; use this as a context manager, so the key is wiped
    whatever happens.
    """

    def __init__(
        self,
        device: str,
        provider_for: ProviderFor,
        new_provider: KeyWrapper,
        *,
        token_id: Optional[int] = None,
    ) -> None:
        self.device = device
        self.provider_for = provider_for
        self.new_provider = new_provider
        header = require_luks2(device)
        require_no_pending(device, header)
        self.source: FoundToken = pick_token(device, header, token_id)
        self.key: Optional[bytearray] = None
        self.wrapped: Optional[WrappedKey] = None
        self.new_token_id: Optional[int] = None
        self.resumed = False

    @property
    def steps(self) -> tuple[Step, ...]:
        return (
            Step("unwrap", self._unwrap),
            Step("wrap", self._wrap),
            Step("import", self._import),
            Step("verify", self._verify),
            Step("remove-old", self._remove_old),
        )

    def _unwrap(self) -> None:
        self.key = unwrap_token(self.device, self.source, self.provider_for)

    def _wrap(self) -> None:
        assert self.key is not None and self.source.token is not None
        wrapped = wrap_copy(self.key, self.source, self.new_provider)
        old = self.source.token.wrapped
        if (old.key_id, old.region) == (wrapped.key_id, wrapped.region):
            raise RefusedError(
                f"Token {self.source.token_id} of {self.device} is already wrapped by "
                f"{wrapped.key_id} in {wrapped.region}; nothing was changed.",
            )
        self.wrapped = wrapped
        wipe(self.key)
        self.key = None

    def _import(self) -> None:
        assert self.wrapped is not None
        header = luks2.read_header(self.device)
        same = find_same_copy(header, self.source, self.wrapped)
        if same is not None:
            # A previous rewrap stopped after writing its token: keep that one (step 4 still
            # proves it) rather than adding a second identical copy.
            log.info(
                "token %d of %s already wraps the key with %s; reusing it",
                same.token_id,
                self.device,
                self.wrapped.key_id,
            )
            self.new_token_id = same.token_id
            self.resumed = True
            return
        self.new_token_id = import_copy(self.device, self.source, self.wrapped)

    def _verify(self) -> None:
        assert self.new_token_id is not None
        try:
            verify_copy(self.device, self.new_token_id, self.provider_for)
        except BaseException:
            if not self.resumed:
                # The old token is still there and still opens: take the unproven copy out.
                luks2.remove_token(self.device, self.new_token_id)
            raise

    def _remove_old(self) -> None:
        luks2.remove_token(self.device, self.source.token_id)
        log.info(
            "removed token %d of %s (was %s)",
            self.source.token_id,
            self.device,
            self.source.token.wrapped.key_id if self.source.token else "?",
        )

    def result(self) -> Rewrapped:
        assert self.wrapped is not None and self.new_token_id is not None
        assert self.source.token is not None
        old = self.source.token.wrapped
        return Rewrapped(
            self.device,
            self.source.token_id,
            old.key_id,
            old.region,
            self.new_token_id,
            self.source.token.keyslots,
            self.wrapped,
            self.resumed,
        )

    def close(self) -> None:
        if self.key is not None:
            wipe(self.key)
            self.key = None


@contextmanager
def planned(
    device: str,
    provider_for: ProviderFor,
    new_provider: KeyWrapper,
    *,
    token_id: Optional[int] = None,
) -> Iterator[Rewrap]:
    job = Rewrap(device, provider_for, new_provider, token_id=token_id)
    try:
        yield job
    finally:
        job.close()


def rewrap(
    device: str,
    provider_for: ProviderFor,
    new_provider: KeyWrapper,
    *,
    token_id: Optional[int] = None,
) -> Rewrapped:
    """Re-wrap a token's key for ``new_provider``'s key and region; see the module text."""
    with planned(device, provider_for, new_provider, token_id=token_id) as job:
        for step in job.steps:
            log.debug("rewrap %s: %s", device, step.name)
            step.run()
        return job.result()
