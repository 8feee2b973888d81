"""The network in the initramfs: wait (bounded) until KMS and IMDS can be reached.

The initrd's network backend (systemd-networkd or dhclient) brings interfaces up on its own
schedule. Before the first KMS call the boot waits for a route that covers the instance
metadata address (a default route on EC2; the link's own subnet in the lab, whose DHCP gives
no router), then makes sure names resolve: systemd-networkd hands DNS servers only to
systemd-resolved, which the initrd does not have, so resolv.conf is written from the lease.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from ..config import Config
from .console import say

ROUTE_TABLE = Path("/proc/net/route")
_RTF_UP = 0x1


def _le_ipv4(hex_text: str) -> int:
    """/proc/net/route prints addresses as host-order (little-endian on x86) hex."""
    return int.from_bytes(struct.pack("<I", int(hex_text, 16)), "big")


def has_route_to(address: Optional[str], route_table: Optional[Path] = None) -> bool:
    """Whether an up, non-loopback IPv4 route covers ``address`` (None: any such route)."""
    try:
        lines = (route_table or ROUTE_TABLE).read_text().splitlines()[1:]
    except OSError:
        return False
    target = int(ipaddress.IPv4Address(address)) if address else None
    for line in lines:
        f = line.split()
        if len(f) < 8 or f[0] == "lo" or not int(f[3], 16) & _RTF_UP:
            continue
        dest, mask = _le_ipv4(f[1]), _le_ipv4(f[7])
        if target is None or target & mask == dest:
            return True
    return False


def metadata_address(config: Config) -> Optional[str]:
    """The IPv4 address of the metadata service, when the configuration names one."""
    if config.aws_kms is None:
        return None
    host = urlsplit(config.aws_kms.imds_endpoint).hostname or ""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


def wait_for_network(
    config: Config,
    deadline: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    route_table: Optional[Path] = None,
) -> bool:
    """Wait until the metadata address is routable; one console line every few seconds."""
    address = metadata_address(config)
    said_at: Optional[float] = None
    while not has_route_to(address, route_table):
        now = clock()
        if now >= deadline:
            return False
        if said_at is None or now - said_at >= 5:
            say(f"waiting for the network (no route to {address or 'anywhere'} yet)")
            said_at = now
        sleep(0.5)
    if route_table is None:  # a real boot, not a test with a fake route table
        servers = ensure_resolv_conf()
        if servers:
            say(f"DNS servers from the DHCP lease: {', '.join(servers)}")
    return True


# --------------------------------------------------------------------------------------------
# DNS in the initrd: systemd-networkd gives DNS servers only to systemd-resolved, which it lacks

NETWORKD_LEASES = Path("/run/systemd/netif/leases")
RESOLV_CONF = Path("/etc/resolv.conf")


def lease_nameservers(leases: Path = NETWORKD_LEASES) -> list[str]:
    """DNS servers of systemd-networkd's DHCP leases, in interface order, without repeats."""
    servers: list[str] = []
    try:
        files = sorted(leases.iterdir(), key=lambda p: (len(p.name), p.name))
    except OSError:
        return servers
    for lease in files:
        try:
            text = lease.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("DNS="):
                servers += [s for s in line[len("DNS=") :].split() if s not in servers]
    return servers


def ensure_resolv_conf(
    resolv_conf: Path = RESOLV_CONF, leases: Path = NETWORKD_LEASES
) -> list[str]:
    """Give the initrd a resolv.conf from the DHCP lease when it has no nameserver.

    systemd-networkd hands DNS servers only to systemd-resolved, which the initrd lacks (a
    separate package on Debian 12), so without this the KMS endpoint's name cannot be looked
    up. network-legacy's dhclient writes resolv.conf itself: then nothing is changed. Returns
    the servers written (empty: nothing written).
    """
    try:
        current = resolv_conf.read_text()
    except OSError:
        current = ""
    if any(line.split()[:1] == ["nameserver"] for line in current.splitlines()):
        return []
    servers = lease_nameservers(leases)
    if not servers:
        return []
    if resolv_conf.is_symlink():
        resolv_conf.unlink()  # e.g. a dangling link to systemd-resolved's stub file
    resolv_conf.parent.mkdir(parents=True, exist_ok=True)
    resolv_conf.write_text(
        "# written by encryptrootfs in the initrd from the DHCP lease\n"
        + "".join(f"nameserver {s}\n" for s in servers[:3])
    )
    return servers[:3]
