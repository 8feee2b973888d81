"""Boots through the disk's own boot loader (issue 6): SeaBIOS + GRUB i386-pc from an msdos
disk, OVMF + GRUB x86_64-efi from a GPT disk with an ESP; the kernel and the initramfs are read
from /boot inside the root filesystem, QEMU gets no -kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from encryptrootfs_lab.bootloader import BootDisk, BootDiskLayout, build_boot_disk
from encryptrootfs_lab.image import Image
from encryptrootfs_lab.layout import Filesystem, verify_root_script
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.qemu import BootEnd, BootResult, Firmware, kernel_cmdline

# One extra argument with a comma: it must reach the kernel through GRUB unchanged.
EXTRA = "erfslab.disk-boot=grub,check"
SCRIPT = (
    verify_root_script()
    + """\
echo "ERFS-CMDLINE $(cat /proc/cmdline)"
if [ -d /sys/firmware/efi ]; then echo "ERFS-FIRMWARE uefi"; else echo "ERFS-FIRMWARE bios"; fi
echo "ERFS-ESP fstype=$(findmnt -no FSTYPE /boot/efi) uuid=$(findmnt -no UUID /boot/efi)"
echo "ERFS-ESP-FILES $(ls /boot/efi/EFI/BOOT 2>/dev/null | tr '\\n' ' ')"
"""
)


def _machine(image: Image, bd: BootDisk, workdir: Path, machines: list[Machine]) -> Machine:
    m = Machine(image, bd.disk, workdir, boot_from_disk=bd.firmware)
    machines.append(m)
    return m


def _assert_booted_through_grub(r: BootResult, bd: BootDisk, m: Machine) -> None:
    assert r.ok, r.describe()
    assert r.booted_state == "running", r.describe()
    root = r.marker("ROOT")
    assert root is not None, r.describe()
    assert root.fields()["uuid"] == bd.disk.root_uuid
    assert root.fields()["fstype"] == bd.layout.fs.value
    assert root.fields()["source"] == "/dev/vda1"
    tree = r.marker("TREE-OK")
    assert tree is not None and tree.fields()["manifest"] == bd.disk.manifest_sha, r.describe()
    assert r.marker("VERIFY-FAILED") is None
    # GRUB loaded the kernel from /boot in the root, with the lab's command line and the extra
    # argument of this boot; QEMU had no kernel of its own to hand over.
    cmdline = r.marker("CMDLINE")
    assert cmdline is not None, r.describe()
    assert cmdline.value.startswith(f"BOOT_IMAGE=/boot/vmlinuz-{bd.kver} "), cmdline.value
    assert kernel_cmdline(bd.disk.root_uuid, (EXTRA,)) in cmdline.value
    assert "Booting `Debian GNU/Linux" in r.console
    qemu_cmd = (m.workdir / f"{r.name}.qemu-cmd").read_text()
    assert "-kernel" not in qemu_cmd and "-initrd" not in qemu_cmd
    firmware = r.marker("FIRMWARE")
    assert firmware is not None and firmware.value == bd.firmware.value, r.describe()


# CI boots through GRUB (BIOS) in test_boot_partition.py; this one stays for test-all.
@pytest.mark.slow
def test_bios_grub_boots_ext4_root_on_msdos_and_survives_a_power_cut(
    plain_image: Image, machines: list[Machine], tmp_path: Path
) -> None:
    bd = build_boot_disk(BootDiskLayout(Firmware.BIOS, Filesystem.EXT4), plain_image)
    m = _machine(plain_image, bd, tmp_path / "bios", machines)
    # A power cut once the booted root is written to (the crash primitives work for disk boots).
    cut = m.boot(SCRIPT, append=(EXTRA,), kill_on_console=r"flush runtime journal")
    assert cut.end is BootEnd.KILLED, cut.describe()
    assert cut.marker("BEGIN") is None
    assert "Booting `Debian GNU/Linux" in cut.console
    r = m.boot(SCRIPT, append=(EXTRA,))
    _assert_booted_through_grub(r, bd, m)
    esp = r.marker("ESP")
    assert esp is not None and esp.fields()["fstype"] == "", r.describe()


@pytest.mark.slow
def test_uefi_grub_boots_xfs_root_on_gpt_with_an_esp(
    plain_image: Image, machines: list[Machine], tmp_path: Path
) -> None:
    bd = build_boot_disk(BootDiskLayout(Firmware.UEFI, Filesystem.XFS), plain_image)
    m = _machine(plain_image, bd, tmp_path / "uefi", machines)
    assert m.efi_vars is not None and m.efi_vars.parent == m.workdir
    r = m.boot(SCRIPT, append=(EXTRA,))
    _assert_booted_through_grub(r, bd, m)
    esp = r.marker("ESP")
    assert esp is not None, r.describe()
    assert esp.fields() == {"fstype": "vfat", "uuid": bd.esp_uuid}, r.describe()
    files = r.marker("ESP-FILES")
    assert files is not None and set(files.value.split()) == {"BOOTX64.EFI", "grub.cfg"}
