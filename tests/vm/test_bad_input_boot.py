"""Bad input that needs a whole machine: refused at boot with the reason, every disk untouched.

(The cases a file-backed image shows as well are in tests/header/test_bad_input.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from encryptrootfs_lab.cloud import EmulatedCloud
from encryptrootfs_lab.image import Image, build_image
from encryptrootfs_lab.layout import Disk, DiskLayout, Filesystem, build_disks, disk_sha256
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.product import ENCRYPT, create_lab_key, inspect_script
from encryptrootfs_lab.qemu import BootResult
from support.robustness import Case

NewMachine = Callable[..., Machine]
# Built before the session's first vm test, with the other modules' (tests/vm/conftest.py).
IMAGES = (ENCRYPT,)
INSPECT = inspect_script()

LAYOUTS = {
    "ext4": DiskLayout(),
    # Same layout as tests/vm/test_first_boot.py's, so the cached disk is shared.
    "xfs-full": DiskLayout(fs=Filesystem.XFS, free_after_mib=0),
}


@pytest.fixture(scope="module")
def encrypt_image() -> Image:
    return build_image(ENCRYPT)


@pytest.fixture(scope="module")
def disks(encrypt_image: Image, filled_disks: list[Disk]) -> dict[str, Disk]:
    return dict(zip(LAYOUTS, build_disks(list(LAYOUTS.values()), encrypt_image)))


def refused(r: BootResult, *causes: str) -> None:
    assert r.marker("BEGIN") is None, "the root was mounted:\n" + r.describe()
    for cause in causes:
        assert cause in r.console, f"{cause!r} not on the console:\n{r.describe()}"


def test_a_root_selector_matching_two_disks_is_refused(
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    """A clone of the root disk attached (same filesystem UUID): never guess which."""
    create_lab_key(cloud.kms)
    m = new_machine(encrypt_image, disks["ext4"], cloud)
    clone = m.attach(disks["ext4"], serial="clone", writable=True)
    shas = [disk_sha256(p, scratch=tmp_path / "flat.img") for p in (m.overlay, clone.path)]
    r = m.boot(INSPECT, timeout=600)
    refused(r, "matches 2 partitions", "nothing was changed")
    after = [disk_sha256(p, scratch=tmp_path / "flat.img") for p in (m.overlay, clone.path)]
    robustness.disk_compared(after == shas)
    assert after == shas
    assert not cloud.kms.requests, "KMS was asked although the boot had to stop"


def test_xfs_without_free_space_is_refused(
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    create_lab_key(cloud.kms)
    m = new_machine(encrypt_image, disks["xfs-full"], cloud)
    before = disk_sha256(m.overlay, scratch=tmp_path / "flat.img")
    r = m.boot(INSPECT, timeout=600)
    refused(r, "xfs cannot shrink", "Nothing was changed")
    after = disk_sha256(m.overlay, scratch=tmp_path / "flat.img")
    robustness.disk_compared(after == before)
    assert after == before
