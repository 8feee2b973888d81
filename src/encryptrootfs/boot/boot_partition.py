"""A plaintext /boot for images whose kernel lives inside the root (DESIGN.md, issue 6).

Once the root is encrypted, GRUB can no longer read ``/boot/vmlinuz-*`` from it. So, on the
first boot and **before key custody starts** (the root is still plain and GRUB still reads it),
the first boot moves /boot out:

1. plan      read-only: GRUB on this disk reads /boot from the root (a BIOS ``boot.img`` in the
             MBR, or an ESP ``grub.cfg`` stub that searches the root's UUID), the root has
             ``grub-mkconfig``, and free space after the root holds the new partition (placed
             at the end of that space, so the root can still grow up to it); without that
             space an ext4/btrfs root gives up its empty tail (filesystem, then partition,
             shrink first: both re-planned alike after a cut, as nothing is recorded yet)
2. record    the plan as JSON in the root (``/etc/encryptrootfs/boot-partition.json``): a boot
             cut later finds the same partition, UUID and loaders again
3. partition sfdisk adds it (ext4 for every GRUB); re-running finds it in the table
4. copy      mkfs + ``cp -a`` of the root's /boot, Boot Loader Specification entries made
             relative to the new partition, then a marker file; without the marker (a cut
             copy) the next boot formats and copies again
5. fstab     ``UUID=... /boot ext4`` added atomically (write, fsync, rename)
6. loader    ``grub-mkconfig`` in a chroot writes grub.cfg on the new /boot (paths relative to
             it); then the switch: BIOS ``grub-install`` (the core image's prefix becomes the new
             partition), UEFI the ESP stubs rewritten atomically to search the new UUID
7. done      the record says so; nothing above runs again

Until step 6 switches, GRUB keeps booting the old /boot inside the (plain) root, and the copy
on the new partition is complete before anything points at it; after the switch both hold the
same files. A power cut at any instant therefore still boots, and the next boot continues from
the record. The root's own /boot stays where it was, hidden under the new mount.
"""

from __future__ import annotations

import json
import os
import re
import uuid as uuid_module
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from ..devices import Partition
from ..errors import DeviceError, RefusedError
from ..log import get_logger
from ..plan_record import REDUCE_DEVICE_SIZE
from ..run import run
from . import filesystems, partitions
from .breakpoints import stop_after
from .console import say
from .filesystems import FsGeometry
from .partitions import MIB, Table

log = get_logger("boot.boot_partition")

RECORD = "etc/encryptrootfs/boot-partition.json"
COPIED = ".encryptrootfs-copied"  # on the new /boot once the copy is complete
BOOT_LABEL = "boot"
MOUNTS = Path("/run/encryptrootfs/mnt")
# GPT "Linux filesystem data" / msdos 0x83; not the XBOOTLDR type: GRUB does not care, and
# systemd-gpt-auto-generator would then mount it by itself beside our fstab line.
PART_TYPE = {"gpt": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "dos": "83"}
# GRUB 2.06 refuses ext4 with the metadata_csum_seed feature (incompatible flag); recent
# e2fsprogs profiles turn it on.
MKFS_OPTIONS = ("-O", "^metadata_csum_seed")
# What mounting the root read-only needs so that inspecting it writes nothing at all.
_RO_OPTIONS = {"ext4": "ro,noload", "xfs": "ro,norecovery", "btrfs": "ro,rescue=nologreplay"}
_CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "HOME": "/root"}


class Loader(str, Enum):
    BIOS_GRUB = "bios-grub"  # boot.img in the MBR, core image in the gap after it
    ESP_STUB = "esp-stub"  # EFI/<vendor>/grub.cfg on an ESP that searches the root

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class EspStub:
    device: str  # the ESP partition
    path: str  # the stub, relative to the ESP's root, e.g. EFI/debian/grub.cfg


