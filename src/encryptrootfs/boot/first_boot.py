"""The first boot: convert the plain root to LUKS2 in place, in small re-runnable stages.

The order is the design (DESIGN.md invariants 1-6):

1. preflight      read-only: tools, filesystem, room for the header, KMS key usable, clock
   (/boot)        when GRUB reads /boot from the root: a plaintext /boot partition first
                  (:mod:`encryptrootfs.boot.boot_partition`; the root is still plain)
2. make room      grow the partition into free space after it, else shrink the filesystem
3. plan record    the wrapped key and the head's hash, durable before the header is written
4. header         ``reencrypt --encrypt --init-only`` (no data is encrypted yet)
5. custody        import the token, prove it unwraps and opens its keyslot
6. data pass      ``reencrypt --resume-only``, with progress on the console
7. open           ``/dev/mapper/<name>``: the filesystem UUID is unchanged, the boot goes on
8. grow           optional: partition to the end of the disk, mapping, filesystem (every boot)

Each stage checks whether it is already done, so a boot cut at any instant is finished by the
next one (see :mod:`encryptrootfs.boot.decide` for how that boot finds its place).
"""

from __future__ import annotations

import time
import uuid as uuid_module
from dataclasses import dataclass, replace
from typing import Optional

from .. import devices, luks2, plan_record
from ..config import Config
from ..devices import Partition
from ..errors import EncryptrootfsError, RefusedError, ToolError, VerifyError
from ..plan_record import REDUCE_DEVICE_SIZE, PlanRecord
from ..providers import KeyProvider
from ..providers.base import NewKey, WrappedKey, new_proven_key, wipe
from ..token import KmsToken, token_from_json, token_to_json, utc_now
from ..tools import Need, missing
from . import boot_partition, filesystems, partitions
from .boot_partition import BootMove
from .breakpoints import stop_after
from .console import say
from .filesystems import FsGeometry
from .grow import grow_root
from .integration import Integration
from .unlock import with_kms_retries
from .volume import data_pass, open_root

# A clock before this cannot be right, and KMS would reject our signatures anyway; refuse
# early with the real reason rather than a signature error.
EARLIEST_SANE_TIME = 1735689600  # 2025-01-01T00:00:00Z

_FS_NEEDS = {"ext4": Need.EXT4, "xfs": Need.XFS, "btrfs": Need.BTRFS}


@dataclass(frozen=True)
class RoomPlan:
    """How the 32 MiB for the header are found; at most one of the two changes."""

    grow_partition_to: Optional[int] = None  # bytes
    shrink_fs_to: Optional[int] = None  # bytes

    def describe(self) -> str:
        if self.grow_partition_to is not None:
            return f"grow the partition to {self.grow_partition_to // 1048576} MiB"
        if self.shrink_fs_to is not None:
            return f"shrink the filesystem to {self.shrink_fs_to // 1048576} MiB"
        return "there is room already"


