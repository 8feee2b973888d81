"""The plan record survives a torn copy, rejects garbage, and restores a torn head."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from encryptrootfs import plan_record
from encryptrootfs.plan_record import HEAD_SIZE, SLOT_SIZE, PlanRecord

MIB = 1024 * 1024
SIZE = 64 * MIB


def make_record(size: int = SIZE) -> PlanRecord:
    return PlanRecord(
        luks_uuid="11111111-2222-3333-4444-555555555555",
        partition_size=size,
        fs_type="ext4",
        fs_uuid="f",
        fs_label="",
        head_sha256="0" * 64,
        token={"type": "encryptrootfs", "ciphertext": "Y2lwaGVy"},
    )


@pytest.fixture
def device(tmp_path: Path) -> str:
    path = tmp_path / "part.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return str(path)


def test_round_trip(device: str) -> None:
    rec = make_record()
    plan_record.write(device, rec)
    assert plan_record.read(device, SIZE) == rec


def test_record_sits_32_mib_before_the_end(device: str) -> None:
    plan_record.write(device, make_record())
    with open(device, "rb") as f:
        f.seek(SIZE - 32 * MIB)
        assert f.read(len(plan_record.MAGIC)) == plan_record.MAGIC


def test_a_torn_first_copy_falls_back_to_the_second(device: str) -> None:
    rec = make_record()
    plan_record.write(device, rec)
    with open(device, "r+b") as f:
        f.seek(rec.offset + 100)
        f.write(b"\xff" * 50)
    assert plan_record.read(device, SIZE) == rec


def test_both_copies_torn_is_no_record(device: str) -> None:
    rec = make_record()
    plan_record.write(device, rec)
    with open(device, "r+b") as f:
        for copy in range(2):
            f.seek(rec.offset + copy * SLOT_SIZE + 100)
            f.write(b"\xff" * 50)
    assert plan_record.read(device, SIZE) is None


def test_record_for_another_partition_size_is_ignored(device: str) -> None:
    plan_record.write(device, make_record())
    assert plan_record.read(device, SIZE - MIB) is None


def test_zeroes_are_no_record(device: str) -> None:
    assert plan_record.read(device, SIZE) is None


def test_erase(device: str) -> None:
    plan_record.write(device, make_record())
    plan_record.erase(device, SIZE)
    assert plan_record.read(device, SIZE) is None


def test_no_plaintext_field_exists() -> None:
    assert "plaintext" not in str(make_record().to_json()).lower()


def test_restore_head_copies_the_tail_back(device: str) -> None:
    head = os.urandom(HEAD_SIZE)
    with open(device, "r+b") as f:
        f.seek(SIZE - HEAD_SIZE)
        f.write(head)  # the moved copy, as cryptsetup leaves it
        f.seek(0)
        f.write(b"torn header" * 1000)
    plan_record.restore_head_from_moved_copy(device, SIZE)
    assert plan_record.head_sha256(device) == hashlib.sha256(head).hexdigest()
    assert plan_record.moved_copy_sha256(device, SIZE) == hashlib.sha256(head).hexdigest()


def test_oversized_record_is_refused() -> None:
    rec = PlanRecord("u", SIZE, "ext4", "f", "", "0" * 64, {"x": "y" * SLOT_SIZE})
    with pytest.raises(ValueError, match="does not fit"):
        plan_record.encode(rec)
