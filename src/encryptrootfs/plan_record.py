"""The first-boot plan record: what the conversion is about to do, durable before it starts.

Why it exists: ``cryptsetup reencrypt --encrypt --init-only`` writes the LUKS2 header (with our
keyslot) in one step, and only afterwards can a token holding the wrapped key be imported. A
power cut between the two would leave a keyslot whose key exists nowhere. So the wrapped key
(ciphertext only; never the plaintext) is written here first, and the next boot can finish the
custody from it.

It also makes a power cut *during* ``--init-only`` recoverable. With ``--reduce-device-size
32M`` cryptsetup first copies the first 16 MiB of the filesystem (where the header will go) to
the last 16 MiB of the partition, then writes the 16 MiB header area in one write. If that write
is torn, the head of the partition is neither LUKS nor a filesystem; the record holds the
SHA-256 of the original head, so the next boot can tell which copy is whole and put it back.

Where: at ``partition size - 32 MiB``, the first bytes of the room made for the header. That
region is beyond the (shrunk) filesystem, cryptsetup's initialisation does not touch it (the
moved segment goes to the last 16 MiB), and the data pass overwrites it with ciphertext only
after the token is durable, when the LUKS2 header has become the record of truth. Two copies,
4 KiB apart, so a torn write of one leaves the other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

MAGIC = b"ENCRYPTROOTFS-PLAN\x00\x01"
SLOT_SIZE = 4096
VERSION = 1
# cryptsetup's data shift (--reduce-device-size): header area at the head, moved segment at
# the tail, each half of it.
REDUCE_DEVICE_SIZE = 32 * 1024 * 1024
HEAD_SIZE = REDUCE_DEVICE_SIZE // 2


@dataclass(frozen=True)
class PlanRecord:
    """What the first boot of one partition is doing; no secret is in here."""

    luks_uuid: str
    partition_size: int  # bytes, after any growth: the record's own offset depends on it
    fs_type: str
    fs_uuid: str
    fs_label: str
    head_sha256: str  # of the first HEAD_SIZE bytes of the plain partition before init
    token: Mapping[str, Any]  # the token JSON (wrapped key), imported after --init-only

    @property
    def offset(self) -> int:
        return record_offset(self.partition_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "luks_uuid": self.luks_uuid,
            "partition_size": self.partition_size,
            "fs_type": self.fs_type,
            "fs_uuid": self.fs_uuid,
            "fs_label": self.fs_label,
            "head_sha256": self.head_sha256,
            "token": dict(self.token),
        }


def record_offset(partition_size: int) -> int:
    return partition_size - REDUCE_DEVICE_SIZE


def encode(record: PlanRecord) -> bytes:
    body = json.dumps(record.to_json(), sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(body).hexdigest().encode()
    slot = MAGIC + len(body).to_bytes(4, "big") + digest + body
    if len(slot) > SLOT_SIZE:
        raise ValueError(f"plan record of {len(slot)} bytes does not fit {SLOT_SIZE}")
    return slot.ljust(SLOT_SIZE, b"\x00")


def decode(slot: bytes) -> Optional[PlanRecord]:
    """The record in one slot, or None when the slot holds anything else (or is torn)."""
    if not slot.startswith(MAGIC):
        return None
    pos = len(MAGIC)
    size = int.from_bytes(slot[pos : pos + 4], "big")
    digest = slot[pos + 4 : pos + 68]
    body = slot[pos + 68 : pos + 68 + size]
    if len(body) != size or hashlib.sha256(body).hexdigest().encode() != digest:
        return None
    try:
        data = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        return None
    # The slot may come from any attached disk (a crafted one included): every field is
    # checked for its type and range; anything else is "no record", never an exception.
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None
    text = ("luks_uuid", "fs_type", "fs_uuid", "head_sha256")
    if not all(isinstance(data.get(name), str) for name in text):
        return None
    partition_size = data.get("partition_size")
    label = data.get("fs_label", "")
    token = data.get("token")
    if (
        isinstance(partition_size, bool)
        or not isinstance(partition_size, int)
        or not 0 < partition_size < 1 << 63
    ):
        return None
    if not isinstance(label, str) or not isinstance(token, dict):
        return None
    return PlanRecord(
        luks_uuid=data["luks_uuid"],
        partition_size=partition_size,
        fs_type=data["fs_type"],
        fs_uuid=data["fs_uuid"],
        fs_label=label,
        head_sha256=data["head_sha256"],
        token=dict(token),
    )


def write(device: str, record: PlanRecord) -> None:
    """Write both copies and flush them to the device."""
    slot = encode(record)
    fd = os.open(device, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        for copy in range(2):
            os.pwrite(fd, slot, record.offset + copy * SLOT_SIZE)
            os.fsync(fd)
    finally:
        os.close(fd)


def read(device: str, partition_size: int) -> Optional[PlanRecord]:
    """The record of a partition of this size, from whichever copy is whole."""
    offset = record_offset(partition_size)
    if offset < 0:
        return None
    fd = os.open(device, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        for copy in range(2):
            record = decode(os.pread(fd, SLOT_SIZE, offset + copy * SLOT_SIZE))
            if record is not None and record.partition_size == partition_size:
                return record
        return None
    finally:
        os.close(fd)


def erase(device: str, partition_size: int) -> None:
    """Zero both copies: used when a plan is abandoned before anything was converted."""
    fd = os.open(device, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.pwrite(fd, b"\x00" * (2 * SLOT_SIZE), record_offset(partition_size))
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_range(device: str, offset: int, size: int) -> str:
    digest = hashlib.sha256()
    fd = os.open(device, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        done = 0
        while done < size:
            chunk = os.pread(fd, min(1 << 20, size - done), offset + done)
            if not chunk:
                raise OSError(f"{device}: short read at {offset + done}")
            digest.update(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def head_sha256(device: str) -> str:
    return sha256_range(device, 0, HEAD_SIZE)


def moved_copy_sha256(device: str, partition_size: int) -> str:
    return sha256_range(device, partition_size - HEAD_SIZE, HEAD_SIZE)


def restore_head_from_moved_copy(device: str, partition_size: int) -> None:
    """Copy the moved first segment back over a torn header: undo an interrupted --init-only.

    Idempotent: the source (the last HEAD_SIZE bytes) is never written, so a power cut during
    the copy is undone by copying again.
    """
    src = partition_size - HEAD_SIZE
    fd = os.open(device, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        step = 1 << 20
        for pos in range(0, HEAD_SIZE, step):
            os.pwrite(fd, os.pread(fd, step, src + pos), pos)
        os.fsync(fd)
    finally:
        os.close(fd)
