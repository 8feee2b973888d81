"""The pure parts of disk boots: partition plans, sfdisk input, GRUB configs, boot.img placement,
and the QEMU arguments of a firmware boot."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from encryptrootfs_lab.bootloader import (
    BOOT_IMG_CODE_END,
    ESP_TYPE,
    LINUX_TYPE,
    BootDiskLayout,
    core_image_fits,
    esp_stub_cfg,
    esp_volume_id,
    grub_cfg,
    install_boot_img,
    plan_boot_disk,
    sfdisk_script,
)
from encryptrootfs_lab.cache import LabError
from encryptrootfs_lab.layout import MIB, Filesystem, PartitionTable
from encryptrootfs_lab.qemu import (
    OVMF_CODE,
    BootSpec,
    Drive,
    Firmware,
    kernel_cmdline,
    qemu_argv,
    smbios_append_value,
)

ROOT = "0a1b2c3d-0000-4000-8000-000000000001"
IDS = (uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3))


def test_bios_disk_is_msdos_with_the_root_at_1_mib_and_no_esp() -> None:
    layout = BootDiskLayout(Firmware.BIOS, root_mib=100, free_after_mib=10)
    plan = plan_boot_disk(layout)
    assert layout.table is PartitionTable.MSDOS
    assert (plan.esp_bytes, plan.root_offset, plan.root_bytes) == (0, MIB, 100 * MIB)
    assert plan.size == MIB + 100 * MIB + 10 * MIB + MIB
    script = sfdisk_script(layout, plan, "/d.raw", *IDS)
    assert "label: dos" in script
    assert "/d.raw1 : start=2048, size=204800, type=83, bootable" in script
    assert "/d.raw15" not in script


def test_uefi_disk_has_the_esp_first_numbered_15_and_the_root_as_partition_1() -> None:
    layout = BootDiskLayout(Firmware.UEFI, fs=Filesystem.XFS, root_mib=400, esp_mib=32)
    plan = plan_boot_disk(layout)
    assert layout.table is PartitionTable.GPT
    assert (plan.esp_offset, plan.esp_bytes) == (MIB, 32 * MIB)
    assert plan.root_offset == 33 * MIB
    script = sfdisk_script(layout, plan, "/d.raw", *IDS)
    root = next(line for line in script.splitlines() if line.startswith("/d.raw1 "))
    esp = next(line for line in script.splitlines() if line.startswith("/d.raw15 "))
    assert f"start={33 * 2048}" in root and LINUX_TYPE in root and str(IDS[1]) in root
    assert "start=2048," in esp and f"size={32 * 2048}" in esp and ESP_TYPE in esp
    assert f"label-id: {IDS[0]}" in script


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fs": Filesystem.XFS, "root_mib": 200}, "XFS"),
        ({"root_mib": 0}, "root_mib"),
        ({"esp_mib": 4}, "esp_mib"),
    ],
)
def test_layout_rejects_what_cannot_be_built(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BootDiskLayout(Firmware.UEFI, **kwargs)  # type: ignore[arg-type]


def test_layout_names_differ_by_firmware_and_filesystem() -> None:
    names = {
        BootDiskLayout(fw, fs=fs).name
        for fw in Firmware
        for fs in (Filesystem.EXT4, Filesystem.XFS)
    }
    assert len(names) == 4
    assert BootDiskLayout(Firmware.UEFI).name.startswith("uefi-ext4-gpt-")


def test_grub_cfg_boots_the_kernel_in_the_root_with_the_lab_command_line() -> None:
    cfg = grub_cfg(ROOT, "6.1.0-9-amd64")
    linux = next(line.strip() for line in cfg.splitlines() if line.strip().startswith("linux "))
    assert linux == f"linux /boot/vmlinuz-6.1.0-9-amd64 {kernel_cmdline(ROOT)} $erfs_append"
    for word in (
        "console=ttyS0,115200",
        "panic=-1",
        "rd.shell=0",
        "rd.emergency=poweroff",
        "modprobe.blacklist=",
        f"root=UUID={ROOT}",
    ):
        assert word in linux
    assert "initrd /boot/initrd.img-6.1.0-9-amd64" in cfg
    assert f"--fs-uuid --set=root {ROOT}" in cfg
    assert "set timeout=0" in cfg
    # the per-boot extra arguments come from the SMBIOS string QEMU is given
    assert "smbios --type 11 --get-string 4 --set erfs_oem" in cfg
    assert "'^erfs-append=(.*)$'" in cfg


def test_esp_stub_searches_the_root_and_loads_its_grub_cfg() -> None:
    assert esp_stub_cfg(ROOT).splitlines() == [
        f"search.fs_uuid {ROOT} root",
        "set prefix=($root)'/boot/grub'",
        "configfile $prefix/grub.cfg",
    ]


def test_esp_volume_id_is_stable_and_fat_shaped() -> None:
    vid = esp_volume_id("k1")
    assert vid == esp_volume_id("k1") != esp_volume_id("k2")
    assert len(vid) == 9 and vid[4] == "-" and vid.replace("-", "").isalnum()
    assert vid == vid.upper()


def _boot_img() -> bytes:
    img = bytearray(range(256)) * 2
    img[0x5C:0x64] = (1).to_bytes(8, "little")
    img[0x66:0x68] = b"\xeb\x05"
    return bytes(img)


def _mbr() -> bytes:
    mbr = bytearray(512)
    mbr[0x03:0x5A] = b"\x11" * (0x5A - 0x03)
    mbr[440:446] = b"SIGN\x00\x00"
    mbr[446:510] = b"\x22" * 64
    mbr[510:] = b"\x55\xaa"
    return bytes(mbr)


def test_boot_img_goes_into_the_mbr_keeping_table_signature_and_bpb() -> None:
    boot_img, mbr = _boot_img(), _mbr()
    out = install_boot_img(mbr, boot_img)
    assert len(out) == 512
    assert out[BOOT_IMG_CODE_END:] == mbr[BOOT_IMG_CODE_END:]  # signature + table + 55aa
    assert out[0x03:0x5A] == mbr[0x03:0x5A]
    assert out[:0x03] == boot_img[:0x03]
    assert out[0x5A:0x66] == boot_img[0x5A:0x66]
    assert out[0x66:0x68] == b"\x90\x90"  # the drive check jmp, as grub-bios-setup does
    assert out[0x68:BOOT_IMG_CODE_END] == boot_img[0x68:BOOT_IMG_CODE_END]


def test_boot_img_refuses_a_disk_without_table_or_an_unexpected_core_sector() -> None:
    with pytest.raises(ValueError, match="partition table"):
        install_boot_img(bytes(512), _boot_img())
    other = bytearray(_boot_img())
    other[0x5C:0x64] = (2048).to_bytes(8, "little")
    with pytest.raises(ValueError, match="sector 2048"):
        install_boot_img(_mbr(), bytes(other))


def test_core_image_must_fit_before_the_first_partition() -> None:
    assert core_image_fits(MIB - 512, MIB)
    assert not core_image_fits(MIB - 511, MIB)


def test_smbios_value_doubles_commas_for_qemu() -> None:
    assert smbios_append_value(["rd.encryptrootfs.break=header,token", "x=1"]) == (
        "type=11,value=erfs-append=rd.encryptrootfs.break=header,,token x=1"
    )


def _spec(**kw: object) -> BootSpec:
    base: dict[str, object] = {
        "kernel": None,
        "initrd": None,
        "root_uuid": ROOT,
        "drives": (Drive(Path("/r.qcow2")), Drive(Path("/x.qcow2"))),
    }
    base.update(kw)
    return BootSpec(**base)  # type: ignore[arg-type]


def _argv(spec: BootSpec) -> list[str]:
    return qemu_argv(spec, Path("/c"), Path("/r"), None)


def test_bios_boot_has_no_kernel_and_boots_the_first_disk() -> None:
    argv = _argv(_spec(firmware=Firmware.BIOS))
    assert "-kernel" not in argv and "-append" not in argv and "pflash" not in " ".join(argv)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    disks = [d for d in devices if d.startswith("virtio-blk-pci")]
    assert disks[0].endswith(",bootindex=0") and "bootindex" not in disks[1]
    assert "virtio-net-pci,netdev=n0,romfile=" in devices
    assert "-smbios" not in argv  # no extra arguments, no OEM string


def test_uefi_boot_uses_ovmf_with_the_machines_vars_and_passes_append() -> None:
    argv = _argv(_spec(firmware=Firmware.UEFI, efi_vars=Path("/m/efi-vars.fd"), append=("a=1,2",)))
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}" in drives
    assert "if=pflash,format=raw,unit=1,file=/m/efi-vars.fd" in drives
    assert argv[argv.index("-smbios") + 1] == "type=11,value=erfs-append=a=1,,2"


def test_direct_boot_is_unchanged() -> None:
    argv = _argv(_spec(kernel=Path("/k"), initrd=Path("/i"), append=("x=1",)))
    assert argv[argv.index("-kernel") + 1] == "/k"
    assert argv[argv.index("-append") + 1] == kernel_cmdline(ROOT, ("x=1",))
    assert "-smbios" not in argv and "bootindex" not in " ".join(argv)
    assert "virtio-net-pci,netdev=n0" in argv


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({}, "needs a kernel"),
        ({"firmware": Firmware.UEFI}, "OVMF_VARS"),
        ({"firmware": Firmware.BIOS, "kernel": Path("/k")}, "from the disk"),
        ({"firmware": Firmware.BIOS, "drives": ()}, "a disk to boot from"),
    ],
)
def test_inconsistent_boot_specs_are_refused(kw: dict[str, object], says: str) -> None:
    with pytest.raises(LabError, match=says):
        _argv(_spec(**kw))
