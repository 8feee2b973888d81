"""Images whose kernel lives in the root, booted through their own GRUB (issue 6).

The first boot moves /boot to a plaintext partition and points GRUB at it before the key is
made, then encrypts; every later boot goes through GRUB again and unlocks. A kernel update in
the encrypted guest (a new kernel package: dracut rebuilds the initramfs with the module,
update-grub adds the entry) still unlocks on the next boot. Power cuts during the /boot copy
and during grub-install leave a machine that boots and finishes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from encryptrootfs_lab.bootloader import BootDisk, BootDiskLayout, build_boot_disk
from encryptrootfs_lab.cloud import EmulatedCloud
from encryptrootfs_lab.image import Image, ImageSpec, build_image
from encryptrootfs_lab.layout import Filesystem
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.offline import check_encrypted_root
from encryptrootfs_lab.product import INSTALL, create_lab_key, inspect_script, lab_config
from encryptrootfs_lab.qemu import BootEnd, BootResult, Firmware

BOOT_MIB = 256
GRUB_IMAGE = ImageSpec(
    name="encrypt-grub",
    config_toml=lab_config(first_boot_extra=f"boot_partition_mib = {BOOT_MIB}\n"),
    chroot_commands=(INSTALL,),
    kernel_update=True,
)
IMAGES = (GRUB_IMAGE,)  # built with the session's others (tests/vm/conftest.py)
# Room after the root for the /boot partition and the header's 32 MiB.
# The root has room for the update's kernel modules and for dracut's work folder in /var/tmp
# (~200 MiB while it builds the new kernel's initramfs).
BIOS = BootDiskLayout(Firmware.BIOS, Filesystem.EXT4, root_mib=1152, free_after_mib=BOOT_MIB + 40)
UEFI = BootDiskLayout(Firmware.UEFI, Filesystem.XFS, root_mib=1152, free_after_mib=BOOT_MIB + 40)

# What the tests read in the booted guest besides the usual inspection: where /boot and / come
# from, what GRUB handed the kernel, and GRUB's view of the disk.
SCRIPT = (
    inspect_script()
    + """\
echo "ERFS-BOOTMNT source=$(findmnt -no SOURCE /boot) fstype=$(findmnt -no FSTYPE /boot) \
uuid=$(findmnt -no UUID /boot)"
echo "ERFS-CMDLINE $(cat /proc/cmdline)"
echo "ERFS-KERNEL $(uname -r)"
echo "ERFS-RECORD $(tr -d '\\n ' < /etc/encryptrootfs/boot-partition.json)"
"""
)
# The disk's partitions in sectors, as the kernel sees them.
PARTS = """\
for p in /sys/block/vda/vda[0-9]*; do
  echo "ERFS-PART ${p##*/} $(cat "$p/start") $(cat "$p/size")"; done
"""


def _parts(r: BootResult) -> dict[str, tuple[int, int]]:
    """{name: (start, size)} from the PARTS lines, in sectors."""
    out = {}
    for mk in r.all("PART"):
        name, start, size = mk.value.split()
        out[name] = (int(start), int(size))
    return out


# Boot 2: a kernel update in the encrypted guest, as apt would do it (dpkg runs the kernel's
# postinst hooks: dracut, then update-grub).
UPDATE = (
    SCRIPT
    + """\
echo "ERFS-DF $(df -m --output=target,avail / /boot | tail -n +2 | tr -s ' \n' '  ')"
deb=$(ls /var/cache/erfs-lab/linux-image-*.deb)
if dpkg -i "$deb" > /tmp/dpkg.log 2>&1; then echo "ERFS-DPKG ok"; else
  echo "ERFS-DPKG failed"; sed 's/^/ERFS-DPKGLOG /' /tmp/dpkg.log; fi
new=$(dpkg-deb -f "$deb" Package | sed 's/^linux-image-//')
echo "ERFS-NEWKVER $new"
if lsinitrd "/boot/initrd.img-$new" 2>/dev/null | grep -q 'encryptrootfs.service'; then
  echo "ERFS-NEWINITRD module"; else echo "ERFS-NEWINITRD no-module"; fi
echo "ERFS-GRUBCFG $(grep -c "vmlinuz-$new" /boot/grub/grub.cfg)"
sync
"""
)


@pytest.fixture(scope="module")
def grub_image() -> Image:
    return build_image(GRUB_IMAGE)


def _machine(
    layout: BootDiskLayout,
    image: Image,
    cloud: EmulatedCloud,
    workdir: Path,
    machines: list[Machine],
) -> tuple[BootDisk, Machine]:
    """The bootable disk for ``layout`` (cached) and a machine booting it, its key created."""
    bd = build_boot_disk(layout, image)
    create_lab_key(cloud.kms)
    m = Machine(image, bd.disk, workdir, forwards=cloud.forwards(), boot_from_disk=bd.firmware)
    machines.append(m)
    return bd, m


def _assert_fsck_clean(m: Machine, cloud: EmulatedCloud, scratch: Path) -> None:
    """The root, decrypted on the host, passes its filesystem's read-only check."""
    fsck = check_encrypted_root(m.overlay, m.disk, cloud.kms, scratch)
    assert fsck.clean, fsck.output


