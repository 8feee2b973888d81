"""Where the 32 MiB for the header come from, and the table/filesystem facts behind it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs.boot import filesystems, partitions
from encryptrootfs.boot.filesystems import FsGeometry
from encryptrootfs.boot.first_boot import plan_room
from encryptrootfs.devices import Partition, Signature, cmdline_root, parse_export
from encryptrootfs.errors import RefusedError

MIB = 1024 * 1024


def part(size: int) -> Partition:
    return Partition(
        path="/dev/vda1",
        name="vda1",
        disk="/dev/vda",
        number=1,
        start=MIB,
        size=size,
        disk_size=4096 * MIB,
        logical_sector=512,
        partuuid="",
        partlabel="",
        signature=Signature("ext4", "u"),
    )


def test_room_already_there() -> None:
    room = plan_room(part(600 * MIB), FsGeometry("ext4", 500 * MIB, 4096, 100 * MIB), 0)
    assert room.grow_partition_to is None and room.shrink_fs_to is None


def test_free_space_after_is_used_first_and_rounded_to_a_mib() -> None:
    room = plan_room(
        part(500 * MIB), FsGeometry("ext4", 500 * MIB - 4096, 4096, 100 * MIB), 1024 * MIB
    )
    assert room.grow_partition_to == 532 * MIB
    assert room.shrink_fs_to is None


def test_shrink_when_no_free_space() -> None:
    room = plan_room(part(500 * MIB), FsGeometry("ext4", 500 * MIB, 4096, 100 * MIB), 0)
    assert room.shrink_fs_to == 468 * MIB
    assert room.grow_partition_to is None


def test_shrink_when_free_space_is_too_small() -> None:
    room = plan_room(part(500 * MIB), FsGeometry("ext4", 500 * MIB, 4096, 100 * MIB), 8 * MIB)
    assert room.shrink_fs_to == 468 * MIB


def test_xfs_without_free_space_is_refused_with_how_much_is_missing() -> None:
    with pytest.raises(RefusedError, match="xfs cannot shrink") as e:
        plan_room(part(500 * MIB), FsGeometry("xfs", 500 * MIB, 4096, None), 0)
    assert "Nothing was changed" in str(e.value)
    assert "33 MiB" in str(e.value)


def test_full_filesystem_that_cannot_shrink_enough_is_refused() -> None:
    with pytest.raises(RefusedError, match="needs at least 490 MiB") as e:
        plan_room(part(500 * MIB), FsGeometry("ext4", 500 * MIB, 4096, 490 * MIB), 0)
    # What works comes first, with the amount: 32 MiB of header room, plus rounding.
    assert str(e.value).startswith(
        "The root /dev/vda1 cannot make room for the 32 MiB LUKS2 header: grow the disk so "
        "that at least 33 MiB lie free after the root partition (now 0 MiB)"
    )
    assert "free some space" not in str(e.value)
    assert "deleting files in the image does not help" in str(e.value)


def test_the_growth_named_by_the_refusal_is_enough() -> None:
    with pytest.raises(RefusedError) as e:
        plan_room(part(500 * MIB), FsGeometry("ext4", 500 * MIB, 4096, 490 * MIB), 10 * MIB)
    assert "at least 33 MiB lie free after the root partition (now 10 MiB)" in str(e.value)
    room = plan_room(part(500 * MIB), FsGeometry("ext4", 500 * MIB, 4096, 490 * MIB), 33 * MIB)
    assert room.grow_partition_to is not None


def _sfdisk(label: str, parts: list[dict[str, Any]], **extra: Any) -> str:
    table: dict[str, Any] = {"label": label, "sectorsize": 512, "partitions": parts, **extra}
    return json.dumps({"partitiontable": table})


def test_free_after_gpt_stops_at_the_backup_table() -> None:
    t = partitions.parse_sfdisk_json(
        _sfdisk("gpt", [{"node": "/dev/vda1", "start": 2048, "size": 2048}], lastlba=10206),
        disk_sectors=10240,
    )
    assert partitions.free_after(t, "/dev/vda1") == (10207 - 4096) * 512


def test_free_after_stops_at_the_next_partition() -> None:
    t = partitions.parse_sfdisk_json(
        _sfdisk(
            "dos",
            [
                {"node": "/dev/vda1", "start": 2048, "size": 2048},
                {"node": "/dev/vda2", "start": 8192, "size": 2048},
            ],
        ),
        disk_sectors=20480,
    )
    assert partitions.free_after(t, "/dev/vda1") == (8192 - 4096) * 512
    assert partitions.free_after(t, "/dev/vda2") == (20480 - 10240) * 512


def test_unknown_node_is_refused() -> None:
    t = partitions.parse_sfdisk_json(_sfdisk("dos", []), disk_sectors=100)
    with pytest.raises(RefusedError):
        partitions.free_after(t, "/dev/vda9")


def test_grown_size() -> None:
    assert partitions.grown_size(100 * MIB, 90 * MIB, 0) == 100 * MIB
    assert partitions.grown_size(100 * MIB, 132 * MIB - 512, 64 * MIB) == 132 * MIB
    assert partitions.grown_size(100 * MIB, 132 * MIB - 512, 32 * MIB - 512) == 132 * MIB - 512
    assert partitions.grown_size(100 * MIB, 132 * MIB, 31 * MIB) is None


def test_filesystem_parsers() -> None:
    assert filesystems.parse_dumpe2fs("Block count:              131072\nBlock size:  4096\n") == (
        131072,
        4096,
    )
    assert filesystems.parse_xfs_db("dblocks = 65536\nblocksize = 4096\nsectsize = 512\n") == (
        65536,
        4096,
        512,
    )
    assert filesystems.parse_btrfs_super(
        "sectorsize\t\t4096\ndev_item.total_bytes\t536870912\n"
    ) == (536870912, 4096)


def test_parser_error_is_a_sentence() -> None:
    with pytest.raises(Exception, match="could not read `Block count`"):
        filesystems.parse_dumpe2fs("garbage")


def test_blkid_export_and_cmdline() -> None:
    assert parse_export("DEVNAME=/dev/vda1\nTYPE=ext4\nUUID=abc\n") == {
        "DEVNAME": "/dev/vda1",
        "TYPE": "ext4",
        "UUID": "abc",
    }
    assert cmdline_root("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro root=UUID=x quiet") == "UUID=x"
    assert cmdline_root("quiet") is None


DUMPE2FS = (
    Path(__file__).resolve().parents[2] / "fixtures" / "ext4" / "dumpe2fs-lab-root.txt"
).read_text()
BLOCKS = 358400  # the fixture's block count (4 KiB blocks)
SHRUNK = BLOCKS - 8192  # 32 MiB less


def test_a_free_tail_shrinks_without_moving_anything() -> None:
    assert filesystems.ext4_tail_in_use(DUMPE2FS, SHRUNK) == (0, 0)


def test_data_blocks_in_the_tail_are_counted() -> None:
    # Group 10 spans 327680-358399; say blocks 351000-351099 hold data.
    text = DUMPE2FS.replace(
        "  Free blocks: 327680-358399", "  Free blocks: 327680-350999, 351100-358399"
    )
    assert text != DUMPE2FS
    assert filesystems.ext4_tail_in_use(text, SHRUNK) == (100, 0)
    # ...whereas a shrink that cuts only after them would not touch them
    assert filesystems.ext4_tail_in_use(text, 351100) == (0, 0)


def test_inodes_in_use_in_a_removed_group_are_counted() -> None:
    text = DUMPE2FS.replace("  Free inodes: 81601-89760", "  Free inodes: 81611-89760")
    assert filesystems.ext4_tail_in_use(text, 327680) == (0, 10)
    # a group that is only shortened keeps its inodes where they are
    assert filesystems.ext4_tail_in_use(text, SHRUNK) == (0, 0)


def test_the_in_place_minimum_is_the_last_block_in_use() -> None:
    # Group 9's backup superblock and descriptors (294912-295087) are the last blocks in use.
    assert filesystems.ext4_in_place_min(DUMPE2FS) == 295088


def test_a_group_with_inodes_in_use_is_kept_whole_enough() -> None:
    text = DUMPE2FS.replace("  Free inodes: 81601-89760", "  Free inodes: 81611-89760")
    # group 10 starts at 327680; resize2fs keeps it only with its overhead + 50 blocks
    assert filesystems.ext4_in_place_min(text) == 327680 + 2 + 510 + 50 + 1 + 1 + 174
