"""Data volumes: local disks encrypted with a KMS-wrapped key, formatted when blank, mounted.

The case is EC2 instance storage: NVMe disks that are blank on every new instance (and after a
stop/start). ``encryptrootfs volumes up`` runs at every boot from a unit in the real root (not
the initramfs: nothing on these disks is needed to boot) and, for each ``[[volumes]]`` entry of
the configuration, in this order:

1. ``find``    the configured selectors (paths or globs) are expanded to the member devices
2. ``members`` each member is probed (blkid -p, sysfs holders); a pure planner decides
3. ``array``   raid0 only: mdadm creates the array over blank members, or assembles ours
4. ``target``  the device to encrypt (the array, or the one disk) is probed; a pure planner
               decides: *format* when blank, *unlock* when it holds our token, else *refuse*
5. ``format``  a KMS data key (proven to unwrap) becomes the passphrase of a fresh LUKS2
               device (random volume key), stored wrapped in our token (same format as the
               root's); the header is marked *formatting* until the filesystem exists
6. ``open``    the token is unwrapped through KMS (retried within ``[boot] unlock_timeout``)
               and the device opened as ``/dev/mapper/<mapper_name>``
7. ``mkfs``    after a format only: the filesystem, then the header is marked finished
8. ``mount``   on the configured folder

Each stage returns early when its work is already done, so running ``up`` again (or after a
crash) continues where it stopped. A device that holds anything else (any signature, a LUKS
header without our token, a partition table, a member of another array) is refused with the
reason and not touched: only a blank device is ever formatted, or one whose header says our
own format of it was interrupted before a filesystem existed (nothing can be stored on it
before that).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import stat
import time
import uuid as uuid_module
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

from .. import __version__, kms_retries, luks2
from ..config import Config, Raid, VolumeConfig, VolumeFilesystem
from ..errors import (
    DeviceError,
    EncryptrootfsError,
    RefusedError,
    ToolError,
    VerifyError,
)
from ..log import get_logger
from ..providers import KeyProvider, provider_for_token, provider_from_config
from ..providers.base import new_proven_key, wipe
from ..run import run, which
from ..token import KmsToken, read_tokens, token_to_json, utc_now

log = get_logger("volumes")

# The LUKS2 subsystem field says how far our own format went: "formatting" from luksFormat
# until the filesystem exists, then "volume". A header marked "formatting" never held data
# (the volume is mounted only after the mark changes), so it may be formatted again.
FORMATTING_SUBSYSTEM = "encryptrootfs-formatting"
VOLUME_SUBSYSTEM = "encryptrootfs-volume"

SYS_BLOCK = Path("/sys/class/block")
MOUNTINFO = Path("/proc/self/mountinfo")
UDEV_SETTLE_SECONDS = 30

# mdadm, mkfs.ext4/mkfs.xfs and mount run in the real root only (the initramfs never touches
# data volumes), so they are checked here, before the first write, not in the dracut module.
MKFS: dict[VolumeFilesystem, list[str]] = {
    # -F / -f: the device is a LUKS2 mapping this run has just created with a fresh key, so
    # whatever mkfs might recognise in it is noise from the disk's old ciphertext, not data.
    VolumeFilesystem.EXT4: ["mkfs.ext4", "-q", "-F"],
    VolumeFilesystem.XFS: ["mkfs.xfs", "-q", "-f"],
}


# --- facts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberProbe:
    """One device a selector matched, as blkid and sysfs see it."""

    path: str  # the resolved path (/dev/nvme1n1), never a symlink
    signature: str = ""  # blkid TYPE, "partition table (gpt)", "ambivalent"; "" for blank
    raid_uuid: Optional[str] = None  # the array UUID of an md member (linux_raid_member)
    holders: tuple[str, ...] = ()  # kernel names of what holds it open (md127, dm-3)

    @property
    def blank(self) -> bool:
        return not self.signature and not self.holders

    def describe(self) -> str:
        what = self.signature or "blank"
        if self.holders:
            what += f", in use by {', '.join(self.holders)}"
        return f"{self.path} ({what})"


@dataclass(frozen=True)
class TargetProbe:
    """The device to encrypt (the array, or the one member), as blkid, cryptsetup and sysfs
    see it."""

    path: str
    signature: str = ""  # as in MemberProbe; "crypto_LUKS" for LUKS
    luks_version: Optional[int] = None
    luks_uuid: Optional[str] = None
    subsystem: Optional[str] = None  # LUKS2 subsystem field (our format's progress mark)
    our_tokens: int = 0  # readable encryptrootfs tokens
    damaged_tokens: tuple[str, ...] = ()
    reencryption_pending: bool = False
    holders: tuple[str, ...] = ()  # kernel names (dm-3)
    open_as: Optional[str] = None  # the device-mapper name holding it, when one does
    error: Optional[str] = None  # the header could not be read

    def describe(self) -> str:
        if self.luks_version is not None:
            what = f"LUKS{self.luks_version}"
            if self.our_tokens:
                what += f" with {self.our_tokens} encryptrootfs token(s)"
            elif self.luks_version == 2:
                what += " without an encryptrootfs token"
            if self.subsystem:
                what += f", subsystem {self.subsystem}"
        else:
            what = self.signature or "blank"
        if self.open_as:
            what += f", open as /dev/mapper/{self.open_as}"
        elif self.holders:
            what += f", in use by {', '.join(self.holders)}"
        return f"{self.path} ({what})"


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo: what is mounted where."""

    mount_point: str
    device: int  # st_rdev-style number (major, minor) of the source
    source: str
    fstype: str


