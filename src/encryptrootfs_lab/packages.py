"""The project's Debian packages as `make deb-build` makes them, for lab images that install
the product the way users do (``ImageSpec(from_packages=True)``) and for the header tier's
package test: built once, then reused from ``dist/`` while they are newer than every file of
the tree."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from encryptrootfs import __version__
from encryptrootfs.run import run


@dataclass(frozen=True)
class DebianPackages:
    """The two packages of one build: the product and its dracut module."""

    product: Path
    dracut: Path

    @property
    def all(self) -> tuple[Path, Path]:
        return (self.product, self.dracut)


def project_root() -> Path:
    """The checkout this lab runs from (``src/`` layout)."""
    return Path(__file__).resolve().parents[2]


def _tree_files(root: Path) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return [root / name for name in out.decode().split("\0") if name]


def _expected(root: Path) -> DebianPackages:
    dist = root / "dist"
    return DebianPackages(
        dist / f"encryptrootfs_{__version__}_all.deb",
        dist / f"encryptrootfs-dracut_{__version__}_all.deb",
    )


def fresh(root: Path) -> bool:
    """Both packages are in dist/ and newer than every file git knows of (or would add)."""
    debs = _expected(root)
    if not all(p.exists() for p in debs.all):
        return False
    built = min(p.stat().st_mtime for p in debs.all)
    return all(not p.exists() or p.stat().st_mtime < built for p in _tree_files(root))


def debian_packages(root: Optional[Path] = None) -> DebianPackages:
    """The packages of the working tree, built with ``make deb-build`` unless fresh."""
    root = root or project_root()
    if not fresh(root):
        run(
            ["nice", "-n", "10", "make", "-C", str(root), "--no-print-directory", "deb-build"],
            hint="`make deb-build` builds them (it installs debhelper and dh-python first)",
        )
    return _expected(root)
