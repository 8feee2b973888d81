"""Disks that boot through their own boot loader, laid out the way cloud images are.

The kernel and the dracut initramfs live in ``/boot`` inside the root filesystem (as in Debian's
and Amazon Linux 2023's cloud images) and GRUB boots them with the lab's kernel command line
(:func:`encryptrootfs_lab.qemu.kernel_cmdline`) from ``/boot/grub/grub.cfg``:

* **BIOS** (SeaBIOS): an msdos table, GRUB's ``boot.img`` in the MBR and an i386-pc core image
  in the gap before the first partition. The core image's embedded config finds the root by
  filesystem UUID and sets ``prefix=($root)/boot/grub``, as ``grub-install`` does.
* **UEFI** (OVMF): a GPT with an ESP (vfat; partition 15 first on the disk, root partition 1
  after it, as in Debian's cloud images) holding a monolithic x86_64-efi GRUB at the removable
  path ``EFI/BOOT/BOOTX64.EFI`` (so no NVRAM entry is needed) and the Debian-style stub
  ``EFI/BOOT/grub.cfg`` that searches the root and loads ``/boot/grub/grub.cfg`` from it. The
  ESP is mounted at ``/boot/efi``.

Everything is written into the image file from the host with GRUB's own tools (``grub-mkimage``;
``boot.img`` and the core image are placed the way ``grub-bios-setup`` places them), sfdisk,
mkfs.vfat and mtools: no loop device, no mount. An XFS or btrfs root is filled in layout.py's
builder guest. Disks are cached by a hash of layout, image, GRUB version and this code.

Extra kernel arguments for one boot (``Machine.boot(append=...)``) reach ``grub.cfg`` as an
SMBIOS OEM string (:func:`encryptrootfs_lab.qemu.smbios_append_value`), read with GRUB's
``smbios`` command, so crash primitives and breakpoints work for disk boots too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Optional, Union

from encryptrootfs.log import get_logger
from encryptrootfs.run import run

from .cache import LabError, building, cache_root, digest, locked, prune, touch
from .image import PLAIN, Image, base_key, build_image, grub_append_cfg
from .layout import (
    MIB,
    ROOT_LABEL,
    Content,
    Disk,
    DiskLayout,
    Filesystem,
    PartitionTable,
    # layout.py's text is part of every cached disk's key: its builder-guest fill and mkfs
    # helpers are reused as they are rather than made public (the lead may rename them).
    _fill_in_guest,
    _mkfs_ext4,
    _Pending,
    _place,
    _Plan,
    _used_bytes,
)
from .qemu import Firmware, kernel_cmdline
from .testtree import cached_tree

log = get_logger("lab.bootloader")

KEEP_BOOT_DISKS = 8
GRUB_LIB = Path("/usr/lib/grub")
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_PARTITION = 1
ESP_PARTITION = 15
ESP_LABEL = "ESP"
ESP_MOUNT = "boot/efi"
GRUB_PREFIX = "/boot/grub"
# The modules both GRUB images carry (grub-mkimage adds their dependencies): every root
# filesystem the lab makes, the search by UUID, the normal mode and what grub.cfg uses. The
# images are monolithic, so /boot/grub needs no module folder.
GRUB_MODULES = (
    "part_msdos",
    "part_gpt",
    "ext2",
    "xfs",
    "btrfs",
    "search",
    "search_fs_uuid",
    "normal",
    "configfile",
    "linux",
    "echo",
    "test",
    "smbios",
    "regexp",
    "serial",
    "terminal",
)
PLATFORM = {Firmware.BIOS: "i386-pc", Firmware.UEFI: "x86_64-efi"}
PLATFORM_MODULES = {Firmware.BIOS: ("biosdisk",), Firmware.UEFI: ("fat",)}

# Offsets in GRUB's boot.img (grub-core's include/grub/i386/pc/boot.h).
BOOT_IMG_BPB = slice(0x03, 0x5A)  # a floppy's BIOS parameter block: kept from the disk
BOOT_IMG_KERNEL_SECTOR = 0x5C  # 8 bytes: the first sector of the core image (default 1)
BOOT_IMG_DRIVE_CHECK = 0x66  # a 2-byte jmp that grub-bios-setup turns into nops for a disk
BOOT_IMG_CODE_END = 0x1B8  # the MBR's disk signature and partition table start here
SECTOR = 512
EPOCH = 1_700_000_000  # file times on the ESP: the same bytes whenever the disk is built


@dataclass(frozen=True)
class BootDiskLayout:
    """A bootable disk: the firmware decides the partition table (BIOS: msdos, UEFI: GPT)."""

    firmware: Firmware
    fs: Filesystem = Filesystem.EXT4
    root_mib: int = 768
    free_after_mib: int = 64
    esp_mib: int = 64

    def __post_init__(self) -> None:
        if self.fs is Filesystem.XFS and self.root_mib < 300:
            raise ValueError("root_mib: XFS refuses filesystems below 300 MiB")
        if self.root_mib <= 0 or self.free_after_mib < 0:
            raise ValueError("root_mib must be positive and free_after_mib not negative")
        if self.firmware is Firmware.UEFI and not 8 <= self.esp_mib <= 1024:
            raise ValueError(f"esp_mib: must be 8..1024, not {self.esp_mib}")

    @property
    def table(self) -> PartitionTable:
        return PartitionTable.MSDOS if self.firmware is Firmware.BIOS else PartitionTable.GPT

    @property
    def name(self) -> str:
        parts = [
            self.firmware.value,
            self.fs.value,
            self.table.value,
            f"root{self.root_mib}M",
            f"free{self.free_after_mib}M",
        ]
        if self.firmware is Firmware.UEFI:
            parts.append(f"esp{self.esp_mib}M")
        return "-".join(parts)

    def disk_layout(self) -> DiskLayout:
        """The same disk in layout.py's terms (what :class:`Disk` and fsck scripts read)."""
        return DiskLayout(
            fs=self.fs,
            table=self.table,
            root_mib=self.root_mib,
            free_after_mib=self.free_after_mib,
            content=Content.ROOTFS,
        )


