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
from .console import say

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


def parse_xfs_db(text: str) -> tuple[int, int, int]:
    """(data blocks, block size, sector size) from ``xfs_db -r -c 'sb 0' -c 'print dblocks
    blocksize sectsize'``."""
    return _field(text, "dblocks"), _field(text, "blocksize"), _field(text, "sectsize")


def parse_btrfs_super(text: str) -> tuple[int, int]:
    """(bytes of this device used by the filesystem, sector size) from ``dump-super``."""
    return _field(text, "dev_item.total_bytes"), _field(text, "sectorsize")


def _ranges(text: str) -> list[tuple[int, int]]:
    """``"1-5, 9, 12-20"`` -> [(1, 5), (9, 9), (12, 20)] (dumpe2fs free lists)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        out.append((int(first), int(last or first)))
    return out


def ext4_tail_in_use(dumpe2fs: str, new_blocks: int) -> tuple[int, int]:
    """(blocks in use at or after block ``new_blocks``, inodes in use in the block groups
    that lie wholly past it), from the full ``dumpe2fs`` output.

    Both zero means resize2fs can shrink to ``new_blocks`` without moving a block or an
    inode: it only rewrites the superblocks, group descriptors and the last group's bitmaps.
    """
    per_group = _field(dumpe2fs, "Inodes per group")
    used_blocks = used_inodes = 0
    groups = re.finditer(
        r"^Group \d+: \(Blocks (\d+)-(\d+)\).*?\n\s+Free blocks: ([^\n]*)\n"
        r"\s+Free inodes: ([^\n]*)",
        dumpe2fs,
        re.MULTILINE | re.DOTALL,
    )
    for m in groups:
        first, last = int(m.group(1)), int(m.group(2))
        if last < new_blocks:
            continue
        start = max(first, new_blocks)
        free = sum(max(0, min(b, last) - max(a, start) + 1) for a, b in _ranges(m.group(3)))
        used_blocks += (last - start + 1) - free
        if first >= new_blocks:
            free_inodes = sum(b - a + 1 for a, b in _ranges(m.group(4)))
            used_inodes += per_group - free_inodes
    return used_blocks, used_inodes


def ext4_in_place_min(dumpe2fs: str) -> int:
    """The fewest blocks the filesystem can shrink to without moving a block or an inode.

    Everything at or after it is free, and the last block group with an inode in use keeps
    enough blocks that resize2fs keeps the group (it drops a last group smaller than its
    overhead plus 50 blocks). ``resize2fs -P`` answers a different question (the smallest
    size after moving everything it can) and errs so far on the safe side that it can refuse
    a 32 MiB shrink of a filesystem two thirds full.
    """
    per_group = _field(dumpe2fs, "Inodes per group")
    overhead = (
        2
        + _field(dumpe2fs, "Inode blocks per group")
        + 50
        + 1
        + 1
        + _field(dumpe2fs, "Reserved GDT blocks")
    )  # backup sb, GDT, reserve
    needed = 1
    groups = re.finditer(
        r"^Group \d+: \(Blocks (\d+)-(\d+)\).*?\n\s+Free blocks: ([^\n]*)\n"
        r"\s+Free inodes: ([^\n]*)",
        dumpe2fs,
        re.MULTILINE | re.DOTALL,
    )
    for m in groups:
        first, last = int(m.group(1)), int(m.group(2))
        free = _ranges(m.group(3))
        # the last block of the group not listed as free
        block = last
        for a, b in sorted(free, reverse=True):
            if b >= block >= a:
                block = a - 1
        if block >= first:
            needed = max(needed, block + 1)
        if sum(b - a + 1 for a, b in _ranges(m.group(4))) < per_group:
            needed = max(needed, first + overhead)
    return needed


def check_shrink_in_place(fs_type: str, device: str, new_size: int) -> None:
    """Refuse an ext4 shrink that would make resize2fs move data.

    resize2fs moves blocks and inodes out of the cut-off tail with no ordering between the
    copies and the pointer updates, so a power cut during such a move can lose data. When the
    tail is free it only rewrites metadata, which ``e2fsck -p`` repairs after a cut. (btrfs
    shrinks in the kernel, with copy-on-write transactions: safe either way.)
    """
    if fs_type != "ext4":
        return
    text = run(["dumpe2fs", device]).stdout.decode(errors="replace")
    total, block_size = parse_dumpe2fs(text)
    blocks, inodes = ext4_tail_in_use(text, new_size // block_size)
    if blocks or inodes:
        tail = (total * block_size - new_size) // 1048576
        raise RefusedError(
            f"The last {tail} MiB of the ext4 filesystem on {device} hold data ({blocks} blocks, "
            f"{inodes} inodes); shrinking would make resize2fs move it, which a power cut "
            "could corrupt, so encryptrootfs does not. Nothing was changed.",
            hint=f"leave {tail} MiB more unpartitioned after the root partition in the image "
            f"(or enlarge the disk by {tail} MiB); see docs/first-boot.md",
        )


def _mount(device: str, fs_type: str, *options: str) -> str:
    os.makedirs(MOUNT_DIR, exist_ok=True)
    opts = ",".join(options) if options else "defaults"
    run(["mount", "-t", fs_type, "-o", opts, device, MOUNT_DIR])
    return MOUNT_DIR


def _umount() -> None:
    run(["umount", MOUNT_DIR])


def geometry(fs_type: str, device: str) -> FsGeometry:
    if fs_type == "ext4":
        # ext4 only ever shrinks in place (check_shrink_in_place), so its minimum is the
        # in-place one, read from the block groups' free lists.
        text = run(["dumpe2fs", device]).stdout.decode(errors="replace")
        blocks, bsize = parse_dumpe2fs(text)
        min_size = ext4_in_place_min(text) * bsize
        return FsGeometry("ext4", blocks * bsize, bsize, min_size, max_sector=bsize)
    if fs_type == "xfs":
        out = run(["xfs_db", "-r", "-c", "sb 0", "-c", "print dblocks blocksize sectsize", device])
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


def ext4_unclean(dumpe2fs_header: str) -> Optional[str]:
    """Why ``e2fsck -p`` must run before this ext4 can be checked read-only (None: it need not).

    Marked with errors: the kernel found some, or a resize2fs was cut (it sets the flag first and
    clears it last). A journal that needs recovery: the filesystem was mounted when the power
    went (the /boot move mounts the root), and ``e2fsck -n`` does not replay journals.
    """
    state = re.search(r"^Filesystem state:\s*(.*)$", dumpe2fs_header, re.MULTILINE)
    if state is not None and "error" in state.group(1):
        return "the ext4 superblock is marked with errors (an interrupted shrink does that)"
    features = re.search(r"^Filesystem features:\s*(.*)$", dumpe2fs_header, re.MULTILINE)
    if features is not None and "needs_recovery" in features.group(1).split():
        return "the ext4 journal needs recovery (the previous boot was cut while it was mounted)"
    return None


def check_readonly(fs_type: str, device: str) -> None:
    """A read-only consistency check; raises when the filesystem needs repair first.

    One exception, ext4 that e2fsck must touch before it can be checked (see ext4_unclean):
    ``e2fsck -p`` makes the repairs that are safe without a human (what every boot's fsck of the
    root does anyway). After a cut during the metadata-only shrink (see check_shrink_in_place)
    or while the /boot move had the root mounted, that is all it takes. XFS with a dirty log:
    a mount replays it, as every boot's mount of the root would.
    """
    hint = "repair the filesystem from a rescue system, then boot again"
    if fs_type == "ext4":
        # Asked first, not only when `e2fsck -n` fails: it skips the journal and may find the
        # filesystem without it consistent, while the files the last boot wrote (the /boot
        # move's record) are still only in the journal.
        header = run(["dumpe2fs", "-h", device], check=False)
        why = ext4_unclean(header.stdout.decode(errors="replace"))
        if why is not None:
            say(f"{device}: {why}; repairing with `e2fsck -f -p`, as the boot's fsck would")
            p = run(["e2fsck", "-f", "-p", device], check=False)
            if p.returncode >= 4:
                raise RefusedError(
                    f"{device} has ext4 errors that `e2fsck -p` cannot repair without a "
                    f"human (exit code {p.returncode}); it changed only what it could fix "
                    "safely, and nothing else was changed.",
                    hint="run `e2fsck -f` on it from a rescue system, then boot again",
                )
        r = run(["e2fsck", "-n", "-f", device], check=False)
        if r.returncode != 0:
            raise RefusedError(
                f"e2fsck found problems on {device}; nothing was changed.", hint=hint
            )
    elif fs_type == "xfs":
        r = run(["xfs_repair", "-n", device], check=False)
        if r.returncode != 0 and b"log" in r.stderr + r.stdout:
            say(
                f"{device}: the XFS log needs replaying (the previous boot was cut while it was "
                "mounted); mounting it once to replay, as the boot's mount would"
            )
            _mount(device, "xfs")
            _umount()
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
                f"e2fsck could not make {device} clean enough to shrink; nothing else was changed.",
                hint="repair it with `e2fsck -f` from a rescue system",
            )
        say(f"{device}: resize2fs to {new_size // 1048576} MiB (the tail is free: no data moves)")
        # -f: resize2fs holds to its own minimum estimate (resize2fs -P), which can exceed the
        # filesystem's size; check_shrink_in_place has proven that nothing lies past new_size,
        # and e2fsck has just run, which is all -f waives.
        run(["resize2fs", "-f", device, f"{new_size // 1024}K"])
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