def _journal(r: BootResult) -> str:
    return "\n".join(m.value for m in r.all("JOURNAL"))


def _assert_unlocked_through_grub(r: BootResult, bd: BootDisk, kver: str) -> None:
    """Booted by GRUB from the plaintext /boot, root opened by encryptrootfs, tree intact."""
    assert r.ok and r.booted_state == "running", r.describe()
    assert r.marker("TREE-OK") is not None and r.marker("VERIFY-FAILED") is None, r.describe()
    dev = r.marker("ROOTDEV")
    assert dev is not None and dev.fields() == {"dm": "crypt", "uuid": bd.disk.root_uuid}, (
        r.describe()
    )
    mnt = r.marker("BOOTMNT")
    assert mnt is not None and mnt.fields()["fstype"] == "ext4", r.describe()
    assert mnt.fields()["source"] == "/dev/vda2" or bd.firmware is Firmware.UEFI, mnt.value
    cmdline = r.marker("CMDLINE")
    # The kernel came from the root of the /boot partition, not from /boot inside the root.
    assert cmdline is not None and cmdline.value.startswith(f"BOOT_IMAGE=/vmlinuz-{kver} "), (
        r.describe()
    )
    kernel = r.marker("KERNEL")
    assert kernel is not None and kernel.value == kver
    record = r.marker("RECORD")
    assert record is not None and '"done":true' in record.value, r.describe()


def test_bios_grub_ext4_moves_boot_encrypts_unlocks_and_survives_a_kernel_update(
    grub_image: Image, cloud: EmulatedCloud, machines: list[Machine], tmp_path: Path
) -> None:
    bd, m = _machine(BIOS, grub_image, cloud, tmp_path / "bios", machines)

    first = m.boot(SCRIPT, timeout=1500, name="first")
    assert first.ok, first.describe()
    j1 = _journal(first)
    assert (
        "GRUB reads /boot from the root; moving /boot to a plaintext partition /dev/vda2" in j1
    ), j1
    assert "/dev/vda: reinstalling GRUB's core image to read /boot from /dev/vda2" in j1, j1
    # the move happened before the key was made and the header written
    assert j1.index("GRUB now boots from /dev/vda2") < j1.index("writing the LUKS2 header"), j1
    assert "encrypting /dev/vda1:" in j1, j1
    # boot 1 came up from GRUB's old configuration (/boot inside the then plain root)
    cmd1 = first.marker("CMDLINE")
    assert cmd1 is not None and cmd1.value.startswith(f"BOOT_IMAGE=/boot/vmlinuz-{bd.kver} ")

    second = m.boot(UPDATE, timeout=1500, name="second")
    _assert_unlocked_through_grub(second, bd, bd.kver)
    assert "the root is encrypted (unlock)" in _journal(second)
    assert "Booting `Debian GNU/Linux" in second.console
    dpkg = second.marker("DPKG")
    assert dpkg is not None and dpkg.value == "ok", second.describe()
    new = second.marker("NEWKVER")
    assert new is not None and new.value != bd.kver and new.value.endswith("-cloud-amd64")
    initrd = second.marker("NEWINITRD")
    assert initrd is not None and initrd.value == "module", second.describe()
    grubcfg = second.marker("GRUBCFG")
    assert grubcfg is not None and int(grubcfg.value) >= 1, second.describe()

    third = m.boot(SCRIPT, timeout=900, name="third")
    _assert_unlocked_through_grub(third, bd, new.value)
    assert "the root is encrypted (unlock)" in _journal(third)
    _assert_fsck_clean(m, cloud, tmp_path / "flat.img")


# test-all only (~10 min: four boots, one of them a whole first boot).
@pytest.mark.slow
def test_power_cuts_during_the_boot_copy_and_during_grub_install_still_boot(
    grub_image: Image, cloud: EmulatedCloud, machines: list[Machine], tmp_path: Path
) -> None:
    bd, m = _machine(BIOS, grub_image, cloud, tmp_path / "cuts", machines)

    # 1. A cut 1 s after the move starts: the partition is being made, formatted or filled.
    cut1 = m.boot(
        None,
        kill_on_console=r"moving /boot to a plaintext partition",
        kill_delay=1.0,
        timeout=900,
        name="cut-copy",
    )
    assert cut1.end is BootEnd.KILLED, cut1.describe()
    # 2. GRUB still boots (the old /boot in the plain root); a cut 1 s into grub-install.
    cut2 = m.boot(
        None,
        kill_on_console=r"reinstalling GRUB's core image",
        kill_delay=1.0,
        timeout=900,
        name="cut-grub",
    )
    assert cut2.end is BootEnd.KILLED, cut2.describe()
    assert "Booting `Debian GNU/Linux" in cut2.console
    assert "moving /boot to a plaintext partition /dev/vda2" in cut2.console, cut2.describe()
    # 3. Whatever the cut left, this boot comes up through GRUB, finishes the move, encrypts.
    third = m.boot(SCRIPT, timeout=1500, name="finish")
    assert third.ok and third.marker("TREE-OK") is not None, third.describe()
    assert "GRUB now boots from /dev/vda2" in _journal(third), _journal(third)
    assert "encrypting /dev/vda1:" in _journal(third)
    # 4. And the next boot goes through the GRUB the cut boots left, and unlocks.
    fourth = m.boot(SCRIPT, timeout=900, name="unlock")
    _assert_unlocked_through_grub(fourth, bd, bd.kver)
    _assert_fsck_clean(m, cloud, tmp_path / "flat.img")