def plan_room(part: Partition, fs: FsGeometry, free_after: int) -> RoomPlan:
    """Pure: where the header's 32 MiB come from, or a refusal that says why none fits."""
    needed = fs.size + REDUCE_DEVICE_SIZE
    if needed <= part.size:
        return RoomPlan()
    grown = partitions.grown_size(part.size, needed, free_after)
    if grown is not None:
        return RoomPlan(grow_partition_to=grown)
    target = (part.size - REDUCE_DEVICE_SIZE) // fs.block_size * fs.block_size
    if fs.min_size is not None and target >= fs.min_size and target > 0:
        return RoomPlan(shrink_fs_to=target)
    short = (needed - part.size - free_after) // 1048576 + 1
    if fs.min_size is None:
        raise RefusedError(
            f"The root {part.path} ({fs.fs_type}) fills its partition, there are only "
            f"{free_after // 1048576} MiB free after it, and {fs.fs_type} cannot shrink: there "
            f"is no room for the 32 MiB LUKS2 header. Nothing was changed.",
            hint=f"leave at least {short} MiB more unpartitioned space after the root "
            "partition in the image (cloud disks larger than the image have it)",
        )
    # What works is room after the partition: the first boot grows the partition into it.
    # Deleting files does not: the shrink is in place and must give up the partition's last
    # 32 MiB, and resize2fs's minimum (-P) hardly falls as files go (measured: the same
    # minimum after 128 MiB were deleted).
    after = free_after // 1048576 + short
    raise RefusedError(
        f"The root {part.path} cannot make room for the 32 MiB LUKS2 header: grow the disk so "
        f"that at least {after} MiB lie free after the root partition (now "
        f"{free_after // 1048576} MiB), and the first boot grows the partition into it. "
        f"Shrinking in place does not fit: the filesystem needs at least "
        f"{fs.min_size // 1048576} MiB and only {(part.size - REDUCE_DEVICE_SIZE) // 1048576} "
        "MiB would be left. Nothing was changed.",
        hint=f"grow the disk (or leave {after} MiB unpartitioned after the root in the image); "
        "deleting files in the image does not help: resize2fs's minimum barely moves with "
        "free space, and the header needs the partition's last 32 MiB",
    )


@dataclass(frozen=True)
class Preflight:
    fs: FsGeometry
    room: RoomPlan
    table: partitions.Table
    luks_uuid: str
    boot: Optional[BootMove] = None  # /boot to move out of the root first (boot_partition.py)

    def describe(self) -> str:
        b = self.boot
        if b is not None and b.fs_size is not None and b.root_size is not None:
            return (
                f"/boot and the LUKS2 header take the root's tail: filesystem "
                f"{b.fs_size // 1048576} MiB, partition "
                f"{b.root_size * b.sector_size // 1048576} MiB"
            )
        return self.room.describe()


def preflight(part: Partition, config: Config, *, now: Optional[float] = None) -> Preflight:
    """Everything that can be checked without writing. Raises before any change."""
    fs_type = part.signature.type
    lacking = missing(Need.LUKS, Need.PARTITION, _FS_NEEDS[fs_type])
    if lacking:
        names = ", ".join(f"{t.name} ({t.package})" for t in lacking)
        raise ToolError(
            f"The initramfs lacks {names}; nothing was changed.",
            hint="rebuild the initramfs with `encryptrootfs install`",
        )
    luks2.require_cryptsetup()
    clock = time.time() if now is None else now
    if clock < EARLIEST_SANE_TIME:
        raise RefusedError(
            f"The clock says {time.strftime('%Y-%m-%d %H:%M', time.gmtime(clock))} UTC, which "
            "cannot be right; KMS would reject the request signatures. Nothing was changed.",
            hint="check the hardware clock (RTC) of the machine",
        )
    filesystems.check_readonly(fs_type, part.path)
    fs = filesystems.geometry(fs_type, part.path)
    table = partitions.read_table(part.disk, part.disk_size, part.logical_sector)
    move = boot_partition.plan(
        part, devices.gather(), table, config.first_boot.boot_partition_mib, fs
    )
    free = partitions.free_after(table, part.path)
    if move is not None:
        if not config.first_boot.move_boot:
            raise RefusedError(
                f"GRUB on {part.disk} reads /boot from the root {part.path}; once encrypted the "
                "machine would not boot, and [first_boot] move_boot is false. Nothing was "
                "changed.",
                hint="set move_boot = true, or give the image a separate /boot",
            )
        lacking = missing(Need.BOOT)
        if lacking:
            raise ToolError(
                f"GRUB reads /boot from the root {part.path}, and moving it needs "
                f"{', '.join(t.name for t in lacking)}, which the initramfs lacks; nothing was "
                "changed.",
                hint="install e2fsprogs and coreutils in the image, then rebuild "
                "the initramfs with `encryptrootfs install`",
            )
        if move.fs_size is not None:
            # The root gives up its tail for /boot and the header's room together: the plan
            # after the move (encrypt re-plans from the disk) finds the room made.
            return Preflight(fs, RoomPlan(), table, str(uuid_module.uuid4()), move)
        if not any(
            boot_partition.partition_number(e.node, part.disk) == move.number for e in table.entries
        ):
            # The header's room comes from the space before the new partition.
            free = min(free, move.start_bytes - (part.start + part.size))
    room = plan_room(part, fs, free)
    if room.shrink_fs_to is not None:
        filesystems.check_shrink_in_place(fs_type, part.path, room.shrink_fs_to)
    return Preflight(fs, room, table, str(uuid_module.uuid4()), move)