@dataclass(frozen=True)
class BootMove:
    """The plan, and (as JSON in the root) the record a cut boot continues from."""

    number: int  # partition number of the new /boot
    start: int  # sectors
    size: int  # sectors
    sector_size: int
    fs_uuid: str
    loaders: tuple[str, ...]  # Loader values
    stubs: tuple[EspStub, ...] = ()
    grub_mkconfig: str = "grub-mkconfig"
    grub_install: str = "grub-install"
    grub_cfg: str = "/boot/grub/grub.cfg"
    root_size: Optional[int] = None  # sectors: the root partition shrinks to this first
    fs_size: Optional[int] = None  # bytes: and before that the root filesystem
    done: bool = False

    @property
    def start_bytes(self) -> int:
        return self.start * self.sector_size

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = 1
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BootMove:
        return cls(
            number=int(data["number"]),
            start=int(data["start"]),
            size=int(data["size"]),
            sector_size=int(data["sector_size"]),
            fs_uuid=str(data["fs_uuid"]),
            loaders=tuple(str(x) for x in data["loaders"]),
            stubs=tuple(EspStub(str(s["device"]), str(s["path"])) for s in data["stubs"]),
            grub_mkconfig=str(data["grub_mkconfig"]),
            grub_install=str(data["grub_install"]),
            grub_cfg=str(data["grub_cfg"]),
            done=bool(data["done"]),
            root_size=_opt_int(data.get("root_size")),
            fs_size=_opt_int(data.get("fs_size")),
        )


def _opt_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


# --- pure parts --------------------------------------------------------------------------------