# --- plans (pure) -------------------------------------------------------------------------------


class MembersAction(str, Enum):
    USE_DEVICE = "use-device"  # one device, no array
    CREATE_ARRAY = "create-array"  # raid0 over blank devices
    ASSEMBLE_ARRAY = "assemble-array"  # raid0: our members, array not running
    USE_ARRAY = "use-array"  # raid0: the array is running
    SKIP = "skip"  # optional volume, nothing matched
    REFUSE = "refuse"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class MembersPlan:
    action: MembersAction
    reason: str
    target: Optional[str] = None  # known for use-device and use-array


class TargetAction(str, Enum):
    FORMAT = "format"  # blank, or our own format interrupted before the filesystem
    UNLOCK = "unlock"  # LUKS2 with our token
    ALREADY_OPEN = "already-open"  # open as the volume's mapper name
    REFUSE = "refuse"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TargetPlan:
    action: TargetAction
    reason: str


def plan_members(volume: VolumeConfig, members: Sequence[MemberProbe]) -> MembersPlan:
    """What to do with the devices the selectors matched; decides nothing about their content
    beyond what an array needs."""
    if not members:
        what = f"no device matches {', '.join(volume.devices)}"
        if volume.optional:
            return MembersPlan(MembersAction.SKIP, f"{what} (optional volume)")
        return MembersPlan(MembersAction.REFUSE, what)
    listed = "; ".join(m.describe() for m in members)
    if len(members) == 1:
        # raid0 over one disk is the disk itself: no array to create or assemble.
        return MembersPlan(MembersAction.USE_DEVICE, f"one device: {listed}", members[0].path)
    if volume.raid is Raid.NONE:
        return MembersPlan(
            MembersAction.REFUSE,
            f'raid = "none" takes one device but {len(members)} match: {listed}; name one, or '
            'set raid = "raid0"',
        )
    holders = {m.holders for m in members}
    if len(holders) == 1:
        (held,) = holders
        if len(held) == 1 and held[0].startswith("md"):
            return MembersPlan(
                MembersAction.USE_ARRAY,
                f"array {held[0]} is running over {len(members)} devices",
                f"/dev/{held[0]}",
            )
    if any(m.holders for m in members):
        return MembersPlan(MembersAction.REFUSE, f"some devices are in use: {listed}")
    if all(m.blank for m in members):
        return MembersPlan(
            MembersAction.CREATE_ARRAY, f"{len(members)} blank devices: a new RAID0 array over them"
        )
    uuids = {m.raid_uuid for m in members}
    if (
        all(m.signature == "linux_raid_member" for m in members)
        and len(uuids) == 1
        and None not in uuids
    ):
        return MembersPlan(
            MembersAction.ASSEMBLE_ARRAY,
            f"{len(members)} members of array {uuids.pop()}: assemble it",
        )
    return MembersPlan(
        MembersAction.REFUSE,
        "the devices are neither all blank nor all members of one array: " + listed,
    )


