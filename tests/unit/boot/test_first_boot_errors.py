"""An error that stops the first boot half way says what is on the disk so far."""

from __future__ import annotations

from typing import Any

import pytest

from encryptrootfs import luks2, plan_record
from encryptrootfs.boot import first_boot
from encryptrootfs.boot.filesystems import FsGeometry
from encryptrootfs.boot.first_boot import Preflight, RoomPlan
from encryptrootfs.boot.partitions import Table
from encryptrootfs.config import parse_config
from encryptrootfs.devices import Partition, Signature
from encryptrootfs.errors import EncryptrootfsError
from encryptrootfs.providers.base import NewKey, ProviderName, WrappedKey

MIB = 1024 * 1024
CONFIG = parse_config({"providers": {"aws_kms": {"key_id": "alias/root"}}}, source="test")
PART = Partition(
    path="/dev/vda1",
    name="vda1",
    disk="/dev/vda",
    number=1,
    start=MIB,
    size=512 * MIB,
    disk_size=1024 * MIB,
    logical_sector=512,
    partuuid="",
    partlabel="",
    signature=Signature("ext4", "u"),
)


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    pre = Preflight(
        FsGeometry("ext4", 512 * MIB, 4096, 100 * MIB, 4096),
        RoomPlan(grow_partition_to=544 * MIB),
        Table("gpt", 512, 0, ()),
        "11111111-2222-3333-4444-555555555555",
    )
    key = NewKey(
        bytearray(b"k" * 64), WrappedKey(ProviderName.AWS_KMS, "arn:k", "eu-west-1", b"c", {})
    )
    monkeypatch.setattr(first_boot, "preflight", lambda part, config: pre)
    monkeypatch.setattr(first_boot, "with_kms_retries", lambda *a, **k: key)
    monkeypatch.setattr(first_boot, "make_room", lambda part, pre: 544 * MIB)
    monkeypatch.setattr(plan_record, "head_sha256", lambda dev: "0" * 64)
    monkeypatch.setattr(plan_record, "write", lambda dev, rec: None)
    return {"key": key}


def fail(*args: Any, **kwargs: Any) -> Any:
    raise EncryptrootfsError("cryptsetup failed.")


def test_failure_after_making_room_says_only_the_room_was_made(
    monkeypatch: pytest.MonkeyPatch, stages: dict[str, Any]
) -> None:
    monkeypatch.setattr(luks2, "reencrypt_encrypt_init", fail)
    with pytest.raises(EncryptrootfsError) as e:
        first_boot.encrypt(PART, CONFIG, provider=None)  # type: ignore[arg-type]
    assert "only the room for the header was made (grow the partition to 544 MiB)" in str(e.value)
    assert "next boot" in str(e.value)
    assert stages["key"].plaintext == bytearray(64)  # wiped on the way out


def test_failure_after_the_header_says_no_data_is_encrypted(
    monkeypatch: pytest.MonkeyPatch, stages: dict[str, Any]
) -> None:
    monkeypatch.setattr(luks2, "reencrypt_encrypt_init", lambda *a, **k: 0)
    monkeypatch.setattr(first_boot, "store_token", fail)
    with pytest.raises(EncryptrootfsError, match="header was written, no data is encrypted"):
        first_boot.encrypt(PART, CONFIG, provider=None)  # type: ignore[arg-type]