def make_room(part: Partition, pre: Preflight) -> int:
    """Apply the room plan; returns the partition size afterwards (bytes)."""
    if pre.room.grow_partition_to is not None:
        say(
            f"{part.path}: growing the partition by "
            f"{(pre.room.grow_partition_to - part.size) // 1048576} MiB for the LUKS2 header"
        )
        partitions.grow(part, pre.table, pre.room.grow_partition_to)
        return pre.room.grow_partition_to
    if pre.room.shrink_fs_to is not None:
        say(
            f"{part.path}: shrinking {pre.fs.fs_type} to "
            f"{pre.room.shrink_fs_to // 1048576} MiB for the LUKS2 header"
        )
        filesystems.shrink(pre.fs.fs_type, part.path, pre.room.shrink_fs_to)
    return part.size


def new_token(wrapped: WrappedKey, keyslot: int, part: Partition) -> KmsToken:
    return KmsToken(
        keyslots=(str(keyslot),),
        wrapped=wrapped,
        created=utc_now(),
        fs_uuid=part.signature.uuid or None,
        fs_label=part.signature.label or None,
    )


def verified_new_key(provider: KeyProvider, luks_uuid: str) -> NewKey:
    """A new data key whose wrapped form has been proven to unwrap to the same bytes."""
    return new_proven_key(provider, luks_uuid, unchanged="nothing was changed")


def encrypt(
    part: Partition,
    config: Config,
    provider: KeyProvider,
    integration: Optional[Integration] = None,
) -> str:
    """Stages 1-7 for a plain root; returns the opened mapping."""
    say(f"{part.path}: first boot: converting the {part.signature.type} root to LUKS2 in place")
    pre = preflight(part, config)
    say(f"{part.path}: preflight passed ({pre.describe()}); asking KMS for a new key")
    key = with_kms_retries(
        config,
        "get a new key from KMS",
        [("new data key from KMS", lambda: verified_new_key(provider, pre.luks_uuid))],
        outcome="Nothing on disk was changed; the next boot tries again.",
        integration=integration,
    )
    stop_after("preflight")
    # What is on the disk so far, for an error that stops the boot half way.
    done = "nothing was changed on disk"
    try:
        if pre.boot is not None:
            done = "the /boot move had started (GRUB boots the root's own /boot until it completes)"
            boot_partition.move(part, pre.boot, pre.table)
            done = "/boot was moved to its own partition"
            # The table (and, when the root gave up its tail, the partition and filesystem
            # sizes) changed: plan the rest from the disk as it is now, for the same LUKS UUID
            # the new key's encryption context names.
            part = devices.partition_facts(part.name, part.disk[len("/dev/") :], part.number)
            pre = replace(preflight(part, config), luks_uuid=pre.luks_uuid)
            say(f"{part.path}: after the /boot move: {pre.describe()}")
        size = make_room(part, pre)
        if pre.room.grow_partition_to or pre.room.shrink_fs_to:
            done = f"only the room for the header was made ({pre.room.describe()})"
        stop_after("room")  # (also when no room had to be made)
        # The token names keyslot 0: --init-only puts the first keyslot there.
        token = new_token(key.wrapped, 0, part)
        record = PlanRecord(
            luks_uuid=pre.luks_uuid,
            partition_size=size,
            fs_type=pre.fs.fs_type,
            fs_uuid=part.signature.uuid,
            fs_label=part.signature.label,
            head_sha256=plan_record.head_sha256(part.path),
            token=token_to_json(token),
        )
        plan_record.write(part.path, record)
        stop_after("record")
        say(f"{part.path}: writing the LUKS2 header (no data is encrypted yet)")
        slot = luks2.reencrypt_encrypt_init(
            part.path,
            key.plaintext,
            uuid=pre.luks_uuid,
            reduce_device_size=REDUCE_DEVICE_SIZE,
            # 4096-byte encryption sectors are ~2x faster than 512 where the fs allows them.
            sector_size=4096 if pre.fs.max_sector >= 4096 else None,
        )
        done = "the LUKS2 header was written, no data is encrypted yet"
        stop_after("header")
        if slot != 0:
            token = new_token(key.wrapped, slot, part)
        store_token(part.path, token, key.plaintext)
        stop_after("token")
        done = "the data pass had started; cryptsetup resumes it"
        data_pass(part.path, key.plaintext)
        stop_after("data")
        mapper = open_root(part.path, config, key.plaintext, token)
        stop_after("open")
        if config.first_boot.grow:
            grow_root(part, config.mapper_name, key.plaintext)
        return mapper
    except EncryptrootfsError as exc:
        exc.message += (
            f" On {part.path} so far: {done}. The next boot finds its place and "
            "continues; nothing is lost."
        )
        raise
    finally:
        key.wipe()