@pytest.mark.slow
def test_uefi_grub_xfs_with_an_esp_moves_boot_encrypts_and_unlocks(
    grub_image: Image, cloud: EmulatedCloud, machines: list[Machine], tmp_path: Path
) -> None:
    bd, m = _machine(UEFI, grub_image, cloud, tmp_path / "uefi", machines)
    first = m.boot(SCRIPT, timeout=1800, name="first")
    assert first.ok, first.describe()
    j1 = _journal(first)
    assert "EFI/BOOT/grub.cfg now loads GRUB's configuration from" in j1, j1
    assert "reinstalling GRUB's core image" not in j1, j1
    second = m.boot(SCRIPT, timeout=900, name="second")
    _assert_unlocked_through_grub(second, bd, bd.kver)
    _assert_fsck_clean(m, cloud, tmp_path / "flat.img")


# test-all only (~15 min: five boots, one of them a whole first boot).
@pytest.mark.slow
def test_without_free_space_the_ext4_root_gives_up_its_tail_for_boot_through_power_cuts(
    grub_image: Image, cloud: EmulatedCloud, machines: list[Machine], tmp_path: Path
) -> None:
    # The root partition reaches the end of the disk: no room for /boot after it.
    layout = BootDiskLayout(Firmware.BIOS, Filesystem.EXT4, root_mib=1500, free_after_mib=0)
    bd, m = _machine(layout, grub_image, cloud, tmp_path / "shrink", machines)
    old_start = bd.disk.root_offset // 512
    old_end = (bd.disk.root_offset + bd.disk.root_bytes) // 512

    # 1. A cut while resize2fs shrinks the filesystem (the tail is free: metadata only).
    # (resize2fs of a free tail took under 0.29 s in a guest: cut 0.1 s after it starts)
    cut1 = m.boot(
        None,
        kill_on_console=r"resize2fs to \d+ MiB \(the tail is free",
        kill_delay=0.1,
        timeout=900,
        name="cut-resize",
    )
    assert cut1.end is BootEnd.KILLED, cut1.describe()
    assert "to make room for /boot" in cut1.console, cut1.describe()
    assert "shrinking the partition to" not in cut1.console, cut1.describe()
    # 2. Exactly between the two shrinks: the filesystem smaller, the partition not yet.
    cut2 = m.boot(
        None,
        append=("rd.encryptrootfs.break=boot-shrink",),
        kill_on_console=r"rd\.encryptrootfs\.break=boot-shrink: stopped",
        kill_delay=0.5,
        timeout=900,
        name="cut-between",
    )
    assert cut2.end is BootEnd.KILLED, cut2.describe()
    # 3. A cut 1 s after the partition shrink starts (the table, then the new partition: in a
    # guest this lands in the new partition's mkfs or copy).
    cut3 = m.boot(
        None,
        kill_on_console=r"shrinking the partition to \d+ MiB",
        kill_delay=1.0,
        timeout=900,
        name="cut-partition",
    )
    assert cut3.end is BootEnd.KILLED, cut3.describe()
    # 4. This boot finishes the move and finds the header's room made by the same shrink.
    finish = m.boot(SCRIPT + PARTS, timeout=1800, name="finish")
    assert finish.ok and finish.marker("TREE-OK") is not None, finish.describe()
    j = _journal(finish)
    assert "GRUB now boots from /dev/vda2" in j, j
    assert "after the /boot move: there is room already" in j, j
    assert "encrypting /dev/vda1:" in j, j
    # The root gave up its tail: /boot starts where the root now ends, inside where the root
    # ended before, and ends in the disk's last whole MiB.
    parts = _parts(finish)
    (root_start, root_size), (boot_start, boot_size) = parts["vda1"], parts["vda2"]
    disk_end = bd.disk.size_bytes // 512
    assert root_start == old_start and root_start + root_size == boot_start < old_end, parts
    assert boot_size == BOOT_MIB * 2048 and disk_end - 2048 < boot_start + boot_size <= disk_end
    # 5. The next boot goes through GRUB from the new /boot and unlocks.
    second = m.boot(SCRIPT, timeout=900, name="second")
    _assert_unlocked_through_grub(second, bd, bd.kver)
    _assert_fsck_clean(m, cloud, tmp_path / "flat.img")