def plan_target(volume: VolumeConfig, target: TargetProbe) -> TargetPlan:
    """Format, unlock or refuse: the decision for the device to encrypt."""
    d = target.describe()
    if target.error is not None:
        return TargetPlan(TargetAction.REFUSE, f"{target.path}: {target.error}")
    if target.open_as is not None:
        if target.open_as != volume.mapper_name:
            return TargetPlan(
                TargetAction.REFUSE, f"{d} is open under another name than {volume.mapper_name}"
            )
        if target.subsystem == FORMATTING_SUBSYSTEM:
            return TargetPlan(
                TargetAction.REFUSE,
                f"{d}: a format of it stopped before its filesystem was made while it stayed "
                f"open; close it (`cryptsetup close {volume.mapper_name}`) and run again",
            )
        if target.our_tokens:
            return TargetPlan(TargetAction.ALREADY_OPEN, f"{d}")
        return TargetPlan(TargetAction.REFUSE, f"{d} is open but has no encryptrootfs token")
    if target.holders:
        return TargetPlan(TargetAction.REFUSE, f"{d} is in use")
    if target.luks_version is None:
        if not target.signature:
            return TargetPlan(TargetAction.FORMAT, f"{d}: blank")
        return TargetPlan(TargetAction.REFUSE, f"{d} holds a signature ({target.signature})")
    if target.luks_version == 2 and target.subsystem == FORMATTING_SUBSYSTEM:
        return TargetPlan(
            TargetAction.FORMAT,
            f"{d}: our format of it stopped before its "
            "filesystem was made (it never held data): formatting it again",
        )
    if target.luks_version != 2 or not target.our_tokens:
        extra = f" ({'; '.join(target.damaged_tokens)})" if target.damaged_tokens else ""
        return TargetPlan(TargetAction.REFUSE, f"{d} is not ours{extra}")
    if target.reencryption_pending:
        return TargetPlan(TargetAction.REFUSE, f"{d} has an unfinished reencryption")
    return TargetPlan(TargetAction.UNLOCK, f"{d}")


