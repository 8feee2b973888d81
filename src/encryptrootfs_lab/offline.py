"""An encrypted lab disk read on the host, where there is no device-mapper.

After a power-cut sequence the tests run each filesystem's own read-only checker on the
decrypted root, exactly as the last clean power-off left it (a check inside the guest would
see a mounted filesystem). The checkers need plaintext: the passphrase the token wraps is
unwrapped by the test's KMS emulator, ``cryptsetup luksDump --dump-volume-key`` (which works on
a plain file) turns it into the volume key, and the data segment is decrypted here with
AES-XTS from ``cryptography`` (LUKS2's default ``aes-xts-plain64``: the IV of each encryption
sector is its offset in 512-byte units, whatever the sector size).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from encryptrootfs import luks2
from encryptrootfs.run import run
from encryptrootfs.token import TOKEN_TYPE

from .cache import LabError
from .emulators.kms import KmsEmulator
from .layout import Disk, Filesystem

MIB = 1024 * 1024
HEADER_BYTES = 16 * MIB  # LUKS2 header area of a first-boot conversion (both copies, keyslots)

# Read-only checks of an unmounted filesystem in a plain file.
CHECKERS = {
    Filesystem.EXT4: ["e2fsck", "-f", "-n"],
    Filesystem.XFS: ["xfs_repair", "-n", "-f"],
    Filesystem.BTRFS: ["btrfs", "check", "--readonly"],
}


@dataclass(frozen=True)
class FsckResult:
    fs: Filesystem
    returncode: int
    output: str

    @property
    def clean(self) -> bool:
        return self.returncode == 0


def partition_extent(raw: Path, number: int) -> tuple[int, int]:
    """(start, size) in bytes of partition ``number`` of the disk image ``raw``, as its table
    says now (a first boot may have grown it)."""
    table = json.loads(run(["sfdisk", "--json", raw]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for p in table["partitions"]:
        # sfdisk names a file's partitions <file><n> (or <file>p<n> after a digit)
        if p["node"][len(str(raw)) :].lstrip("p") == str(number):
            return int(p["start"]) * sector, int(p["size"]) * sector
    raise LabError(f"{raw} has no partition {number}")


def _copy_range(src: Path, offset: int, size: int, dst: Path) -> None:
    with open(src, "rb") as s, open(dst, "wb") as d:
        s.seek(offset)
        left = size
        while left:
            chunk = s.read(min(left, 8 * MIB))
            if not chunk:
                break
            d.write(chunk)
            left -= len(chunk)


def root_token(header: Path) -> dict[str, Any]:
    """The encryptrootfs token of the LUKS2 header in ``header``."""
    ids = luks2.read_header(header).token_ids(TOKEN_TYPE)
    if len(ids) != 1:
        raise LabError(f"{header}: expected one {TOKEN_TYPE} token, found {len(ids)}")
    return dict(luks2.export_token(header, ids[0]))


def unwrap(kms: KmsEmulator, token: Mapping[str, Any]) -> bytes:
    """The token's plaintext key, unwrapped by the emulator in the token's own region (as the
    host, not the guest): what a test looks for on disks and in output."""
    import botocore.session

    client = botocore.session.get_session().create_client(
        "kms",
        region_name=str(token["region"]),
        endpoint_url=kms.url,
        # the emulator accepts any credentials
        aws_access_key_id="lab",
        aws_secret_access_key="lab",  # noqa: S106
    )
    out = client.decrypt(
        CiphertextBlob=base64.b64decode(str(token["ciphertext"])),
        EncryptionContext=dict(token["encryption_context"]),
    )
    return bytes(out["Plaintext"])


def root_key(
    image: Path, disk: Disk, kms: KmsEmulator, scratch: Path, *, fmt: str = "qcow2"
) -> bytes:
    """The key the root's token wraps, unwrapped by the emulator: what must be on no disk."""
    from .layout import raw_view

    raw = raw_view(image, fmt, scratch)
    header = scratch.with_name(scratch.name + ".header")
    try:
        start, _ = partition_extent(raw, disk.root_partition)
        _copy_range(raw, start, HEADER_BYTES, header)
        return unwrap(kms, root_token(header))
    finally:
        header.unlink(missing_ok=True)
        if raw != image:
            raw.unlink(missing_ok=True)


