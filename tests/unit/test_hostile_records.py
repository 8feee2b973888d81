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
from encryptrootfs.errors import RefusedError


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


def _sysfs(tmp_path: Path) -> Path:
    """vda (GPT) with vda1 (the root), vdb (unpartitioned), md0, dm-0 (our mapping of vda1),
    dm-1 (someone else's), loop0."""
    sys_block = tmp_path / "sys"
    for name in ("vda", "vdb", "md0", "dm-0", "dm-1", "loop0"):
        (sys_block / name).mkdir(parents=True)
    (sys_block / "vda1").mkdir()
    (sys_block / "vda1" / "partition").write_text("1\n")
    for dm, uuid, slave in (("dm-0", "CRYPT-LUKS2-abc-root", "vda1"), ("dm-1", "LVM-x", "vdb")):
        (sys_block / dm / "dm").mkdir()
        (sys_block / dm / "dm" / "uuid").write_text(uuid + "\n")
        (sys_block / dm / "slaves").mkdir()
        (sys_block / dm / "slaves" / slave).mkdir()
    return sys_block


ROOT = Partition(
    path="/dev/vda1",
    name="vda1",
    disk="/dev/vda",
    number=1,
    start=1 << 20,
    size=1 << 30,
    disk_size=1 << 31,
    logical_sector=512,
    partuuid="p",
    partlabel="root",
    signature=devices.Signature("ext4", "f00d", "root"),
)


def test_whole_disks_md_and_dm_are_seen(tmp_path: Path) -> None:
    assert devices.whole_devices(_sysfs(tmp_path)) == ["dm-0", "dm-1", "md0", "vda", "vdb"]


@pytest.mark.parametrize("spec", ["UUID=F00D", "LABEL=root"])
def test_another_device_with_the_roots_file_system_is_refused(tmp_path: Path, spec: str) -> None:
    sys_block = _sysfs(tmp_path)
    same = devices.Signature("ext4", "f00d", "root")
    signatures = {
        "/dev/vda": devices.Signature(),  # a partition table: no file system of its own
        "/dev/vdb": same,  # an unpartitioned volume carrying the root's UUID and label
        "/dev/md0": devices.Signature(),
        "/dev/dm-0": same,  # our own open mapping of the root: never a competitor
        "/dev/dm-1": same,
    }
    found = devices.competing_devices(spec, ROOT, sys_block, signatures.__getitem__)
    assert found == ["/dev/dm-1", "/dev/vdb"]
    with pytest.raises(RefusedError, match=r"also the file system on /dev/dm-1, /dev/vdb"):
        devices.refuse_competitors(spec, ROOT, found)
    devices.refuse_competitors(spec, ROOT, [])  # nothing else: no refusal
    assert devices.competing_devices("PARTUUID=p", ROOT, sys_block, signatures.__getitem__) == []


def test_a_device_that_cannot_be_probed_is_skipped_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def signature(path: str) -> devices.Signature:
        if path == "/dev/vdb":
            raise ValueError("crafted")
        return devices.Signature()

    with caplog.at_level(logging.WARNING):
        assert devices.competing_devices("UUID=f00d", ROOT, _sysfs(tmp_path), signature) == []
    assert "skipping /dev/vdb: it could not be probed (ValueError)" in caplog.text
