"""The partition table: free space after the root, and growing the root into it.

sfdisk edits the table; partx tells the kernel. Both are re-runnable: growing to a size the
partition already has changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ..devices import Partition
from ..errors import RefusedError
from ..run import run

MIB = 1024 * 1024


@dataclass(frozen=True)
class TableEntry:
    node: str
    start: int  # sectors
    size: int  # sectors


@dataclass(frozen=True)
class Table:
    label: str  # "gpt" or "dos"
    sector_size: int
    last_usable: int  # last sector a partition may use
    entries: tuple[TableEntry, ...]


def parse_sfdisk_json(text: str, disk_sectors: int) -> Table:
    data: Mapping[str, Any] = json.loads(text)["partitiontable"]
    sector = int(data.get("sectorsize", 512))
    label = str(data["label"])
    last = int(data["lastlba"]) if label == "gpt" else disk_sectors - 1
    entries = tuple(
        TableEntry(str(e["node"]), int(e["start"]), int(e["size"]))
        for e in data.get("partitions", [])
    )
    return Table(label, sector, last, entries)


def read_table(disk: str, disk_size: int, logical_sector: int) -> Table:
    out = run(["sfdisk", "--json", disk]).stdout.decode()
    return parse_sfdisk_json(out, disk_size // logical_sector)


def free_after(table: Table, node: str) -> int:
    """Bytes of unpartitioned space right after partition ``node``."""
    entry = _entry(table, node)
    end = entry.start + entry.size  # first sector after the partition
    following = [e.start for e in table.entries if e.start >= end]
    limit = min(following) if following else table.last_usable + 1
    return max(0, limit - end) * table.sector_size


def _entry(table: Table, node: str) -> TableEntry:
    for e in table.entries:
        if e.node == node:
            return e
    raise RefusedError(f"{node} is not in the partition table of its disk; nothing was changed.")


def grown_size(current: int, wanted: int, available: int) -> Optional[int]:
    """The partition size to grow to (bytes): ``wanted`` rounded up to a MiB when it fits."""
    if wanted <= current:
        return current
    rounded = -(-wanted // MIB) * MIB
    if rounded - current <= available:
        return rounded
    if wanted - current <= available:
        return wanted
    return None


def grow(part: Partition, table: Table, new_size: int) -> None:
    """Make partition ``part`` ``new_size`` bytes long, keeping its start (also to shrink it,
    once what it holds ends before ``new_size``: the /boot move does that)."""
    entry = _entry(table, part.path)
    if table.label == "dos" and part.number > 4:
        raise RefusedError(
            f"{part.path} is a logical partition; growing it is not supported. Nothing was changed."
        )
    sectors = new_size // table.sector_size
    if sectors == entry.size:
        return
    # --no-reread/--no-tell-kernel: partx below updates just this partition; rereading the
    # whole table fails while any partition of the disk is in use.
    run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-N", str(part.number), part.disk],
        stdin=f"{entry.start},{sectors}\n".encode(),
    )
    run(["partx", "-u", "--nr", str(part.number), part.disk])


def grow_to_end(part: Partition, table: Table) -> int:
    """Grow ``part`` over all free space after it; returns the new size in bytes."""
    entry = _entry(table, part.path)
    new_size = part.size + free_after(table, part.path)
    # Keep the end on a MiB boundary relative to the start of the disk.
    end = (entry.start * table.sector_size + new_size) // MIB * MIB
    new_size = end - entry.start * table.sector_size
    if new_size > part.size:
        grow(part, table, new_size)
    return max(new_size, part.size)
