"""The product installed from its Debian packages, as an image builder installs it
(`apt-get install ./encryptrootfs_*.deb ./encryptrootfs-dracut_*.deb`, Debian's own
python3-botocore, then `encryptrootfs install`): the first boot encrypts, the second unlocks;
on the encrypted machine `apt-get remove` is refused with the reason (removing the product
would leave an initramfs that cannot unlock the root), and the next boot still unlocks.
"""

from __future__ import annotations

from collections.abc import Callable

from encryptrootfs_lab.cloud import EmulatedCloud
from encryptrootfs_lab.image import Image, build_image
from encryptrootfs_lab.layout import Disk, DiskLayout, build_disk
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.product import PACKAGED, create_lab_key, inspect_script
from encryptrootfs_lab.qemu import BootResult

NewMachine = Callable[..., Machine]
IMAGES = (PACKAGED,)  # built with the session's others (tests/vm/conftest.py)
INSPECT = inspect_script()
# What the package manager says and leaves; removal must be refused by the prerm.
REMOVE = (
    INSPECT
    + """\
echo "ERFS-BOTOCORE $(python3 -c 'import botocore; print(botocore.__file__)')"
if apt-get remove -y encryptrootfs encryptrootfs-dracut > /tmp/remove.log 2>&1; then
  echo "ERFS-REMOVE removed"; else echo "ERFS-REMOVE refused"; fi
sed 's/^/ERFS-REMOVELOG /' /tmp/remove.log
status=$(dpkg-query -W -f='${Status}' encryptrootfs encryptrootfs-dracut)
echo "ERFS-INSTALLED $(echo "$status" | tr ' ' '-')"
"""
)


def _on_encrypted_root(r: BootResult, disk: Disk) -> None:
    assert r.ok and r.marker("TREE-OK") is not None, r.describe()
    dev = r.marker("ROOTDEV")
    assert dev is not None and dev.fields() == {"dm": "crypt", "uuid": disk.root_uuid}, r.describe()


def test_the_debian_package_encrypts_unlocks_and_refuses_its_own_removal(
    cloud: EmulatedCloud, new_machine: NewMachine
) -> None:
    image: Image = build_image(PACKAGED)
    disk = build_disk(DiskLayout(), image)
    create_lab_key(cloud.kms)
    m = new_machine(image, disk, cloud)

    first = m.boot(INSPECT, timeout=900, name="first")
    _on_encrypted_root(first, disk)
    assert "encrypting /dev/vda1:" in "\n".join(x.value for x in first.all("JOURNAL"))

    second = m.boot(REMOVE, timeout=900, name="second")
    _on_encrypted_root(second, disk)
    journal = "\n".join(x.value for x in second.all("JOURNAL"))
    assert "the root is encrypted (unlock)" in journal, journal
    botocore = second.marker("BOTOCORE")
    assert botocore is not None and botocore.value.startswith("/usr/lib/python3/dist-packages/")
    verdict = second.marker("REMOVE")
    assert verdict is not None and verdict.value == "refused", second.describe()
    log = "\n".join(x.value for x in second.all("REMOVELOG"))
    assert "encryptrootfs" in log and "ENCRYPTROOTFS_ALLOW_REMOVE" in log, log
    installed = second.marker("INSTALLED")
    assert installed is not None and installed.value.count("install-ok-installed") == 2, (
        second.describe()
    )

    third = m.boot(INSPECT, timeout=900, name="third")
    _on_encrypted_root(third, disk)
