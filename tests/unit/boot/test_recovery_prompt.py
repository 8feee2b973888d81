"""KMS in the background, the recovery key on the console: who opens the root, and when.

The KMS side is a scripted unwrapper (it reports a failed round, then waits for the test to
let it answer or give up); the console is a scripted ``ask``; cryptsetup is a fake
``luks2.open_device`` that knows one passphrase for one keyslot; the unlock record is kept in
a list (``written``) instead of /run.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Callable, Optional, Union

import pytest

from encryptrootfs import luks2, unlock_record
from encryptrootfs.boot import unlock
from encryptrootfs.boot.ask_password import Question
from encryptrootfs.config import parse_config
from encryptrootfs.devices import LuksFacts, Partition, Signature
from encryptrootfs.errors import EncryptrootfsError, KeyServiceError, VerifyError
from encryptrootfs.kms_retries import RetriesStopped
from encryptrootfs.providers.base import ProviderName, WrappedKey
from encryptrootfs.token import KmsToken

RIGHT = "7kq2m-x9d4a-00000-11111-22222-33333-44444-55555"
WRONG = "00000-00000-00000-00000-00000-00000-00000-00000"
RECOVERY_SLOT = 1
CONFIG = parse_config({"providers": {"aws_kms": {"key_id": "alias/root"}}}, source="test")
TOKEN = KmsToken(("0",), WrappedKey(ProviderName.AWS_KMS, "arn:k", "eu-west-1", b"c", {}))
PART = Partition(
    path="/dev/vda1",
    name="vda1",
    disk="/dev/vda",
    number=1,
    start=1048576,
    size=1 << 30,
    disk_size=2 << 30,
    logical_sector=512,
    partuuid="",
    partlabel="",
    signature=Signature("crypto_LUKS", "u", "", "2"),
    luks=LuksFacts("u", 2, False, (TOKEN,), ("0", "1")),
)
DOWN = KeyServiceError("the connection to KMS at http://kms failed", retryable=True)


class ScriptedKms:
    """An unwrapper: reports one failed round, then waits until ``answer`` or ``give_up``."""

    def __init__(self, *, fail_first: bool = True) -> None:
        self.fail_first = fail_first
        self.release = threading.Event()
        self.outcome: Union[bytearray, BaseException, None] = None
        self.stopped = False
        self.delivered: Optional[bytearray] = None

    def answer(self, key: bytes) -> None:
        self.outcome = bytearray(key)
        self.release.set()

    def give_up(self, exc: BaseException) -> None:
        self.outcome = exc
        self.release.set()

    def __call__(
        self, stop: threading.Event, failed: Callable[[EncryptrootfsError], None]
    ) -> tuple[bytearray, KmsToken]:
        if not self.fail_first:
            self.delivered = bytearray(b"k" * 64)
            return self.delivered, TOKEN
        failed(DOWN)
        self.release.wait(10)
        if stop.is_set() and self.outcome is None:
            self.stopped = True
            raise RetriesStopped()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        assert self.outcome is not None
        self.delivered = self.outcome
        return self.outcome, TOKEN


class ScriptedConsole:
    """``ask``: each entry is typed text, or a callable run first (then it waits for the
    question to be withdrawn)."""

    def __init__(self, script: Sequence[Union[str, Callable[[], None]]]) -> None:
        self.script = list(script)
        self.questions: list[Question] = []
        self.withdrawn = 0

    def __call__(self, question: Question, withdraw: threading.Event) -> Optional[bytearray]:
        self.questions.append(question)
        if not self.script:
            raise AssertionError("asked once more than the test expected")
        step = self.script.pop(0)
        if callable(step):
            step()
            assert withdraw.wait(10), "the question was never withdrawn"
            self.withdrawn += 1
            return None
        return bytearray(step.encode())


@pytest.fixture(autouse=True)
def written(monkeypatch: pytest.MonkeyPatch) -> list[unlock_record.UnlockRecord]:
    """The unlock records the boot wrote (never the host's /run)."""
    records: list[unlock_record.UnlockRecord] = []

    def write(record: unlock_record.UnlockRecord, path: Any = None) -> bool:
        records.append(record)
        return True

    monkeypatch.setattr(unlock_record, "write", write)
    return records


@pytest.fixture
def cryptsetup(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """A fake ``luks2.open_device``: RIGHT opens RECOVERY_SLOT; returns what was tried."""
    tried: list[tuple[str, int]] = []

    def open_device(
        device: str, name: str, key: Any, *, keyslot: Optional[int] = None, header: Any = None
    ) -> str:
        assert isinstance(key, bytearray), "the passphrase must stay in a bytearray"
        assert keyslot is not None
        tried.append((bytes(key).decode(), keyslot))
        if bytes(key) != RIGHT.encode() or keyslot != RECOVERY_SLOT:
            raise VerifyError(f"No keyslot of `{device}` opened with this key.")
        return f"/dev/mapper/{name}"

    monkeypatch.setattr(luks2, "open_device", open_device)
    return tried


def race(
    kms: ScriptedKms, console: ScriptedConsole, slots: tuple[int, ...] = (RECOVERY_SLOT,)
) -> Union[tuple[bytearray, KmsToken], str]:
    asked_for_slots: list[str] = []

    def slots_of(device: str) -> tuple[int, ...]:
        asked_for_slots.append(device)
        return slots

    return unlock.unwrap_or_recover(
        PART, CONFIG, [TOKEN], unwrap=kms, ask=console, slots_of=slots_of
    )


def test_kms_answering_at_once_never_asks(cryptsetup: list[tuple[str, int]]) -> None:
    kms = ScriptedKms(fail_first=False)
    console = ScriptedConsole([])
    won = race(kms, console)
    assert isinstance(won, tuple) and won[1] is TOKEN and bytes(won[0]) == b"k" * 64
    assert console.questions == [] and cryptsetup == []


def test_wrong_key_is_said_and_asked_again_then_the_right_one_opens(
    cryptsetup: list[tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    kms = ScriptedKms()
    # typed as a person might: capitals, no dashes, an O for a 0
    typed_right = RIGHT.upper().replace("-", "").replace("0", "O", 1)
    console = ScriptedConsole([WRONG, typed_right])
    with caplog.at_level("INFO", logger="encryptrootfs"):
        won = race(kms, console)
    assert won == "/dev/mapper/root"
    assert cryptsetup == [(WRONG, RECOVERY_SLOT), (RIGHT, RECOVERY_SLOT)]
    assert len(console.questions) == 2
    assert console.questions[0].message.startswith("Recovery key for /dev/vda1")
    assert "KMS is failing (the connection to KMS at http://kms failed)" in caplog.text
    assert "KMS retries go on in the background" in caplog.text
    assert "That recovery key does not open /dev/vda1; try again." in caplog.text
    assert "opened with the recovery key (keyslot 1)" in caplog.text
    assert RIGHT not in caplog.text and WRONG not in caplog.text
    # the retries are told to stop; a key KMS delivers afterwards is wiped, never used
    kms.answer(b"late" * 16)
    for _ in range(100):
        if kms.delivered is not None:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.05)
    assert kms.delivered is not None and bytes(kms.delivered) == bytes(64)


def test_the_recovery_key_opening_the_root_is_recorded_for_status(
    cryptsetup: list[tuple[str, int]],
    written: list[unlock_record.UnlockRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A clock read at the start of the unlock (100.0) and when the root is open (195.25).
    ticks = iter([100.0, 195.25])
    monkeypatch.setattr(unlock, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    won = race(ScriptedKms(), ScriptedConsole([WRONG, RIGHT]), slots=(3, RECOVERY_SLOT))
    assert won == "/dev/mapper/root"
    (rec,) = written  # one record, for the key that opened: not for the wrong one
    assert rec.method is unlock_record.UnlockMethod.RECOVERY_KEY
    assert (rec.device, rec.luks_uuid, rec.mapper, rec.keyslot) == (
        PART.path,
        "u",
        "/dev/mapper/root",
        RECOVERY_SLOT,
    )
    assert (rec.provider, rec.key_id, rec.region, rec.attempts) == (None, None, None, None)
    assert rec.seconds == 95.25 and rec.unlocked_at.endswith("Z")
    assert RIGHT not in repr(rec.as_dict()) and RIGHT.replace("-", "") not in repr(rec)


def test_text_that_is_no_recovery_key_is_refused_without_cryptsetup(
    cryptsetup: list[tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    console = ScriptedConsole(["hello", RIGHT])
    with caplog.at_level("INFO", logger="encryptrootfs"):
        won = race(ScriptedKms(), console)
    assert won == "/dev/mapper/root"
    assert cryptsetup == [(RIGHT, RECOVERY_SLOT)]
    assert "That is not a recovery key (a recovery key is 8 groups of 5" in caplog.text


def test_kms_coming_back_withdraws_the_question(
    cryptsetup: list[tuple[str, int]],
    caplog: pytest.LogCaptureFixture,
    written: list[unlock_record.UnlockRecord],
) -> None:
    kms = ScriptedKms()
    console = ScriptedConsole([lambda: kms.answer(b"x" * 64)])
    with caplog.at_level("INFO", logger="encryptrootfs"):
        won = race(kms, console)
    assert isinstance(won, tuple) and bytes(won[0]) == b"x" * 64
    assert console.withdrawn == 1 and cryptsetup == []
    assert "KMS answered; the recovery key prompt was withdrawn" in caplog.text
    assert written == []  # the KMS unlock's record is unwrap_and_open's, once it has opened


def test_kms_giving_up_keeps_the_question_and_says_so(
    cryptsetup: list[tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    kms = ScriptedKms()
    budget = KeyServiceError(
        "Could not unwrap the root key within 120 s (9 attempts): down. "
        "The root stays locked and nothing on disk was changed."
    )
    gave_up = threading.Event()

    def give_up() -> None:
        kms.give_up(budget)
        gave_up.set()

    console = ScriptedConsole([RIGHT])
    with caplog.at_level("INFO", logger="encryptrootfs"):
        # KMS gives up before the key is typed: the typed key still opens the root
        original = console.__call__

        def ask(question: Question, withdraw: threading.Event) -> Optional[bytearray]:
            if not gave_up.is_set():
                give_up()
                for _ in range(200):
                    if "still opens it" in caplog.text:
                        break
                    threading.Event().wait(0.01)
            return original(question, withdraw)

        won = unlock.unwrap_or_recover(
            PART, CONFIG, [TOKEN], unwrap=kms, ask=ask, slots_of=lambda d: (RECOVERY_SLOT,)
        )
    assert won == "/dev/mapper/root"
    assert "within 120 s" in caplog.text
    assert "The recovery key typed on the console still opens it." in caplog.text


def test_kms_refusing_for_good_at_once_asks_without_background_retries(
    cryptsetup: list[tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    denied = KeyServiceError("KMS denied Decrypt.", retryable=False)

    def refuse(
        stop: threading.Event, failed: Callable[[EncryptrootfsError], None]
    ) -> tuple[bytearray, KmsToken]:
        raise denied

    with caplog.at_level("INFO", logger="encryptrootfs"):
        won = unlock.unwrap_or_recover(
            PART,
            CONFIG,
            [TOKEN],
            unwrap=refuse,
            ask=ScriptedConsole([RIGHT]),
            slots_of=lambda d: (RECOVERY_SLOT,),
        )
    assert won == "/dev/mapper/root"
    assert "KMS is failing (KMS denied Decrypt.); asking for the recovery key" in caplog.text
    assert "retries go on" not in caplog.text


def test_without_a_recovery_key_the_kms_error_stands(cryptsetup: list[tuple[str, int]]) -> None:
    kms = ScriptedKms()
    console = ScriptedConsole([])
    budget = KeyServiceError("Could not unwrap the root key within 120 s.")
    threading.Timer(0.05, lambda: kms.give_up(budget)).start()
    with pytest.raises(KeyServiceError, match="within 120 s"):
        race(kms, console, slots=())
    assert console.questions == [] and cryptsetup == []


def test_without_a_recovery_key_kms_coming_back_late_still_unlocks(
    cryptsetup: list[tuple[str, int]],
) -> None:
    kms = ScriptedKms()
    threading.Timer(0.05, lambda: kms.answer(b"y" * 64)).start()
    won = race(kms, ScriptedConsole([]), slots=())
    assert isinstance(won, tuple) and bytes(won[0]) == b"y" * 64


def test_only_the_recovery_tokens_keyslots_are_tried(cryptsetup: list[tuple[str, int]]) -> None:
    """A key typed is tried against the recovery keyslots only (here 3 then 1), never the
    KMS token's keyslot 0."""
    won = race(ScriptedKms(), ScriptedConsole([RIGHT]), slots=(3, RECOVERY_SLOT))
    assert won == "/dev/mapper/root"
    assert [slot for _, slot in cryptsetup] == [3, RECOVERY_SLOT]


def test_recovery_keyslots_come_from_recovery_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    header = SimpleNamespace(
        keyslots={"0": object(), "1": object(), "2": object()},
        tokens={
            "0": {"type": "encryptrootfs", "keyslots": ["0"]},
            "1": {"type": "encryptrootfs-recovery", "keyslots": ["2"]},
            "2": {"type": "encryptrootfs-recovery", "keyslots": ["5"]},  # wiped keyslot
            "3": {"type": "systemd-fido2", "keyslots": ["1"]},
        },
    )

    monkeypatch.setattr(luks2, "read_header", lambda device, header_=None: header)
    assert unlock.recovery_keyslots("/dev/vda1") == (2,)


def test_an_unreadable_header_means_no_recovery_key(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(device: str, header: Any = None) -> Any:
        raise EncryptrootfsError("luksDump failed")

    monkeypatch.setattr(luks2, "read_header", fail)
    assert unlock.recovery_keyslots("/dev/vda1") == ()
