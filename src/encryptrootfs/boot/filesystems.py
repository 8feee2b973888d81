"""Filesystem geometry and resizing for the supported roots: ext4, XFS, btrfs.

Each filesystem answers three questions the planner needs (how big is it, how small can it
get, can it shrink at all) and does two things (shrink before encryption, grow after).
btrfs resizes only while mounted, so it is mounted on a private folder under /run for that.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from ..errors import EncryptrootfsError, RefusedError
from ..run import run

MOUNT_DIR = "/run/encryptrootfs/mnt"


@dataclass(frozen=True)
class FsGeometry:
    fs_type: str
    size: int  # bytes the filesystem spans on its device
    block_size: int
    min_size: Optional[int]  # bytes it could shrink to; None: it cannot shrink
    # The largest logical sector the filesystem accepts under it: an encryption sector
    # (LUKS2 --sector-size) above it would make the mapping unmountable (XFS made with
    # 512-byte sectors refuses a 4096-byte device).
    max_sector: int = 512


def _field(text: str, name: str) -> int:
    m = re.search(rf"^{re.escape(name)}\s*[:=]?\s*(\d+)", text, re.MULTILINE)
    if m is None:
        raise EncryptrootfsError(f"could not read `{name}` from the filesystem description")
    return int(m.group(1))


def parse_dumpe2fs(text: str) -> tuple[int, int]:
    """(block count, block size) from ``dumpe2fs -h``."""
    return _field(text, "Block count"), _field(text, "Block size")


def parse_resize2fs_min(text: str) -> int:
    """Blocks from ``resize2fs -P``: 'Estimated minimum size of the filesystem: N'."""
    m = re.search(r"minimum size of the filesystem:\s*(\d+)", text)
    if m is None:
        raise EncryptrootfsError("could not read the minimum size from `resize2fs -P`")
    return int(m.group(1))


def parse_xfs_db(text: str) -> tuple[int, int, int]:
    """(data blocks, block size, sector size) from ``xfs_db -r -c 'sb 0' -c 'print dblocks
    blocksize sectsize'``."""
    return _field(text, "dblocks"), _field(text, "blocksize"), _field(text, "sectsize")


def parse_btrfs_super(text: str) -> tuple[int, int]:
    """(bytes of this device used by the filesystem, sector size) from ``dump-super``."""
    return _field(text, "dev_item.total_bytes"), _field(text, "sectorsize")


def _mount(device: str, fs_type: str, *options: str) -> str:
    os.makedirs(MOUNT_DIR, exist_ok=True)
    opts = ",".join(options) if options else "defaults"
    run(["mount", "-t", fs_type, "-o", opts, device, MOUNT_DIR])
    return MOUNT_DIR


def _umount() -> None:
    run(["umount", MOUNT_DIR])


def geometry(fs_type: str, device: str) -> FsGeometry:
    if fs_type == "ext4":
        blocks, bsize = parse_dumpe2fs(run(["dumpe2fs", "-h", device]).stdout.decode())
        minimum = run(["resize2fs", "-P", device], check=False)
        min_size = (parse_resize2fs_min(minimum.stdout.decode()) * bsize
                    if minimum.returncode == 0 else None)
        return FsGeometry("ext4", blocks * bsize, bsize, min_size, max_sector=bsize)
    if fs_type == "xfs":
        out = run(["xfs_db", "-r", "-c", "sb 0", "-c", "print dblocks blocksize sectsize",
                   device])  # fmt: skip
        blocks, bsize, sectsize = parse_xfs_db(out.stdout.decode())
        return FsGeometry("xfs", blocks * bsize, bsize, None, max_sector=sectsize)
    if fs_type == "btrfs":
        out = run(["btrfs", "inspect-internal", "dump-super", device])
        size, sector = parse_btrfs_super(out.stdout.decode())
        # The minimum needs a mount; read-only and without log replay, so nothing is written.
        mnt = _mount(device, "btrfs", "ro", "rescue=nologreplay")
        try:
            m = run(["btrfs", "inspect-internal", "min-dev-size", mnt])
            min_size = int(m.stdout.decode().split()[0])
        finally:
            _umount()
        return FsGeometry("btrfs", size, sector, min_size, max_sector=sector)
    raise RefusedError(f"{fs_type} cannot be converted in place; nothing was changed.")


def check_readonly(fs_type: str, device: str) -> None:
    """A read-only consistency check; raises when the filesystem needs repair first."""
    hint = "repair the filesystem from a rescue system, then boot again"
    if fs_type == "ext4":
        r = run(["e2fsck", "-n", "-f", device], check=False)
        if r.returncode not in (0,):
            raise RefusedError(f"e2fsck found problems on {device}; nothing was changed.",
                               hint=hint)
    elif fs_type == "xfs":
        run(["xfs_repair", "-n", device], hint=hint)
    elif fs_type == "btrfs":
        run(["btrfs", "check", "--readonly", device], hint=hint)


def shrink(fs_type: str, device: str, new_size: int) -> None:
    """Shrink the filesystem to ``new_size`` bytes (a multiple of its block size)."""
    if fs_type == "ext4":
        # resize2fs insists on a freshly checked filesystem; -p repairs only what is safe.
        r = run(["e2fsck", "-f", "-p", device], check=False)
        if r.returncode >= 4:
            raise RefusedError(
                f"e2fsck could not make {device} clean enough to shrink; nothing else was "
                "changed.", hint="repair it with `e2fsck -f` from a rescue system")
        run(["resize2fs", device, f"{new_size // 1024}K"])
    elif fs_type == "btrfs":
        mnt = _mount(device, "btrfs")
        try:
            run(["btrfs", "filesystem", "resize", f"1:{new_size}", mnt])
        finally:
            _umount()
    else:
        raise RefusedError(f"{fs_type} cannot shrink; nothing was changed.")


def grow(fs_type: str, device: str) -> None:
    """Grow the filesystem to fill ``device`` (the opened LUKS mapping)."""
    if fs_type == "ext4":
        run(["resize2fs", device])
        return
    mnt = _mount(device, fs_type)
    try:
        if fs_type == "xfs":
            run(["xfs_growfs", mnt])
        else:
            run(["btrfs", "filesystem", "resize", "1:max", mnt])
    finally:
        _umount()
