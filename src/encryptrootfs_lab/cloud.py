"""The emulated cloud a guest sees: IMDSv2 at 169.254.169.254 and KMS at 169.254.169.250.

Both emulators listen on the host's loopback; the guest reaches them only through QEMU's
``guestfwd`` rules (:class:`~encryptrootfs_lab.qemu.Forward`) and the loopback-only relay.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .emulators.imds import ImdsEmulator
from .emulators.kms import KmsEmulator
from .qemu import IMDS_ADDRESS, KMS_ADDRESS, Forward

DEFAULT_REGION = "eu-west-1"
DEFAULT_INSTANCE_ID = "i-0e1a2b3c4d5e6f708"
DEFAULT_ROLE = "encryptrootfs-lab-role"
# What the guest uses as the KMS endpoint (config `endpoint_url`).
GUEST_KMS_URL = f"http://{KMS_ADDRESS}"
GUEST_IMDS_URL = f"http://{IMDS_ADDRESS}"


@dataclass(frozen=True)
class EmulatedCloud:
    kms: KmsEmulator
    imds: ImdsEmulator

    def forwards(self) -> tuple[Forward, ...]:
        return (Forward(IMDS_ADDRESS, self.imds.port), Forward(KMS_ADDRESS, self.kms.port))


@contextmanager
def emulated_cloud(
    region: str = DEFAULT_REGION,
    instance_id: str = DEFAULT_INSTANCE_ID,
    role_name: str = DEFAULT_ROLE,
) -> Iterator[EmulatedCloud]:
    """Start both emulators for the block; both are stopped on every way out."""
    kms = KmsEmulator(region=region)
    imds = ImdsEmulator(region=region, instance_id=instance_id, role_name=role_name)
    kms.start()
    try:
        imds.start()
        try:
            yield EmulatedCloud(kms, imds)
        finally:
            imds.stop()
    finally:
        kms.stop()