def parse_mountinfo(text: str) -> list[MountEntry]:
    """``/proc/self/mountinfo`` lines (man 5 proc) as entries; octal escapes decoded."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 7:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 3:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            device = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        entries.append(
            MountEntry(_unescape(fields[4]), device, _unescape(fields[sep + 2]), fields[sep + 1])
        )
    return entries


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040 \011 \012 \134.
    out, i = [], 0
    while i < len(text):
        code = text[i + 1 : i + 4]
        if text[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mounted_here(mounts: Sequence[MountEntry], mount_point: str, device: int) -> Optional[bool]:
    """True: ``device`` is mounted on ``mount_point`` (the last mount there wins); False:
    something else is; None: nothing is."""
    here = [m for m in mounts if m.mount_point == mount_point]
    if not here:
        return None
    return here[-1].device == device


# --- probing (read-only) ------------------------------------------------------------------------


def find_devices(volume: VolumeConfig) -> list[str]:
    """The devices the selectors match now: resolved, each once, in a stable order.

    A glob that matches nothing is no error here (the planner decides); an explicit path that
    does not exist is, because it names one particular disk.
    """
    found: list[str] = []
    for selector in volume.devices:
        if any(c in selector for c in "*?["):
            matches = sorted(glob.glob(selector))
        elif os.path.exists(selector):
            matches = [selector]
        else:
            raise DeviceError(
                f"Volume {volume.name}: {selector} does not exist; nothing was changed.",
                hint="check the device path, or use a glob with optional = true for disks "
                "that only some instance types have",
            )
        for match in matches:
            real = os.path.realpath(match)
            mode = os.stat(real).st_mode
            if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
                raise DeviceError(
                    f"Volume {volume.name}: {match} is not a block device; nothing was changed."
                )
            if real not in found:
                found.append(real)
    return found


def holders(device: str, sys_block: Path = SYS_BLOCK) -> tuple[str, ...]:
    """Kernel names of the devices built on ``device`` (md arrays, dm mappings)."""
    folder = sys_block / os.path.basename(os.path.realpath(device)) / "holders"
    try:
        return tuple(sorted(p.name for p in folder.iterdir()))
    except OSError:
        return ()  # an image file, or a device without a sysfs entry


def dm_name(kernel_name: str, sys_block: Path = SYS_BLOCK) -> Optional[str]:
    try:
        return (sys_block / kernel_name / "dm" / "name").read_text().strip() or None
    except OSError:
        return None


def _signature(tags: dict[str, str], found_type: str) -> str:
    if found_type:
        return found_type
    if tags.get("PTTYPE"):
        return f"partition table ({tags['PTTYPE']})"
    return ""


def probe_member(path: str) -> MemberProbe:
    from ..devices import probe_signature

    sig, tags = probe_signature(path)
    return MemberProbe(
        path=path,
        signature=_signature(tags, sig.type),
        raid_uuid=tags.get("UUID") if sig.type == "linux_raid_member" else None,
        holders=holders(path),
    )


def probe_target(path: str) -> TargetProbe:
    from ..devices import probe_signature

    sig, tags = probe_signature(path)
    held = holders(path)
    names = [n for n in (dm_name(h) for h in held) if n is not None]
    base = TargetProbe(
        path=path,
        signature=_signature(tags, sig.type),
        holders=held,
        open_as=names[0] if len(names) == 1 and len(held) == 1 else None,
    )
    if sig.type != "crypto_LUKS":
        return base
    version = int(sig.version) if sig.version.isdigit() else None
    if version != 2:
        return dataclasses.replace(base, luks_version=version or 1)
    try:
        header = luks2.read_header(path)
    except EncryptrootfsError as exc:
        return dataclasses.replace(base, luks_version=2, error=exc.message)
    tokens = read_tokens(header.tokens)
    return dataclasses.replace(
        base,
        luks_version=2,
        luks_uuid=header.uuid,
        subsystem=header.subsystem,
        our_tokens=len(tokens.kms),
        damaged_tokens=tokens.damaged,
        reencryption_pending=header.reencryption_pending,
    )


def read_mounts(path: Path = MOUNTINFO) -> list[MountEntry]:
    try:
        return parse_mountinfo(path.read_text())
    except OSError:
        return []


def our_tokens(path: str) -> list[KmsToken]:
    tokens = read_tokens(luks2.read_header(path).tokens)
    for why in tokens.damaged:
        log.warning("%s: skipping a damaged token: %s", path, why)
    return list(tokens.kms)


# --- stages that write --------------------------------------------------------------------------


def settle() -> None:
    """Let udev finish creating device nodes and links (/dev/disk/by-id, /dev/md*)."""
    if which("udevadm") is not None:
        run(["udevadm", "settle", f"--timeout={UDEV_SETTLE_SECONDS}"], check=False)


def create_array(volume: VolumeConfig, members: Sequence[str]) -> None:
    log.info("volume %s: creating a RAID0 array over %s", volume.name, ", ".join(members))
    run(
        [
            "mdadm",
            "--create",
            f"/dev/md/{volume.name}",
            "--run",
            "--level=0",
            f"--raid-devices={len(members)}",
            "--metadata=1.2",
            f"--name={volume.name}",
            *members,
        ],
        hint="nothing was stored on the devices; fix the cause and run it again",
    )


def assemble_array(volume: VolumeConfig, members: Sequence[str]) -> None:
    log.info("volume %s: assembling its RAID0 array from %s", volume.name, ", ".join(members))
    run(
        ["mdadm", "--assemble", "--run", f"/dev/md/{volume.name}", *members],
        hint="the devices were not changed; `mdadm --examine DEVICE` shows their superblocks",
    )


def array_of(volume: VolumeConfig, members: Sequence[str]) -> str:
    """The md device now holding all ``members``."""
    held = {holders(m) for m in members}
    if len(held) == 1:
        (names,) = held
        if len(names) == 1 and names[0].startswith("md"):
            return f"/dev/{names[0]}"
    raise DeviceError(
        f"Volume {volume.name}: mdadm finished but no single array holds "
        f"{', '.join(members)}; nothing was formatted.",
        hint="`cat /proc/mdstat` shows the arrays",
    )


def luks_format(device: str, key: bytearray, *, uuid: str, label: str) -> int:
    """A fresh LUKS2 header on ``device`` (random volume key, PBKDF2 keyslot for ``key``),
    marked as our unfinished format; the keyslot's id.

    ``uuid`` is chosen beforehand: the wrapped key's encryption context binds to it.
    """
    luks2.format_device(
        device,
        key,
        uuid=uuid,
        label=label,
        subsystem=FORMATTING_SUBSYSTEM,
        hint="the device held no data (it was blank); run it again",
    )
    header = luks2.read_header(device)
    if header.uuid != uuid or header.subsystem != FORMATTING_SUBSYSTEM or not header.key_keyslots:
        raise VerifyError(
            f"cryptsetup wrote a LUKS2 header on {device} that is not the one "
            "asked for; nothing is stored on it."
        )
    return header.key_keyslots[0].id


def mark(device: str, label: str, subsystem: str) -> None:
    luks2.set_label(device, label, subsystem)


def format_volume(device: str, volume: VolumeConfig, provider: KeyProvider) -> bytearray:
    """Stage 5: LUKS2 on a blank ``device`` with a KMS data key as its passphrase.

    The key is proven to unwrap before the header is written, and the keyslot to open with it
    after the token is stored. Returns the key (for the open stage; the caller wipes it).
    """
    luks_uuid = str(uuid_module.uuid4())
    new = new_proven_key(provider, luks_uuid, unchanged=f"nothing was written to {device}")
    try:
        log.info("volume %s: formatting %s as LUKS2 %s", volume.name, device, luks_uuid)
        slot = luks_format(device, new.plaintext, uuid=luks_uuid, label=volume.name)
        token = KmsToken(
            keyslots=(str(slot),),
            wrapped=new.wrapped,
            created=utc_now(),
            created_by=f"encryptrootfs {__version__}",
        )
        token_id = luks2.import_token(device, token_to_json(token))
        if not luks2.test_keyslot(device, new.plaintext, slot):
            raise VerifyError(
                f"The new keyslot {slot} of {device} does not open with its key; "
                "the next run formats it again (it holds no data)."
            )
        log.info(
            "volume %s: token %d holds the key wrapped by %s",
            volume.name,
            token_id,
            new.wrapped.key_id,
        )
        return bytearray(new.plaintext)
    finally:
        new.wipe()


def unwrap_key(
    config: Config,
    device: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bytearray, KmsToken]:
    """The key of the first token of ``device`` that unwraps, retried while the failure can
    pass (network not up yet, throttling) until ``[boot] unlock_timeout``."""
    tokens = our_tokens(device)
    if not tokens:
        raise VerifyError(f"{device} has no readable encryptrootfs token; nothing was changed.")

    def unwrap(token: KmsToken) -> Callable[[], tuple[bytearray, KmsToken]]:
        return lambda: (provider_for_token(config, token.wrapped).unwrap(token.wrapped), token)

    def report(line: str) -> None:
        log.warning("%s: %s", device, line)

    return kms_retries.with_kms_retries(
        config.boot.unlock_timeout,
        f"unwrap the key of {device}",
        [(f"unwrap with {t.wrapped.key_id} ({t.wrapped.region})", unwrap(t)) for t in tokens],
        outcome="The volume stays locked and nothing on it was changed.",
        report=report,
        clock=clock,
        sleep=sleep,
    )


def open_volume(device: str, volume: VolumeConfig, key: bytearray, keyslot: Optional[int]) -> str:
    mapper = luks2.open_device(device, volume.mapper_name, key, keyslot=keyslot)
    log.info("volume %s: %s opened as %s", volume.name, device, mapper)
    return mapper


def _close_quietly(volume: VolumeConfig) -> None:
    try:
        luks2.close_device(volume.mapper_name)
    except EncryptrootfsError as exc:
        log.error(
            "volume %s: could not close /dev/mapper/%s: %s",
            volume.name,
            volume.mapper_name,
            exc.message,
        )


def make_filesystem(mapper: str, volume: VolumeConfig) -> None:
    log.info("volume %s: making %s on %s", volume.name, volume.filesystem.value, mapper)
    run(
        [*MKFS[volume.filesystem], mapper],
        hint="the volume holds no data yet; the next run formats it again",
    )


def filesystem_of(device: str) -> str:
    from ..devices import probe_signature

    sig, _ = probe_signature(device)
    return sig.type


def mount_volume(mapper: str, volume: VolumeConfig, mounts: Sequence[MountEntry]) -> bool:
    """Stage 8; False when it was already mounted there."""
    device = os.stat(mapper).st_rdev
    state = mounted_here(mounts, volume.mount, device)
    if state:
        return False
    if state is False:
        raise RefusedError(
            f"Volume {volume.name}: something else is mounted on {volume.mount}; "
            f"{mapper} was left open and not mounted.",
            hint=f"unmount it, or choose another mount for volume {volume.name}",
        )
    found = filesystem_of(mapper)
    if found != volume.filesystem.value:
        raise RefusedError(
            f"Volume {volume.name}: {mapper} holds {found or 'no filesystem'}, not the "
            f"configured {volume.filesystem.value}; it was left open and not mounted.",
            hint="a volume keeps the filesystem it was formatted with; fix `filesystem`",
        )
    os.makedirs(volume.mount, mode=0o755, exist_ok=True)
    argv = ["mount", "-t", volume.filesystem.value]
    if volume.mount_options:
        argv += ["-o", ",".join(volume.mount_options)]
    run([*argv, mapper, volume.mount])
    log.info("volume %s: %s mounted on %s", volume.name, mapper, volume.mount)
    return True


# --- one volume, every stage in order -----------------------------------------------------------


@dataclass(frozen=True)
class VolumeResult:
    name: str
    action: str  # what was done: formatted | unlocked | already-open | mounted | skipped
    target: Optional[str] = None
    mapper: Optional[str] = None
    mount: Optional[str] = None
    steps: tuple[str, ...] = ()  # the stages that changed something, in order

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "target": self.target,
            "mapper": self.mapper,
            "mount": self.mount,
            "steps": list(self.steps),
        }


def _refuse(volume: VolumeConfig, reason: str) -> RefusedError:
    return RefusedError(
        f"Volume {volume.name}: {reason}. Nothing on the device(s) was changed.",
        hint="encryptrootfs formats only blank devices and unlocks only its own; discard a "
        "device you mean to reuse (blkdiscard DEVICE: wipefs -a alone leaves its old data "
        "readable beneath the new volume) or change `devices`",
    )


def volume_up(
    volume: VolumeConfig,
    config: Config,
    *,
    provider_factory: Callable[[Config], KeyProvider] = provider_from_config,
    mounts: Optional[Callable[[], list[MountEntry]]] = None,
) -> VolumeResult:
    """Every stage for one volume, in the order of the module text."""
    steps: list[str] = []
    members = find_devices(volume)
    member_plan = plan_members(volume, [probe_member(m) for m in members])
    log.info("volume %s: %s: %s", volume.name, member_plan.action.value, member_plan.reason)
    if member_plan.action is MembersAction.SKIP:
        return VolumeResult(volume.name, "skipped")
    if member_plan.action is MembersAction.REFUSE:
        raise _refuse(volume, member_plan.reason)
    if member_plan.action in (MembersAction.CREATE_ARRAY, MembersAction.ASSEMBLE_ARRAY):
        if which("mdadm") is None:
            raise ToolError(
                f"Volume {volume.name} needs mdadm for its RAID0 array and it is "
                "not installed; nothing was changed.",
                hint="install mdadm (Debian and RHEL: package mdadm)",
            )
        if member_plan.action is MembersAction.CREATE_ARRAY:
            create_array(volume, members)
        else:
            assemble_array(volume, members)
        steps.append(member_plan.action.value)
        settle()
        target = array_of(volume, members)
    else:
        assert member_plan.target is not None
        target = member_plan.target

    target_plan = plan_target(volume, probe_target(target))
    log.info("volume %s: %s: %s", volume.name, target_plan.action.value, target_plan.reason)
    if target_plan.action is TargetAction.REFUSE:
        raise _refuse(volume, target_plan.reason)
    mapper = f"/dev/mapper/{volume.mapper_name}"
    action = "unlocked"
    if target_plan.action is TargetAction.FORMAT:
        mkfs = MKFS[volume.filesystem][0]
        if which(mkfs) is None:
            raise ToolError(
                f"Volume {volume.name} is formatted with {mkfs}, which is not "
                "installed; nothing was written to it.",
                hint="install e2fsprogs (ext4) or xfsprogs (xfs)",
            )
        key = format_volume(target, volume, provider_factory(config))
        try:
            steps.append("format")
            open_volume(target, volume, key, None)
            steps.append("open")
        finally:
            wipe(key)
        try:
            make_filesystem(mapper, volume)
            mark(target, volume.name, VOLUME_SUBSYSTEM)
        except BaseException:
            # Still marked "formatting": closed, the next run formats it again from scratch.
            _close_quietly(volume)
            raise
        steps.append("mkfs")
        action = "formatted"
    elif target_plan.action is TargetAction.UNLOCK:
        key, token = unwrap_key(config, target)
        try:
            open_volume(target, volume, key, int(token.keyslots[0]))
        finally:
            wipe(key)
        steps.append("open")
    else:
        action = "already-open"
    if mount_volume(mapper, volume, (mounts or read_mounts)()):
        steps.append("mount")
    return VolumeResult(volume.name, action, target, mapper, volume.mount, tuple(steps))


def volumes_up(config: Config) -> tuple[list[VolumeResult], list[tuple[str, EncryptrootfsError]]]:
    """Every configured volume; one volume's failure does not stop the others."""
    if not config.volumes:
        return [], []
    settle()
    done: list[VolumeResult] = []
    failed: list[tuple[str, EncryptrootfsError]] = []
    for volume in config.volumes:
        try:
            done.append(volume_up(volume, config))
        except EncryptrootfsError as exc:
            log.error("volume %s: %s", volume.name, exc)
            failed.append((volume.name, exc))
    return done, failed


