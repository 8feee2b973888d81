"""Bad input: each is refused with a message that names the problem, and the disk is untouched.

File-backed images stand in for the root partition: the planner probes them with the same
blkid/cryptsetup/resize2fs calls it makes in the initramfs. (The vm tier boots the cases that
need a whole machine: two disks matching the root selector, XFS without room.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from encryptrootfs import devices
from encryptrootfs.boot import filesystems, locate_root
from encryptrootfs.boot.decide import decide
from encryptrootfs.boot.first_boot import plan_room
from encryptrootfs.cli import main
from encryptrootfs.devices import find_root
from encryptrootfs.errors import DeviceError, EncryptrootfsError, ExitCode, RefusedError
from encryptrootfs.run import run
from header.conftest import MIB, luks_format
from support.robustness import Case


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def blank(path: Path, size: int) -> Path:
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


def unchanged(case: Case, path: Path, before: str) -> None:
    after = sha(path)
    case.disk_compared(after == before)
    assert after == before, f"{path} changed"


def probe(path: Path) -> devices.Partition:
    return devices.probe(str(path), path.stat().st_size)


VALID_KMS = '[providers.aws_kms]\nkey_id = "alias/x"\n'


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[root]\ndevice = 42\n" + VALID_KMS, "root.device"),
        ('[providers.aws_kms]\nkey_id = ""\n', "key_id"),
        (VALID_KMS + "[boot]\nunlock_timeout = -5\n", "unlock_timeout"),
        ("[root\n", "line 1"),
    ],
)
def test_invalid_config_stops_the_boot_before_any_device_is_touched(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    robustness: Case,
    text: str,
    names: str,
) -> None:
    disk = blank(tmp_path / "disk.img", 64 * MIB)
    run(["mkfs.ext4", "-q", "-F", disk])
    before = sha(disk)
    config = tmp_path / "config.toml"
    config.write_text(text)
    rc = main(["--config", str(config), "boot"])
    err = capsys.readouterr().err
    assert rc == ExitCode.CONFIG, err
    assert names in err and str(config) in err, err
    unchanged(robustness, disk, before)


def test_a_selector_matching_no_device_names_the_selector(tmp_path: Path, robustness: Case) -> None:
    disk = blank(tmp_path / "disk.img", 64 * MIB)
    run(["mkfs.ext4", "-q", "-F", disk])
    before = sha(disk)
    spec = "UUID=00000000-0000-4000-8000-000000000000"
    with pytest.raises(DeviceError, match="No partition matches the root selector `UUID=0000"):
        locate_root(spec, 0, gather=lambda: [probe(disk)], sleep=lambda _: None)
    unchanged(robustness, disk, before)


def test_a_selector_matching_two_devices_is_refused_never_guessed(
    tmp_path: Path, robustness: Case
) -> None:
    disk = blank(tmp_path / "disk.img", 64 * MIB)
    run(["mkfs.ext4", "-q", "-F", "-U", "5a1c0b7e-2f43-4d4e-9d38-0b3c5a9e1f00", disk])
    clone = tmp_path / "clone.img"
    clone.write_bytes(disk.read_bytes())
    before = sha(disk)
    with pytest.raises(RefusedError, match="matches 2 partitions"):
        find_root("UUID=5a1c0b7e-2f43-4d4e-9d38-0b3c5a9e1f00", [probe(disk), probe(clone)])
    unchanged(robustness, disk, before)


@pytest.mark.parametrize(
    ("mkfs", "fs"),
    [
        (["mkfs.ext2", "-q", "-F"], "ext2"),
        (["mkfs.ext3", "-q", "-F"], "ext3"),
        (["mkswap"], "swap"),
    ],
)
def test_an_unsupported_filesystem_is_refused_by_name(
    tmp_path: Path, robustness: Case, mkfs: list[str], fs: str
) -> None:
    disk = blank(tmp_path / "disk.img", 64 * MIB)
    run([*mkfs, disk])
    before = sha(disk)
    with pytest.raises(RefusedError, match=f"holds {fs}, which encryptrootfs cannot convert"):
        decide(str(disk), probe(disk), first_boot_enabled=True)
    unchanged(robustness, disk, before)


def test_a_luks1_root_is_refused(tmp_path: Path, robustness: Case) -> None:
    disk = blank(tmp_path / "disk.img", 64 * MIB)
    luks_format(disk, b"luks1 passphrase", "--type", "luks1")
    before = sha(disk)
    with pytest.raises(RefusedError, match="is LUKS1; encryptrootfs manages LUKS2 only"):
        decide(str(disk), probe(disk), first_boot_enabled=True)
    unchanged(robustness, disk, before)


def test_a_partition_too_small_for_the_header_is_refused(tmp_path: Path, robustness: Case) -> None:
    disk = blank(tmp_path / "disk.img", 24 * MIB)
    run(["mkfs.ext4", "-q", "-F", disk])
    before = sha(disk)
    part = probe(disk)
    fs = filesystems.geometry("ext4", str(disk))
    with pytest.raises(RefusedError, match="cannot make room for the 32 MiB LUKS2 header"):
        plan_room(part, fs, free_after=0)
    unchanged(robustness, disk, before)


def test_a_full_filesystem_that_cannot_shrink_is_refused(tmp_path: Path, robustness: Case) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(100 * MIB))
    disk = blank(tmp_path / "disk.img", 128 * MIB)
    run(["mkfs.ext4", "-q", "-F", "-d", tree, disk])
    before = sha(disk)
    part = probe(disk)
    fs = filesystems.geometry("ext4", str(disk))
    assert fs.min_size is not None and fs.min_size > part.size - 32 * MIB
    with pytest.raises(RefusedError) as err:
        plan_room(part, fs, free_after=0)
    assert "the filesystem needs at least" in str(err.value)
    assert "Nothing was changed" in str(err.value)
    unchanged(robustness, disk, before)


def test_every_refusal_is_a_sentence_with_a_next_step(tmp_path: Path) -> None:
    """The refusals above carry a hint (what to do next), not only the reason."""
    disk = blank(tmp_path / "disk.img", 64 * MIB)
    luks_format(disk, b"p", "--type", "luks1")
    with pytest.raises(EncryptrootfsError) as err:
        decide(str(disk), probe(disk), first_boot_enabled=True)
    assert err.value.hint