def store_token(device: str, token: KmsToken, key: bytearray) -> int:
    """Import the token and prove the keyslot it names opens with ``key``."""
    if not luks2.test_keyslot(device, key, int(token.keyslots[0])):
        raise VerifyError(
            f"The key does not open keyslot {token.keyslots[0]} of {device}; no data has been "
            "encrypted. The next boot starts the conversion again."
        )
    token_id = luks2.import_token(device, token_to_json(token))
    say(f"{device}: token {token_id} stored: key wrapped by {token.wrapped.key_id}")
    return token_id


def finish_custody(
    part: Partition,
    provider: KeyProvider,
    config: Config,
    integration: Optional[Integration] = None,
) -> bool:
    """The header exists but the token does not: import it from the plan record.

    Returns False when the keyslot does not open with the recorded key (its write was torn);
    nothing was encrypted then, and the caller puts the head back and starts again.
    """
    assert part.record is not None
    token = token_from_json(part.record.token)
    if token is None:
        raise RefusedError(
            f"The plan record on {part.path} holds no encryptrootfs token; nothing was changed."
        )
    key = with_kms_retries(
        config,
        "unwrap the key of the plan record",
        [("unwrap the plan record's key", lambda: provider.unwrap(token.wrapped))],
        outcome="The header is written and no data is encrypted yet; the next boot continues.",
        integration=integration,
    )
    try:
        if not luks2.test_keyslot(part.path, key, int(token.keyslots[0])):
            return False
        store_token(part.path, token, key)
        return True
    finally:
        wipe(key)


def restore_head(part: Partition) -> None:
    """Undo an --init-only whose header write was cut: the moved copy goes back to the head."""
    assert part.record is not None
    say(
        f"{part.path}: the previous boot was cut while writing the LUKS2 header; putting the "
        "original first 16 MiB back from their copy at the end of the partition"
    )
    plan_record.restore_head_from_moved_copy(part.path, part.size)
    if plan_record.head_sha256(part.path) != part.record.head_sha256:
        raise EncryptrootfsError(
            f"Restoring the head of {part.path} did not give back the recorded bytes; the "
            "copy at the end of the partition is untouched. Stopping.",
            hint="attach the disk to another machine and inspect it before booting it again",
        )
    plan_record.erase(part.path, part.size)
