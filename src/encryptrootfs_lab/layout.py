"""Disk layouts and the raw disks built from them, without loop devices or mounts on the host.

A :class:`DiskLayout` names everything the product must cope with: root filesystem, partition
table, root size, free space after the root partition, a separate /boot, the logical sector
size, and whether the disk holds a bootable root (``content=rootfs``) or only the test tree
(``content=tree``, small disks for the layout matrix). Every disk carries the test tree and its
manifest under ``/srv``.

ext4 is built on the host (``mkfs.ext4 -d``). XFS (``mkfs.xfs`` cannot fill a filesystem from a
folder in xfsprogs 6.1) and btrfs (``--rootdir`` loses holes in sparse files) are filled inside
one "builder" guest boot: the host prepares the partition table and an ext4 image with the
content, the guest makes the filesystem and copies with ``cp -a`` (hard links, xattrs, holes).
Disks are cached by a hash of layout + content; tests use qcow2 overlays over them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Optional

from encryptrootfs.log import get_logger
from encryptrootfs.run import run

from . import partition
from .cache import LabError, building, cache_root, digest, locked, prune, touch
from .image import PLAIN, Image, base_key, build_image
from .qemu import BootSpec, Drive, boot
from .testtree import GUEST_MANIFEST, GUEST_TREE, cached_tree

log = get_logger("lab.layout")

MIB = 1024 * 1024
KEEP_DISKS = 32
# A bootable root's default size: the product image (~500 MiB) with room for a first boot to
# work in. Every first boot encrypts the whole partition, so its size is paid in every data
# pass; tests about size (a root larger than the guest's RAM) ask for more.
ROOTFS_MIB = 640
# btrfs needs ~615 MiB for the product image (its own minimum size, `btrfs inspect-internal
# min-dev-size`), so a btrfs root that must shrink by the header's 32 MiB starts larger.
BTRFS_SHRINK_MIB = 768
GUEST_TREE_TOOL = "/usr/local/lib/erfs-lab/erfs-tree"
ROOT_LABEL = "erfsroot"
BOOT_LABEL = "erfsboot"


class Filesystem(str, Enum):
    EXT4 = "ext4"
    XFS = "xfs"
    BTRFS = "btrfs"


class PartitionTable(str, Enum):
    GPT = "gpt"
    MSDOS = "msdos"


class Content(str, Enum):
    ROOTFS = "rootfs"  # a bootable root: the product image's rootfs (with the test tree)
    TREE = "tree"  # only the test tree and its manifest (layout matrix disks)


@dataclass(frozen=True)
class DiskLayout:
    """The shape of one disk. ``root_mib=0`` picks a size that fits the content."""

    fs: Filesystem = Filesystem.EXT4
    table: PartitionTable = PartitionTable.GPT
    root_mib: int = 0
    free_after_mib: int = 64
    separate_boot: bool = False
    boot_mib: int = 256
    sector: int = 512
    content: Content = Content.ROOTFS

    def __post_init__(self) -> None:
        if self.sector not in (512, 4096):
            raise ValueError(f"sector: must be 512 or 4096, not {self.sector}")
        if self.separate_boot and self.content is Content.TREE:
            raise ValueError("separate_boot: only a bootable (content=rootfs) disk has a /boot")
        if self.root_mib < 0 or self.free_after_mib < 0:
            raise ValueError("root_mib and free_after_mib must not be negative")

    @property
    def effective_root_mib(self) -> int:
        if self.root_mib:
            return self.root_mib
        if self.content is Content.ROOTFS:
            return ROOTFS_MIB
        # XFS refuses filesystems below 300 MiB (xfsprogs >= 5.19).
        return 320 if self.fs is Filesystem.XFS else 200

    @property
    def name(self) -> str:
        parts = [
            self.fs.value,
            self.table.value,
            f"root{self.effective_root_mib}M",
            f"free{self.free_after_mib}M",
        ]
        if self.separate_boot:
            parts.append(f"boot{self.boot_mib}M")
        if self.sector != 512:
            parts.append(f"sector{self.sector}")
        if self.content is Content.TREE:
            parts.append("tree")
        return "-".join(parts)

    @property
    def built_on_host(self) -> bool:
        return self.fs is Filesystem.EXT4


@dataclass(frozen=True)
class Disk:
    """A built raw disk in the cache."""

    layout: DiskLayout
    key: str
    path: Path
    root_uuid: str
    boot_uuid: Optional[str]
    root_partition: int
    root_offset: int
    root_bytes: int
    size_bytes: int
    manifest_sha: str
    build_seconds: float
    cached: bool

    def drive(
        self, path: Optional[Path] = None, *, snapshot: bool = False, serial: Optional[str] = None
    ) -> Drive:
        """A QEMU drive for this disk (or for an overlay ``path`` over it)."""
        target = path or self.path
        fmt = "raw" if target == self.path else "qcow2"
        return Drive(target, fmt, self.layout.sector, snapshot=snapshot, serial=serial)


# ---------------------------------------------------------------------------------------------


def _layout_key(layout: DiskLayout, image: Image) -> str:
    here = Path(__file__).parent
    content = image.key if layout.content is Content.ROOTFS else str(cached_tree()[0].parent.name)
    builder = "host" if layout.built_on_host else f"guest-{base_key()}"
    return digest(
        [
            "disk",
            asdict(layout),
            content,
            builder,
            (here / "layout.py").read_text(),
            (here / "partition.py").read_text(),
        ]
    )


def _uuid(key: str, what: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"erfslab:{key}:{what}")


def _fstab(layout: DiskLayout, root_uuid: str, boot_uuid: Optional[str]) -> str:
    opts = "defaults,errors=remount-ro" if layout.fs is Filesystem.EXT4 else "defaults"
    fsck = 1 if layout.fs is Filesystem.EXT4 else 0
    lines = [f"UUID={root_uuid} / {layout.fs.value} {opts} 0 {fsck}"]
    if boot_uuid:
        lines.append(f"UUID={boot_uuid} /boot ext4 defaults 0 2")
    return "\n".join(lines) + "\n"


def _stage(
    layout: DiskLayout, image: Image, work: Path, root_uuid: str, boot_uuid: Optional[str]
) -> tuple[Path, Optional[Path]]:
    """Hard-link copies of the content: ``(root folder, boot folder or None)``."""
    staging = work / "staging"
    if layout.content is Content.ROOTFS:
        run(["cp", "-al", image.rootfs, staging])
        fstab = staging / "etc/fstab"
        fstab.unlink(missing_ok=True)  # a hard link into the image: replace, never write
        fstab.write_text(_fstab(layout, root_uuid, boot_uuid))
    else:
        tree, manifest = cached_tree()
        (staging / GUEST_TREE).parent.mkdir(parents=True)
        run(["cp", "-al", tree, staging / GUEST_TREE])
        shutil.copy(manifest, staging / GUEST_MANIFEST)
    boot_dir: Optional[Path] = None
    if layout.separate_boot:
        boot_dir = work / "boot-staging"
        boot_dir.mkdir()
        for entry in sorted((staging / "boot").iterdir()):
            entry.rename(boot_dir / entry.name)
    return staging, boot_dir


def _mkfs_ext4(source: Path, target: Path, size_bytes: int, fs_uuid: str, label: str) -> None:
    target.unlink(missing_ok=True)
    # Inode tables and journal written now: a lazily initialised filesystem has the guest's
    # ext4lazyinit thread write them in the background of every TCG boot.
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            label,
            "-U",
            fs_uuid,
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            source,
            target,
            f"{size_bytes // 1024}k",
        ]
    )


def _place(fs_image: Path, disk: Path, offset: int) -> None:
    run(
        [
            "dd",
            f"if={fs_image}",
            f"of={disk}",
            "bs=4M",
            f"seek={offset}",
            "oflag=seek_bytes",
            "conv=notrunc,sparse",
            "status=none",
        ]
    )
    fs_image.unlink()


def _used_bytes(folder: Path) -> int:
    out = run(["du", "-s", "-B1", "-x", folder]).stdout.decode()
    return int(out.split()[0])


@dataclass(frozen=True)
class _Plan:
    """Where a disk's partitions go (bytes)."""

    size: int
    boot_offset: int
    root_offset: int
    root_bytes: int


