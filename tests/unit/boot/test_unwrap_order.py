"""``[boot] prefer_regions``: the order the boot tries the wrapped copies, and which one won."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import unlock_record
from encryptrootfs.boot import systemd_initrd, unlock
from encryptrootfs.config import Config, parse_config
from encryptrootfs.devices import LuksFacts, Partition, Signature
from encryptrootfs.errors import KeyServiceError
from encryptrootfs.providers.base import CONTEXT_LUKS_UUID, ProviderName, WrappedKey
from encryptrootfs.token import KmsToken


def token(region: str) -> KmsToken:
    context = {CONTEXT_LUKS_UUID: "u"}  # the header UUID of part() below
    return KmsToken(
        ("0",), WrappedKey(ProviderName.AWS_KMS, f"arn:{region}", region, b"c", context)
    )


US, EU, AP = token("us-east-1"), token("eu-west-1"), token("ap-south-1")


def config(prefer: list[str]) -> Config:
    return parse_config(
        {
            "providers": {"aws_kms": {"key_id": "alias/root"}},
            "boot": {"prefer_regions": prefer, "unlock_timeout": 30},
        },
        source="test",
    )


def part(tokens: tuple[KmsToken, ...]) -> Partition:
    return Partition(
        path="/dev/vda1",
        name="vda1",
        disk="/dev/vda",
        number=1,
        start=0,
        size=1 << 30,
        disk_size=1 << 31,
        logical_sector=512,
        partuuid="",
        partlabel="",
        signature=Signature("crypto_LUKS", "u", "", "2"),
        luks=LuksFacts("u", 2, False, tokens, ("0",)),
    )


def written(monkeypatch: pytest.MonkeyPatch) -> list[unlock_record.UnlockRecord]:
    """The unlock records the boot wrote (never the host's /run)."""
    records: list[unlock_record.UnlockRecord] = []

    def write(record: unlock_record.UnlockRecord, path: Any = None) -> bool:
        records.append(record)
        return True

    monkeypatch.setattr(unlock_record, "write", write)
    return records


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [
        ([], [US, EU, AP]),
        (["eu-west-1"], [EU, US, AP]),
        (["ap-south-1", "eu-west-1"], [AP, EU, US]),
        (["sa-east-1"], [US, EU, AP]),  # a region no copy is in changes nothing
    ],
)
def test_preferred_regions_come_first_then_header_order(
    prefer: list[str], expected: list[KmsToken], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="encryptrootfs"):
        assert unlock.ordered_copies(config(prefer), [US, EU, AP]) == expected
    order = ", ".join(f"{t.wrapped.region} (arn:{t.wrapped.region})" for t in expected)
    assert f"wrapped copies, in the order tried: {order}" in caplog.text


def test_a_single_copy_is_not_announced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="encryptrootfs"):
        assert unlock.ordered_copies(config(["eu-west-1"]), [US]) == [US]
    assert "in the order tried" not in caplog.text


class RegionalKms:
    """A provider whose regions in ``down`` do not answer; records the order of calls."""

    def __init__(self, down: set[str]) -> None:
        self.down = down
        self.calls: list[str] = []

    def unwrap(self, wrapped: WrappedKey) -> bytearray:
        self.calls.append(wrapped.region)
        if wrapped.region in self.down:
            raise KeyServiceError(f"KMS in {wrapped.region} did not answer.", retryable=True)
        return bytearray(b"k" * 64)


@pytest.mark.parametrize(
    ("prefer", "down", "calls", "won"),
    [
        (["eu-west-1"], set(), ["eu-west-1"], "eu-west-1"),
        (["eu-west-1"], {"eu-west-1"}, ["eu-west-1", "us-east-1"], "us-east-1"),
        ([], set(), ["us-east-1"], "us-east-1"),
    ],
)
def test_the_boot_tries_copies_in_the_configured_order_and_records_the_winner(
    prefer: list[str],
    down: set[str],
    calls: list[str],
    won: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kms = RegionalKms(down)
    monkeypatch.setattr(unlock, "provider_for_token", lambda cfg, wrapped: kms)
    monkeypatch.setattr(systemd_initrd, "wait_for_network", lambda *a, **k: True)
    opened: list[Any] = []

    def open_root(dev: str, cfg: Config, key: bytearray, tok: KmsToken) -> str:
        opened.append(tok)
        return "/dev/mapper/root"

    monkeypatch.setattr(unlock, "open_root", open_root)
    records = written(monkeypatch)
    with caplog.at_level("INFO", logger="encryptrootfs"):
        mapper = unlock.unwrap_and_open(part((US, EU)), config(prefer), [US, EU])
    assert mapper == "/dev/mapper/root"
    assert kms.calls == calls
    assert [t.wrapped.region for t in opened] == [won]
    assert records[0].region == won
    assert f"unwrap with arn:{won} ({won}): done on attempt 1" in caplog.text


class FakeIntegration:
    """Another initramfs generator's side: its own network wait, console and record path."""

    name = "test"

    def __init__(self, record_path: Path) -> None:
        self.record_path = record_path
        self.calls: list[str] = []

    def network_up(self, config: Config, deadline: float, *, clock: Any, sleep: Any) -> bool:
        self.calls.append("network_up")
        return True

    def network_down(self) -> None:
        self.calls.append("network_down")

    def ask(self, question: Any, cancel: Any) -> None:
        raise AssertionError("no question: KMS answers")

    def hand_back(self, mapper: Any) -> None:
        self.calls.append(f"hand_back {mapper}")

    def fail(self, error: Any) -> int:
        return 1


def test_the_boot_core_uses_only_the_integration_for_network_and_records(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kms = RegionalKms(set())
    monkeypatch.setattr(unlock, "provider_for_token", lambda cfg, wrapped: kms)

    def no_dracut_network(*a: Any, **k: Any) -> bool:
        raise AssertionError("the dracut network wait ran under another integration")

    monkeypatch.setattr(systemd_initrd, "wait_for_network", no_dracut_network)
    monkeypatch.setattr(unlock, "open_root", lambda dev, cfg, key, tok: "/dev/mapper/root")
    fake = FakeIntegration(tmp_path / "run" / "last-unlock.json")
    assert unlock.unwrap_and_open(part((US,)), config([]), [US], integration=fake) == (
        "/dev/mapper/root"
    )
    assert fake.calls == ["network_up"]
    record = unlock_record.read(fake.record_path)
    assert record is not None and record.region == "us-east-1"
