"""The product, booted: the first boot encrypts the root in place, every later boot unlocks it.

Each test boots a real Debian guest (dracut initramfs with the encryptrootfs module installed by
`encryptrootfs install` in the image) against the KMS and IMDS emulators, and checks the disk
from the host between boots.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs_lab.cloud import EmulatedCloud
from encryptrootfs_lab.emulators.kms import KmsRequest
from encryptrootfs_lab.image import PLAIN, Image, build_image
from encryptrootfs_lab.layout import (
    BTRFS_SHRINK_MIB,
    Disk,
    DiskLayout,
    Filesystem,
    build_disks,
    disk_contains,
)
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.offline import root_key
from encryptrootfs_lab.product import ENCRYPT, create_lab_key, inspect_script
from encryptrootfs_lab.qemu import BootResult
from encryptrootfs_lab.testtree import PLAINTEXT_MARKER
from support.session_root import EncryptedRoot

NewMachine = Callable[..., Machine]
IMAGES = (ENCRYPT, PLAIN)  # built with the session's others (tests/vm/conftest.py)
MIB = 1024 * 1024

INSPECT = inspect_script()


# The flagship case boots the session's encrypted root (tests/vm/conftest.py); the other
# paths use the lab's smaller default root.
LAYOUTS = {
    "ext4-shrink": DiskLayout(free_after_mib=0),
    "xfs-grow": DiskLayout(fs=Filesystem.XFS),
    # (XFS without free space, refused: tests/vm/test_bad_input_boot.py)
    "xfs-full": DiskLayout(fs=Filesystem.XFS, free_after_mib=0),
    "btrfs-shrink": DiskLayout(fs=Filesystem.BTRFS, free_after_mib=0, root_mib=BTRFS_SHRINK_MIB),
}


@pytest.fixture(scope="module")
def encrypt_image() -> Image:
    return build_image(ENCRYPT)


@pytest.fixture(scope="module")
def disks(encrypt_image: Image, filled_disks: list[Disk]) -> dict[str, Disk]:
    # One call: the xfs and btrfs disks are filled in a single builder boot.
    built = build_disks(list(LAYOUTS.values()), encrypt_image)
    return dict(zip(LAYOUTS, built))


def _token_json(r: BootResult) -> dict[str, Any]:
    m = r.marker("TOKEN")
    assert m is not None, r.describe()
    data: dict[str, Any] = json.loads(m.value)
    return data


def _kms_actions(cloud: EmulatedCloud) -> list[str]:
    return [q.action for q in cloud.kms.requests]


def _check_two_boots(
    disk: Disk,
    key_arn: str,
    first: BootResult,
    boot1_kms: Sequence[KmsRequest],
    second: BootResult,
    boot2_kms: Sequence[KmsRequest],
) -> None:
    """Both boots came up on the encrypted root with the tree intact; the token names the lab
    key and binds the header's UUID; the first boot asked KMS for a new key and proved it, the
    second asked only to unwrap it, each with the token's context."""
    for r in (first, second):
        assert r.ok, r.describe()
        assert r.marker("TREE-OK") is not None and r.marker("VERIFY-FAILED") is None, r.describe()
        dev = r.marker("ROOTDEV")
        assert dev is not None and dev.fields() == {"dm": "crypt", "uuid": disk.root_uuid}, (
            r.describe()
        )

    token = next(t for t in _token_json(second)["tokens"] if t["type"] == "encryptrootfs")
    assert token["provider"] == "aws-kms" and token["key_id"] == key_arn
    luks_uuid = _token_json(second)["luks_uuid"]
    assert token["encryption_context"] == {"encryptrootfs:luks_uuid": luks_uuid, "fleet": "lab"}
    slot = next(s for s in _token_json(second)["keyslots"] if str(s["id"]) in token["keyslots"])
    assert slot["kdf"] == "pbkdf2" and slot["iterations"] == 1000

    actions1 = [q.action for q in boot1_kms]
    assert "GenerateDataKey" in actions1 and "Decrypt" in actions1, actions1
    actions2 = [q.action for q in boot2_kms]
    assert actions2 == ["Decrypt"], actions2
    for q in [*boot1_kms, *boot2_kms]:
        if q.action in ("GenerateDataKey", "Decrypt"):
            assert q.encryption_context == token["encryption_context"], q


