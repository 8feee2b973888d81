"""``encryptrootfs removal-check``: may the package be removed from this machine?

The Debian prerm (on ``remove``) and the RPM ``%preun`` (on erase) run it before any file goes.
Removing the package does not change the initramfs images that exist, but the next one that is
built (a kernel update) would lack what unlocks the root, and the machine would not boot. So
removal is refused, with the reason and what to do, when

1. the root filesystem is on a dm-crypt LUKS2 mapping whose header holds an encryptrootfs
   token, or this boot's initramfs wrote an unlock record (the root was unlocked by us); or
2. the product is enabled (``/etc/dracut.conf.d/50-encryptrootfs.conf``, written by
   ``encryptrootfs install``): the image encrypts its root on its next first boot, and every
   later dracut run asks for a module that would be gone.

``ENCRYPTROOTFS_ALLOW_REMOVE=1`` turns a refusal into a warning (the maintainer scripts honour
it before they run Python, so it also works when this installation is broken). The checks only
read: /proc/self/mountinfo, /sys/dev/block and the LUKS2 header (``cryptsetup luksDump``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import EncryptrootfsError, ExitCode

ALLOW_ENV = "ENCRYPTROOTFS_ALLOW_REMOVE"
MOUNTINFO = Path("/proc/self/mountinfo")
SYS_DEV_BLOCK = Path("/sys/dev/block")
# dm-crypt mappings that cryptsetup opened from a LUKS2 header carry this dm uuid prefix.
LUKS2_DM_UUID = "CRYPT-LUKS2-"
OVERRIDE_HINT = f"to remove it anyway, run the removal again with {ALLOW_ENV}=1 in its environment"


class RemovalRefused(EncryptrootfsError):
    exit_code = ExitCode.REFUSED


@dataclass(frozen=True)
class RemovalVerdict:
    allowed: bool
    reason: str  # a sentence: why removal is (not) safe
    hint: Optional[str] = None  # what to do instead, when refused

    def as_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "reason": self.reason, "hint": self.hint}


@dataclass(frozen=True)
class RootMapping:
    """The device-mapper device the running root filesystem is mounted from."""

    name: str  # /dev/mapper/<name>
    dm_uuid: str
    backing: tuple[str, ...]  # /dev/<kernel name> of the devices under it


def root_device_number(mountinfo: str) -> Optional[str]:
    """``major:minor`` of the filesystem mounted at ``/`` (the last such mount wins)."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/":
            found = fields[2]
    return found


def root_mapping(mountinfo: str, sys_dev_block: Path = SYS_DEV_BLOCK) -> Optional[RootMapping]:
    """The dm device under ``/``, or None when the root is not on device-mapper."""
    number = root_device_number(mountinfo)
    if number is None:
        return None
    dm = sys_dev_block / number / "dm"
    try:
        name = (dm / "name").read_text().strip()
        dm_uuid = (dm / "uuid").read_text().strip()
    except OSError:
        return None
    slaves = sys_dev_block / number / "slaves"
    backing = tuple(sorted(f"/dev/{p.name}" for p in slaves.iterdir())) if slaves.is_dir() else ()
    return RootMapping(name, dm_uuid, backing)


def _has_our_token(device: str) -> bool:
    from .. import luks2
    from ..token import TOKEN_TYPE

    return bool(luks2.read_header(device).token_ids(TOKEN_TYPE))


def _enabled_marker(root: Path) -> Path:
    from .install import DRACUT_CONF

    return root / DRACUT_CONF


def _unlock_record(root: Path) -> Path:
    from ..unlock_record import DEFAULT_PATH

    return root / str(DEFAULT_PATH).lstrip("/")