@dataclass(frozen=True)
class BootPlan:
    """Where the partitions go (bytes). ``esp_bytes`` is 0 without an ESP."""

    size: int
    esp_offset: int
    esp_bytes: int
    root_offset: int
    root_bytes: int


def plan_boot_disk(layout: BootDiskLayout) -> BootPlan:
    """1 MiB of room first (the MBR gap for GRUB's core image, or the GPT), then the ESP (UEFI),
    the root, the free space and 1 MiB at the end (the GPT backup)."""
    offset = MIB
    esp_offset, esp_bytes = 0, 0
    if layout.firmware is Firmware.UEFI:
        esp_offset, esp_bytes = offset, layout.esp_mib * MIB
        offset += esp_bytes
    root_bytes = layout.root_mib * MIB
    size = offset + root_bytes + layout.free_after_mib * MIB + MIB
    return BootPlan(size, esp_offset, esp_bytes, offset, root_bytes)


def sfdisk_script(
    layout: BootDiskLayout,
    plan: BootPlan,
    device: str,
    disk_id: uuid.UUID,
    root_guid: uuid.UUID,
    esp_guid: uuid.UUID,
) -> str:
    """The sfdisk input for ``device`` (the image file's path: it prefixes partition names)."""
    if layout.table is PartitionTable.MSDOS:
        return (
            f"label: dos\nlabel-id: 0x{disk_id.hex[:8]}\nunit: sectors\nsector-size: {SECTOR}\n\n"
            f"{device}{ROOT_PARTITION} : start={plan.root_offset // SECTOR}, "
            f"size={plan.root_bytes // SECTOR}, type=83, bootable\n"
        )
    return (
        f"label: gpt\nlabel-id: {disk_id}\nunit: sectors\nsector-size: {SECTOR}\n\n"
        f"{device}{ROOT_PARTITION} : start={plan.root_offset // SECTOR}, "
        f'size={plan.root_bytes // SECTOR}, type={LINUX_TYPE}, uuid={root_guid}, name="root"\n'
        f"{device}{ESP_PARTITION} : start={plan.esp_offset // SECTOR}, "
        f'size={plan.esp_bytes // SECTOR}, type={ESP_TYPE}, uuid={esp_guid}, name="esp"\n'
    )


def esp_volume_id(key: str) -> str:
    """The ESP's FAT volume id, as blkid and fstab spell it (``ABCD-1234``)."""
    raw = hashlib.sha256(f"erfslab:{key}:esp".encode()).hexdigest()[:8].upper()
    return f"{raw[:4]}-{raw[4:]}"


def _serial_terminal() -> str:
    # GRUB's own messages ("error: no such device ...") on the lab's console log.
    return (
        "serial --unit=0 --speed=115200\nterminal_input serial console\n"
        "terminal_output serial console\n"
    )


def find_root_cfg(root_uuid: str) -> str:
    """Find the root by filesystem UUID and point GRUB's prefix at its /boot/grub: the BIOS core
    image's embedded config and (plus ``configfile``) the ESP's ``grub.cfg`` stub."""
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root)'{GRUB_PREFIX}'\n"