# --- show (read-only) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeView:
    """What ``encryptrootfs volumes`` shows: the configuration, what is there, what ``up``
    would do. Probes only; calls no key service."""

    volume: VolumeConfig
    members: tuple[MemberProbe, ...] = ()
    members_plan: Optional[MembersPlan] = None
    target: Optional[TargetProbe] = None
    target_plan: Optional[TargetPlan] = None
    mounted: bool = False
    error: Optional[str] = None
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        v = self.volume
        return {
            "name": v.name,
            "raid": v.raid.value,
            "filesystem": v.filesystem.value,
            "mount": v.mount,
            "mapper_name": v.mapper_name,
            "selectors": list(v.devices),
            "mount_options": list(v.mount_options),
            "optional": v.optional,
            "members": [
                {
                    "device": m.path,
                    "signature": m.signature or None,
                    "raid_uuid": m.raid_uuid,
                    "holders": list(m.holders),
                }
                for m in self.members
            ],
            "members_plan": (
                {"action": self.members_plan.action.value, "reason": self.members_plan.reason}
                if self.members_plan
                else None
            ),
            "target": (
                {
                    "device": self.target.path,
                    "signature": self.target.signature or None,
                    "luks_version": self.target.luks_version,
                    "luks_uuid": self.target.luks_uuid,
                    "subsystem": self.target.subsystem,
                    "encryptrootfs_tokens": self.target.our_tokens,
                    "open_as": self.target.open_as,
                }
                if self.target
                else None
            ),
            "target_plan": (
                {"action": self.target_plan.action.value, "reason": self.target_plan.reason}
                if self.target_plan
                else None
            ),
            "mounted": self.mounted,
            "error": self.error,
        }


