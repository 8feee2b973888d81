"""Header tier fixtures: file-backed LUKS and ext4 images (sparse files under tmp_path).

These need root (cryptsetup locks) but no device-mapper: cryptsetup works on plain files for
header operations and for offline reencryption.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from encryptrootfs.run import run

MIB = 1024 * 1024
SHRINK = 32 * MIB  # what the first boot frees for the LUKS2 header
MARKER = b"encryptrootfs-plaintext-marker-7f3c"


@dataclass(frozen=True)
class LuksImage:
    path: Path
    passphrase: bytes


@dataclass(frozen=True)
class Ext4Image:
    path: Path
    size: int
    marker_file: str  # path inside the filesystem
    files: dict[str, str]  # path inside the filesystem -> sha256 of its content


def luks_format(path: Path, passphrase: bytes, *args: str) -> None:
    # PBKDF2 at the minimum: the tier tests header operations, not the PBKDF's cost.
    run(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            *args,
            "--key-file",
            "-",
            str(path),
        ],
        stdin=passphrase,
    )


@pytest.fixture
def luks_image(tmp_path: Path) -> LuksImage:
    path = tmp_path / "luks2.img"
    path.write_bytes(b"")
    os.truncate(path, 64 * MIB)
    passphrase = secrets.token_hex(16).encode()
    luks_format(path, passphrase, "--type", "luks2")
    return LuksImage(path, passphrase)


@pytest.fixture
def make_ext4_image(tmp_path: Path) -> Callable[[int], Ext4Image]:
    """An image of ``size`` bytes holding ext4 (from a small tree) shrunk by 32 MiB."""

    def make(size: int) -> Ext4Image:
        tree = tmp_path / f"tree-{size}"
        (tree / "etc").mkdir(parents=True)
        marker_file = "etc/marker.txt"
        (tree / marker_file).write_bytes(b"before " + MARKER + b" after\n")
        (tree / "random.bin").write_bytes(secrets.token_bytes(3 * MIB))
        (tree / "zeros.bin").write_bytes(bytes(MIB))
        files = {
            str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in tree.rglob("*")
            if p.is_file()
        }
        image = tmp_path / f"ext4-{size}.img"
        image.write_bytes(b"")
        os.truncate(image, size)
        run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)])
        run(["e2fsck", "-fy", str(image)])
        run(["resize2fs", str(image), f"{(size - SHRINK) // 1024}K"])
        # resize2fs shortens a regular file when it shrinks the filesystem in it; a partition
        # keeps its size, and the freed tail is where the LUKS2 header's room comes from.
        os.truncate(image, size)
        return Ext4Image(image, size, marker_file, files)

    return make


def _decrypt(image: Path, key: bytes, workdir: Path) -> Path:
    """Decrypt an encrypted image in place with cryptsetup's own offline decryption.

    Decryption of a header-at-the-head device moves the data back to offset 0 and keeps its
    state in a detached header file; without device-mapper this is how the tier reads the
    data back. Returns the image, now holding the plain filesystem at offset 0.
    """
    run(
        [
            "cryptsetup",
            "reencrypt",
            "--decrypt",
            "--batch-mode",
            "--force-offline-reencrypt",
            "--header",
            str(workdir / f"{image.stem}-decrypt-header"),
            "--key-file",
            "-",
            str(image),
        ],
        stdin=key,
    )
    return image


def _read_file_in_ext4(image: Path, inside: str) -> bytes:
    return run(["debugfs", "-R", f"cat /{inside}", str(image)]).stdout


def _image_contains(path: Path, needle: bytes, chunk: int = 8 * MIB) -> bool:
    overlap = len(needle) - 1
    tail = b""
    with path.open("rb") as f:
        while block := f.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-overlap:]
    return False


@dataclass(frozen=True)
class ImageTools:
    """Helpers for checking images, handed to tests as the ``images`` fixture."""

    marker: bytes = MARKER
    shrink: int = SHRINK
    decrypt: Callable[[Path, bytes, Path], Path] = _decrypt
    read_file_in_ext4: Callable[[Path, str], bytes] = _read_file_in_ext4
    contains: Callable[[Path, bytes], bool] = _image_contains


@pytest.fixture
def images() -> ImageTools:
    return ImageTools()
