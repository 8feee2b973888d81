"""Console progress lines, network wait and the unlock retry budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from encryptrootfs.boot import network, unlock
from encryptrootfs.boot.console import ProgressPrinter, progress_line
from encryptrootfs.config import parse_config
from encryptrootfs.errors import KeyServiceError
from encryptrootfs.luks2 import ReencryptProgress
from encryptrootfs.providers.base import ProviderName, WrappedKey
from encryptrootfs.token import KmsToken

MIB = 1024 * 1024


def test_progress_line_has_percent_speed_and_eta() -> None:
    line = progress_line("/dev/vda1", ReencryptProgress(256 * MIB, 1024 * MIB, 32.0, 24.0))
    assert line == ("encrypting /dev/vda1:  25.0% (256 of 1024 MiB), 32.0 MiB/s, about 24 s left")


def test_progress_printer_rate_limits_but_prints_the_end() -> None:
    now = [0.0]
    lines: list[str] = []
    printer = ProgressPrinter("/dev/x", interval=5, clock=lambda: now[0], emit=lines.append)
    for done in range(10, 101, 10):  # one call a second, t = 1..10
        now[0] += 1
        printer(ReencryptProgress(done * MIB, 100 * MIB, 10.0, None))
    # t=1 (first), t=6 (5 s later), t=10: only 4 s later, but the pass is finished.
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == ["10.0", "60.0", "100.0"]


ROUTE_HEAD = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
# The lab's DHCP gives the link's subnet and no router: 169.254.169.0/24 on ens3.
LINK_ONLY = ROUTE_HEAD + "ens3\t00A9FEA9\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
DEFAULT = ROUTE_HEAD + "eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
LOOPBACK = ROUTE_HEAD + "lo\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"


@pytest.mark.parametrize(
    ("table", "address", "expected"),
    [
        (LINK_ONLY, "169.254.169.254", True),
        (LINK_ONLY, "10.0.0.1", False),
        (DEFAULT, "169.254.169.254", True),
        (DEFAULT, None, True),
        (LOOPBACK, "169.254.169.254", False),
        (ROUTE_HEAD, None, False),
    ],
)
def test_route_detection(tmp_path: Path, table: str, address: str, expected: bool) -> None:
    path = tmp_path / "route"
    path.write_text(table)
    assert network.has_route_to(address, path) is expected


def test_missing_route_table_is_no_route(tmp_path: Path) -> None:
    assert not network.has_route_to(None, tmp_path / "missing")


CONFIG = parse_config(
    {"providers": {"aws_kms": {"key_id": "alias/root"}}, "boot": {"unlock_timeout": 30}},
    source="test",
)


def make_token(key_id: str) -> KmsToken:
    return KmsToken(("0",), WrappedKey(ProviderName.AWS_KMS, key_id, "us-east-1", b"c", {}))


class FakeProvider:
    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.calls = 0

    def unwrap(self, wrapped: WrappedKey) -> bytearray:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return bytearray(outcome)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.fixture
def route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    table = tmp_path / "route"
    table.write_text(DEFAULT)
    return table


def _patch(monkeypatch: pytest.MonkeyPatch, provider: FakeProvider) -> None:
    monkeypatch.setattr(unlock, "provider_for_token", lambda config, wrapped: provider)


def test_transient_failures_are_retried_then_succeed(
    monkeypatch: pytest.MonkeyPatch, route: Path, caplog: pytest.LogCaptureFixture
) -> None:
    transient = KeyServiceError("KMS did not answer.", retryable=True)
    provider = FakeProvider([transient, transient, b"k" * 64])
    _patch(monkeypatch, provider)
    clock = FakeClock()
    key, _ = unlock.unwrap_with_retries(
        CONFIG, [make_token("a")], clock=clock, sleep=clock.sleep, route_table=route
    )
    assert bytes(key) == b"k" * 64
    assert provider.calls == 3


def test_permanent_failure_fails_closed_at_once(
    monkeypatch: pytest.MonkeyPatch, route: Path
) -> None:
    denied = KeyServiceError("KMS denied access to the key.", retryable=False)
    provider = FakeProvider([denied])
    _patch(monkeypatch, provider)
    clock = FakeClock()
    with pytest.raises(KeyServiceError, match="denied"):
        unlock.unwrap_with_retries(
            CONFIG, [make_token("a")], clock=clock, sleep=clock.sleep, route_table=route
        )
    assert provider.calls == 1


def test_budget_exhausted_says_why_and_that_nothing_changed(
    monkeypatch: pytest.MonkeyPatch, route: Path
) -> None:
    transient = KeyServiceError("KMS endpoint unreachable.", retryable=True)
    provider = FakeProvider([transient] * 100)
    _patch(monkeypatch, provider)
    clock = FakeClock()
    with pytest.raises(KeyServiceError) as e:
        unlock.unwrap_with_retries(
            CONFIG, [make_token("a")], clock=clock, sleep=clock.sleep, route_table=route
        )
    assert "within 30 s" in e.value.message
    assert "unreachable" in e.value.message
    assert "nothing on disk was changed" in e.value.message
    assert clock.t <= 30 + 1e-9


def test_second_token_is_tried_when_the_first_fails(
    monkeypatch: pytest.MonkeyPatch, route: Path
) -> None:
    down = KeyServiceError("region down", retryable=True)
    provider = FakeProvider([down, b"x" * 64])
    _patch(monkeypatch, provider)
    clock = FakeClock()
    _, used = unlock.unwrap_with_retries(
        CONFIG,
        [make_token("a"), make_token("b")],
        clock=clock,
        sleep=clock.sleep,
        route_table=route,
    )
    assert used.wrapped.key_id == "b"


def test_a_copy_refused_for_good_is_dropped_and_the_next_one_unlocks(
    monkeypatch: pytest.MonkeyPatch, route: Path
) -> None:
    """Key A disabled (final), key B's region down once: B is retried, A never again."""
    disabled = KeyServiceError("KMS refused Decrypt: the key a is disabled.", retryable=False)
    down = KeyServiceError("region down", retryable=True)
    provider = FakeProvider([disabled, down, b"x" * 64])
    _patch(monkeypatch, provider)
    clock = FakeClock()
    _, used = unlock.unwrap_with_retries(
        CONFIG,
        [make_token("a"), make_token("b")],
        clock=clock,
        sleep=clock.sleep,
        route_table=route,
    )
    assert used.wrapped.key_id == "b"
    assert provider.calls == 3