def removal_verdict(
    root: Path = Path("/"),
    *,
    mountinfo: Optional[str] = None,
    sys_dev_block: Path = SYS_DEV_BLOCK,
    has_our_token: Callable[[str], bool] = _has_our_token,
    running: Optional[bool] = None,
) -> RemovalVerdict:
    """Whether removing the package leaves a machine that boots; reads only.

    ``running``: ``root`` is the running system (default: when it is ``/``), whose mounts and
    unlock record are looked at. An image tree is judged by its files only.
    """
    keep = "keep the package (upgrades are safe: they rebuild the initramfs with the new version)"
    if running is None:
        running = root.resolve() == Path("/")
    if running:
        if mountinfo is None:
            try:
                mountinfo = MOUNTINFO.read_text()
            except OSError:
                mountinfo = ""
        mapping = root_mapping(mountinfo, sys_dev_block)
        if mapping is not None and mapping.dm_uuid.startswith(LUKS2_DM_UUID):
            for device in mapping.backing:
                try:
                    ours = has_our_token(device)
                except EncryptrootfsError as exc:
                    return RemovalVerdict(
                        False,
                        f"The root filesystem is on the LUKS2 mapping /dev/mapper/{mapping.name} "
                        f"and its header on {device} could not be read ({exc.message}), so it "
                        "cannot be ruled out that encryptrootfs unlocks it at boot.",
                        f"{keep}; {OVERRIDE_HINT} if another tool unlocks this root",
                    )
                if ours:
                    return RemovalVerdict(
                        False,
                        f"The root filesystem is on /dev/mapper/{mapping.name}, which the "
                        f"initramfs unlocks with encryptrootfs (a token in the LUKS2 header of "
                        f"{device}). The initramfs images on disk still work, but the next one "
                        "built without encryptrootfs (a kernel update) cannot unlock the root "
                        "and the machine would not boot.",
                        f"{keep}; {OVERRIDE_HINT} only when something else will unlock the "
                        "root at boot (a recovery key alone needs encryptrootfs's prompt)",
                    )
        record = _unlock_record(root)
        if record.exists():
            return RemovalVerdict(
                False,
                f"This boot's initramfs unlocked a root with encryptrootfs ({record}). The next "
                "initramfs built without encryptrootfs (a kernel update) could not unlock it "
                "and the machine would not boot.",
                f"{keep}; {OVERRIDE_HINT} only when something else will unlock the root at boot",
            )
    marker = _enabled_marker(root)
    if marker.exists():
        return RemovalVerdict(
            False,
            f"encryptrootfs is enabled here ({marker}): this image encrypts its root on its first "
            "boot, and every later dracut run (a kernel update) would ask for a module that "
            "removal deletes.",
            f"disable it first: delete {marker}, run `dracut --force --regenerate-all`, then "
            f"remove the package; or {OVERRIDE_HINT}",
        )
    return RemovalVerdict(
        True, "The root is not encrypted by encryptrootfs and encryptrootfs is not enabled here."
    )


# --- command line -------------------------------------------------------------------------------


def cmd_removal_check(args: argparse.Namespace) -> int:
    verdict = removal_verdict(Path(args.root))
    overridden = not verdict.allowed and os.environ.get(ALLOW_ENV) == "1"
    if args.json:
        data = {**verdict.as_dict(), "overridden": overridden}
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return ExitCode.OK if verdict.allowed or overridden else ExitCode.REFUSED
    if verdict.allowed:
        print(f"encryptrootfs: removal is safe: {verdict.reason}")
        return ExitCode.OK
    if overridden:
        print(
            f"encryptrootfs: warning: removal allowed by {ALLOW_ENV}=1: {verdict.reason}",
            file=sys.stderr,
        )
        return ExitCode.OK
    raise RemovalRefused(
        f"{verdict.reason} Nothing was removed.",
        hint=verdict.hint,
    )


def add_removal_check_parser(sub: Any) -> None:
    rc = sub.add_parser(
        "removal-check",
        help="may the package be removed? (run by the package's prerm)",
        description="Refuse (exit 8) when removing encryptrootfs would leave a machine that "
        "cannot unlock its root once the initramfs is rebuilt: the root is on a LUKS2 mapping "
        "with an encryptrootfs token, this boot was unlocked by encryptrootfs, or the product is "
        f"enabled (/etc/dracut.conf.d/50-encryptrootfs.conf). {ALLOW_ENV}=1 makes a refusal a "
        "warning. Reads only. See docs/packages.md.",
    )
    rc.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="an image tree: only its enabled marker is checked",
    )
    rc.add_argument("--json", action="store_true", help="print the verdict as JSON")
    rc.set_defaults(func=cmd_removal_check)
