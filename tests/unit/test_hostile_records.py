"""Records on any attached disk are hostile input: a sentence or "no record", never a traceback
(security review 2, M2)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import devices, plan_record
from encryptrootfs.devices import Partition


def _slot(body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest().encode()
    raw = plan_record.MAGIC + len(body).to_bytes(4, "big") + digest + body
    return raw.ljust(plan_record.SLOT_SIZE, b"\x00")


def _good() -> dict[str, Any]:
    return {
        "version": plan_record.VERSION,
        "luks_uuid": "5f2c7d1e-8a4b-4c3d-9e6f-0a1b2c3d4e5f",
        "partition_size": 1 << 30,
        "fs_type": "ext4",
        "fs_uuid": "u",
        "fs_label": "",
        "head_sha256": "0" * 64,
        "token": {"type": "encryptrootfs"},
    }


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'"x"',
        b"null",
        b"\xff\xfe",
        json.dumps({**_good(), "partition_size": 1e999}).encode(),
        json.dumps({**_good(), "partition_size": -4096}).encode(),
        json.dumps({**_good(), "partition_size": True}).encode(),
        json.dumps({**_good(), "partition_size": 1 << 70}).encode(),
        json.dumps({**_good(), "luks_uuid": ["x"]}).encode(),
        json.dumps({**_good(), "token": "x"}).encode(),
        json.dumps({**_good(), "fs_label": 7}).encode(),
    ],
)
def test_a_crafted_plan_record_is_no_record(body: bytes) -> None:
    assert plan_record.decode(_slot(body)) is None


def test_a_whole_plan_record_still_decodes() -> None:
    record = plan_record.decode(_slot(json.dumps(_good()).encode()))
    assert record is not None and record.partition_size == 1 << 30


def test_a_device_whose_probe_raises_is_skipped_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name, number in (("vda1", 1), ("vdb1", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "partition").write_text(f"{number}\n")
    monkeypatch.setattr(
        devices, "list_partitions", lambda _: [("vda1", "vda", 1), ("vdb1", "vdb", 1)]
    )
    good = object()

    def facts(name: str, disk: str, number: int, sys_block: Path) -> Any:
        if name == "vdb1":
            raise AttributeError("'list' object has no attribute 'get'")
        return good

    monkeypatch.setattr(devices, "partition_facts", facts)
    with caplog.at_level(logging.WARNING):
        found: list[Partition] = devices.gather(tmp_path)
    assert found == [good]
    assert "skipping /dev/vdb1: it could not be read (AttributeError)" in caplog.text
