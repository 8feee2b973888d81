"""The lab's on-disk cache: where layers live, how they are keyed, locked and published.

Every artifact (base rootfs, product rootfs + initramfs, disk image) is a directory named by a
hash of its inputs. A build happens in a ``.tmp-`` sibling while an exclusive lock on the key is
held and is published with one ``rename``: a concurrent run waits for the lock and then reuses
the result, an interrupted run leaves only a temp folder that the next run removes (after
making sure nothing is mounted below it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Union

from encryptrootfs.errors import EncryptrootfsError
from encryptrootfs.log import get_logger
from encryptrootfs.run import run

log = get_logger("lab.cache")

# Outside the checkout and across reboots (not /tmp); root-owned, see cache_root().
DEFAULT_CACHE = Path("/var/tmp/encryptrootfs-lab")  # noqa: S108
CACHE_ENV = "ENCRYPTROOTFS_LAB_CACHE"

Jsonable = Union[str, int, float, bool, None, Sequence["Jsonable"], Mapping[str, "Jsonable"]]


class LabError(EncryptrootfsError):
    """The lab could not build or boot something; nothing outside the cache was changed."""


def cache_root() -> Path:
    """The cache folder: ``$ENCRYPTROOTFS_LAB_CACHE`` or ``/var/tmp/encryptrootfs-lab``."""
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(parts: Jsonable) -> str:
    """A short stable hash of JSON-able inputs."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tree_digest(root: Path, *, exclude: Sequence[str] = ("__pycache__",)) -> str:
    """Hash of the names and contents of every file below ``root`` (sorted walk)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude)
        for name in sorted(filenames):
            if name.endswith(".pyc"):
                continue
            path = Path(dirpath, name)
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mounts)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            point = line.split()[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def unmount_below(path: Path) -> None:
    """Unmount everything at or below ``path``, deepest first."""
    for point in sorted(mounts_below(path), key=len, reverse=True):
        run(["umount", "-R", point], check=False)
    left = mounts_below(path)
    if left:
        raise LabError(
            f"Could not unmount {', '.join(left)}; the cache folder {path} was left as it is.",
            hint="unmount them by hand (umount -R) and run the lab again",
        )


def safe_remove_tree(path: Path) -> None:
    """``rm -rf`` that refuses when anything is mounted below ``path`` (a chroot's /dev...)."""
    if not path.exists() and not path.is_symlink():
        return
    left = mounts_below(path)
    if left:
        raise LabError(
            f"Refusing to delete {path}: {', '.join(left)} is still mounted below it; "
            "nothing was deleted.",
            hint="unmount it (umount -R) and run the lab again",
        )
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold an exclusive lock named ``name`` in the cache (waits for another run's build)."""
    locks = cache_root() / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "w", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another lab run that is building %s", name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """A fresh temp folder next to ``final`` that becomes ``final`` when the block succeeds.

    The caller holds the lock for ``final``; a temp folder left by an interrupted run is
    unmounted and removed first. On failure the temp folder is unmounted and removed.
    """
    tmp = final.with_name(f".tmp-{final.name}")
    unmount_below(tmp)
    safe_remove_tree(tmp)
    tmp.mkdir(parents=True)
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        unmount_below(tmp)
        if ok:
            os.rename(tmp, final)
        else:
            safe_remove_tree(tmp)


# An entry used this recently may belong to a test session still running (sessions hold their
# images for hours and touch them at every boot): never removed, whatever ``keep`` says.
IN_USE_SECONDS = 3600


def prune(folder: Path, keep: int) -> None:
    """Keep the ``keep`` most recently used entries of ``folder`` (by mtime), remove the rest
    that no session used in the last :data:`IN_USE_SECONDS`."""
    if not folder.is_dir():
        return
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    recent = time.time() - IN_USE_SECONDS
    for old in entries[keep:]:
        if old.stat().st_mtime > recent:
            continue
        with locked(f"{folder.name}-{old.name}"):
            if old.exists():
                log.info("removing old cache entry %s", old)
                safe_remove_tree(old)


def touch(path: Path) -> None:
    """Mark a cache entry as recently used (for :func:`prune`)."""
    now = time.time()
    os.utime(path, (now, now))