def test_every_copy_refused_for_good_fails_at_once_naming_each(
    monkeypatch: pytest.MonkeyPatch, route: Path
) -> None:
    a = KeyServiceError("KMS denied Decrypt on a.", retryable=False)
    b = KeyServiceError("KMS refused Decrypt: the key b is disabled.", retryable=False)
    provider = FakeProvider([a, b])
    _patch(monkeypatch, provider)
    clock = FakeClock()
    with pytest.raises(KeyServiceError) as e:
        unlock.unwrap_with_retries(
            CONFIG,
            [make_token("a"), make_token("b")],
            clock=clock,
            sleep=clock.sleep,
            route_table=route,
        )
    assert "every wrapped copy was refused" in e.value.message
    assert "denied Decrypt on a" in e.value.message and "b is disabled" in e.value.message
    assert provider.calls == 2 and clock.t == 0


def test_no_network_is_said_and_bounded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = tmp_path / "route"
    table.write_text(ROUTE_HEAD)
    provider = FakeProvider([KeyServiceError("KMS endpoint unreachable.", retryable=True)] * 5)
    _patch(monkeypatch, provider)
    clock = FakeClock()
    with caplog.at_level("INFO", logger="encryptrootfs"), pytest.raises(KeyServiceError):
        unlock.unwrap_with_retries(
            CONFIG, [make_token("a")], clock=clock, sleep=clock.sleep, route_table=table
        )
    assert "waiting for the network (no route to 169.254.169.254 yet)" in caplog.text
    assert "no network after 30 s" in caplog.text
    assert provider.calls == 1