def fstab_mounts(text: str) -> dict[str, str]:
    """Mount point -> source of every (uncommented) fstab line."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#"):
            out[fields[1].rstrip("/") or "/"] = fields[0]
    return out


def fstab_with_boot(text: str, fs_uuid: str) -> str:
    """``text`` with a /boot line for ``fs_uuid``; a /boot line already there is replaced.

    The line goes before the first mount below /boot (``/boot/efi``) so that ``mount -a``
    (which follows the file's order) mounts the parent first.
    """
    line = f"UUID={fs_uuid} /boot ext4 defaults 0 2  # encryptrootfs: plaintext /boot"
    kept: list[str] = []
    for old in text.splitlines():
        fields = old.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1].rstrip("/") == "/boot":
            continue
        kept.append(old)
    for i, old in enumerate(kept):
        fields = old.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1].startswith("/boot/"):
            kept.insert(i, line)
            break
    else:
        kept.append(line)
    return "\n".join(kept) + "\n"


def holds_kernels(names: Sequence[str]) -> bool:
    """Whether a /boot listing holds what GRUB loads (a kernel or GRUB's own folder)."""
    return any(n.startswith(("vmlinuz", "vmlinux")) or n in ("grub", "grub2") for n in names)


def mbr_has_grub(sector0: bytes) -> bool:
    """GRUB's boot.img carries the strings it prints on failure ("GRUB ", "Geom", "Hard Disk")."""
    return len(sector0) >= 512 and sector0[510:512] == b"\x55\xaa" and b"GRUB \x00" in sector0[:446]


_SEARCH = re.compile(r"^(\s*search\b.*?)([0-9a-fA-F-]{8,})(\s*.*)$")
_PREFIX = re.compile(r"(\bprefix=\S*?\))(['\"]?)/boot(/grub2?)")


def retarget_stub(text: str, root_uuid: str, boot_uuid: str) -> Optional[str]:
    """An ESP ``grub.cfg`` stub pointed at the new /boot, or None when it does not load the root.

    Debian's stub: ``search.fs_uuid ROOT root`` + ``set prefix=($root)'/boot/grub'``; RHEL's:
    ``search --no-floppy --fs-uuid --set=dev ROOT`` + ``set prefix=($dev)/boot/grub2``. The
    search names the new filesystem and the prefix loses its ``/boot``.
    """
    lines = text.splitlines()
    found = False
    out = []
    for line in lines:
        m = _SEARCH.match(line)
        if m and m.group(2).lower() == root_uuid.lower():
            line = m.group(1) + boot_uuid + m.group(3)
            found = True
        elif "prefix=" in line:
            line = _PREFIX.sub(r"\1\2\3", line)
        out.append(line)
    if not found:
        return None
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


@dataclass(frozen=True)
class Placement:
    """Where the new /boot goes, and what the root gives up for it when free space is short."""

    start: int  # sectors
    size: int  # sectors
    root_size: Optional[int] = None  # sectors: the root partition shrinks to this
    fs_size: Optional[int] = None  # bytes: the root filesystem shrinks to this first


_BLS_PATHS = re.compile(r"^(\s*(?:linux|initrd|devicetree)\s+)(.*)$")


def bls_entry_on_boot_partition(text: str, exists: Callable[[str], bool]) -> Optional[str]:
    """A Boot Loader Specification entry (RHEL, Fedora, Amazon Linux: /boot/loader/entries)
    with its kernel, initrd and devicetree paths relative to a /boot partition; None when
    nothing changes.

    kernel-install writes those paths relative to the filesystem GRUB reads them from
    (``/boot/vmlinuz-V`` while /boot is a folder of the root, ``/vmlinuz-V`` on a /boot
    partition) and GRUB's blscfg takes them as written, so copied entries would name files the
    new partition holds elsewhere. A path loses everything up to its ``/boot/`` only when the
    new partition has the file (``exists`` gets the path there); anything else (``$tuned_initrd``,
    paths already relative) is left as it is, so a second run changes nothing.
    """

    def fix(m: re.Match[str]) -> str:
        word = m.group(0)
        if not word.startswith("/") or "/boot/" not in word:
            return word
        rel = "/" + word.split("/boot/", 1)[1]
        return rel if exists(rel) else word

    out = []
    for line in text.split("\n"):
        m = _BLS_PATHS.match(line)
        if m is not None:
            line = m.group(1) + re.sub(r"\S+", fix, m.group(2))
        out.append(line)
    new = "\n".join(out)
    return None if new == text else new


def place(
    table: Table, root_node: str, size_bytes: int, fs: Optional[FsGeometry] = None
) -> Placement:
    """A new partition at the end of the free space after the root (the root keeps the header's
    32 MiB before it and can grow up to it later); when that space is too small and ``fs`` can
    shrink, the room comes from the root's tail: filesystem, then partition, shrink. Refuses
    otherwise, saying how much to leave."""
    free = partitions.free_after(table, root_node)
    entry = next(e for e in table.entries if e.node == root_node)
    ss = table.sector_size
    root_start = entry.start * ss
    root_end = (entry.start + entry.size) * ss
    start = (root_end + free - size_bytes) // MIB * MIB
    if start - root_end >= REDUCE_DEVICE_SIZE:
        return Placement(start // ss, size_bytes // ss)
    fs_size = None
    if fs is not None and fs.min_size is not None:
        fs_size = (start - root_start - REDUCE_DEVICE_SIZE) // fs.block_size * fs.block_size
    if (
        fs is not None
        and fs_size is not None
        and fs.min_size is not None
        and fs_size >= fs.min_size
        and start > root_start
    ):
        return Placement(
            start // ss, size_bytes // ss, (start - root_start) // ss, min(fs_size, fs.size)
        )
    needed = size_bytes + REDUCE_DEVICE_SIZE + MIB
    how = (
        ""
        if fs is None or fs.min_size is None
        else (
            f", and the filesystem cannot give up {(root_end - start + REDUCE_DEVICE_SIZE) // MIB} "
            f"MiB of its tail (it needs {fs.min_size // MIB} MiB)"
        )
    )
    raise RefusedError(
        f"GRUB reads /boot from the root {root_node}, so a {size_bytes // MIB} MiB "
        f"plaintext /boot partition must be made before encrypting, but there are only "
        f"{free // MIB} MiB free after the root (it needs {needed // MIB} MiB with the "
        f"LUKS2 header's room){how}. Nothing was changed.",
        hint=f"leave at least {needed // MIB} MiB unpartitioned after the root partition "
        "(cloud disks larger than the image have it), or set [first_boot] "
        "boot_partition_mib lower",
    )


def free_number(table: Table, disk: str) -> int:
    """The lowest partition number not in use (msdos: primary partitions only)."""
    used = {partition_number(e.node, disk) for e in table.entries}
    limit = 4 if table.label == "dos" else 128
    for n in range(1, limit + 1):
        if n not in used:
            return n
    raise RefusedError(
        f"{disk} has no free partition number for a /boot partition; nothing was changed.",
        hint="use a GPT disk, or leave a primary slot free",
    )


def partition_node(disk: str, number: int) -> str:
    """/dev/vda + 2 -> /dev/vda2; /dev/nvme0n1 + 2 -> /dev/nvme0n1p2."""
    return f"{disk}p{number}" if disk[-1:].isdigit() else f"{disk}{number}"


def partition_number(node: str, disk: str) -> int:
    tail = node[len(disk) :].lstrip("p")
    return int(tail) if tail.isdigit() else 0


def grub_tools(root: Path) -> tuple[Optional[str], Optional[str], str]:
    """(grub-install, grub-mkconfig, grub.cfg path) as this root's distribution names them."""
    for install, mkconfig, cfg in (
        ("grub-install", "grub-mkconfig", "/boot/grub/grub.cfg"),
        ("grub2-install", "grub2-mkconfig", "/boot/grub2/grub.cfg"),
    ):
        found_mk = _in_root(root, mkconfig)
        if found_mk is not None:
            return _in_root(root, install), mkconfig, cfg
    return None, None, "/boot/grub/grub.cfg"


def _in_root(root: Path, program: str) -> Optional[str]:
    for folder in ("usr/sbin", "usr/bin", "sbin", "bin"):
        if os.access(root / folder / program, os.X_OK):
            return program
    return None


# --- reading the disk (no writes) --------------------------------------------------------------


@contextmanager
def mounted(device: str, fs_type: str, options: str, name: str) -> Iterator[Path]:
    target = MOUNTS / name
    target.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", fs_type, "-o", options, device, str(target)])
    try:
        yield target
    finally:
        run(["umount", str(target)])


def _read_record(root: Path) -> Optional[BootMove]:
    path = root / RECORD
    if not path.exists():
        return None
    try:
        return BootMove.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise RefusedError(
            f"The /boot move record /{RECORD} in the root is unreadable ({exc}). An earlier "
            "boot had started moving /boot; the root is still plain, and this boot changed "
            "nothing.",
            hint=f"from a rescue system, check the root's /etc/fstab and the disk's partitions, "
            f"then delete /{RECORD} so that the next boot plans the move again",
        ) from exc


def _esp_stubs(part: Partition, siblings: Sequence[Partition]) -> list[EspStub]:
    """Stubs on vfat partitions of the root's disk that load the root's /boot/grub."""
    stubs = []
    for esp in siblings:
        if esp.disk != part.disk or esp.signature.type != "vfat":
            continue
        with mounted(esp.path, "vfat", "ro", "esp") as top:
            for cfg in sorted((top / "EFI").glob("*/grub.cfg")) if (top / "EFI").is_dir() else []:
                text = cfg.read_text(errors="replace")
                if retarget_stub(text, part.signature.uuid, part.signature.uuid) is not None:
                    stubs.append(EspStub(esp.path, str(cfg.relative_to(top))))
    return stubs


def plan(
    part: Partition,
    siblings: Sequence[Partition],
    table: Table,
    size_mib: int,
    fs: Optional[FsGeometry] = None,
) -> Optional[BootMove]:
    """Read-only: the /boot move this root needs (None: none), or a refusal that says why."""
    fs_type = part.signature.type
    with open(part.disk, "rb") as f:
        bios = mbr_has_grub(f.read(512))
    stubs = _esp_stubs(part, siblings)
    if not bios and not stubs:
        # No GRUB on this disk reads the root (the kernel comes from elsewhere, e.g. a /boot
        # partition the ESP's stub searches, or the hypervisor): the root is not even mounted.
        return None
    with mounted(part.path, fs_type, _RO_OPTIONS[fs_type], "root") as root:
        record = _read_record(root)
        if record is not None:
            return None if record.done else record
        fstab = (root / "etc/fstab").read_text() if (root / "etc/fstab").exists() else ""
        boot = root / "boot"
        if (
            "/boot" in fstab_mounts(fstab)
            or not boot.is_dir()
            or not holds_kernels(os.listdir(boot))
        ):
            return None
        install, mkconfig, cfg = grub_tools(root)
        used = _tree_bytes(boot)
    if mkconfig is None or (bios and install is None):
        raise RefusedError(
            f"GRUB on {part.disk} reads /boot from the root {part.path}, which has no "
            f"{'grub-install and ' if bios else ''}grub-mkconfig to move it to a plaintext "
            "partition: once encrypted, the machine would not boot. Nothing was changed.",
            hint="install the distribution's GRUB package in the image, or give the image a "
            "separate /boot partition",
        )
    if table.label == "dos" and part.number > 4:
        # The new partition is a primary one; beside a logical root it would have to live
        # inside the extended partition, which this move does not rearrange.
        raise RefusedError(
            f"GRUB reads /boot from the root {part.path}, a logical partition; encryptrootfs "
            "moves /boot only beside a primary (or GPT) root. Nothing was changed.",
            hint="give the image a separate /boot partition, or a primary root partition",
        )
    size = size_mib * MIB
    if used * 2 + 16 * MIB > size:
        raise RefusedError(
            f"The root's /boot holds {used // MIB} MiB; a {size_mib} MiB /boot partition would "
            "leave no room for a kernel update. Nothing was changed.",
            hint=f"set [first_boot] boot_partition_mib to at least {(used * 2) // MIB + 16}",
        )
    where = place(table, part.path, size, fs)
    if where.fs_size is not None:
        # (only a tail that holds nothing: see filesystems.check_shrink_in_place)
        filesystems.check_shrink_in_place(fs_type, part.path, where.fs_size)
    loaders = ((Loader.BIOS_GRUB.value,) if bios else ()) + (
        (Loader.ESP_STUB.value,) if stubs else ()
    )
    return BootMove(
        number=free_number(table, part.disk),
        start=where.start,
        size=where.size,
        sector_size=table.sector_size,
        fs_uuid=str(uuid_module.uuid4()),
        loaders=loaders,
        stubs=tuple(stubs),
        grub_mkconfig=mkconfig,
        grub_install=install or "",
        grub_cfg=cfg,
        root_size=where.root_size,
        fs_size=where.fs_size,
    )


def _tree_bytes(top: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(top):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


# --- the move (writes) -------------------------------------------------------------------------


def move(part: Partition, move: BootMove, table: Table) -> None:
    """Steps 2-7 of the module docstring; each one finds out whether it is done already."""
    node = partition_node(part.disk, move.number)
    say(
        f"{part.path}: GRUB reads /boot from the root; moving /boot to a plaintext partition "
        f"{node} ({move.size * move.sector_size // MIB} MiB) before encrypting"
    )
    _make_room(part, move, table)
    with mounted(part.path, part.signature.type, "rw", "root") as root:
        _write_json(root / RECORD, move.to_json())
        _ensure_partition(part, move, table, node)
        _ensure_copy(root, node, move)
        _write_text(
            root / "etc/fstab",
            fstab_with_boot(
                (root / "etc/fstab").read_text() if (root / "etc/fstab").exists() else "",
                move.fs_uuid,
            ),
        )
        say(f"{part.path}: /boot copied to {node} and added to /etc/fstab")
        stop_after("boot-copy")
        _switch_loader(part, move, root, node)
        _write_json(root / RECORD, replace(move, done=True).to_json())
    say(f"{part.path}: GRUB now boots from {node}; the root can be encrypted")
    stop_after("boot-loader")


def _make_room(part: Partition, move: BootMove, table: Table) -> None:
    """When the root gives up its tail: the filesystem shrinks, then the partition. Both are
    re-runnable (a size already reached is left), and the order keeps the filesystem inside
    its partition at every instant."""
    if move.root_size is None or move.fs_size is None:
        return
    fs = filesystems.geometry(part.signature.type, part.path)
    if fs.size > move.fs_size:
        say(
            f"{part.path}: shrinking {part.signature.type} to {move.fs_size // MIB} MiB to make "
            "room for /boot"
        )
        filesystems.shrink(part.signature.type, part.path, move.fs_size)
    stop_after("boot-shrink")  # the filesystem ends inside the old and the new partition
    if part.size > move.root_size * move.sector_size:
        say(
            f"{part.path}: shrinking the partition to {move.root_size * move.sector_size // MIB}"
            " MiB"
        )
        partitions.grow(part, table, move.root_size * move.sector_size)


def _ensure_partition(part: Partition, move: BootMove, table: Table, node: str) -> None:
    existing = [e for e in table.entries if e.node == node]
    if existing:
        e = existing[0]
        if (e.start, e.size) != (move.start, move.size):
            raise DeviceError(
                f"{node} exists but not where the /boot move record says (start {e.start}, "
                f"size {e.size} sectors, recorded {move.start}, {move.size}); the root is "
                "still plain and GRUB still boots it. Stopping.",
                hint=f"inspect the partition table of {part.disk}; remove /{RECORD} from the "
                "root to plan the move again",
            )
        return
    run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-N", str(move.number), part.disk],
        stdin=f"{move.start},{move.size},{PART_TYPE[table.label]}\n".encode(),
    )
    run(["partx", "-a", "--nr", str(move.number), part.disk])
    run(["udevadm", "settle", "--timeout=30"], check=False)


def _ensure_copy(root: Path, node: str, move: BootMove) -> None:
    sig = run(["blkid", "-p", "-o", "value", "-s", "UUID", node], check=False)
    if sig.stdout.decode().strip() == move.fs_uuid:
        with mounted(node, "ext4", "ro", "boot") as boot:
            if (boot / COPIED).exists():
                return  # complete: GRUB may point at it already, never format it again
    run(["mkfs.ext4", "-q", "-F", *MKFS_OPTIONS, "-U", move.fs_uuid, "-L", BOOT_LABEL, node])
    with mounted(node, "ext4", "rw", "boot") as boot:
        # (the ESP's mount point /boot/efi comes along as an empty folder)
        run(["cp", "-a", f"{root / 'boot'}/.", f"{boot}/"])
        _retarget_bls_entries(boot, node)
        os.sync()
        _write_text(boot / COPIED, "the root's /boot was copied here by encryptrootfs\n")


def _retarget_bls_entries(boot: Path, node: str) -> None:
    """The copied Boot Loader Specification entries, their kernel paths made relative to the
    new partition (part of the copy: done before its completion marker)."""
    entries = boot / "loader" / "entries"
    changed = 0
    for entry in sorted(entries.glob("*.conf")) if entries.is_dir() else []:
        new = bls_entry_on_boot_partition(
            entry.read_text(errors="replace"), lambda rel: (boot / rel.lstrip("/")).exists()
        )
        if new is not None:
            _write_text(entry, new)
            changed += 1
    if changed:
        say(
            f"{node}: {changed} boot loader entries (loader/entries) now name their kernel "
            "relative to the /boot partition"
        )


def _switch_loader(part: Partition, move: BootMove, root: Path, node: str) -> None:
    with _chroot_mounts(root, node):
        # grub.cfg first: it lands on the new /boot, which nothing reads until the switch.
        _chroot(root, move.grub_mkconfig, "-o", move.grub_cfg)
        if Loader.BIOS_GRUB.value in move.loaders:
            say(f"{part.disk}: reinstalling GRUB's core image to read /boot from {node}")
            _chroot(root, move.grub_install, "--target=i386-pc", part.disk)
    for stub in move.stubs:
        with mounted(stub.device, "vfat", "rw", "esp") as esp:
            path = esp / stub.path
            new = retarget_stub(path.read_text(errors="replace"), part.signature.uuid, move.fs_uuid)
            if new is None:
                continue  # rewritten by a boot that was cut after this step
            say(f"{stub.device}: {stub.path} now loads GRUB's configuration from {node}")
            _write_text(path, new)


@contextmanager
def _chroot_mounts(root: Path, boot_node: str) -> Iterator[None]:
    done: list[Path] = []
    try:
        run(["mount", "-t", "ext4", boot_node, str(root / "boot")])
        done.append(root / "boot")
        for sub in ("dev", "proc", "sys"):
            run(["mount", "--bind", f"/{sub}", str(root / sub)])
            done.append(root / sub)
        yield
    finally:
        for target in reversed(done):
            run(["umount", str(target)], check=False)


def _chroot(root: Path, *argv: str) -> None:
    # (the preflight has checked that the initramfs has chroot: tools.Need.BOOT)
    run(
        ["chroot", str(root), *argv],
        env=_CHROOT_ENV,
        hint="the root is still plain and GRUB still boots the old /boot; see the output above",
    )


def _write_text(path: Path, text: str) -> None:
    """Atomically: a power cut leaves the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".encryptrootfs-new")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
