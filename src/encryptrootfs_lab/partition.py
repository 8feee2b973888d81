"""Partition tables (GPT and MBR) written straight into an image file.

sfdisk 2.38 cannot write a table for 4096-byte logical sectors into a plain file (it recalculates
to the file's 512), and the host kernel has no partition parsers to check anything through a
loop device. The two formats are small and fully specified, so the lab writes them itself, for
either sector size, with deterministic disk and partition GUIDs.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

GPT_LINUX_FS = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
MBR_LINUX = 0x83
GPT_ENTRIES = 128
GPT_ENTRY_SIZE = 128


@dataclass(frozen=True)
class Partition:
    """A partition in logical sectors (``start`` and ``sectors`` in units of the table's sector)."""

    start: int
    sectors: int
    name: str
    guid: uuid.UUID


def _gpt_header(
    sector: int,
    current: int,
    backup: int,
    first: int,
    last: int,
    disk: uuid.UUID,
    entries_lba: int,
    entries_crc: int,
) -> bytes:
    fields = [
        b"EFI PART",
        0x00010000,
        92,
        0,
        0,
        current,
        backup,
        first,
        last,
        disk.bytes_le,
        entries_lba,
        GPT_ENTRIES,
        GPT_ENTRY_SIZE,
        entries_crc,
    ]
    fmt = "<8sIIII QQQQ 16s QIII"
    header = struct.pack(fmt, *fields)
    crc = zlib.crc32(header)
    header = header[:16] + struct.pack("<I", crc) + header[20:]
    return header + bytes(sector - len(header))


def _protective_mbr(total_sectors: int) -> bytes:
    size = min(total_sectors - 1, 0xFFFFFFFF)
    entry = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, size)
    return bytes(446) + entry + bytes(48) + b"\x55\xaa"


def write_gpt(path: Path, sector: int, disk_guid: uuid.UUID, parts: list[Partition]) -> None:
    """Write a GPT (protective MBR, primary and backup header and entries) into ``path``."""
    total = path.stat().st_size // sector
    entries_sectors = GPT_ENTRIES * GPT_ENTRY_SIZE // sector
    first_usable = 2 + entries_sectors
    last_usable = total - 2 - entries_sectors
    entries = b""
    for p in parts:
        if p.start < first_usable or p.start + p.sectors - 1 > last_usable:
            raise ValueError(f"partition {p.name} does not fit into the disk")
        name = p.name.encode("utf-16-le")[:72]
        entries += struct.pack(
            "<16s16sQQQ72s",
            GPT_LINUX_FS.bytes_le,
            p.guid.bytes_le,
            p.start,
            p.start + p.sectors - 1,
            0,
            name + bytes(72 - len(name)),
        )
    entries += bytes(GPT_ENTRIES * GPT_ENTRY_SIZE - len(entries))
    crc = zlib.crc32(entries)
    last = total - 1
    backup_entries = last - entries_sectors
    primary = _gpt_header(sector, 1, last, first_usable, last_usable, disk_guid, 2, crc)
    backup = _gpt_header(sector, last, 1, first_usable, last_usable, disk_guid, backup_entries, crc)
    mbr = _protective_mbr(total)
    with open(path, "r+b") as f:
        f.write(mbr + bytes(sector - len(mbr)))
        f.write(primary)
        f.write(entries)
        f.seek(backup_entries * sector)
        f.write(entries)
        f.write(backup)


def write_mbr(path: Path, signature: int, parts: list[Partition]) -> None:
    """Write a DOS partition table with up to four primary Linux partitions."""
    if len(parts) > 4:
        raise ValueError("an MBR holds at most four primary partitions")
    table = b""
    for i, p in enumerate(parts):
        # CHS fields are ignored by Linux; fill them with the "use LBA" maximum.
        table += struct.pack(
            "<B3sB3sII",
            0x80 if i == 0 else 0,
            b"\xfe\xff\xff",
            MBR_LINUX,
            b"\xfe\xff\xff",
            p.start,
            p.sectors,
        )
    table += bytes(64 - len(table))
    with open(path, "r+b") as f:
        f.seek(440)
        f.write(struct.pack("<I", signature) + b"\x00\x00" + table + b"\x55\xaa")
