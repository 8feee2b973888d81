"""Later boots: unwrap the key through KMS and open the root; fail closed when that cannot be.

The network in an initramfs comes up in its own time and KMS or IMDS may not answer at once.
Each unwrap attempt has the provider's own budget (``total_timeout``); around it, attempts are
repeated with backoff until ``[boot] unlock_timeout`` has passed, with one console line per
attempt that says why. Past the budget the boot stops: the root is never mounted unencrypted
and nothing on disk has changed.

When the header also holds a recovery key (``encryptrootfs recovery-key add``) and
``[boot] recovery_prompt`` is on, the retries run on a thread of their own: once a whole round
of attempts has failed (each attempt already had its own retries and budget, so KMS is
clearly failing, not just slow), or KMS refused for good, the console asks for the recovery
key through systemd's password agents while the retries go on. Whichever comes first opens
the root; KMS answering withdraws the question. After the budget the retries stop and the
question stays, so a person at the console can still open the root: the root stays locked
until then.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

from .. import kms_retries, luks2, unlock_record
from ..config import Config
from ..devices import Partition
from ..errors import EncryptrootfsError, VerifyError
from ..kms_retries import RetriesStopped
from ..log import get_logger
from ..passphrase import normalise
from ..providers import provider_for_token
from ..providers.base import wipe
from ..token import KmsToken, not_for_volume, order_tokens, read_tokens
from . import ask_password
from .console import say
from .grow import grow_root
from .integration import Integration
from .systemd_initrd import DracutSystemd
from .volume import data_pass, open_root

T = TypeVar("T")
log = get_logger("boot.unlock")


def with_kms_retries(
    config: Config,
    what: str,
    attempts: Sequence[tuple[str, Callable[[], T]]],
    *,
    outcome: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    route_table: Optional[Path] = None,
    stop: Optional[threading.Event] = None,
    on_round_failed: Optional[Callable[[EncryptrootfsError], None]] = None,
    integration: Optional[Integration] = None,
) -> T:
    """:func:`encryptrootfs.kms_retries.with_kms_retries` as the boot runs it: within
    ``[boot] unlock_timeout``, after the integration's network wait, one console line per
    failed attempt."""
    net = integration or DracutSystemd(route_table=route_table)
    return kms_retries.with_kms_retries(
        config.boot.unlock_timeout,
        what,
        attempts,
        outcome=outcome,
        report=say,
        clock=clock,
        sleep=sleep,
        network_up=lambda deadline: net.network_up(config, deadline, clock=clock, sleep=sleep),
        stop=stop,
        on_round_failed=on_round_failed,
    )


def unwrap_with_retries(
    config: Config,
    tokens: Sequence[KmsToken],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    route_table: Optional[Path] = None,
    stop: Optional[threading.Event] = None,
    on_round_failed: Optional[Callable[[EncryptrootfsError], None]] = None,
    integration: Optional[Integration] = None,
) -> tuple[bytearray, KmsToken]:
    """The key of the first token that unwraps, trying each in order, until the boot budget."""

    def unwrap(token: KmsToken) -> Callable[[], tuple[bytearray, KmsToken]]:
        return lambda: (provider_for_token(config, token.wrapped).unwrap(token.wrapped), token)

    attempts = [(copy_label(t), unwrap(t)) for t in tokens]
    return with_kms_retries(
        config,
        "unwrap the root key",
        attempts,
        clock=clock,
        sleep=sleep,
        route_table=route_table,
        stop=stop,
        on_round_failed=on_round_failed,
        outcome="The root stays locked and nothing on disk was changed.",
        integration=integration,
    )


def tokens_for_volume(device: str, luks_uuid: str, tokens: Sequence[KmsToken]) -> list[KmsToken]:
    """The tokens made for this volume; each other one is named on the console and skipped
    before any KMS request. None left: a sentence, the root stays locked."""
    kept: list[KmsToken] = []
    refused: list[str] = []
    for token in tokens:
        why = not_for_volume(token, luks_uuid)
        if why is None:
            kept.append(token)
        else:
            refused.append(why)
            say(f"{device}: skipping the token for {token.wrapped.key_id}: {why}")
    if tokens and not kept:
        raise VerifyError(
            f"{device}: no encryptrootfs token in this header belongs to it ({refused[0]}); "
            "the header was copied from or edited by another volume's. KMS was not asked.",
            hint="open the volume with the recovery key if one was added; "
            "the root stays locked and nothing on disk was changed",
        )
    return kept


def copy_label(token: KmsToken) -> str:
    return f"unwrap with {token.wrapped.key_id} ({token.wrapped.region})"


def ordered_copies(config: Config, tokens: Sequence[KmsToken]) -> list[KmsToken]:
    """The wrapped copies in the order the boot tries them: ``[boot] prefer_regions`` first,
    then header order. Said on the console when there is a choice."""
    ordered = order_tokens(tokens, config.boot.prefer_regions)
    if len(ordered) > 1:
        say(
            "wrapped copies, in the order tried: "
            + ", ".join(f"{t.wrapped.region} ({t.wrapped.key_id})" for t in ordered)
        )
    return ordered


def unwrap_and_open(
    part: Partition,
    config: Config,
    tokens: Sequence[KmsToken],
    *,
    resume: bool = False,
    integration: Optional[Integration] = None,
) -> str:
    """Later boots: unwrap (with retries), finish an interrupted data pass if any, open.

    With ``[boot] recovery_prompt`` (the default) and a recovery key enrolled, the console
    asks for the recovery key as soon as a whole round of unwrap attempts has failed, while
    the retries go on in the background: whichever comes first opens the root.
    """
    chosen: Integration = integration or DracutSystemd()
    if part.luks is not None:
        tokens = tokens_for_volume(part.path, part.luks.uuid, tokens)
    ordered = ordered_copies(config, tokens)
    started = time.monotonic()
    if config.boot.recovery_prompt:
        won = unwrap_or_recover(
            part, config, ordered, resume=resume, ask=chosen.ask, integration=chosen
        )
        if isinstance(won, str):
            return won
        key, token = won
    else:
        key, token = unwrap_with_retries(config, ordered, integration=chosen)
    unwrapped = time.monotonic()
    try:
        if resume:
            data_pass(part.path, key)
        opening = time.monotonic()
        mapper = open_root(part.path, config, key, token)
        if part.luks is not None:
            # For `encryptrootfs status`; the data pass is not part of the unlock's cost.
            seconds = (unwrapped - started) + (time.monotonic() - opening)
            unlock_record.write(
                unlock_record.record_for(part.path, part.luks.uuid, mapper, token, seconds),
                chosen.record_path,
            )
        if config.first_boot.grow:
            grow_root(part, config.mapper_name, key)
        return mapper
    finally:
        wipe(key)


# --------------------------------------------------------------------------------------------
# KMS in the background, the recovery key on the console


Unwrapped = tuple[bytearray, KmsToken]
# (stop, on_round_failed) -> the unwrapped key: unwrap_with_retries with its tokens
Unwrapper = Callable[[threading.Event, Callable[[EncryptrootfsError], None]], Unwrapped]


class KmsRace:
    """The KMS unwrap on a thread of its own, and what it has come to so far.

    Only the boot's main thread opens the root; this thread only unwraps. A key that arrives
    after the root was opened with the recovery key is wiped (``abandon``).
    """

    def __init__(self, unwrap: Unwrapper) -> None:
        self._unwrap = unwrap
        self._cond = threading.Condition()
        self.stop = threading.Event()
        self.got_key = threading.Event()
        self._key: Optional[Unwrapped] = None
        self.error: Optional[BaseException] = None
        self.failing: Optional[EncryptrootfsError] = None  # the first failed round's last error
        self.finished = False
        self.prompting = False
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="kms-unwrap", daemon=True)

    def start(self) -> KmsRace:
        self._thread.start()
        return self

    def _round_failed(self, exc: EncryptrootfsError) -> None:
        with self._cond:
            if self.failing is None:
                self.failing = exc
                self._cond.notify_all()

    def _run(self) -> None:
        try:
            result = self._unwrap(self.stop, self._round_failed)
        except RetriesStopped:
            result = None
        except BaseException as exc:  # handed to the main thread, which raises it
            with self._cond:
                self.error = exc
                self.finished = True
                prompting = self.prompting
                self._cond.notify_all()
            if prompting and isinstance(exc, EncryptrootfsError):
                say(f"{exc.message} The recovery key typed on the console still opens it.")
            return
        with self._cond:
            if result is not None and self._abandoned:
                wipe(result[0])
            elif result is not None:
                self._key = result
                self.got_key.set()
            self.finished = True
            self._cond.notify_all()

    def wait_for_news(self, timeout: Optional[float] = None) -> None:
        """Until a key, a final error, or a first failed round."""
        with self._cond:
            self._cond.wait_for(lambda: self.finished or self.failing is not None, timeout)

    def wait_finished(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.finished)

    def take_key(self) -> Optional[Unwrapped]:
        with self._cond:
            key, self._key = self._key, None
            return key

    def start_prompting(self) -> None:
        """From now on a final KMS failure is said on the console by this thread."""
        with self._cond:
            self.prompting = True

    def abandon(self) -> None:
        """The root is open another way: stop retrying, wipe a key that is or will be here."""
        self.stop.set()
        with self._cond:
            self._abandoned = True
            if self._key is not None:
                wipe(self._key[0])
                self._key = None


def recovery_keyslots(device: str) -> tuple[int, ...]:
    """The keyslots named by ``encryptrootfs-recovery`` tokens (the only ones the prompt
    tries); () when there are none or the header cannot be read."""
    try:
        header = luks2.read_header(device)
    except EncryptrootfsError as exc:
        log.debug("cannot read the header of %s for a recovery key: %s", device, exc)
        return ()
    slots = {
        s
        for _, named in read_tokens(header.tokens).recovery
        for s in named
        if str(s) in header.keyslots
    }
    return tuple(sorted(slots))


def open_with_recovery_key(
    part: Partition,
    config: Config,
    passphrase: bytearray,
    slots: Sequence[int],
    *,
    resume: bool = False,
) -> Optional[tuple[str, int]]:
    """(mapper, keyslot) when ``passphrase`` opens one of ``slots``; None when it opens none.

    The passphrase reaches cryptsetup on stdin only. With a data pass pending, the keyslot is
    tested first, the pass finished, then the root opened.
    """
    for slot in slots:
        try:
            if resume:
                if not luks2.test_keyslot(part.path, passphrase, slot):
                    continue
                data_pass(part.path, passphrase)
            mapper = luks2.open_device(part.path, config.mapper_name, passphrase, keyslot=slot)
        except VerifyError:
            continue  # not this keyslot's passphrase
        return mapper, slot
    return None


AskPassword = Callable[[ask_password.Question, threading.Event], Optional[bytearray]]


def unwrap_or_recover(
    part: Partition,
    config: Config,
    tokens: Sequence[KmsToken],
    *,
    resume: bool = False,
    unwrap: Optional[Unwrapper] = None,
    ask: AskPassword = ask_password.ask,
    slots_of: Callable[[str], tuple[int, ...]] = recovery_keyslots,
    integration: Optional[Integration] = None,
) -> Union[Unwrapped, str]:
    """The KMS key (``(key, token)``), or the mapper path when the recovery key opened the
    root first.

    KMS runs in the background from the start. When a whole round of attempts has failed (or
    KMS refused for good) and the header has a recovery key, the console asks for it, and goes
    on asking after a wrong one; KMS answering first withdraws the question. Without a
    recovery key this is :func:`unwrap_with_retries`: the same retries, the same error.
    """
    started = time.monotonic()  # for the unlock record of a recovery-key unlock
    if unwrap is None:

        def unwrap(
            stop: threading.Event, failed: Callable[[EncryptrootfsError], None]
        ) -> Unwrapped:
            return unwrap_with_retries(
                config, tokens, stop=stop, on_round_failed=failed, integration=integration
            )

    race = KmsRace(unwrap).start()
    race.wait_for_news()
    key = race.take_key()
    if key is not None:
        return key
    slots = slots_of(part.path)
    if not slots:
        race.wait_finished()
        key = race.take_key()
        if key is not None:
            return key
        assert race.error is not None
        raise race.error
    race.start_prompting()
    why = race.error if race.error is not None else race.failing
    reason = why.message if isinstance(why, EncryptrootfsError) else str(why)
    say(
        f"{part.path}: KMS is failing ({reason}); asking for the recovery key on the console"
        + ("" if race.finished else "; KMS retries go on in the background")
    )
    question = ask_password.Question(
        f"Recovery key for {part.path} (the root, {config.mapper_name}):",
        id=f"encryptrootfs:{part.path}",
    )
    while True:
        typed = ask(question, race.got_key)
        if typed is None:
            key = race.take_key()
            if key is not None:
                say("KMS answered; the recovery key prompt was withdrawn")
                return key
            continue
        try:
            passphrase = normalise(typed)
        except ValueError as exc:
            say(f"That is not a recovery key ({exc}); try again.")
            continue
        finally:
            wipe(typed)
        try:
            say(f"{part.path}: trying the recovery key")
            opened = open_with_recovery_key(part, config, passphrase, slots, resume=resume)
            if opened is None:
                say(f"That recovery key does not open {part.path}; try again.")
                continue
            mapper, slot = opened
            seconds = time.monotonic() - started
            race.abandon()
            say(f"{part.path}: opened with the recovery key (keyslot {slot}) as {mapper}")
            if part.luks is not None:
                # For `encryptrootfs status`: a boot the recovery key opened means KMS failed,
                # which the operator should look into. Best effort, as on the KMS path.
                unlock_record.write(
                    unlock_record.recovery_record_for(
                        part.path, part.luks.uuid, mapper, slot, seconds
                    ),
                    (integration or DracutSystemd()).record_path,
                )
            if config.first_boot.grow:
                grow_root(part, config.mapper_name, passphrase)
            return mapper
        finally:
            wipe(passphrase)