def _two_boots(
    image: Image, disk: Disk, cloud: EmulatedCloud, new_machine: NewMachine
) -> tuple[BootResult, BootResult]:
    key_arn = create_lab_key(cloud.kms)
    m = new_machine(image, disk, cloud)
    first = m.boot(INSPECT, timeout=900)
    assert first.ok, first.describe()
    boot1_kms = list(cloud.kms.requests)
    cloud.kms.clear_log()
    second = m.boot(INSPECT, timeout=600)
    _check_two_boots(disk, key_arn, first, boot1_kms, second, list(cloud.kms.requests))
    return first, second


def _assert_no_secret_on_disk(
    cloud: EmulatedCloud, m: Machine, marker: bytes, tmp_path: Path
) -> None:
    """Neither the plaintext key (raw, hex, base64) nor the plain marker is on the raw disk."""
    key = root_key(m.overlay, m.disk, cloud.kms, tmp_path / "flat.img")
    needles = [key, key.hex().encode(), base64.b64encode(key), marker]
    found = disk_contains(m.overlay, needles, scratch=tmp_path / "flat.img")
    assert not any(found.values()), {n[:12]: f for n, f in found.items()}


def test_ext4_gpt_with_free_space_encrypts_on_boot_1_and_unlocks_on_boot_2(
    encrypted_root: EncryptedRoot,
    lab_cloud: EmulatedCloud,
    new_machine: NewMachine,
    tmp_path: Path,
) -> None:
    """The session's first boot (tests/vm/conftest.py: a 1152 MiB root, more than the guest's
    RAM), then a second boot of its result; no secret and no plaintext left on the disk."""
    root = encrypted_root
    marker = PLAINTEXT_MARKER  # file content of the test tree, in the plain root only
    assert disk_contains(root.plain.path, [marker], fmt="raw")[marker], "marker not on the disk"
    m = new_machine(root.image, root.disk, lab_cloud)
    _assert_no_secret_on_disk(lab_cloud, m, marker, tmp_path)
    lab_cloud.kms.clear_log()
    second = m.boot(INSPECT, timeout=600)
    _check_two_boots(
        root.disk, root.key_arn, root.first, root.requests, second, list(lab_cloud.kms.requests)
    )
    _assert_no_secret_on_disk(lab_cloud, m, marker, tmp_path)
    journal1 = "\n".join(m.value for m in root.first.all("JOURNAL"))
    assert "growing the partition by 32 MiB" in journal1, journal1
    assert "encrypting /dev/vda1:" in journal1 and "MiB/s" in journal1, journal1
    journal2 = "\n".join(m.value for m in second.all("JOURNAL"))
    assert "the root is encrypted (unlock)" in journal2, journal2
    assert "encrypting" not in journal2


@pytest.mark.parametrize("name", ["ext4-shrink", "xfs-grow", "btrfs-shrink"])
def test_other_filesystems_and_the_shrink_path(
    name: str,
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    tmp_path: Path,
) -> None:
    disk = disks[name]
    first, _ = _two_boots(encrypt_image, disk, cloud, new_machine)
    journal = "\n".join(m.value for m in first.all("JOURNAL"))
    room = "shrinking" if disk.layout.free_after_mib == 0 else "growing the partition"
    assert room in journal, journal


def test_initramfs_grows_by_at_most_8_mib(encrypt_image: Image) -> None:
    plain = build_image(PLAIN).initrd.stat().st_size
    product = encrypt_image.initrd.stat().st_size
    growth = product - plain
    print(
        f"initramfs: plain {plain / MIB:.2f} MiB, with encryptrootfs {product / MIB:.2f} MiB, "
        f"growth {growth / MIB:.2f} MiB"
    )
    assert 0 < growth <= 8 * MIB
