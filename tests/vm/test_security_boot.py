"""Security review 2 in a guest: a token that is not this machine's is refused before any KMS
request, and the failed boot gives no shell and powers off; a second, unpartitioned disk
carrying the root's file-system UUID is refused before the unlock; a plain root under an
initramfs built with ``[boot] require_encrypted`` is refused (no first boot, no plain boot).

Both cases boot copy-on-write copies of the session's encrypted root (tests/vm/conftest.py)
whose header was edited offline: no first boot of their own. The unit and header tiers hold
the rest (tests/unit/test_instance_binding.py: the example key policy enforced by the KMS
emulator; tests/unit/test_security_defaults.py: the initramfs's rd.shell=0 default).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from encryptrootfs import luks2
from encryptrootfs.providers.base import (
    CONTEXT_INSTANCE_ARN,
    CONTEXT_INSTANCE_ID,
    CONTEXT_LUKS_UUID,
)
from encryptrootfs.token import TOKEN_TYPE
from encryptrootfs_lab.cloud import EmulatedCloud
from encryptrootfs_lab.image import Image, ImageSpec
from encryptrootfs_lab.layout import Disk, DiskLayout, build_disk, disk_sha256
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.offline import edit_root_header
from encryptrootfs_lab.product import ENCRYPT, encrypt_spec, inspect_script, lab_config
from encryptrootfs_lab.qemu import BootEnd, Drive
from support.session_root import EncryptedRoot

NewMachine = Callable[..., Machine]
REQUIRE_ENCRYPTED = encrypt_spec(
    "require-encrypted", config=lab_config(extra="require_encrypted = true\n")
)
IMAGES = (ENCRYPT, REQUIRE_ENCRYPTED)  # built with the session's others (tests/vm/conftest.py)
OTHER_INSTANCE = "i-0bbbbbbbbbbbbbbbb"
OTHER_ARN = f"arn:aws:ec2:eu-west-1:123456789012:instance/{OTHER_INSTANCE}"


@pytest.fixture
def quiet_cloud(lab_cloud: EmulatedCloud) -> Iterator[EmulatedCloud]:
    lab_cloud.kms.clear_faults()
    lab_cloud.kms.clear_log()
    yield lab_cloud
    lab_cloud.kms.clear_log()


def _edited(root: EncryptedRoot, work: Path, context: dict[str, str]) -> Disk:
    """The session's encrypted root with its token's encryption context changed by ``context``."""

    def edit(header: Path) -> None:
        (tid,) = luks2.read_header(header).token_ids(TOKEN_TYPE)
        token = dict(luks2.export_token(header, tid))
        token["encryption_context"] = {**token["encryption_context"], **context}
        luks2.import_token(header, token, token_id=tid, replace=True)

    work.mkdir(parents=True, exist_ok=True)
    copy = work / "edited.raw"
    shutil.copyfile(root.disk.path, copy)
    edit_root_header(copy, root.disk, edit)
    return dataclasses.replace(root.disk, path=copy)


@pytest.mark.parametrize(
    ("context", "cause"),
    [
        (
            {CONTEXT_INSTANCE_ID: OTHER_INSTANCE, CONTEXT_INSTANCE_ARN: OTHER_ARN},
            "is bound to the instance",
        ),
        (
            {CONTEXT_LUKS_UUID: "00000000-0000-4000-8000-000000000000"},
            "no encryptrootfs token in this header belongs to it",
        ),
    ],
    ids=["other-instance", "other-volume"],
)
def test_a_token_that_is_not_this_machines_is_refused_before_kms_and_powers_off(
    encrypted_root: EncryptedRoot,
    quiet_cloud: EmulatedCloud,
    new_machine: NewMachine,
    tmp_path: Path,
    context: dict[str, str],
    cause: str,
) -> None:
    disk = _edited(encrypted_root, tmp_path / "disk", context)
    m = new_machine(encrypted_root.image, disk, quiet_cloud)
    before = disk_sha256(m.overlay, scratch=tmp_path / "flat.img")
    r = m.boot(inspect_script(), timeout=600, name="later")
    assert r.marker("BEGIN") is None, "the root was mounted:\n" + r.describe()
    assert cause in r.console, r.describe()
    assert "KMS was not asked" in r.console, r.describe()
    assert quiet_cloud.kms.requests_for("Decrypt") == []  # refused before any KMS request
    # The failed boot says why, then the machine powers off (the lab also passes rd.shell=0).
    assert r.end is BootEnd.POWEROFF, r.describe()
    assert disk_sha256(m.overlay, scratch=tmp_path / "flat.img") == before


def test_a_second_disk_with_the_roots_filesystem_uuid_is_refused(
    encrypted_root: EncryptedRoot,
    quiet_cloud: EmulatedCloud,
    new_machine: NewMachine,
    tmp_path: Path,
) -> None:
    """An unpartitioned volume whose ext4 carries the root's UUID (what AttachVolume of a
    crafted volume gives) could win /dev/disk/by-uuid: the boot refuses before any unlock."""
    m = new_machine(encrypted_root.image, encrypted_root.disk, quiet_cloud)
    crafted = tmp_path / "crafted.raw"
    with open(crafted, "wb") as f:
        f.truncate(64 << 20)
    uuid = encrypted_root.disk.root_uuid
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", uuid, str(crafted)], check=True)
    m.extra.append(Drive(crafted, "raw", 512, snapshot=True))
    r = m.boot(inspect_script(), timeout=600, name="later")
    assert r.marker("BEGIN") is None, "the root was mounted:\n" + r.describe()
    assert "never guesses which disk to trust" in r.console, r.describe()
    assert "/dev/vdb" in r.console, r.describe()
    assert quiet_cloud.kms.requests_for("Decrypt") == []
    assert r.end is BootEnd.POWEROFF, r.describe()


def test_a_plain_root_under_an_initramfs_that_requires_encryption_is_refused(
    image_for: Callable[[ImageSpec], Image],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    tmp_path: Path,
) -> None:
    """A downgrade: the initramfs says the root was converted, the disk holds a plain root.
    It is neither encrypted with a new key nor booted plain, and KMS is never asked."""
    image = image_for(REQUIRE_ENCRYPTED)
    m = new_machine(image, build_disk(DiskLayout(), image), cloud)
    before = disk_sha256(m.overlay, scratch=tmp_path / "flat.img")
    r = m.boot(inspect_script(), timeout=600, name="first")
    assert r.marker("BEGIN") is None, "the root was mounted:\n" + r.describe()
    assert "require_encrypted is set" in r.console, r.describe()
    assert cloud.kms.requests == []
    assert r.end is BootEnd.POWEROFF, r.describe()
    assert disk_sha256(m.overlay, scratch=tmp_path / "flat.img") == before
