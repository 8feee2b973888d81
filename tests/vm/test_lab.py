"""The lab itself: a plain guest boots and verifies its test tree, the initramfs reaches the
emulated cloud, and a power cut mid-boot is followed by a clean boot on the same overlay."""

from __future__ import annotations

from collections.abc import Callable

from encryptrootfs_lab.cloud import EmulatedCloud
from encryptrootfs_lab.image import PLAIN, PROBE, Image
from encryptrootfs_lab.layout import Disk, verify_root_script
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.qemu import BootEnd

NewMachine = Callable[..., Machine]
IMAGES = (PLAIN, PROBE)  # built with the session's others (tests/vm/conftest.py)
PROBE_ARGS = ("rd.neednet=1", "ip=dhcp", "rd.erfslab.probe=1")


def test_plain_image_boots_and_verifies_its_manifest(
    plain_image: Image, root_disk: Disk, new_machine: NewMachine
) -> None:
    m = new_machine(plain_image, root_disk)
    r = m.boot(verify_root_script())
    assert r.ok, r.describe()
    assert r.booted_state == "running", r.describe()
    root = r.marker("ROOT")
    assert root is not None and root.fields()["uuid"] == root_disk.root_uuid, r.describe()
    assert root.fields()["fstype"] == "ext4"
    tree = r.marker("TREE-OK")
    assert tree is not None, r.describe()
    assert tree.fields()["manifest"] == root_disk.manifest_sha
    assert r.marker("VERIFY-FAILED") is None


def test_initramfs_python_reaches_imds_and_kms_emulators(
    probe_image: Image, cloud: EmulatedCloud, new_machine: NewMachine
) -> None:
    from encryptrootfs_lab.layout import DiskLayout, build_disk

    disk = build_disk(DiskLayout(), probe_image)
    m = new_machine(probe_image, disk, cloud)
    r = m.boot("true\n", append=PROBE_ARGS)
    assert r.ok, r.describe()
    token = r.marker("PROBE-IMDS-TOKEN")
    region = r.marker("PROBE-IMDS-REGION")
    kms = r.marker("PROBE-KMS")
    assert token is not None and token.fields()["status"] == "200", r.describe()
    assert region is not None and region.fields()["region"] == cloud.imds.region, r.describe()
    assert kms is not None and kms.fields()["status"] != "None", r.describe()
    # The probe ran in the initramfs: before the real root's runner said anything.
    names = [mk.name for mk in r.markers]
    assert names.index("ERFS-PROBE-KMS") < names.index("ERFS-BEGIN")
    # ... and both emulators saw it.
    imds = [(q.method, q.path, q.status, q.had_token) for q in cloud.imds.requests]
    assert ("PUT", "/latest/api/token", 200, False) in imds, imds
    assert ("GET", "/latest/meta-data/placement/region", 200, True) in imds, imds
    assert [q.action for q in cloud.kms.requests] == ["ListKeys"], cloud.kms.requests


def test_power_cut_mid_boot_then_next_boot_reaches_multi_user(
    plain_image: Image, root_disk: Disk, new_machine: NewMachine
) -> None:
    m = new_machine(plain_image, root_disk)
    # Cut 1: in the real root, once journald writes to the (read-write) root filesystem.
    flush = r"Received client request to flush runtime journal"
    cut = m.boot(verify_root_script(), kill_on_console=flush)
    assert cut.end is BootEnd.KILLED, cut.describe()
    assert "flush runtime journal" in cut.console
    assert "reboot: Power down" not in cut.console
    assert cut.marker("BEGIN") is None, "the guest got to the test runner before the cut"
    # Cut 2: by time, while the kernel or the initramfs is still running.
    early = m.boot(verify_root_script(), kill_after=6.0)
    assert early.end is BootEnd.KILLED, early.describe()
    assert early.marker("BEGIN") is None
    again = m.boot(verify_root_script())
    assert again.ok, again.describe()
    assert again.booted_state == "running", again.describe()
    tree = again.marker("TREE-OK")
    assert tree is not None and tree.fields()["manifest"] == root_disk.manifest_sha
