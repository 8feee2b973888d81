"""The deterministic test tree every lab disk carries, and its sha256 manifest.

Same bytes on every run (content comes from SHAKE-256 of a fixed seed), so a manifest computed
once proves in the guest that nothing was lost: files of awkward sizes around sector and block
boundaries, nested folders, symlinks (relative, to a folder, dangling), a hard-link group,
``user.*`` xattrs, a sparse file, a file larger than 64 MiB, odd names and modes, and a marker
string that tests can look for on the raw disk (it must vanish once the disk is encrypted).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

from .cache import building, cache_root, digest, locked, touch

TREE_VERSION = "1"
SEED = b"encryptrootfs-lab test tree v" + TREE_VERSION.encode()
# Where the tree lives in a guest filesystem, and its manifest next to it.
GUEST_TREE = "srv/erfs-testtree"
GUEST_MANIFEST = "srv/erfs-testtree.manifest.json"
# Plain text that is in the tree; after encryption it must not be found on the raw disk.
PLAINTEXT_MARKER = b"ERFS-PLAINTEXT-MARKER-7d1c0b5e-not-encrypted-yet"

LARGE_FILE_BYTES = 64 * 1024 * 1024 + 12345
SMALL_SIZES = (0, 1, 17, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 1048579, 3 * 1048576 + 7)


def _bytes(label: str, size: int) -> bytes:
    return hashlib.shake_256(SEED + b"/" + label.encode()).digest(size)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def populate(root: Path) -> None:
    """Write the test tree into the empty folder ``root``."""
    for i, size in enumerate(SMALL_SIZES):
        _write(root / "sizes" / f"file-{i:02d}-{size}.bin", _bytes(f"size-{i}", size))
    for depth in range(1, 6):
        nested = root / "nested" / Path(*[f"level{d}" for d in range(1, depth + 1)])
        _write(nested / "data.txt", f"depth {depth}\n".encode() * (depth * 100))
    (root / "empty-dir").mkdir()
    _write(root / "modes" / "private", b"0600\n", 0o600)
    _write(root / "modes" / "script.sh", b"#!/bin/sh\necho hi\n", 0o755)
    _write(root / "modes" / "read-only", b"0444\n", 0o444)
    _write(root / "names" / "with space and ü.txt", b"unicode name\n")
    _write(root / "marker.txt", PLAINTEXT_MARKER + b"\n")

    _write(root / "links" / "target.txt", b"symlink target\n")
    os.symlink("target.txt", root / "links" / "relative-link")
    os.symlink("../nested", root / "links" / "dir-link")
    os.symlink("does-not-exist", root / "links" / "dangling-link")
    _write(root / "links" / "hard-a", _bytes("hard", 200_000))
    os.link(root / "links" / "hard-a", root / "links" / "hard-b")
    os.link(root / "links" / "hard-a", root / "nested" / "hard-c")

    _write(root / "xattrs" / "tagged", b"has xattrs\n")
    os.setxattr(root / "xattrs" / "tagged", "user.erfs.small", b"v1")
    os.setxattr(root / "xattrs" / "tagged", "user.erfs.binary", _bytes("xattr", 200))
    (root / "xattrs" / "tagged-dir").mkdir()
    os.setxattr(root / "xattrs" / "tagged-dir", "user.erfs.dir", b"dir")

    sparse = root / "sparse" / "holes.bin"
    sparse.parent.mkdir()
    with open(sparse, "wb") as f:
        for offset in (0, 16 * 1048576, 48 * 1048576 - 4096):
            f.seek(offset)
            f.write(_bytes(f"sparse-{offset}", 4096))
        f.truncate(48 * 1048576)

    large = root / "large" / "over-64MiB.bin"
    large.parent.mkdir()
    with open(large, "wb") as f:
        left, n = LARGE_FILE_BYTES, 0
        while left:
            chunk = min(left, 8 * 1048576)
            f.write(_bytes(f"large-{n}", chunk))
            left -= chunk
            n += 1


def tree_script() -> Path:
    """The scan/verify script (the same file runs on the host and in the guest)."""
    return Path(str(resources.files("encryptrootfs_lab") / "guest" / "erfs-tree"))


def write_manifest(tree: Path, manifest: Path) -> None:
    """Scan ``tree`` with the guest's own scanner and write its manifest."""
    out = subprocess.run(
        [sys.executable, str(tree_script()), "scan", str(tree)],
        check=True,
        capture_output=True,
    ).stdout
    manifest.write_bytes(out)


def cached_tree() -> tuple[Path, Path]:
    """``(tree, manifest)`` in the cache, built once per tree version and scanner."""
    key = digest(["testtree", TREE_VERSION, tree_script().read_text()])
    final = cache_root() / "testtree" / key
    with locked(f"testtree-{key}"):
        if not final.exists():
            final.parent.mkdir(exist_ok=True)
            with building(final) as tmp:
                (tmp / "tree").mkdir()
                populate(tmp / "tree")
                write_manifest(tmp / "tree", tmp / "manifest.json")
        touch(final)
    return final / "tree", final / "manifest.json"


def bytes_lost(results: str, manifest: Path) -> Optional[int]:
    """Bytes of the test tree's files that a guest's ``erfs-tree verify`` found missing or
    changed (from its ``ERFS-TREE-BAD`` lines); None when no verification ran.

    A lower bound when the verifier listed only the first 50 problems.
    """
    if "ERFS-TREE-OK" not in results and "ERFS-TREE-FAIL" not in results:
        return None
    sizes = {e["path"]: int(e.get("size", 0)) for e in json.loads(manifest.read_text())["entries"]}
    # Paths may contain spaces: take the longest manifest path the line names.
    by_length = sorted(sizes, key=len, reverse=True)
    lost: dict[str, int] = {}
    for line in results.splitlines():
        _, sep, rest = line.partition("ERFS-TREE-BAD ")
        if not sep:
            continue
        _, sep, rest = rest.partition(" path=")
        path = next((p for p in by_length if rest.startswith(p + " ")), None)
        if path is not None and not rest[len(path) + 1 :].startswith("unexpected"):
            lost[path] = sizes[path]
    return sum(lost.values())