def _plan(layout: DiskLayout) -> _Plan:
    offset = MIB
    boot_offset = 0
    if layout.separate_boot:
        boot_offset = offset
        offset += layout.boot_mib * MIB
    root_bytes = layout.effective_root_mib * MIB
    # 1 MiB at the end: room for the GPT backup (and symmetry for MBR).
    size = offset + root_bytes + layout.free_after_mib * MIB + MIB
    return _Plan(size, boot_offset, offset, root_bytes)


def _write_table(layout: DiskLayout, disk: Path, key: str, plan: _Plan) -> int:
    """Partition ``disk``; returns the root partition's number."""
    s = layout.sector
    parts = []
    if layout.separate_boot:
        parts.append(
            partition.Partition(
                plan.boot_offset // s, layout.boot_mib * MIB // s, "boot", _uuid(key, "part-boot")
            )
        )
    parts.append(
        partition.Partition(
            plan.root_offset // s, plan.root_bytes // s, "root", _uuid(key, "part-root")
        )
    )
    if layout.table is PartitionTable.GPT:
        partition.write_gpt(disk, s, _uuid(key, "disk"), parts)
    else:
        partition.write_mbr(disk, int(_uuid(key, "disk").hex[:8], 16), parts)
    return len(parts)


@dataclass
class _Pending:
    """A disk being built (the in-guest part still to do)."""

    layout: DiskLayout
    key: str
    tmp: Path
    final: Path
    root_uuid: str
    boot_uuid: Optional[str]
    root_partition: int
    plan: _Plan
    source: Optional[Path]
    started: float


