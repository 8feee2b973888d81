"""Data volumes on file-backed images: a blank image becomes LUKS2 with our token (which `token
verify` unwraps through the KMS emulator), an interrupted format is recognised as ours, and
anything that is not blank is refused through the real `encryptrootfs volumes up` with the image
byte for byte unchanged.

The host has no device-mapper, so opening, mkfs and mounting are not exercised here (the vm
tier does that); `volumes up` is only ever run here on images it must refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from encryptrootfs import luks2
from encryptrootfs.config import Config, VolumeConfig, load_config
from encryptrootfs.errors import ExitCode, KeyServiceError
from encryptrootfs.ops.volumes import (
    FORMATTING_SUBSYSTEM,
    VOLUME_SUBSYSTEM,
    TargetAction,
    format_volume,
    mark,
    plan_target,
    probe_target,
)
from encryptrootfs.providers import provider_from_config
from encryptrootfs.providers.base import wipe
from encryptrootfs.run import run
from encryptrootfs.token import TOKEN_TYPE
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from encryptrootfs_lab.offline import unwrap
from support.cli import Cli, emulator_config

MIB = 1024 * 1024


@pytest.fixture
def shm() -> Iterator[Path]:
    """A folder under /dev/shm: the configuration only takes /dev/ paths, and tmpfs there
    holds plain files (small ones: they are in RAM)."""
    folder = Path("/dev/shm") / f"erfs-volumes-{secrets.token_hex(4)}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _blank(path: Path, size: int = 32 * MIB) -> Path:
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


def _config_file(tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, volumes: str) -> Path:
    path = emulator_config(tmp_path / "config.toml", kms, imds, {"fleet": "web"})
    with path.open("a") as f:
        f.write(f"\n[boot]\nunlock_timeout = 5\n{volumes}")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def volume_config(
    tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, key_arn: str, shm: Path
) -> Config:
    return load_config(
        _config_file(
            tmp_path,
            kms,
            imds,
            f"""
[[volumes]]
name = "data"
devices = ["{shm}/disk0"]
mount = "/data"
""",
        )
    )


def test_a_blank_image_is_formatted_with_our_token_and_verifies(
    volume_config: Config, kms: KmsEmulator, key_arn: str, tmp_path: Path
) -> None:
    volume: VolumeConfig = volume_config.volumes[0]
    image = _blank(tmp_path / "disk0.img")
    assert plan_target(volume, probe_target(str(image))).action is TargetAction.FORMAT

    key = format_volume(str(image), volume, provider_from_config(volume_config))
    try:
        header = luks2.read_header(image)
        (slot,) = header.key_keyslots
        assert (header.label, header.subsystem) == ("data", FORMATTING_SUBSYSTEM)
        assert (slot.kdf_type, slot.iterations) == ("pbkdf2", 1000)
        (token_id,) = header.token_ids(TOKEN_TYPE)
        token = luks2.export_token(image, token_id)
        assert token["keyslots"] == [str(slot.id)] and token["key_id"] == key_arn
        assert token["encryption_context"] == {
            "encryptrootfs:luks_uuid": header.uuid,
            "fleet": "web",
        }
        # The passphrase is the KMS data key: what KMS unwraps the token to opens the keyslot.
        assert unwrap(kms, token) == bytes(key)
        assert luks2.test_keyslot(image, key, slot.id)
        # The volume key is luksFormat's own random key, not the KMS data key.
        dumped = run(
            [
                "cryptsetup",
                "luksDump",
                "--dump-volume-key",
                "--batch-mode",
                "--key-file",
                "-",
                str(image),
            ],
            stdin=key,
        ).stdout.decode()
        volume_key = bytes.fromhex("".join(dumped.split("MK dump:", 1)[1].split()))
        assert len(volume_key) == 64 and volume_key != bytes(key)
    finally:
        wipe(key)

    # Not finished yet: a run now would format it again (it never held data) ...
    plan = plan_target(volume, probe_target(str(image)))
    assert plan.action is TargetAction.FORMAT and "never held data" in plan.reason
    # ... once marked (after mkfs), it is unlocked, and the label survives the mark.
    mark(str(image), volume.name, VOLUME_SUBSYSTEM)
    header = luks2.read_header(image)
    assert (header.label, header.subsystem) == ("data", VOLUME_SUBSYSTEM)
    assert plan_target(volume, probe_target(str(image))).action is TargetAction.UNLOCK

    r = Cli(Path(volume_config.source))("token", "verify", str(image), "--json")
    assert r.returncode == 0, r.stderr
    (result,) = json.loads(r.stdout)
    assert result["ok"] is True and result["key_id"] == key_arn


def test_format_needs_kms_before_it_writes(
    tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, shm: Path
) -> None:
    # No key under the configured alias: GenerateDataKey fails, the image stays blank.
    config = load_config(
        _config_file(
            tmp_path,
            kms,
            imds,
            f"""
