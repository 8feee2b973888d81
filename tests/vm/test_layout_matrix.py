"""Disk layouts: the matrix builds, and every disk's test tree verifies inside one guest.

ext4/xfs/btrfs x gpt/msdos x (no free space, 64 MiB free), plus one 4096-byte sector disk: the
disks are attached to a single boot (CI time), each mounted read-only and checked against its
manifest. Bootable xfs/btrfs roots and a separate /boot are `slow`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from encryptrootfs_lab.image import PLAIN, Image
from encryptrootfs_lab.layout import (
    Disk,
    DiskLayout,
    Filesystem,
    PartitionTable,
    build_disks,
    matrix_layouts,
    verify_disks_script,
    verify_root_script,
)
from encryptrootfs_lab.machine import Machine

NewMachine = Callable[..., Machine]
IMAGES = (PLAIN,)  # built with the session's others (tests/vm/conftest.py)
PTTYPE = {PartitionTable.GPT: "gpt", PartitionTable.MSDOS: "dos"}


def test_layout_matrix_builds_and_every_manifest_verifies_in_one_guest(
    plain_image: Image, root_disk: Disk, new_machine: NewMachine
) -> None:
    layouts = matrix_layouts()
    disks = build_disks(layouts, plain_image)
    assert {d.layout.fs for d in disks} == set(Filesystem)
    assert {d.layout.sector for d in disks} == {512, 4096}
    assert {d.layout.free_after_mib for d in disks} == {0, 64}
    m = new_machine(plain_image, root_disk)
    serials = [f"m{i}" for i in range(len(disks))]
    for serial, disk in zip(serials, disks):
        m.attach(disk, serial)
    r = m.boot(verify_disks_script(list(zip(serials, disks))), timeout=420)
    assert r.ok, r.describe()
    seen = {mk.fields()["serial"]: mk.fields() for mk in r.all("DISK")}
    ok = {mk.fields()["root"].split("/")[2]: mk.fields() for mk in r.all("TREE-OK")}
    fsck = {mk.fields()["name"]: mk.fields() for mk in r.all("FSCK")}
    problems = []
    for serial, disk in zip(serials, disks):
        lay = disk.layout
        info = seen.get(serial, {})
        want = {
            "fstype": lay.fs.value,
            "uuid": disk.root_uuid,
            "lbs": str(lay.sector),
            "pttype": PTTYPE[lay.table],
        }
        got = {k: info.get(k) for k in want}
        if got != want:
            problems.append(f"{lay.name}: expected {want}, guest saw {got}")
        if fsck.get(serial, {}).get("rc") != "0":
            problems.append(f"{lay.name}: read-only fsck not clean: {fsck.get(serial)}")
        tree = ok.get(serial)
        if tree is None or tree["manifest"] != disk.manifest_sha:
            problems.append(f"{lay.name}: test tree did not verify ({tree})")
    assert not problems, "\n".join(problems) + "\n" + r.describe(20)


BOOTABLE = {
    "xfs-gpt": DiskLayout(fs=Filesystem.XFS),
    "btrfs-msdos": DiskLayout(fs=Filesystem.BTRFS, table=PartitionTable.MSDOS),
    "ext4-msdos-separate-boot-no-free": DiskLayout(
        separate_boot=True, table=PartitionTable.MSDOS, free_after_mib=0
    ),
    "xfs-gpt-4096-separate-boot": DiskLayout(fs=Filesystem.XFS, sector=4096, separate_boot=True),
}


@pytest.fixture(scope="module")
def bootable_disks(plain_image: Image) -> dict[str, Disk]:
    """All bootable layouts at once: the xfs/btrfs ones share one builder boot."""
    names = sorted(BOOTABLE)
    return dict(zip(names, build_disks([BOOTABLE[n] for n in names], plain_image)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BOOTABLE))
def test_bootable_layout_boots_and_verifies(
    plain_image: Image, new_machine: NewMachine, bootable_disks: dict[str, Disk], name: str
) -> None:
    disk = bootable_disks[name]
    layout = disk.layout
    m = new_machine(plain_image, disk)
    boot_check = 'echo "ERFS-BOOTMNT source=$(findmnt -no SOURCE /boot)"\n'
    r = m.boot(verify_root_script() + boot_check)
    assert r.ok, r.describe()
    root = r.marker("ROOT")
    assert root is not None
    assert root.fields()["uuid"] == disk.root_uuid
    assert root.fields()["fstype"] == layout.fs.value
    assert r.marker("TREE-OK") is not None, r.describe()
    bootmnt = r.marker("BOOTMNT")
    assert bootmnt is not None, r.describe()
    if layout.separate_boot:
        assert bootmnt.value == "source=/dev/vda1", r.describe()
    else:
        assert bootmnt.value == "source=", r.describe()