def _prepare(layout: DiskLayout, image: Image, key: str, tmp: Path, final: Path) -> _Pending:
    started = time.monotonic()
    root_uuid = str(_uuid(key, "root-fs"))
    boot_uuid = str(_uuid(key, "boot-fs")) if layout.separate_boot else None
    plan = _plan(layout)
    disk = tmp / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(plan.size)
    root_partition = _write_table(layout, disk, key, plan)
    staging, boot_dir = _stage(layout, image, tmp, root_uuid, boot_uuid)
    if boot_dir is not None and boot_uuid is not None:
        _mkfs_ext4(boot_dir, tmp / "boot.fs", layout.boot_mib * MIB, boot_uuid, BOOT_LABEL)
        _place(tmp / "boot.fs", disk, plan.boot_offset)
        shutil.rmtree(boot_dir)
    source: Optional[Path] = None
    if layout.built_on_host:
        _mkfs_ext4(staging, tmp / "root.fs", plan.root_bytes, root_uuid, ROOT_LABEL)
        _place(tmp / "root.fs", disk, plan.root_offset)
    else:
        used = _used_bytes(staging)
        if used + 32 * MIB > plan.root_bytes:
            raise LabError(
                f"The content ({used // MIB} MiB) does not fit a {layout.effective_root_mib} MiB "
                f"{layout.fs.value} root; no disk was built.",
                hint="give the layout a larger root_mib",
            )
        source = tmp / "source.ext4"
        size = (used * 115 // 100 + 64 * MIB) // MIB * MIB
        _mkfs_ext4(staging, source, size, str(_uuid(key, "source-fs")), "erfssrc")
    shutil.rmtree(staging)
    return _Pending(
        layout, key, tmp, final, root_uuid, boot_uuid, root_partition, plan, source, started
    )


def _manifest_sha() -> str:
    return hashlib.sha256(cached_tree()[1].read_bytes()).hexdigest()[:16]


def _finish(p: _Pending) -> Disk:
    seconds = time.monotonic() - p.started
    info = {
        "layout": asdict(p.layout),
        "key": p.key,
        "root_uuid": p.root_uuid,
        "boot_uuid": p.boot_uuid,
        "root_partition": p.root_partition,
        "root_offset": p.plan.root_offset,
        "root_bytes": p.plan.root_bytes,
        "size_bytes": p.plan.size,
        "manifest_sha": _manifest_sha(),
        "build_seconds": seconds,
    }
    if p.source is not None:
        p.source.unlink(missing_ok=True)
    (p.tmp / "disk.json").write_text(json.dumps(info, indent=1, default=str))
    return _load(p.tmp, cached=False)


def _load(folder: Path, *, cached: bool) -> Disk:
    info = json.loads((folder / "disk.json").read_text())
    lay = info["layout"]
    layout = DiskLayout(
        fs=Filesystem(lay["fs"]),
        table=PartitionTable(lay["table"]),
        root_mib=lay["root_mib"],
        free_after_mib=lay["free_after_mib"],
        separate_boot=lay["separate_boot"],
        boot_mib=lay["boot_mib"],
        sector=lay["sector"],
        content=Content(lay["content"]),
    )
    return Disk(
        layout=layout,
        key=info["key"],
        path=folder / "disk.raw",
        root_uuid=info["root_uuid"],
        boot_uuid=info["boot_uuid"],
        root_partition=info["root_partition"],
        root_offset=info["root_offset"],
        root_bytes=info["root_bytes"],
        size_bytes=info["size_bytes"],
        manifest_sha=info["manifest_sha"],
        build_seconds=info["build_seconds"],
        cached=cached,
    )


def _guest_fill_script(pending: Sequence[_Pending]) -> str:
    lines = ["set -eu", "udevadm settle"]
    for i, p in enumerate(pending):
        dev = f"/dev/disk/by-id/virtio-t{i}-part{p.root_partition}"
        if p.layout.fs is Filesystem.XFS:
            mkfs = f"mkfs.xfs -q -f -m uuid={p.root_uuid} -L {ROOT_LABEL} {dev}"
        else:
            mkfs = f"mkfs.btrfs -q -f -U {p.root_uuid} -L {ROOT_LABEL} {dev}"
        lines += [
            f"mkdir -p /mnt/s{i} /mnt/t{i}",
            f"mount -o ro /dev/disk/by-id/virtio-s{i} /mnt/s{i}",
            mkfs,
            f"mount {dev} /mnt/t{i}",
            f"cp -a /mnt/s{i}/. /mnt/t{i}/",
            f"rm -rf /mnt/t{i}/lost+found",
            f"umount /mnt/t{i} /mnt/s{i}",
            f"echo ERFS-DISK-FILLED t{i} {p.layout.name}",
        ]
    return "\n".join(lines) + "\n"


def _fill_in_guest(pending: Sequence[_Pending], logs: Path) -> None:
    # The plain image: it has the mkfs tools and the runner, and no product in its initramfs
    # (an image with encryptrootfs would encrypt the builder's own root first).
    builder_image = build_image(PLAIN)
    builder_disk = build_disk(DiskLayout(), builder_image)
    drives = [builder_disk.drive(snapshot=True)]
    for i, p in enumerate(pending):
        assert p.source is not None
        drives.append(Drive(p.tmp / "disk.raw", "raw", p.layout.sector, serial=f"t{i}"))
        drives.append(Drive(p.source, "raw", 512, readonly=True, serial=f"s{i}"))
    spec = BootSpec(
        kernel=builder_image.kernel,
        initrd=builder_image.initrd,
        root_uuid=builder_disk.root_uuid,
        drives=tuple(drives),
        script=_guest_fill_script(pending),
        timeout=300 + 120 * len(pending),
    )
    log.info("filling %d xfs/btrfs disk(s) in a builder guest", len(pending))
    result = boot(spec, logs, "fill")
    filled = {m.value.split()[0] for m in result.all("DISK-FILLED")}
    if not result.ok or len(filled) != len(pending):
        raise LabError(
            "The builder guest did not fill every xfs/btrfs disk; no disk was added to the "
            "cache.\n" + result.describe(40),
            hint=f"logs in {logs}",
        )


def _build_group(
    items: Sequence[tuple[str, DiskLayout]], image: Image, folder: Path
) -> dict[str, Disk]:
    """Build the missing disks of ``items`` (all host-built, or all filled in one guest)."""
    out: dict[str, Disk] = {}
    with ExitStack() as stack:
        pending: list[_Pending] = []
        for key, lay in items:
            final = folder / key
            stack.enter_context(locked(f"disks-{key}"))
            if final.exists():
                touch(final)
                out[key] = _load(final, cached=True)
                continue
            tmp = stack.enter_context(building(final))
            log.info("building disk %s (%s)", lay.name, key)
            pending.append(_prepare(lay, image, key, tmp, final))
        guest = [p for p in pending if p.source is not None]
        if guest:
            logs = cache_root() / "logs" / f"fill-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            _fill_in_guest(guest, logs)
        finished = [(p, _finish(p)) for p in pending]
    # building() published the folders when the ExitStack closed.
    for p, disk in finished:
        out[p.key] = replace(disk, path=p.final / "disk.raw")
    return out


def build_disks(layouts: Iterable[DiskLayout], image: Optional[Image] = None) -> list[Disk]:
    """The disks for ``layouts`` (cached); xfs/btrfs ones are filled in one builder boot."""
    image = image or build_image(PLAIN)
    layouts = list(layouts)
    keys = [_layout_key(lay, image) for lay in layouts]
    folder = cache_root() / "disks"
    folder.mkdir(exist_ok=True)
    unique = sorted(dict(zip(keys, layouts)).items())
    # Host-built disks first and published: the builder guest boots from one of them, and its
    # lock must not be held by this run while the guest group is being built.
    out = _build_group([(k, lay) for k, lay in unique if lay.built_on_host], image, folder)
    out.update(
        _build_group([(k, lay) for k, lay in unique if not lay.built_on_host], image, folder)
    )
    prune(folder, KEEP_DISKS)
    return [out[k] for k in keys]


def build_disk(layout: DiskLayout, image: Optional[Image] = None) -> Disk:
    return build_disks([layout], image)[0]


# ---------------------------------------------------------------------------------------------
# the layout matrix and checks in the guest


def matrix_layouts() -> list[DiskLayout]:
    """ext4/xfs/btrfs x gpt/msdos x (no free space, free space), plus one 4096-byte sector disk."""
    out = [
        DiskLayout(fs=fs, table=table, free_after_mib=free, content=Content.TREE)
        for fs in Filesystem
        for table in PartitionTable
        for free in (0, 64)
    ]
    out.append(
        DiskLayout(fs=Filesystem.XFS, table=PartitionTable.GPT, sector=4096, content=Content.TREE)
    )
    return out


def verify_root_script() -> str:
    """Guest shell lines: verify the test tree of the running root."""
    return (
        f"python3 {GUEST_TREE_TOOL} verify /{GUEST_TREE} /{GUEST_MANIFEST} "
        '|| echo "ERFS-VERIFY-FAILED root"\n'
    )


FSCK_READ_ONLY = {
    Filesystem.EXT4: "e2fsck -f -n",
    Filesystem.XFS: "xfs_repair -n",
    Filesystem.BTRFS: "btrfs check --readonly",
}


def fsck_script(fs: Filesystem, device: str, name: str) -> str:
    """Guest shell lines: a read-only check of the unmounted filesystem on ``device``.

    Prints ``ERFS-FSCK name=... fs=... rc=N`` (0: clean); the checker's output goes to the
    results channel with a ``fsck:`` prefix.
    """
    return (
        f"{FSCK_READ_ONLY[fs]} {device} 2>&1 | sed 's/^/fsck: /'; "
        f'echo "ERFS-FSCK name={name} fs={fs.value} rc=${{PIPESTATUS[0]}}"\n'
    )


def verify_disks_script(disks: Sequence[tuple[str, Disk]]) -> str:
    """Guest shell lines: check each ``(serial, disk)``'s filesystem read-only, then mount it
    read-only and verify its test tree.

    Prints ``ERFS-DISK serial=... dev=... fstype=... uuid=... lbs=... pttype=...``,
    ``ERFS-FSCK name=<serial> ... rc=...`` and the verifier's ``ERFS-TREE-OK
    root=/mnt/<serial>/...`` lines; never stops early.
    """
    lines = ["udevadm settle"]
    for serial, disk in disks:
        dev = f"/dev/disk/by-id/virtio-{serial}-part{disk.root_partition}"
        mnt = f"/mnt/{serial}"
        lines += [
            f"mkdir -p {mnt}",
            f'echo "ERFS-DISK serial={serial} dev=$(readlink -f {dev}) '
            f"fstype=$(blkid -o value -s TYPE {dev}) uuid=$(blkid -o value -s UUID {dev}) "
            f"lbs=$(blockdev --getss {dev}) pttype=$(blkid -o value -s PTTYPE "
            f'/dev/disk/by-id/virtio-{serial})"',
            fsck_script(disk.layout.fs, dev, serial).rstrip("\n"),
            f"if mount -o ro {dev} {mnt}; then",
            f"  python3 {GUEST_TREE_TOOL} verify {mnt}/{GUEST_TREE} {mnt}/{GUEST_MANIFEST} "
            f'|| echo "ERFS-VERIFY-FAILED {serial}"',
            f"  umount {mnt}",
            "else",
            f'  echo "ERFS-VERIFY-FAILED {serial} mount"',
            "fi",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# looking at raw bytes from the host (crash and secrecy tests)


def raw_view(image: Path, fmt: str, scratch: Path) -> Path:
    """A raw file with the guest-visible bytes of ``image`` (a qcow2 overlay is flattened)."""
    if fmt == "raw":
        return image
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, scratch])
    return scratch


