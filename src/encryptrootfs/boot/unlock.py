"""Later boots: unwrap the key through KMS and open the root; fail closed when that cannot be.

The network in an initramfs comes up in its own time and KMS or IMDS may not answer at once.
Each unwrap attempt has the provider's own budget (``total_timeout``); around it, attempts are
repeated with backoff until ``[boot] unlock_timeout`` has passed, with one console line per
attempt that says why. Past the budget the boot stops: the root is never mounted unencrypted
and nothing on disk has changed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, TypeVar

from .. import unlock_record
from ..config import Config
from ..errors import EncryptrootfsError, KeyServiceError
from ..providers import provider_for_token
from ..providers.base import wipe
from ..token import KmsToken
from .console import say
from .devices import Partition
from .grow import grow_root
from .network import wait_for_network
from .volume import data_pass, open_root

T = TypeVar("T")


def with_kms_retries(
    config: Config,
    what: str,
    attempts: Sequence[tuple[str, Callable[[], T]]],
    *,
    outcome: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    route_table: Optional[Path] = None,
) -> T:
    """The result of the first of ``attempts`` that succeeds, round after round, until the
    boot budget; one console line per failed attempt. Errors KMS says are final (access
    denied, context mismatch, disabled key) are raised at once."""
    budget = config.boot.unlock_timeout
    deadline = clock() + budget
    if not wait_for_network(config, deadline, clock=clock, sleep=sleep, route_table=route_table):
        say(f"no network after {budget:g} s; trying KMS once anyway")
    attempt = 0
    delay = 1.0
    last: Optional[EncryptrootfsError] = None
    # An attempt KMS refused for good (denied, context mismatch, disabled key) is dropped;
    # the others (another wrapped copy, say) go on. When none is left, that is the answer.
    alive = list(attempts)
    final: list[KeyServiceError] = []
    while True:
        attempt += 1
        for label, action in list(alive):
            try:
                result = action()
                say(f"{label}: done on attempt {attempt}")
                return result
            except KeyServiceError as exc:
                last = exc
                say(f"{label}: attempt {attempt} failed: {exc.message}")
                if not exc.retryable:
                    alive.remove((label, action))
                    final.append(exc)
        if not alive:
            if len(final) == 1:
                raise KeyServiceError(f"{final[0].message} {outcome}", hint=final[0].hint)
            raise KeyServiceError(
                f"Could not {what}: every wrapped copy was refused: "
                + " / ".join(e.message for e in final) + f" {outcome}",
                hint=final[0].hint)
        remaining = deadline - clock()
        if remaining <= 0:
            break
        sleep(min(delay, remaining))
        delay = min(delay * 2, 15.0)
    assert last is not None
    raise KeyServiceError(
        f"Could not {what} within {budget:g} s ({attempt} attempts): {last.message} {outcome}",
        hint=last.hint,
    )


def unwrap_with_retries(
    config: Config,
    tokens: Sequence[KmsToken],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    route_table: Optional[Path] = None,
) -> tuple[bytearray, KmsToken]:
    """The key of the first token that unwraps, trying each in order, until the boot budget."""

    def unwrap(token: KmsToken) -> Callable[[], tuple[bytearray, KmsToken]]:
        return lambda: (provider_for_token(config, token.wrapped).unwrap(token.wrapped), token)

    attempts = [(f"unwrap with {t.wrapped.key_id} ({t.wrapped.region})", unwrap(t))
                for t in tokens]
    return with_kms_retries(
        config, "unwrap the root key", attempts, clock=clock, sleep=sleep,
        route_table=route_table,
        outcome="The root stays locked and nothing on disk was changed.")


def unwrap_and_open(part: Partition, config: Config, tokens: Sequence[KmsToken],
                    *, resume: bool = False) -> str:
    """Later boots: unwrap (with retries), finish an interrupted data pass if any, open."""
    started = time.monotonic()
    key, token = unwrap_with_retries(config, tokens)
    unwrapped = time.monotonic()
    try:
        if resume:
            data_pass(part.path, key)
        opening = time.monotonic()
        mapper = open_root(part.path, config, key, token)
        if part.luks is not None:
            # For `encryptrootfs status`; the data pass is not part of the unlock's cost.
            seconds = (unwrapped - started) + (time.monotonic() - opening)
            unlock_record.write(unlock_record.record_for(
                part.path, part.luks.uuid, mapper, token, seconds))
        if config.first_boot.grow:
            grow_root(part, config.mapper_name, key)
        return mapper
    finally:
        wipe(key)
