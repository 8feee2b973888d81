"""`encryptrootfs removal-check`: refuse removal on a root encryptrootfs unlocks, or where it is
enabled; allow it elsewhere; the override. Fake /proc/self/mountinfo and /sys/dev/block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from encryptrootfs.cli import main
from encryptrootfs.errors import DeviceError, ExitCode
from encryptrootfs.image import removal

PLAIN_ROOT = "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n"
MAPPED_ROOT = (
    "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n"
    # A later mount on / wins (the real root after switch-root).
    "25 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/root rw\n"
    "26 25 0:5 / /dev rw shared:2 - devtmpfs udev rw\n"
)


def fake_dm(sys_dev_block: Path, uuid: str, name: str = "root") -> None:
    dm = sys_dev_block / "253:0" / "dm"
    dm.mkdir(parents=True)
    (dm / "name").write_text(f"{name}\n")
    (dm / "uuid").write_text(f"{uuid}\n")
    (sys_dev_block / "253:0" / "slaves" / "nvme0n1p2").mkdir(parents=True)


def verdict(tmp_path: Path, mountinfo: str, ours: bool = True) -> removal.RemovalVerdict:
    return removal.removal_verdict(
        tmp_path / "root",
        mountinfo=mountinfo,
        sys_dev_block=tmp_path / "sys",
        has_our_token=lambda device: ours,
        running=True,
    )


def test_root_device_number_takes_the_last_mount_on_slash() -> None:
    assert removal.root_device_number(MAPPED_ROOT) == "253:0"
    assert removal.root_device_number("") is None


def test_plain_root_not_enabled_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    v = verdict(tmp_path, PLAIN_ROOT)
    assert v.allowed and v.hint is None


def test_root_unlocked_by_encryptrootfs_is_refused(tmp_path: Path) -> None:
    fake_dm(tmp_path / "sys", "CRYPT-LUKS2-0123456789abcdef0123456789abcdef-root")
    v = verdict(tmp_path, MAPPED_ROOT)
    assert not v.allowed
    assert "/dev/mapper/root" in v.reason and "/dev/nvme0n1p2" in v.reason
    assert "not boot" in v.reason
    assert v.hint is not None and removal.ALLOW_ENV in v.hint


def test_luks2_root_of_another_tool_is_allowed(tmp_path: Path) -> None:
    fake_dm(tmp_path / "sys", "CRYPT-LUKS2-0123456789abcdef0123456789abcdef-root")
    assert verdict(tmp_path, MAPPED_ROOT, ours=False).allowed


def test_root_on_lvm_is_not_looked_into(tmp_path: Path) -> None:
    fake_dm(tmp_path / "sys", "LVM-abcdef", name="vg-root")
    assert verdict(tmp_path, MAPPED_ROOT, ours=True).allowed


def test_unreadable_luks2_header_is_refused(tmp_path: Path) -> None:
    fake_dm(tmp_path / "sys", "CRYPT-LUKS2-0123456789abcdef0123456789abcdef-root")

    def unreadable(device: str) -> bool:
        raise DeviceError(f"`{device}`: cryptsetup failed")

    v = removal.removal_verdict(
        tmp_path / "root",
        mountinfo=MAPPED_ROOT,
        sys_dev_block=tmp_path / "sys",
        has_our_token=unreadable,
        running=True,
    )
    assert not v.allowed and "could not be read" in v.reason


def test_unlock_record_is_refused(tmp_path: Path) -> None:
    record = tmp_path / "root/run/encryptrootfs/last-unlock.json"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    v = verdict(tmp_path, PLAIN_ROOT)
    assert not v.allowed and str(record) in v.reason


def test_enabled_image_is_refused_with_how_to_disable(tmp_path: Path) -> None:
    marker = tmp_path / "root/etc/dracut.conf.d/50-encryptrootfs.conf"
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    v = verdict(tmp_path, PLAIN_ROOT)
    assert not v.allowed and "enabled" in v.reason
    assert v.hint is not None and f"delete {marker}" in v.hint


def test_image_tree_checks_only_its_marker(tmp_path: Path) -> None:
    tree = tmp_path / "image"
    (tree / "etc/dracut.conf.d").mkdir(parents=True)
    assert removal.removal_verdict(tree, mountinfo=MAPPED_ROOT).allowed
    (tree / "etc/dracut.conf.d/50-encryptrootfs.conf").write_text("")
    assert not removal.removal_verdict(tree, mountinfo=MAPPED_ROOT).allowed


def test_cli_refuses_with_exit_8_and_the_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "image"
    (tree / "etc/dracut.conf.d").mkdir(parents=True)
    (tree / "etc/dracut.conf.d/50-encryptrootfs.conf").write_text("")
    monkeypatch.delenv(removal.ALLOW_ENV, raising=False)
    assert main(["removal-check", "--root", str(tree)]) == ExitCode.REFUSED
    err = capsys.readouterr().err
    assert "is enabled here" in err and "Nothing was removed." in err and "hint:" in err

    monkeypatch.setenv(removal.ALLOW_ENV, "1")
    assert main(["removal-check", "--root", str(tree)]) == ExitCode.OK
    assert f"removal allowed by {removal.ALLOW_ENV}=1" in capsys.readouterr().err
    assert main(["removal-check", "--root", str(tree), "--json"]) == ExitCode.OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["allowed"] is False and doc["overridden"] is True


def test_cli_allows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "image"
    tree.mkdir()
    assert main(["removal-check", "--root", str(tree)]) == ExitCode.OK
    assert "removal is safe" in capsys.readouterr().out
