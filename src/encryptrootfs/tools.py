"""The external programs encryptrootfs uses, declared once.

The code, the dracut module's ``check()``/``install()`` (via ``encryptrootfs tools``) and the
preflight all read this table, so a program cannot be used without being shipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .run import which


class Need(str, Enum):
    """Which job a program is needed for."""

    LUKS = "luks"  # every boot
    PARTITION = "partition"  # first boot: find and grow partitions
    EXT4 = "ext4"
    XFS = "xfs"
    BTRFS = "btrfs"
    BOOT = "boot"  # first boot: a plaintext /boot when GRUB reads it from the root


@dataclass(frozen=True)
class Tool:
    name: str
    package: str  # Debian package; the RPM name is the same unless noted in the purpose
    purpose: str
    need: Need


TOOLS: tuple[Tool, ...] = (
    Tool("cryptsetup", "cryptsetup-bin", "LUKS2 header, keyslots, tokens, reencryption", Need.LUKS),
    Tool("blkid", "util-linux", "find the root by UUID/LABEL/PARTLABEL", Need.PARTITION),
    Tool("lsblk", "util-linux", "map a partition to its disk", Need.PARTITION),
    Tool("blockdev", "util-linux", "sizes of disks and partitions", Need.PARTITION),
    Tool("sfdisk", "fdisk (util-linux on RPM)", "grow the root partition", Need.PARTITION),
    Tool("partx", "util-linux", "tell the kernel a partition grew", Need.PARTITION),
    Tool("e2fsck", "e2fsprogs", "check ext4 before resizing", Need.EXT4),
    Tool("resize2fs", "e2fsprogs", "shrink/grow ext4", Need.EXT4),
    Tool("dumpe2fs", "e2fsprogs", "ext4 geometry", Need.EXT4),
    Tool("xfs_repair", "xfsprogs", "read-only check (-n) before converting", Need.XFS),
    Tool("xfs_growfs", "xfsprogs", "grow XFS", Need.XFS),
    Tool("xfs_db", "xfsprogs", "XFS geometry", Need.XFS),
    Tool("btrfs", "btrfs-progs", "shrink/grow btrfs", Need.BTRFS),
    Tool("mkfs.ext4", "e2fsprogs", "the plaintext /boot partition", Need.BOOT),
    Tool("chroot", "coreutils", "run the root's grub-mkconfig/grub-install", Need.BOOT),
    Tool("cp", "coreutils", "copy /boot to its partition", Need.BOOT),
)


def tools_for(*needs: Need) -> tuple[Tool, ...]:
    return tuple(t for t in TOOLS if t.need in needs)


def missing(*needs: Need) -> tuple[Tool, ...]:
    """The tools for ``needs`` that are not on this machine."""
    return tuple(t for t in tools_for(*needs) if which(t.name) is None)
