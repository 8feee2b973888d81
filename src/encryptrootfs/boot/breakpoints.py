"""``rd.encryptrootfs.break=<stage>``: stop the first boot right after a stage, on purpose.

The counterpart of dracut's ``rd.break``, for whoever needs the disk in an exact half-converted
state: to examine it, or to cut the power at that instant (the lab's power-cut tests do). The
boot says which stage it stopped after, syncs what was written, and waits forever; nothing on
the disk changes until the machine is powered off, and the next boot (without the option)
carries on from there like after any power cut.

Several stages may be given, comma separated; the first one reached stops the boot.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

from ..devices import kernel_cmdline
from .console import say

OPTION = "rd.encryptrootfs.break"

# In the order the first boot reaches them (see first_boot.encrypt). "boot-shrink", "boot-copy"
# and "boot-loader" exist only when /boot moves out of the root (boot_partition.move): after the
# root's filesystem gave up its tail (only when there was no free space for /boot; the partition
# shrinks next), after the copy and fstab, and after GRUB was pointed at the new partition.
# "grow" is the optional grow stage, after the partition was grown and before the mapping and
# filesystem follow.
STAGES = (
    "preflight",
    "boot-shrink",
    "boot-copy",
    "boot-loader",
    "room",
    "record",
    "header",
    "token",
    "data",
    "open",
    "grow",
)


def requested(cmdline: str) -> frozenset[str]:
    """The stages the kernel command line asks to stop after; unknown names are ignored."""
    stages: set[str] = set()
    for word in cmdline.split():
        name, sep, value = word.partition("=")
        if name == OPTION and sep:
            stages.update(s for s in value.split(",") if s in STAGES)
    return frozenset(stages)


def _hang() -> None:
    while True:
        time.sleep(3600)


def stop_after(
    stage: str,
    *,
    cmdline: Optional[str] = None,
    hang: Callable[[], None] = _hang,
) -> None:
    """Return at once, unless the command line asks to stop after ``stage``."""
    assert stage in STAGES, stage
    text = kernel_cmdline() if cmdline is None else cmdline
    if stage not in requested(text):
        return
    os.sync()
    say(
        f"{OPTION}={stage}: stopped after the {stage} stage; everything written so far is "
        "on the disk. Power off to continue from here on the next boot."
    )
    hang()
