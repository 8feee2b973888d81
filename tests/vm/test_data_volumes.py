"""Data volumes, booted: two blank disks become an encrypted RAID0 mounted at /data by
encryptrootfs-volumes.service on boot 1, and boot 2 unlocks it (KMS Decrypt only) and finds the
file boot 1 wrote there.

Twice: beside a root left plain (first-boot encryption off: the volume alone, ~3 min, in CI),
and beside a root that boot 1 encrypts in place (root and volume each with their own key and
context; the root's conversion makes it ~6 min, so `slow`).

(The lab's base layer carries mdadm for this.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from encryptrootfs_lab.cloud import EmulatedCloud
from encryptrootfs_lab.image import Image, ImageSpec
from encryptrootfs_lab.layout import DiskLayout, build_disks
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.product import create_lab_key, encrypt_spec, lab_config
from encryptrootfs_lab.qemu import BootResult

NewMachine = Callable[..., Machine]
MIB = 1024 * 1024
PROOF = "written-on-boot-1-7d41"

VOLUMES = """
[[volumes]]
name = "data"
devices = ["/dev/disk/by-id/virtio-erfsdata*"]
raid = "raid0"
filesystem = "ext4"
mount = "/data"
"""
_CONFIG = lab_config(extra=VOLUMES)
SPEC = encrypt_spec("volumes", config=_CONFIG)
_FIRST_BOOT_ON = "[first_boot]\nenabled = true\n"
assert _FIRST_BOOT_ON in _CONFIG
PLAIN_ROOT_SPEC = encrypt_spec(
    "volumes-plain-root",
    config=_CONFIG.replace(_FIRST_BOOT_ON, "[first_boot]\nenabled = false\n"),
)
IMAGES = (PLAIN_ROOT_SPEC,)  # built with the session's others (tests/vm/conftest.py)

# `systemctl start` waits for the oneshot unit that boot already started (KMS retries included).
REPORT = """\
echo "ERFS-ROOTDEV $(lsblk -no TYPE "$(findmnt -no SOURCE /)")"
systemctl start encryptrootfs-volumes.service || true
echo "ERFS-UNIT $(systemctl is-active encryptrootfs-volumes.service)"
echo "ERFS-MOUNT source=$(findmnt -no SOURCE /data) fstype=$(findmnt -no FSTYPE /data)"
echo "ERFS-STACK $(lsblk -nro TYPE "$(findmnt -no SOURCE /data)" -s | tr '\\n' ,)"
echo "ERFS-LUKS $(encryptrootfs volumes --json | tr -d '\\n ')"
journalctl -b -u encryptrootfs-volumes.service --no-pager -o cat | sed 's/^/ERFS-VOLLOG /'
"""
BOOT1 = REPORT + f"echo {PROOF} > /data/proof && sync\n"
BOOT2 = REPORT + 'echo "ERFS-PROOF $(cat /data/proof)"\n'


def _log(r: BootResult) -> str:
    return "\n".join(m.value for m in r.all("VOLLOG"))


@pytest.mark.parametrize(
    "root",
    [
        "plain",
        pytest.param("encrypted", marks=pytest.mark.slow),
    ],
)
def test_two_blank_disks_become_an_encrypted_raid0_that_survives_a_reboot(
    root: str,
    image_for: Callable[[ImageSpec], Image],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
) -> None:
    image = image_for(SPEC if root == "encrypted" else PLAIN_ROOT_SPEC)
    keys = 2 if root == "encrypted" else 1  # the volume's own, and the root's if encrypted
    (disk,) = build_disks([DiskLayout()], image)
    create_lab_key(cloud.kms)
    m = new_machine(image, disk, cloud)
    for n in (1, 2):
        m.attach_blank(256 * MIB, serial=f"erfsdata{n}")

    first = m.boot(BOOT1, timeout=900)
    assert first.ok, first.describe()
    boot1 = [q.action for q in cloud.kms.requests]
    cloud.kms.clear_log()
    second = m.boot(BOOT2, timeout=600)
    assert second.ok, second.describe()

    for r in (first, second):
        rootdev = r.marker("ROOTDEV")
        assert rootdev is not None and rootdev.value == ("crypt" if keys == 2 else "part"), (
            r.describe()
        )
        unit, mount, stack = r.marker("UNIT"), r.marker("MOUNT"), r.marker("STACK")
        assert unit is not None and unit.value == "active", r.describe()
        assert mount is not None and mount.fields() == {
            "source": "/dev/mapper/data",
            "fstype": "ext4",
        }, r.describe()
        # the mapping sits on an md RAID0 array over the two disks
        assert stack is not None and stack.value.startswith("crypt,raid0,"), r.describe()
    assert "volume data: create-array:" in _log(first), _log(first)
    assert "volume data: format:" in _log(first), _log(first)
    assert "volume data: use-array:" in _log(second) or "assemble-array" in _log(second)
    assert "volume data: unlock:" in _log(second), _log(second)
    proof = second.marker("PROOF")
    assert proof is not None and proof.value == PROOF, second.describe()

    # Boot 1: the volume (and an encrypted root) each made a key (GenerateDataKey + its
    # Decrypt round trip); boot 2: only Decrypt, never a new key.
    assert boot1.count("GenerateDataKey") == keys, boot1
    actions2 = [q.action for q in cloud.kms.requests]
    assert actions2 and set(actions2) == {"Decrypt"}, actions2
    contexts = {
        q.encryption_context.get("encryptrootfs:luks_uuid")
        for q in cloud.kms.requests
        if q.encryption_context
    }
    assert len(contexts) == keys, contexts  # the volume's UUID (and the root's)
