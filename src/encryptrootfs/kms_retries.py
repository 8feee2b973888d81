"""The one KMS retry loop: round after round over the wrapped copies, until a time budget.

Each attempt already has the provider's own budget (``providers.aws_kms.total_timeout``: the
SDK's retries, its connect and read timeouts); around it, a round tries every wrapped copy in
order, and rounds repeat with backoff (1 s doubling to 15 s) until the caller's budget
(``[boot] unlock_timeout``). An error the key service says is final (access denied, context
mismatch, disabled key) drops that copy at once; when none is left, that is the answer. Used
by the boot (root unlock, first-boot custody) and by ``volumes up``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Callable, Optional, TypeVar

from .errors import EncryptrootfsError, KeyServiceError

T = TypeVar("T")

# Backoff between rounds: short at first (the network may just be coming up), capped so that
# a recovering KMS is seen within 15 s.
FIRST_DELAY = 1.0
MAX_DELAY = 15.0


class RetriesStopped(Exception):
    """``with_kms_retries`` was told to stop (the root was opened another way)."""


def with_kms_retries(
    budget: float,
    what: str,
    attempts: Sequence[tuple[str, Callable[[], T]]],
    *,
    outcome: str,
    report: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    network_up: Optional[Callable[[float], bool]] = None,
    stop: Optional[threading.Event] = None,
    on_round_failed: Optional[Callable[[EncryptrootfsError], None]] = None,
) -> T:
    """The result of the first of ``attempts`` that succeeds, round after round, until
    ``budget`` seconds have passed; ``report`` hears one line per failed attempt.

    ``network_up(deadline)`` (the boot's) is waited for first. ``on_round_failed`` hears the
    last error after every round in which all attempts failed (the recovery prompt starts on
    the first); ``stop`` set ends the retries between two attempts with
    :class:`RetriesStopped`."""
    deadline = clock() + budget
    if network_up is not None and not network_up(deadline):
        report(f"no network after {budget:g} s; trying KMS once anyway")
    attempt = 0
    delay = FIRST_DELAY
    last: Optional[EncryptrootfsError] = None
    alive = list(attempts)
    final: list[KeyServiceError] = []
    while True:
        attempt += 1
        for label, action in list(alive):
            if stop is not None and stop.is_set():
                raise RetriesStopped()
            try:
                result = action()
                if stop is None or not stop.is_set():
                    report(f"{label}: done on attempt {attempt}")
                return result
            except KeyServiceError as exc:
                if stop is not None and stop.is_set():
                    # The root is open already: nothing more to say (and a thread that still
                    # writes to the console while the boot process exits could block its exit).
                    raise RetriesStopped() from None
                last = exc
                report(f"{label}: attempt {attempt} failed: {exc.message}")
                if not exc.retryable:
                    alive.remove((label, action))
                    final.append(exc)
        if not alive:
            if len(final) == 1:
                raise KeyServiceError(f"{final[0].message} {outcome}", hint=final[0].hint)
            raise KeyServiceError(
                f"Could not {what}: every wrapped copy was refused: "
                + " / ".join(e.message for e in final)
                + f" {outcome}",
                hint=final[0].hint,
            )
        assert last is not None
        if on_round_failed is not None:
            on_round_failed(last)
        remaining = deadline - clock()
        if remaining <= 0:
            break
        sleep(min(delay, remaining))
        delay = min(delay * 2, MAX_DELAY)
    assert last is not None
    raise KeyServiceError(
        f"Could not {what} within {budget:g} s ({attempt} attempts): {last.message} {outcome}",
        hint=last.hint,
    )
