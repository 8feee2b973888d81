"""Facts about block devices, gathered read-only: signatures (blkid -p), geometry (sysfs).

The planner (:mod:`encryptrootfs.boot.decide`) only ever sees these frozen facts; nothing in
here writes to a device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import luks2, plan_record
from .config import Config, RootKind
from .errors import EncryptrootfsError, RefusedError
from .log import get_logger
from .plan_record import PlanRecord
from .run import run
from .token import KmsToken, read_tokens

log = get_logger("devices")

SYS_BLOCK = Path("/sys/class/block")
SECTOR = 512  # sysfs start/size are always in 512-byte units

_BY_PATH = {
    "/dev/disk/by-uuid/": "UUID=",
    "/dev/disk/by-label/": "LABEL=",
    "/dev/disk/by-partuuid/": "PARTUUID=",
    "/dev/disk/by-partlabel/": "PARTLABEL=",
}


@dataclass(frozen=True)
class Signature:
    """What ``blkid -p`` recognises on a device ("" when nothing)."""

    type: str = ""
    uuid: str = ""
    label: str = ""
    version: str = ""  # LUKS version for crypto_LUKS


@dataclass(frozen=True)
class LuksFacts:
    uuid: str
    version: int
    reencryption_pending: bool
    tokens: tuple[KmsToken, ...]  # ours only; foreign tokens are skipped
    keyslots: tuple[str, ...]
    # Tokens of our type that cannot be read, as "token N: why". Skipped, never fatal here:
    # the header may hold a good copy beside it, and a damaged token on some other disk must
    # not stop the root's boot.
    damaged: tuple[str, ...] = ()
    # The pending reencryption as "<mode>/<resilience>" (e.g. "encrypt/datashift"); None when
    # none is pending or the header does not say. Only the first boot's own kind is resumed.
    reencryption: Optional[str] = None


@dataclass(frozen=True)
class Partition:
    """One partition and everything the planner needs to know about it."""

    path: str
    name: str  # kernel name, e.g. vda1
    disk: str  # e.g. /dev/vda
    number: int
    start: int  # bytes from the start of the disk
    size: int  # bytes
    disk_size: int
    logical_sector: int
    partuuid: str
    partlabel: str
    signature: Signature
    luks: Optional[LuksFacts] = None
    record: Optional[PlanRecord] = None
    # Only when a plan record is present: hashes of the head and of its moved copy at the tail.
    head_sha256: Optional[str] = None
    moved_sha256: Optional[str] = None

    def describe(self) -> str:
        what = self.signature.type or "no recognised signature"
        return f"{self.path} ({what}, {self.size // (1024 * 1024)} MiB)"


def parse_export(text: str) -> dict[str, str]:
    """``blkid -o export`` output (KEY=value lines) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def probe_signature(device: str) -> tuple[Signature, dict[str, str]]:
    """Low-level probe (no cache): the signature and the partition-table entry tags."""
    # -p bypasses the blkid cache, which in an initramfs may describe the disk as it was
    # before our own changes of the previous (interrupted) boot.
    result = run(["blkid", "-p", "-o", "export", device], check=False)
    if result.returncode not in (0, 2):  # 2: nothing recognised
        raise EncryptrootfsError(
            f"`blkid -p {device}` failed: {result.stderr.decode(errors='replace').strip()}"
        )
    tags = parse_export(result.stdout.decode(errors="replace"))
    if tags.get("AMBIVALENT") or "ambivalent" in result.stderr.decode(errors="replace"):
        return Signature(type="ambivalent"), tags
    sig = Signature(
        type=tags.get("TYPE", ""),
        uuid=tags.get("UUID", ""),
        label=tags.get("LABEL", ""),
        version=tags.get("VERSION", ""),
    )
    return sig, tags


def luks_facts(device: str) -> LuksFacts:
    header = luks2.read_header(device)
    tokens = read_tokens(header.tokens)
    slot = header.reencrypt_keyslot
    pending = f"{slot.mode}/{slot.resilience}" if slot is not None else None
    return LuksFacts(
        uuid=header.uuid,
        version=2,
        reencryption_pending=header.reencryption_pending,
        tokens=tokens.kms,
        keyslots=tuple(sorted(header.keyslots, key=int)),
        damaged=tokens.damaged,
        reencryption=pending if header.reencryption_pending else None,
    )


