"""Images with encryptrootfs installed the way an image builder does it.

The configuration points at the emulated cloud (KMS at 169.254.169.250, IMDS at the usual
address) and names the key by alias, so one image serves every test: each test's KMS emulator
creates a key under that alias. ``encryptrootfs install --no-regenerate`` runs in the image's
chroot (the real command, as in the README's quick start); the lab's dracut run afterwards
picks the module up through the dracut.conf.d file that install wrote.
"""

from __future__ import annotations

from typing import Optional

from .cloud import GUEST_IMDS_URL, GUEST_KMS_URL
from .emulators.kms import KmsEmulator
from .image import ImageSpec
from .layout import verify_root_script

LAB_KEY_ALIAS = "alias/encryptrootfs-lab"
INSTALL = ("/usr/local/sbin/encryptrootfs", "install", "--no-regenerate")


def lab_config(
    *,
    grow: bool = False,
    unlock_timeout: float = 120.0,
    extra: str = "",
    first_boot_extra: str = "",
) -> str:
    return f"""\
# encryptrootfs lab image: the emulated cloud of encryptrootfs_lab.cloud
[root]
device = "cmdline"
mapper_name = "root"

[providers.aws_kms]
key_id = "{LAB_KEY_ALIAS}"
endpoint_url = "{GUEST_KMS_URL}"
allow_insecure_http = true  # the emulator speaks plain http on the lab's private link
imds_endpoint = "{GUEST_IMDS_URL}"
total_timeout = 30.0

[providers.aws_kms.encryption_context]
fleet = "lab"

[first_boot]
enabled = true
grow = {"true" if grow else "false"}
{first_boot_extra}
[boot]
unlock_timeout = {unlock_timeout}
{extra}"""


def encrypt_spec(
    name: str = "encrypt", *, grow: bool = False, config: Optional[str] = None
) -> ImageSpec:
    """The plain image plus encryptrootfs installed and configured for the lab's cloud."""
    return ImageSpec(
        name=name,
        config_toml=config if config is not None else lab_config(grow=grow),
        chroot_commands=(INSTALL,),
    )


ENCRYPT = encrypt_spec()
# The same configuration, the product installed from its Debian packages (Debian's botocore in
# /usr/lib/python3/dist-packages, the command in /usr/bin), then the same `encryptrootfs install`.
PACKAGED = ImageSpec(
    name="encrypt-deb",
    config_toml=lab_config(),
    chroot_commands=(("encryptrootfs", "install", "--no-regenerate"),),
    from_packages=True,
)


def create_lab_key(kms: KmsEmulator) -> str:
    """The key the lab images' configuration names; returns its ARN."""
    return kms.create_key(alias=LAB_KEY_ALIAS)


def inspect_script() -> str:
    """Guest shell lines run in the real root after a boot: what the tests and the demo read.

    ``ERFS-ROOTDEV`` (the root's device type and filesystem UUID), ``ERFS-TOKEN`` (``token
    show --json`` of the root partition), ``ERFS-JOURNAL`` (what encryptrootfs said in the
    initramfs), and the test tree's verification.
    """
    return (
        verify_root_script()
        + """\
echo "ERFS-ROOTDEV dm=$(lsblk -no TYPE "$(findmnt -no SOURCE /)") uuid=$(findmnt -no UUID /)"
echo "ERFS-TOKEN $(encryptrootfs token show /dev/vda1 --json | tr -d '\\n ')"
journalctl -b -u encryptrootfs.service --no-pager -o cat | sed 's/^/ERFS-JOURNAL /'
"""
    )