def esp_stub_cfg(root_uuid: str) -> str:
    return find_root_cfg(root_uuid) + "configfile $prefix/grub.cfg\n"


def grub_cfg(root_uuid: str, kver: str) -> str:
    """``/boot/grub/grub.cfg``: one entry with the lab's command line, as update-grub writes it
    for one kernel, plus this boot's extra arguments from the SMBIOS OEM string."""
    cmdline = kernel_cmdline(root_uuid)
    return (
        "# encryptrootfs lab: written by encryptrootfs_lab.bootloader\n"
        + _serial_terminal()
        + "set default=0\nset timeout=0\n"
        + grub_append_cfg()
        + f"menuentry 'Debian GNU/Linux, with Linux {kver}' {{\n"
        + f"\tsearch --no-floppy --fs-uuid --set=root {root_uuid}\n"
        + f"\techo 'Loading Linux {kver} ...'\n"
        + f"\tlinux /boot/vmlinuz-{kver} {cmdline} $erfs_append\n"
        + "\techo 'Loading initial ramdisk ...'\n"
        + f"\tinitrd /boot/initrd.img-{kver}\n"
        + "}\n"
    )


def install_boot_img(mbr: bytes, boot_img: bytes) -> bytes:
    """The disk's first sector with GRUB's ``boot.img`` in it, as grub-bios-setup writes it.

    The boot code replaces bytes 0..0x1B7 except the BPB area (grub-bios-setup keeps what the
    disk had there); the disk signature and the partition table stay. The
    boot drive check becomes two nops (grub-bios-setup does that for a hard disk: a BIOS that
    hands over a wrong drive number then still reads the disk at 0x80). The core image must
    start at sector 1, the boot.img default, which is where :func:`build_boot_disk` puts it.
    """
    if len(mbr) != SECTOR or len(boot_img) != SECTOR:
        raise ValueError("the MBR and boot.img are 512 bytes each")
    if mbr[510:] != b"\x55\xaa":
        raise ValueError("the disk has no partition table in its first sector")
    kernel_sector = int.from_bytes(
        boot_img[BOOT_IMG_KERNEL_SECTOR : BOOT_IMG_KERNEL_SECTOR + 8], "little"
    )
    if kernel_sector != 1:
        raise ValueError(f"boot.img expects its core image at sector {kernel_sector}, not 1")
    code = bytearray(boot_img[:BOOT_IMG_CODE_END])
    code[BOOT_IMG_BPB] = mbr[BOOT_IMG_BPB]
    code[BOOT_IMG_DRIVE_CHECK : BOOT_IMG_DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(code) + mbr[BOOT_IMG_CODE_END:]


def core_image_fits(core_bytes: int, root_offset: int) -> bool:
    """Whether a core image of ``core_bytes`` fits between the MBR and the first partition."""
    return SECTOR + core_bytes <= root_offset


@dataclass(frozen=True)
class BootDisk:
    """A built bootable raw disk in the cache; ``disk`` is what :class:`Machine` takes."""

    layout: BootDiskLayout
    disk: Disk
    kver: str
    esp_uuid: Optional[str]
    grub_version: str

    @property
    def firmware(self) -> Firmware:
        return self.layout.firmware


# ---------------------------------------------------------------------------------------------


def grub_version() -> str:
    for tool in ("grub-mkimage", "mkfs.vfat", "mcopy"):
        if shutil.which(tool) is None:
            raise LabError(
                f"{tool} is not installed; no bootable disk was built.",
                hint="run `make apt` as root (grub-pc-bin, grub-efi-amd64-bin, dosfstools, mtools)",
            )
    out = run(["grub-mkimage", "--version"]).stdout.decode().strip()
    for firmware, platform in PLATFORM.items():
        if not (GRUB_LIB / platform / "moddep.lst").exists():
            raise LabError(
                f"GRUB's {platform} modules are missing ({GRUB_LIB / platform}); no bootable "
                f"{firmware.value} disk was built.",
                hint="run `make apt` as root (grub-pc-bin, grub-efi-amd64-bin)",
            )
    return out


def _layout_dict(layout: BootDiskLayout) -> dict[str, Union[str, int]]:
    return {k: v.value if isinstance(v, Enum) else v for k, v in asdict(layout).items()}


def _key(layout: BootDiskLayout, image: Image, version: str) -> str:
    builder = "host" if layout.fs is Filesystem.EXT4 else f"guest-{base_key()}"
    here = Path(__file__).parent
    return digest(
        [
            "bootdisk",
            _layout_dict(layout),
            image.key,
            builder,
            version,
            kernel_cmdline("UUID"),
            (here / "bootloader.py").read_text(),
            (here / "layout.py").read_text(),
        ]
    )


def _uuid(key: str, what: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"erfslab:{key}:{what}")


def _fstab(layout: BootDiskLayout, root_uuid: str, esp_uuid: Optional[str]) -> str:
    opts = "defaults,errors=remount-ro" if layout.fs is Filesystem.EXT4 else "defaults"
    fsck = 1 if layout.fs is Filesystem.EXT4 else 0
    lines = [f"UUID={root_uuid} / {layout.fs.value} {opts} 0 {fsck}"]
    if esp_uuid:
        # Debian's cloud images mount the ESP like this; no fsck.vfat in the lab's images.
        lines.append(f"UUID={esp_uuid} /{ESP_MOUNT} vfat umask=0077 0 0")
    return "\n".join(lines) + "\n"


def _stage(
    layout: BootDiskLayout, image: Image, work: Path, root_uuid: str, esp_uuid: Optional[str]
) -> Path:
    """A hard-link copy of the image's rootfs with fstab, the initramfs and grub.cfg in /boot."""
    staging = work / "staging"
    run(["cp", "-al", image.rootfs, staging])
    fstab = staging / "etc/fstab"
    fstab.unlink(missing_ok=True)  # a hard link into the image: replace, never write
    fstab.write_text(_fstab(layout, root_uuid, esp_uuid))
    boot = staging / "boot"
    if not (boot / f"vmlinuz-{image.kver}").exists():
        raise LabError(
            f"The image {image.key} has no /boot/vmlinuz-{image.kver}; no bootable disk was built."
        )
    initrd = boot / f"initrd.img-{image.kver}"
    initrd.unlink(missing_ok=True)
    os.link(image.initrd, initrd)
    (boot / "grub").mkdir(exist_ok=True)
    cfg = boot / "grub/grub.cfg"
    cfg.unlink(missing_ok=True)
    cfg.write_text(grub_cfg(root_uuid, image.kver))
    if esp_uuid:
        (staging / ESP_MOUNT).mkdir(parents=True, exist_ok=True)
    return staging


def _grub_image(firmware: Firmware, work: Path, early: Optional[str], prefix: str) -> Path:
    out = work / ("core.img" if firmware is Firmware.BIOS else "BOOTX64.EFI")
    argv: list[Union[str, Path]] = [
        "grub-mkimage",
        "-O",
        PLATFORM[firmware],
        "-o",
        out,
        "-p",
        prefix,
    ]
    if early is not None:
        (work / "early.cfg").write_text(early)
        argv += ["-c", work / "early.cfg"]
    run([*argv, *PLATFORM_MODULES[firmware], *GRUB_MODULES])
    return out


def _install_bios(disk: Path, work: Path, plan: BootPlan, root_uuid: str) -> None:
    core = _grub_image(
        Firmware.BIOS, work, _serial_terminal() + find_root_cfg(root_uuid), GRUB_PREFIX
    )
    core_bytes = core.read_bytes()
    if not core_image_fits(len(core_bytes), plan.root_offset):
        raise LabError(
            f"GRUB's core image ({len(core_bytes)} bytes) does not fit before the "
            "first partition; no disk was built."
        )
    boot_img = (GRUB_LIB / PLATFORM[Firmware.BIOS] / "boot.img").read_bytes()
    with open(disk, "r+b") as raw:
        mbr = raw.read(SECTOR)
        raw.seek(0)
        raw.write(install_boot_img(mbr, boot_img))
        raw.seek(SECTOR)
        raw.write(core_bytes)


def _make_esp(work: Path, plan: BootPlan, esp_uuid: str, root_uuid: str) -> Path:
    efi = _grub_image(Firmware.UEFI, work, None, "/EFI/BOOT")
    stub = work / "grub.cfg"
    stub.write_text(esp_stub_cfg(root_uuid))
    for path in (efi, stub):
        os.utime(path, (EPOCH, EPOCH))
    esp = work / "esp.fs"
    with open(esp, "wb") as f:
        f.truncate(plan.esp_bytes)
    run(["mkfs.vfat", "--invariant", "-i", esp_uuid.replace("-", ""), "-n", ESP_LABEL, esp])
    env = {"MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], env=env)
    run(["mcopy", "-m", "-i", esp, efi, "::/EFI/BOOT/BOOTX64.EFI"], env=env)
    run(["mcopy", "-m", "-i", esp, stub, "::/EFI/BOOT/grub.cfg"], env=env)
    return esp


def _manifest_sha() -> str:
    return hashlib.sha256(cached_tree()[1].read_bytes()).hexdigest()[:16]


def _load(folder: Path, *, cached: bool) -> BootDisk:
    info = json.loads((folder / "bootdisk.json").read_text())
    lay = info["layout"]
    layout = BootDiskLayout(
        firmware=Firmware(lay["firmware"]),
        fs=Filesystem(lay["fs"]),
        root_mib=lay["root_mib"],
        free_after_mib=lay["free_after_mib"],
        esp_mib=lay["esp_mib"],
    )
    disk = Disk(
        layout=layout.disk_layout(),
        key=info["key"],
        path=folder / "disk.raw",
        root_uuid=info["root_uuid"],
        boot_uuid=None,
        root_partition=ROOT_PARTITION,
        root_offset=info["root_offset"],
        root_bytes=info["root_bytes"],
        size_bytes=info["size_bytes"],
        manifest_sha=info["manifest_sha"],
        build_seconds=info["build_seconds"],
        cached=cached,
    )
    return BootDisk(layout, disk, info["kver"], info["esp_uuid"], info["grub_version"])


def _build(
    layout: BootDiskLayout, image: Image, key: str, tmp: Path, final: Path, version: str
) -> None:
    started = time.monotonic()
    root_uuid = str(_uuid(key, "root-fs"))
    esp_uuid = esp_volume_id(key) if layout.firmware is Firmware.UEFI else None
    plan = plan_boot_disk(layout)
    disk = tmp / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(plan.size)
    script = sfdisk_script(
        layout, plan, str(disk), _uuid(key, "disk"), _uuid(key, "part-root"), _uuid(key, "part-esp")
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk], stdin=script.encode())
    staging = _stage(layout, image, tmp, root_uuid, esp_uuid)
    if layout.fs is Filesystem.EXT4:
        _mkfs_ext4(staging, tmp / "root.fs", plan.root_bytes, root_uuid, ROOT_LABEL)
        _place(tmp / "root.fs", disk, plan.root_offset)
    else:
        used = _used_bytes(staging)
        if used + 32 * MIB > plan.root_bytes:
            raise LabError(
                f"The content ({used // MIB} MiB) does not fit a {layout.root_mib} MiB "
                f"{layout.fs.value} root; no disk was built.",
                hint="give the layout a larger root_mib",
            )
        source = tmp / "source.ext4"
        size = (used * 115 // 100 + 64 * MIB) // MIB * MIB
        _mkfs_ext4(staging, source, size, str(_uuid(key, "source-fs")), "erfssrc")
        shutil.rmtree(staging)
        pending = _Pending(
            layout.disk_layout(),
            key,
            tmp,
            final,
            root_uuid,
            None,
            ROOT_PARTITION,
            _Plan(plan.size, 0, plan.root_offset, plan.root_bytes),
            source,
            started,
        )
        logs = cache_root() / "logs" / f"bootfill-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        _fill_in_guest([pending], logs)
        source.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    if layout.firmware is Firmware.BIOS:
        _install_bios(disk, tmp, plan, root_uuid)
    else:
        assert esp_uuid is not None
        _place(_make_esp(tmp, plan, esp_uuid, root_uuid), disk, plan.esp_offset)
    for leftover in ("core.img", "BOOTX64.EFI", "grub.cfg", "early.cfg"):
        (tmp / leftover).unlink(missing_ok=True)
    info = {
        "layout": _layout_dict(layout),
        "key": key,
        "root_uuid": root_uuid,
        "esp_uuid": esp_uuid,
        "root_offset": plan.root_offset,
        "root_bytes": plan.root_bytes,
        "size_bytes": plan.size,
        "manifest_sha": _manifest_sha(),
        "kver": image.kver,
        "grub_version": version,
        "build_seconds": time.monotonic() - started,
    }
    (tmp / "bootdisk.json").write_text(json.dumps(info, indent=1))


def build_boot_disk(layout: BootDiskLayout, image: Optional[Image] = None) -> BootDisk:
    """The bootable disk for ``layout`` with ``image``'s rootfs (default: the plain image),
    cached; an XFS or btrfs root costs one builder-guest boot the first time."""
    image = image or build_image(PLAIN)
    version = grub_version()
    key = _key(layout, image, version)
    folder = cache_root() / "bootdisks"
    folder.mkdir(exist_ok=True)
    final = folder / key
    with locked(f"bootdisks-{key}"):
        if final.exists():
            touch(final)
            return _load(final, cached=True)
        log.info("building bootable disk %s (%s)", layout.name, key)
        with building(final) as tmp:
            _build(layout, image, key, tmp, final, version)
    prune(folder, KEEP_BOOT_DISKS)
    return _load(final, cached=False)