def device_size(path: str) -> Optional[int]:
    """Size in bytes of a block device or file (None when it cannot be told)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def list_partitions(sys_block: Path = SYS_BLOCK) -> list[tuple[str, str, int]]:
    """(partition name, disk name, number) for every partition the kernel knows."""
    found = []
    for entry in sorted(sys_block.iterdir()) if sys_block.exists() else []:
        part_file = entry / "partition"
        if not part_file.exists():
            continue
        disk = entry.resolve().parent.name
        found.append((entry.name, disk, _read_int(part_file)))
    return found


def probe(
    path: str,
    size: int,
    *,
    name: str = "",
    disk: str = "",
    number: int = 0,
    start: int = 0,
    disk_size: int = 0,
    logical_sector: int = SECTOR,
) -> Partition:
    """What ``path`` (``size`` bytes) holds; the geometry arguments come from sysfs.

    Works on image files too, which is how the header tier drives the planner.
    """
    signature, tags = probe_signature(path)
    luks: Optional[LuksFacts] = None
    if signature.type == "crypto_LUKS" and signature.version.startswith("2"):
        luks = luks_facts(path)
    elif signature.type == "crypto_LUKS":
        luks = LuksFacts(signature.uuid, 1, False, (), ())
    record = None
    head = moved = None
    try:
        record = plan_record.read(path, size)
        if record is not None:
            head = plan_record.head_sha256(path)
            moved = plan_record.moved_copy_sha256(path, size)
    except OSError as exc:
        log.debug("cannot read a plan record on %s: %s", path, exc)
    return Partition(
        path=path,
        name=name,
        disk=disk,
        number=number,
        start=start,
        size=size,
        disk_size=disk_size,
        logical_sector=logical_sector,
        partuuid=tags.get("PART_ENTRY_UUID", ""),
        partlabel=tags.get("PART_ENTRY_NAME", ""),
        signature=signature,
        luks=luks,
        record=record,
        head_sha256=head,
        moved_sha256=moved,
    )


def partition_facts(name: str, disk: str, number: int, sys_block: Path = SYS_BLOCK) -> Partition:
    return probe(
        f"/dev/{name}",
        _read_int(sys_block / name / "size") * SECTOR,
        name=name,
        disk=f"/dev/{disk}",
        number=number,
        start=_read_int(sys_block / name / "start") * SECTOR,
        disk_size=_read_int(sys_block / disk / "size") * SECTOR,
        logical_sector=_read_int(sys_block / disk / "queue" / "logical_block_size"),
    )


def gather(sys_block: Path = SYS_BLOCK) -> list[Partition]:
    """Facts about every partition; devices that cannot be read are skipped with a note."""
    facts = []
    for name, disk, number in list_partitions(sys_block):
        try:
            facts.append(partition_facts(name, disk, number, sys_block))
        except (OSError, EncryptrootfsError) as exc:
            log.debug("skipping %s: %s", name, exc)
        except Exception as exc:  # hostile content on any attached disk
            # A damaged or crafted record on some other disk must not stop the root's boot:
            # the device is skipped and named, never a traceback.
            log.warning("skipping /dev/%s: it could not be read (%s)", name, type(exc).__name__)
    return facts


def kernel_cmdline(path: str = "/proc/cmdline") -> str:
    with open(path) as f:
        return f.read()


def cmdline_root(cmdline: str) -> Optional[str]:
    """The last ``root=`` of a kernel command line (the kernel uses the last one)."""
    value = None
    for word in cmdline.split():
        if word.startswith("root="):
            value = word[len("root=") :]
    return value


def wait_for_udev(timeout: int = 30) -> None:
    run(["udevadm", "settle", f"--timeout={timeout}"], check=False)


def disk_partitions(parts: Iterable[Partition], disk: str) -> list[Partition]:
    return sorted((p for p in parts if p.disk == disk), key=lambda p: p.start)


# --- which partition is the root (the boot and `status` find it the same way) ----------------


def root_spec(config: Config, cmdline: Optional[str] = None) -> str:
    """The root selector as a ``TAG=value`` or path string."""
    if config.root.kind is RootKind.CMDLINE:
        text = kernel_cmdline() if cmdline is None else cmdline
        spec = cmdline_root(text)
        if not spec:
            raise RefusedError(
                "The kernel command line has no root=, and [root] device is `cmdline`; "
                "encryptrootfs never guesses which disk to touch. Nothing was changed.",
                hint='set [root] device = "UUID=..." in the configuration',
            )
        return spec
    return str(config.root)


def normalise_spec(spec: str) -> str:
    """``/dev/disk/by-uuid/X`` -> ``UUID=X``; other forms unchanged."""
    for prefix, tag in _BY_PATH.items():
        if spec.startswith(prefix):
            return tag + spec[len(prefix) :]
    return spec


def _fs_uuids(p: Partition) -> set[str]:
    uuids = set()
    if p.luks is None and p.signature.uuid:
        uuids.add(p.signature.uuid.lower())
    if p.luks is not None:
        uuids.update(t.fs_uuid.lower() for t in p.luks.tokens if t.fs_uuid)
    if p.record is not None and p.record.fs_uuid:
        uuids.add(p.record.fs_uuid.lower())
    return uuids


def _fs_labels(p: Partition) -> set[str]:
    labels = set()
    if p.luks is None and p.signature.label:
        labels.add(p.signature.label)
    if p.luks is not None:
        labels.update(t.fs_label for t in p.luks.tokens if t.fs_label)
    if p.record is not None and p.record.fs_label:
        labels.add(p.record.fs_label)
    return labels


def matches(spec: str, p: Partition) -> bool:
    """Whether partition ``p`` is (or, encrypted, holds) the root that ``spec`` names."""
    spec = normalise_spec(spec)
    tag, sep, value = spec.partition("=")
    if not sep:
        return spec == p.path
    if tag == "UUID":
        return value.lower() in _fs_uuids(p)
    if tag == "LABEL":
        return value in _fs_labels(p)
    if tag == "PARTUUID":
        return bool(p.partuuid) and value.lower() == p.partuuid.lower()
    if tag == "PARTLABEL":
        return bool(p.partlabel) and value == p.partlabel
    raise RefusedError(
        f"The root selector `{spec}` is not understood; nothing was changed.",
        hint="use UUID=, LABEL=, PARTUUID=, PARTLABEL= or a /dev path",
    )


# Block devices that never carry an attacker's copy of the root: memory, loop files of this
# initramfs, optical drives.
_NOT_DISKS = ("loop", "ram", "zram", "sr", "fd", "nbd")


def whole_devices(sys_block: Path = SYS_BLOCK) -> list[str]:
    """Kernel names of the block devices that are not partitions: whole disks (an unpartitioned
    volume carries its file system on the disk itself), md arrays and dm devices."""
    names = []
    for entry in sorted(sys_block.iterdir()) if sys_block.exists() else []:
        if (entry / "partition").exists() or entry.name.startswith(_NOT_DISKS):
            continue
        names.append(entry.name)
    return names


def _opens(name: str, root: Partition, sys_block: Path) -> bool:
    """Whether dm device ``name`` is a LUKS mapping of ``root`` (ours, opened by this boot: it
    carries the root's file system by design)."""
    try:
        uuid = (sys_block / name / "dm" / "uuid").read_text().strip()
        slaves = {e.name for e in (sys_block / name / "slaves").iterdir()}
    except OSError:
        return False
    return uuid.startswith("CRYPT-") and root.name in slaves


def competing_devices(
    spec: str,
    root: Partition,
    sys_block: Path = SYS_BLOCK,
    signature_of: Callable[[str], Signature] = lambda path: probe_signature(path)[0],
) -> list[str]:
    """Other devices (whole disks, md, dm) whose file system carries the UUID or label that
    ``spec`` names: each could win ``/dev/disk/by-uuid`` and be mounted as ``/``. A device
    that cannot be probed is skipped and named in the log."""
    tag, sep, value = normalise_spec(spec).partition("=")
    if not sep or tag not in ("UUID", "LABEL"):
        return []  # PARTUUID/PARTLABEL name partitions only; a path names one device
    found = []
    for name in whole_devices(sys_block):
        if name.startswith("dm-") and _opens(name, root, sys_block):
            continue
        try:
            sig = signature_of(f"/dev/{name}")
        except Exception as exc:  # hostile content on any attached disk
            log.warning("skipping /dev/%s: it could not be probed (%s)", name, type(exc).__name__)
            continue
        if (tag == "UUID" and sig.uuid.lower() == value.lower()) or (
            tag == "LABEL" and sig.label == value
        ):
            found.append(f"/dev/{name}")
    return found


def refuse_competitors(spec: str, root: Partition, found: Sequence[str]) -> None:
    if found:
        raise RefusedError(
            f"The root selector `{spec}` names {root.path}, and also the file system on "
            f"{', '.join(found)} (a whole disk, md or dm device): either could be mounted as /. "
            "encryptrootfs never guesses which disk to trust, so nothing was changed and the "
            "root stays locked.",
            hint="detach the other device (a copy or a crafted volume), or select the root by "
            "PARTUUID= in [root] device",
        )


def find_root(spec: str, partitions: Sequence[Partition]) -> Optional[Partition]:
    """The one partition ``spec`` names; None when none does yet; refuse when several do."""
    found = [p for p in partitions if matches(spec, p)]
    if len(found) > 1:
        names = ", ".join(p.describe() for p in found)
        raise RefusedError(
            f"The root selector `{spec}` matches {len(found)} partitions ({names}); "
            "encryptrootfs never guesses which disk to touch, so nothing was changed.",
            hint="detach the copy (e.g. a cloned disk) or select the root by PARTUUID= in "
            "[root] device",
        )
    return found[0] if found else None