def view_volume(volume: VolumeConfig, mounts: Sequence[MountEntry]) -> VolumeView:
    try:
        members = tuple(probe_member(m) for m in find_devices(volume))
    except EncryptrootfsError as exc:
        return VolumeView(volume, error=exc.message)
    members_plan = plan_members(volume, members)
    target_path = members_plan.target
    if target_path is None:
        return VolumeView(volume, members, members_plan)
    target = probe_target(target_path)
    target_plan = plan_target(volume, target)
    mapper = f"/dev/mapper/{volume.mapper_name}"
    mounted = False
    if target.open_as == volume.mapper_name and os.path.exists(mapper):
        mounted = bool(mounted_here(mounts, volume.mount, os.stat(mapper).st_rdev))
    return VolumeView(volume, members, members_plan, target, target_plan, mounted)


def view_volumes(config: Config) -> list[VolumeView]:
    mounts = read_mounts()
    return [view_volume(v, mounts) for v in config.volumes]


def views_text(views: Sequence[VolumeView]) -> str:
    if not views:
        return "no [[volumes]] in the configuration\n"
    lines = []
    for view in views:
        v = view.volume
        lines.append(
            f"{v.name}: {v.filesystem.value} on {v.mount}, raid {v.raid.value}, "
            f"/dev/mapper/{v.mapper_name}" + (" (mounted)" if view.mounted else "")
        )
        if view.error:
            lines.append(f"  error: {view.error}")
        for m in view.members:
            lines.append(f"  member {m.describe()}")
        if view.members_plan is not None:
            lines.append(f"  devices: {view.members_plan.action.value}: {view.members_plan.reason}")
        if view.target_plan is not None:
            lines.append(f"  volume: {view.target_plan.action.value}: {view.target_plan.reason}")
    return "\n".join(lines) + "\n"


def exit_failed(failed: Sequence[tuple[str, EncryptrootfsError]]) -> Optional[EncryptrootfsError]:
    """The error ``volumes up`` exits with: the first failure (each was logged)."""
    if not failed:
        return None
    if len(failed) == 1:
        return failed[0][1]
    first = failed[0][1]
    names = ", ".join(name for name, _ in failed)
    error = type(first)(
        f"{len(failed)} volumes failed ({names}); the first: {first.message}", hint=first.hint
    )
    return error