[[volumes]]
name = "data"
devices = ["{shm}/disk0"]
mount = "/data"
""",
        )
    )
    image = _blank(tmp_path / "disk0.img")
    before = _sha256(image)
    with pytest.raises(KeyServiceError):
        format_volume(str(image), config.volumes[0], provider_from_config(config))
    assert _sha256(image) == before


def _not_blank_images(shm: Path, passphrase: bytes) -> dict[str, Path]:
    ext4 = _blank(shm / "ext4.img")
    run(["mkfs.ext4", "-q", "-F", str(ext4)])
    luks = _blank(shm / "luks.img")
    run(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            "-",
            str(luks),
        ],
        stdin=passphrase,
    )
    table = _blank(shm / "gpt.img")
    run(["sfdisk", "--quiet", str(table)], stdin=b"label: gpt\n,16M\n")
    return {"ext4": ext4, "luks2 (not ours)": luks, "partition table": table}


@pytest.mark.parametrize("kind", ["ext4", "luks2 (not ours)", "partition table"])
def test_a_device_that_is_not_blank_is_refused_and_left_byte_identical(
    kind: str, tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, key_arn: str, shm: Path
) -> None:
    image = _not_blank_images(shm, b"passphrase")[kind]
    before = _sha256(image)
    config = _config_file(
        tmp_path,
        kms,
        imds,
        f"""
[[volumes]]
name = "data"
devices = ["{image}"]
mount = "{tmp_path}/mnt"
""",
    )
    cli = Cli(config)
    r = cli("volumes", "--json")
    assert r.returncode == 0, r.stderr
    (view,) = json.loads(r.stdout)["volumes"]
    assert view["target_plan"]["action"] == "refuse", view

    r = cli("volumes", "up")
    assert r.returncode == ExitCode.REFUSED, r.stdout + r.stderr
    assert "Volume data:" in r.stderr and "Nothing on the device(s) was changed" in r.stderr
    assert str(image) in r.stderr
    assert _sha256(image) == before
    assert not (tmp_path / "mnt").exists()
    assert [q.action for q in kms.requests] == []  # refused before any key service call


def test_raid_none_with_two_matches_is_refused_and_both_stay_blank(
    tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, key_arn: str, shm: Path
) -> None:
    disks = [_blank(shm / f"nvme{i}.img") for i in (1, 2)]
    cli = Cli(
        _config_file(
            tmp_path,
            kms,
            imds,
            f"""
[[volumes]]
name = "scratch"
devices = ["{shm}/nvme*.img"]
mount = "{tmp_path}/mnt"
""",
        )
    )
    r = cli("volumes", "--json")
    (view,) = json.loads(r.stdout)["volumes"]
    assert [m["device"] for m in view["members"]] == [str(d) for d in disks]
    assert view["members_plan"]["action"] == "refuse"
    r = cli("volumes", "up")
    assert r.returncode == ExitCode.REFUSED, r.stderr
    assert 'raid = "none" takes one device but 2 match' in r.stderr
    assert all(d.read_bytes() == bytes(32 * MIB) for d in disks)


def test_show_of_a_blank_device_says_format_and_changes_nothing(
    tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, key_arn: str, shm: Path
) -> None:
    disk = _blank(shm / "nvme1.img")
    cli = Cli(
        _config_file(
            tmp_path,
            kms,
            imds,
            f"""
