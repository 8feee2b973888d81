"""The pure parts of moving /boot out of the root (encryptrootfs.boot.boot_partition)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from encryptrootfs.boot import boot_partition as bp
from encryptrootfs.boot.filesystems import FsGeometry, ext4_unclean
from encryptrootfs.boot.first_boot import Preflight, RoomPlan
from encryptrootfs.boot.partitions import MIB, Table, TableEntry
from encryptrootfs.config import parse_config
from encryptrootfs.errors import ConfigError, RefusedError

ROOT = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
BOOT = "6f1c3a52-7a44-4f0e-9d36-2f6a6b7f6e01"

DEBIAN_STUB = (
    f"search.fs_uuid {ROOT} root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n"
)
RHEL_STUB = (
    f"search --no-floppy --fs-uuid --set=dev {ROOT}\n"
    "set prefix=($dev)/boot/grub2\nexport $prefix\nconfigfile $prefix/grub.cfg\n"
)


def test_debian_stub_searches_the_new_boot_and_drops_the_boot_folder_from_the_prefix() -> None:
    assert bp.retarget_stub(DEBIAN_STUB, ROOT, BOOT) == (
        f"search.fs_uuid {BOOT} root\nset prefix=($root)'/grub'\nconfigfile $prefix/grub.cfg\n"
    )


def test_rhel_stub_is_retargeted_the_same_way() -> None:
    assert bp.retarget_stub(RHEL_STUB, ROOT.upper(), BOOT) == (
        f"search --no-floppy --fs-uuid --set=dev {BOOT}\n"
        "set prefix=($dev)/grub2\nexport $prefix\nconfigfile $prefix/grub.cfg\n"
    )


def test_a_stub_for_another_filesystem_or_already_retargeted_is_left_alone() -> None:
    other = DEBIAN_STUB.replace(ROOT, "0000aaaa-0000-0000-0000-000000000000")
    assert bp.retarget_stub(other, ROOT, BOOT) is None
    done = bp.retarget_stub(DEBIAN_STUB, ROOT, BOOT)
    assert done is not None and bp.retarget_stub(done, ROOT, BOOT) is None


def test_fstab_gets_one_boot_line_before_the_esp_and_a_rerun_replaces_it() -> None:
    fstab = "# static\nUUID=r / ext4 defaults 0 1\nUUID=E /boot/efi vfat umask=0077 0 0\n"
    once = bp.fstab_with_boot(fstab, BOOT)
    lines = once.splitlines()
    assert lines[0] == "# static"
    assert lines[2].startswith(f"UUID={BOOT} /boot ext4 ")
    assert lines[3].startswith("UUID=E /boot/efi ")
    again = bp.fstab_with_boot(once, "11111111-2222-3333-4444-555555555555")
    assert again.count(" /boot ext4 ") == 1 and BOOT not in again
    assert bp.fstab_mounts(once)["/boot"] == f"UUID={BOOT}"
    assert bp.fstab_with_boot("", BOOT).startswith(f"UUID={BOOT} /boot ")


def test_fstab_mounts_ignores_comments_and_normalises_trailing_slashes() -> None:
    text = "#UUID=x /boot ext4 defaults 0 2\nUUID=y /boot/ ext4 defaults 0 2\n\nnone\n"
    assert bp.fstab_mounts(text) == {"/boot": "UUID=y"}


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["vmlinuz-6.1.0-50-amd64", "initrd.img-6.1.0-50-amd64"], True),
        (["grub2", "loader"], True),
        (["efi"], False),
        ([], False),
    ],
)
def test_holds_kernels(names: list[str], expected: bool) -> None:
    assert bp.holds_kernels(names) is expected


def test_mbr_with_grub_boot_img_is_recognised_and_an_empty_protective_mbr_is_not() -> None:
    mbr = bytearray(512)
    mbr[510:] = b"\x55\xaa"
    assert not bp.mbr_has_grub(bytes(mbr))
    text = b"GRUB \x00Geom\x00Hard Disk\x00Read\x00 Error"  # where boot.img has it
    mbr[0x180 : 0x180 + len(text)] = text
    assert bp.mbr_has_grub(bytes(mbr))
    mbr[510:] = b"\x00\x00"
    assert not bp.mbr_has_grub(bytes(mbr))


def _table(label: str, root_sectors: int, disk_sectors: int, *more: TableEntry) -> Table:
    entries = (TableEntry("/dev/vda1", 2048, root_sectors), *more)
    return Table(label, 512, disk_sectors - 34 if label == "gpt" else disk_sectors - 1, entries)


def test_the_new_partition_goes_at_the_end_of_the_free_space_leaving_the_header_room() -> None:
    # root 1 GiB at 1 MiB, disk 2 GiB: /boot (256 MiB) ends at the last whole MiB before the
    # GPT's backup header.
    table = _table("gpt", 2 * 1024 * 1024, 4 * 1024 * 1024)
    where = bp.place(table, "/dev/vda1", 256 * MIB)
    start, size = where.start, where.size
    assert where.root_size is None and where.fs_size is None
    assert size * 512 == 256 * MIB
    assert (start * 512) % MIB == 0
    assert start + size <= table.last_usable + 1
    assert (start + size) * 512 > table.last_usable * 512 - MIB
    # a partition after the free space limits it
    other = TableEntry("/dev/vda2", 3 * 1024 * 1024, 2048)
    start2 = bp.place(
        _table("gpt", 2 * 1024 * 1024, 4 * 1024 * 1024, other), "/dev/vda1", 256 * MIB
    ).start
    assert start2 + 256 * MIB // 512 <= other.start


def test_no_room_for_boot_and_header_is_refused_with_how_much_to_leave() -> None:
    # 200 MiB free after the root: 256 MiB /boot + 32 MiB header room do not fit.
    table = _table("dos", 2 * 1024 * 1024, 2 * 1024 * 1024 + 2048 + 200 * 2048)
    with pytest.raises(RefusedError) as info:
        bp.place(table, "/dev/vda1", 256 * MIB)
    assert "only 200 MiB free after the root" in info.value.message
    assert "Nothing was changed" in info.value.message
    assert info.value.hint is not None and "289 MiB" in info.value.hint


def test_partition_numbers_and_nodes() -> None:
    table = _table("dos", 2048, 8192, TableEntry("/dev/vda2", 4096, 100))
    assert bp.free_number(table, "/dev/vda") == 3
    assert bp.partition_node("/dev/vda", 3) == "/dev/vda3"
    assert bp.partition_node("/dev/nvme0n1", 2) == "/dev/nvme0n1p2"
    assert bp.partition_number("/dev/nvme0n1p12", "/dev/nvme0n1") == 12
    full = _table(
        "dos", 2048, 9000, *(TableEntry(f"/dev/vda{n}", 4096 + n * 100, 50) for n in (2, 3, 4))
    )
    with pytest.raises(RefusedError, match="no free partition number"):
        bp.free_number(full, "/dev/vda")


def test_the_record_round_trips_through_json() -> None:
    move = bp.BootMove(
        number=2,
        start=4096,
        size=524288,
        sector_size=512,
        fs_uuid=BOOT,
        loaders=("bios-grub", "esp-stub"),
        stubs=(bp.EspStub("/dev/vda15", "EFI/debian/grub.cfg"),),
    )
    data = move.to_json()
    assert data["version"] == 1 and data["done"] is False
    assert bp.BootMove.from_json(data) == move
    assert move.start_bytes == 4096 * 512


def test_ext4_that_needs_journal_recovery_or_has_errors_is_named() -> None:
    clean = "Filesystem state:         clean\nFilesystem features:      has_journal extent\n"
    assert ext4_unclean(clean) is None
    journal = clean.replace("extent", "extent needs_recovery")
    assert "journal needs recovery" in (ext4_unclean(journal) or "")
    errors = clean.replace("clean", "clean with errors")
    assert "marked with errors" in (ext4_unclean(errors) or "")


def test_boot_partition_config_is_validated() -> None:
    base: dict[str, Any] = {
        "root": {"device": "UUID=x"},
        "providers": {"aws_kms": {"key_id": "alias/k"}},
    }
    config = parse_config(
        {**base, "first_boot": {"boot_partition_mib": 256, "move_boot": False}}, source="t"
    )
    assert config.first_boot.boot_partition_mib == 256 and config.first_boot.move_boot is False
    defaults = parse_config(base, source="t").first_boot
    assert defaults.boot_partition_mib == 512 and defaults.move_boot is True
    with pytest.raises(ConfigError, match="boot_partition_mib"):
        parse_config({**base, "first_boot": {"boot_partition_mib": 16}}, source="t")


def test_without_free_space_an_ext4_root_gives_up_its_tail_for_boot_and_the_header() -> None:
    # root 1 GiB at 1 MiB, filling the disk; ext4 could shrink to 400 MiB.
    table = _table("dos", 2 * 1024 * 1024, 2048 + 2 * 1024 * 1024)
    fs = FsGeometry("ext4", 1024 * MIB, 4096, 400 * MIB)
    where = bp.place(table, "/dev/vda1", 256 * MIB, fs)
    assert where.root_size is not None and where.fs_size is not None
    root_end = (2048 + where.root_size) * 512
    assert root_end == where.start * 512  # /boot right after the smaller root
    assert (where.start + where.size) * 512 <= (table.last_usable + 1) * 512
    assert where.fs_size == where.root_size * 512 - 32 * MIB  # the header's room inside
    assert where.fs_size % 4096 == 0 and where.fs_size >= fs.min_size  # type: ignore[operator]


def test_a_root_that_cannot_give_up_enough_is_refused_naming_what_it_needs() -> None:
    table = _table("dos", 2 * 1024 * 1024, 2048 + 2 * 1024 * 1024)
    full = FsGeometry("ext4", 1024 * MIB, 4096, 900 * MIB)
    with pytest.raises(RefusedError) as info:
        bp.place(table, "/dev/vda1", 256 * MIB, full)
    assert "cannot give up 288 MiB of its tail (it needs 900 MiB)" in info.value.message
    xfs = FsGeometry("xfs", 1024 * MIB, 4096, None)
    with pytest.raises(RefusedError, match="only 0 MiB free"):
        bp.place(table, "/dev/vda1", 256 * MIB, xfs)


def test_a_boot_cut_between_or_after_the_shrinks_plans_the_same_move_again() -> None:
    # The record is written after the shrinks, so a boot cut before it plans afresh from the
    # disk: after the filesystem shrank, and after the partition did too, the plan is the same.
    table = _table("dos", 2 * 1024 * 1024, 2048 + 2 * 1024 * 1024)
    first = bp.place(table, "/dev/vda1", 256 * MIB, FsGeometry("ext4", 1024 * MIB, 4096, 400 * MIB))
    assert first.fs_size is not None and first.root_size is not None
    fs_shrunk = FsGeometry("ext4", first.fs_size, 4096, 390 * MIB)
    assert bp.place(table, "/dev/vda1", 256 * MIB, fs_shrunk) == first
    part_shrunk = _table("dos", first.root_size, 2048 + 2 * 1024 * 1024)
    assert bp.place(part_shrunk, "/dev/vda1", 256 * MIB, fs_shrunk) == first


def test_the_preflight_line_says_the_root_gives_up_its_tail() -> None:
    table = _table("dos", 2 * 1024 * 1024, 2048 + 2 * 1024 * 1024)
    fs = FsGeometry("ext4", 1024 * MIB, 4096, 400 * MIB)
    where = bp.place(table, "/dev/vda1", 256 * MIB, fs)
    move = bp.BootMove(
        number=2,
        start=where.start,
        size=where.size,
        sector_size=512,
        fs_uuid=BOOT,
        loaders=("bios-grub",),
        stubs=(),
        root_size=where.root_size,
        fs_size=where.fs_size,
    )
    pre = Preflight(fs, RoomPlan(), table, ROOT, move)
    assert pre.describe() == (
        "/boot and the LUKS2 header take the root's tail: filesystem 736 MiB, partition 768 MiB"
    )
    assert Preflight(fs, RoomPlan(), table, ROOT, None).describe() == "there is room already"


# An entry as kernel-install writes it on RHEL 9 / Amazon Linux 2023 while /boot is a folder of
# the root (tuned's extra initrd is a GRUB variable, not a path).
BLS_IN_ROOT = """\
title Amazon Linux (6.1.112-122.189.amzn2023.x86_64) 2023
version 6.1.112-122.189.amzn2023.x86_64
linux /boot/vmlinuz-6.1.112-122.189.amzn2023.x86_64
initrd /boot/initramfs-6.1.112-122.189.amzn2023.x86_64.img $tuned_initrd
options root=UUID=1b4e28ba-2fa1-11d2-883f-0016d3cca427 ro console=ttyS0 $tuned_params
grub_users $grub_users
grub_arg --unrestricted
grub_class amzn
"""
ON_PARTITION = {
    "/vmlinuz-6.1.112-122.189.amzn2023.x86_64",
    "/initramfs-6.1.112-122.189.amzn2023.x86_64.img",
}


def test_bls_entries_name_their_kernel_relative_to_the_new_boot_partition() -> None:
    new = bp.bls_entry_on_boot_partition(BLS_IN_ROOT, ON_PARTITION.__contains__)
    assert new is not None
    assert "linux /vmlinuz-6.1.112-122.189.amzn2023.x86_64\n" in new
    assert "initrd /initramfs-6.1.112-122.189.amzn2023.x86_64.img $tuned_initrd\n" in new
    # everything else stays as it was, byte for byte
    assert (
        new.replace("linux /vmlinuz", "linux /boot/vmlinuz").replace(
            "initrd /initramfs", "initrd /boot/initramfs"
        )
        == BLS_IN_ROOT
    )
    # a second run (a cut boot copying again) changes nothing
    assert bp.bls_entry_on_boot_partition(new, ON_PARTITION.__contains__) is None


def test_a_bls_path_is_left_alone_unless_the_new_partition_has_its_file() -> None:
    # a btrfs root's subvolume prefix goes too; a file the copy lacks keeps its path
    entry = "linux /@/boot/vmlinuz-6.1\ninitrd /boot/initrd-missing.img\noptions ro\n"
    new = bp.bls_entry_on_boot_partition(entry, {"/vmlinuz-6.1"}.__contains__)
    assert new == "linux /vmlinuz-6.1\ninitrd /boot/initrd-missing.img\noptions ro\n"
    # options and titles that merely mention /boot/ are not paths to rewrite
    other = "title /boot/x\noptions init=/boot/x\n"
    assert bp.bls_entry_on_boot_partition(other, lambda _: True) is None


def test_the_copy_rewrites_its_bls_entries_in_place_and_keeps_their_mode(tmp_path: Path) -> None:
    entries = tmp_path / "loader" / "entries"
    entries.mkdir(parents=True)
    for name in ON_PARTITION:
        (tmp_path / name.lstrip("/")).write_text("")
    entry = entries / "ec2abc-6.1.112-122.189.amzn2023.x86_64.conf"
    entry.write_text(BLS_IN_ROOT)
    entry.chmod(0o600)
    (entries / "notes.txt").write_text("linux /boot/vmlinuz-6.1.112-122.189.amzn2023.x86_64\n")
    bp._retarget_bls_entries(tmp_path, "/dev/vda2")
    assert entry.read_text() == bp.bls_entry_on_boot_partition(
        BLS_IN_ROOT, ON_PARTITION.__contains__
    )
    assert entry.stat().st_mode & 0o777 == 0o600
    assert "/boot/" in (entries / "notes.txt").read_text()  # only *.conf are entries
    assert sorted(p.name for p in entries.iterdir()) == [entry.name, "notes.txt"]  # no temp left
