"""Measure 5: the initramfs with and without the encryptrootfs module, by component.

The plain lab image and the product image differ only by encryptrootfs's dracut module (both
have dracut's crypt and network modules). Each initrd is read on the host without unpacking it
to disk: uncompressed cpio segments (early microcode) then one compressed cpio, parsed as
``newc`` in Python. "Compressed by component" compresses each component's file contents alone
with the initrd's own compressor (gzip -9 / zstd -19 ...): an estimate, since the real archive
compresses everything in one stream.
"""

from __future__ import annotations

import gzip
import lzma
import subprocess
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from encryptrootfs_lab.image import PLAIN, build_image
from encryptrootfs_lab.product import ENCRYPT

from .common import MIB

# First match wins: (component, path fragment test).
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "encryptrootfs",
        (
            "/encryptrootfs/",
            "/encryptrootfs-",
            "encryptrootfs.service",
            "90-encryptrootfs",
            "encryptrootfs-generator",
            "sbin/encryptrootfs",
        ),
    ),
    ("botocore", ("/botocore/",)),
    ("python packages (other)", ("dist-packages/", "site-packages/")),
    ("python (interpreter, stdlib)", ("lib/python3", "bin/python3", "libpython3")),
    ("kernel modules", ("lib/modules/",)),
    ("firmware", ("lib/firmware/",)),
    ("cryptsetup, device-mapper", ("cryptsetup", "libdevmapper", "libargon2", "dmsetup")),
    ("systemd, udev", ("systemd", "udev")),
    ("shared libraries (other)", (".so",)),
)


def component(path: str) -> str:
    for name, fragments in COMPONENTS:
        if any(f in path for f in fragments):
            return name
    return "other"


def _cpio_entries(data: bytes, offset: int = 0) -> tuple[list[tuple[str, int, int]], int]:
    """(path, data offset, size) of regular files of one newc archive; returns the end offset."""
    entries: list[tuple[str, int, int]] = []
    while True:
        magic = data[offset : offset + 6]
        if magic not in (b"070701", b"070702"):
            raise ValueError(f"not a newc cpio header at {offset}: {magic!r}")
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode(errors="replace")
        body = (name_start + namesize + 3) & ~3
        offset = (body + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries, offset
        if mode & 0o170000 == 0o100000:
            entries.append((name, body, filesize))


def _decompress(blob: bytes) -> tuple[str, bytes]:
    if blob[:2] == b"\x1f\x8b":
        return "gzip", gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        out = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, check=True)
        return "zstd", out.stdout
    if blob[:6] == b"\xfd7zXZ\x00":
        return "xz", lzma.decompress(blob)
    raise ValueError(f"unknown initramfs compression (magic {blob[:6].hex()})")


def _compress(method: str, data: bytes) -> int:
    if method == "gzip":
        return len(zlib.compress(data, 9))
    if method == "zstd":
        out = subprocess.run(
            ["zstd", "-q", "-19", "-c"], input=data, capture_output=True, check=True
        )
        return len(out.stdout)
    return len(lzma.compress(data))


def read_initrd(path: Path, estimate: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Sizes by component; a compressed estimate for the components named in ``estimate``."""
    raw = path.read_bytes()
    offset, early = 0, 0
    files: list[tuple[str, int]] = []
    while raw[offset : offset + 6] in (b"070701", b"070702"):  # early (uncompressed) archives
        entries, end = _cpio_entries(raw, offset)
        files += [(name, size) for name, _, size in entries]
        early += end - offset
        offset = end
        while offset < len(raw) and raw[offset] == 0:
            offset += 1
    method, main = _decompress(raw[offset:])
    entries, _ = _cpio_entries(main)
    by_component: dict[str, dict[str, Any]] = defaultdict(lambda: {"files": 0, "unpacked": 0})
    contents: dict[str, list[bytes]] = defaultdict(list)
    for name, body, size in entries:
        c = component(name)
        by_component[c]["files"] += 1
        by_component[c]["unpacked"] += size
        if c in estimate:
            contents[c].append(main[body : body + size])
    for c, chunks in contents.items():
        by_component[c]["compressed_estimate"] = _compress(method, b"".join(chunks))
    return {
        "path": str(path),
        "compression": method,
        "compressed": len(raw),
        "early_cpio": early,
        "unpacked": sum(size for _, _, size in entries) + sum(s for _, s in files),
        "files": len(entries) + len(files),
        "by_component": dict(by_component),
    }


def run() -> dict[str, Any]:
    paths = build_image(PLAIN).initrd, build_image(ENCRYPT).initrd
    plain, product = read_initrd(paths[0]), read_initrd(paths[1])
    # Only what the module changes is compressed alone (the kernel modules take minutes).
    changed = frozenset(
        n
        for n in set(plain["by_component"]) | set(product["by_component"])
        if plain["by_component"].get(n, {}).get("unpacked")
        != product["by_component"].get(n, {}).get("unpacked")
    )
    plain, product = read_initrd(paths[0], changed), read_initrd(paths[1], changed)
    diff = {}
    for n in sorted(changed):
        a = plain["by_component"].get(n, {})
        b = product["by_component"].get(n, {})
        diff[n] = {
            k: b.get(k, 0) - a.get(k, 0) for k in ("files", "unpacked", "compressed_estimate")
        }
    return {
        "plain": plain,
        "product": product,
        "growth_by_component": diff,
        "growth_compressed_mib": (product["compressed"] - plain["compressed"]) / MIB,
        "growth_unpacked_mib": (product["unpacked"] - plain["unpacked"]) / MIB,
    }