[[volumes]]
name = "data"
devices = ["{shm}/nvme*.img"]
raid = "raid0"
filesystem = "xfs"
mount = "/data"
""",
        )
    )
    r = cli("volumes", "--json")
    assert r.returncode == 0, r.stderr
    (view,) = json.loads(r.stdout)["volumes"]
    assert (view["members_plan"]["action"], view["target_plan"]["action"]) == (
        "use-device",
        "format",
    )
    assert (view["filesystem"], view["raid"], view["mounted"]) == ("xfs", "raid0", False)
    r = cli("volumes")
    assert "volume: format:" in r.stdout, r.stdout
    assert disk.read_bytes() == bytes(32 * MIB)
    assert [q.action for q in kms.requests] == []


def test_optional_volume_without_devices_is_skipped(
    tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, key_arn: str, shm: Path
) -> None:
    cli = Cli(
        _config_file(
            tmp_path,
            kms,
            imds,
            f"""
[[volumes]]
name = "data"
devices = ["{shm}/nothing-*"]
mount = "{tmp_path}/mnt"
optional = true
""",
        )
    )
    r = cli("volumes", "up", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["volumes"] == [
        {
            "name": "data",
            "action": "skipped",
            "target": None,
            "mapper": None,
            "mount": None,
            "steps": [],
        }
    ]


# --- the unit, installed by `encryptrootfs install` ---------------------------------------------


def test_install_writes_the_unit_and_enables_it_only_with_volumes(tmp_path: Path) -> None:
    from encryptrootfs.image.install import VOLUMES_UNIT, Change, install, volumes_unit_source

    example = Path(__file__).resolve().parents[2] / "examples" / "config.toml"
    with_volumes = tmp_path / "with-volumes.toml"
    with_volumes.write_text(
        example.read_text()
        + """
[[volumes]]
name = "data"
devices = ["/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*"]
raid = "raid0"
mount = "/data"
"""
    )
    root = tmp_path / "image"
    (root / "usr/lib/dracut/modules.d").mkdir(parents=True)
    unit = root / "etc/systemd/system" / VOLUMES_UNIT
    link = root / "etc/systemd/system/remote-fs.target.wants" / VOLUMES_UNIT

    first = install(root, with_volumes, regenerate_initramfs=False)
    assert (first.volumes_unit, first.volumes_enabled) == (Change.WRITTEN, True)
    assert unit.read_bytes() == volumes_unit_source().read_bytes()
    assert os.readlink(link) == f"/etc/systemd/system/{VOLUMES_UNIT}"
    again = install(root, with_volumes, regenerate_initramfs=False)
    assert (again.volumes_unit, again.volumes_enabled) == (Change.UNCHANGED, True)

    without = install(root, example, regenerate_initramfs=False)
    assert (without.volumes_unit, without.volumes_enabled) == (Change.UPDATED, False)
    assert unit.exists() and not link.is_symlink()
    assert install(root, None, regenerate_initramfs=False).as_dict()["volumes_enabled"] is False


def test_the_unit_orders_after_the_network_and_before_remote_filesystems() -> None:
    from encryptrootfs.image.install import volumes_unit_source

    lines = [
        line.strip()
        for line in volumes_unit_source().read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "After=network-online.target" in lines and "Wants=network-online.target" in lines
    assert "Before=remote-fs.target" in lines and "WantedBy=remote-fs.target" in lines
    # local-fs.target comes before the network: ordering the unit before it would be a cycle.
    assert not any("local-fs.target" in line for line in lines)
    assert "ExecStart=/usr/bin/python3 -I -u -m encryptrootfs volumes up" in lines
    assert "Type=oneshot" in lines and "RemainAfterExit=yes" in lines
