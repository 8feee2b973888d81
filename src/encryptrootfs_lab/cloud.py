"""The emulated cloud a guest sees: IMDSv2 at 169.254.169.254 and KMS at 169.254.169.250.

Both emulators listen on the host's loopback; the guest reaches them only through QEMU's
``guestfwd`` rules (:class:`~encryptrootfs_lab.qemu.Forward`) and the loopback-only relay.

With ``more_regions``, KMS runs in several regions of one account (one emulator each, so one
region can be down while another answers) behind a router on the same guest address: the
product has one ``endpoint_url`` for every region, and the router picks the region from each
request's signature.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Optional

from .emulators.imds import ImdsEmulator
from .emulators.kms import KmsEmulator
from .emulators.regions import KmsRegionRouter
from .qemu import IMDS_ADDRESS, KMS_ADDRESS, Forward

DEFAULT_REGION = "eu-west-1"
DEFAULT_INSTANCE_ID = "i-0e1a2b3c4d5e6f708"
DEFAULT_ROLE = "encryptrootfs-lab-role"
# What the guest uses as the KMS endpoint (config `endpoint_url`).
GUEST_KMS_URL = f"http://{KMS_ADDRESS}"
GUEST_IMDS_URL = f"http://{IMDS_ADDRESS}"


@dataclass(frozen=True)
class EmulatedCloud:
    kms: KmsEmulator  # the instance's own region (IMDS placement/region)
    imds: ImdsEmulator
    # with more_regions: every region's emulator (``kms`` included) and the router before them
    kms_regions: Mapping[str, KmsEmulator] = field(default_factory=lambda: MappingProxyType({}))
    router: Optional[KmsRegionRouter] = None

    def kms_in(self, region: str) -> KmsEmulator:
        if region == self.kms.region:
            return self.kms
        return self.kms_regions[region]

    @property
    def ports(self) -> tuple[int, ...]:
        """Every port this cloud listens on (for leak checks)."""
        kms = [k.port for k in self.kms_regions.values()] or [self.kms.port]
        routed = [self.router.port] if self.router is not None else []
        return (*kms, *routed, self.imds.port)

    def forwards(self) -> tuple[Forward, ...]:
        kms_port = self.router.port if self.router is not None else self.kms.port
        return (Forward(IMDS_ADDRESS, self.imds.port), Forward(KMS_ADDRESS, kms_port))


@contextmanager
def emulated_cloud(
    region: str = DEFAULT_REGION,
    instance_id: str = DEFAULT_INSTANCE_ID,
    role_name: str = DEFAULT_ROLE,
    more_regions: Sequence[str] = (),
) -> Iterator[EmulatedCloud]:
    """Start the emulators for the block; all are stopped on every way out."""
    kms = KmsEmulator(region=region)
    imds = ImdsEmulator(region=region, instance_id=instance_id, role_name=role_name)
    with ExitStack() as stack:
        kms.start()
        stack.callback(kms.stop)
        regions: dict[str, KmsEmulator] = {}
        router: Optional[KmsRegionRouter] = None
        if more_regions:
            regions[region] = kms
            for other in more_regions:
                # one account in several regions: moto keeps each region's keys apart
                regions[other] = KmsEmulator(region=other, account_id=kms.account_id).start()
                stack.callback(regions[other].stop)
            router = KmsRegionRouter(regions).start()
            stack.callback(router.stop)
        imds.start()
        stack.callback(imds.stop)
        yield EmulatedCloud(kms, imds, MappingProxyType(regions), router)