def volume_key(header: Path, passphrase: bytes, scratch: Path) -> bytes:
    """The volume key, from the header and a passphrase of one of its keyslots."""
    out = scratch.with_name(scratch.name + ".vk")
    try:
        run(
            [
                "cryptsetup",
                "luksDump",
                "--batch-mode",
                "--dump-volume-key",
                "--volume-key-file",
                out,
                "--key-file",
                "-",
                header,
            ],
            stdin=passphrase,
        )
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def decrypt(raw: Path, offset: int, size: int, key: bytes, sector: int, out: Path) -> None:
    """Decrypt ``size`` bytes of ``raw`` at ``offset`` (aes-xts-plain64) into ``out``."""
    with open(raw, "rb") as src, open(out, "wb") as dst:
        src.seek(offset)
        done = 0
        while done < size:
            chunk = src.read(min(size - done, 8 * MIB))
            if not chunk:
                break
            plain = bytearray(len(chunk))
            for i in range(0, len(chunk) - len(chunk) % sector, sector):
                tweak = ((done + i) // 512).to_bytes(16, "little")
                d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
                plain[i : i + sector] = d.update(chunk[i : i + sector]) + d.finalize()
            dst.write(plain)
            done += len(chunk)


def fsck(fs: Filesystem, image: Path) -> FsckResult:
    r = run([*CHECKERS[fs], image], check=False)
    # stderr first: e2fsck's summary line (stdout) is then the last line
    return FsckResult(fs, r.returncode, (r.stderr + r.stdout).decode(errors="replace"))


def check_encrypted_root(
    image: Path,
    disk: Disk,
    kms: KmsEmulator,
    scratch: Path,
    *,
    fmt: str = "qcow2",
) -> FsckResult:
    """Decrypt the root partition of ``image`` (a disk of layout ``disk``) on the host and
    check its filesystem read-only. Scratch files next to ``scratch`` are removed after."""
    from .layout import raw_view

    raw = raw_view(image, fmt, scratch)
    header = scratch.with_name(scratch.name + ".header")
    plain = scratch.with_name(scratch.name + ".plain")
    try:
        start, size = partition_extent(raw, disk.root_partition)
        _copy_range(raw, start, HEADER_BYTES, header)
        hdr = luks2.read_header(header)
        if hdr.requirements:
            raise LabError(
                f"the root header still has requirements {hdr.requirements} "
                "(an unfinished conversion)"
            )
        (segment,) = [s for s in hdr.segments if s.type == "crypt"]
        if segment.encryption != "aes-xts-plain64":
            raise LabError(f"cannot decrypt {segment.encryption} on the host")
        length = size - segment.offset if segment.size is None else segment.size
        passphrase = unwrap(kms, root_token(header))
        key = volume_key(header, passphrase, scratch)
        decrypt(raw, start + segment.offset, length, key, segment.sector_size or 512, plain)
        return fsck(disk.layout.fs, plain)
    finally:
        for p in (header, plain):
            p.unlink(missing_ok=True)
        if raw != image:
            raw.unlink(missing_ok=True)


def last_line(result: Optional[FsckResult]) -> str:
    if result is None:
        return "not checked"
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    return f"{result.fs.value} rc={result.returncode}: {lines[-1] if lines else ''}"


def edit_root_header(raw: Path, disk: Disk, edit: Callable[[Path], None]) -> None:
    """Change the LUKS2 header of the root partition of the raw disk image ``raw`` in place:
    ``edit`` gets a file holding the header area (a LUKS2 device to cryptsetup) and changes
    it, e.g. with ``cryptsetup token import``; the area is written back at the same place."""
    start, _ = partition_extent(raw, disk.root_partition)
    area = raw.with_name(raw.name + ".header")
    try:
        _copy_range(raw, start, HEADER_BYTES, area)
        edit(area)
        data = area.read_bytes()
        if len(data) != HEADER_BYTES:
            raise LabError(f"editing the header changed its size to {len(data)} bytes")
        with open(raw, "r+b") as f:
            f.seek(start)
            f.write(data)
    finally:
        area.unlink(missing_ok=True)
