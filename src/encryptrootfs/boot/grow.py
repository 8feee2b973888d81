"""Optional last stage (``[first_boot] grow = true``): give the encrypted root the whole disk.

Run on every boot that opens the root, not only the first: it does nothing when there is no
free space after the partition, finishes a grow that a power cut interrupted (the partition
grown but not the mapping or the filesystem), and picks up a disk that was enlarged later.
"""

from __future__ import annotations

from ..devices import Partition, probe_signature
from ..luks2 import resize_device
from ..run import Secret, run
from . import filesystems, partitions
from .breakpoints import stop_after
from .console import say

MIB = 1024 * 1024


def grow_root(part: Partition, mapper_name: str, key: Secret) -> None:
    mapper = f"/dev/mapper/{mapper_name}"
    table = partitions.read_table(part.disk, part.disk_size, part.logical_sector)
    if partitions.free_after(table, part.path) >= MIB:
        new_size = partitions.grow_to_end(part, table)
        say(f"{part.path}: partition grown to {new_size // MIB} MiB")
        stop_after("grow")
    # Always bring the mapping and the filesystem up to the partition: cheap when they are
    # already there, and the only way to finish a grow cut after the partition step.
    resize_device(mapper_name, key)
    fs_type = probe_signature(mapper)[0].type
    if fs_type == "ext4":
        # resize2fs refuses an unmounted filesystem that was not checked since it was mounted.
        run(["e2fsck", "-f", "-p", mapper], check=False)
    before = filesystems.geometry(fs_type, mapper).size
    filesystems.grow(fs_type, mapper)
    after = filesystems.geometry(fs_type, mapper).size
    if after != before:
        say(f"{mapper}: {fs_type} grown from {before // MIB} MiB to {after // MIB} MiB")