def disk_sha256(image: Path, fmt: str = "qcow2", scratch: Optional[Path] = None) -> str:
    """sha256 of the bytes the guest sees on ``image``."""
    scratch = scratch or image.with_name(image.name + ".flat")
    raw = raw_view(image, fmt, scratch)
    try:
        h = hashlib.sha256()
        with open(raw, "rb") as f:
            while chunk := f.read(8 * MIB):
                h.update(chunk)
        return h.hexdigest()
    finally:
        if raw != image:
            raw.unlink(missing_ok=True)


def disk_contains(
    image: Path, needles: Sequence[bytes], fmt: str = "qcow2", scratch: Optional[Path] = None
) -> dict[bytes, bool]:
    """Which of ``needles`` occur anywhere in the guest-visible bytes of ``image``."""
    scratch = scratch or image.with_name(image.name + ".flat")
    raw = raw_view(image, fmt, scratch)
    found = dict.fromkeys(needles, False)
    overlap = max((len(n) for n in needles), default=1) - 1
    try:
        tail = b""
        with open(raw, "rb") as f:
            while chunk := f.read(8 * MIB):
                window = tail + chunk
                for n in needles:
                    if not found[n] and n in window:
                        found[n] = True
                tail = window[-overlap:] if overlap else b""
        return found
    finally:
        if raw != image:
            raw.unlink(missing_ok=True)


def images_identical(a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "raw") -> bool:
    """True when the guest-visible bytes of two images are the same (``qemu-img compare``)."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", fmt_a, "-F", fmt_b, str(a), str(b)], check=False
    )
    if proc.returncode not in (0, 1):
        raise LabError(f"`qemu-img compare {a} {b}` failed with exit code {proc.returncode}.")
    return proc.returncode == 0
