"""A test machine: one image, one root disk overlay, extra disks, and the boots it has made.

Boots of one :class:`Machine` share its qcow2 overlay, so a second boot sees what the first
wrote (or half-wrote, when a crash primitive cut the power). The cached raw disk under the
overlay never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .image import Image
from .layout import Disk
from .qemu import BootResult, BootSpec, Drive, Forward, boot, create_blank, create_overlay


@dataclass
class Machine:
    image: Image
    disk: Disk
    workdir: Path
    forwards: tuple[Forward, ...] = ()
    extra: list[Drive] = field(default_factory=list)
    boots: list[BootResult] = field(default_factory=list)
    overlay: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.overlay = create_overlay(self.disk.path, self.workdir / "root.qcow2")

    def attach(self, disk: Disk, serial: Optional[str] = None, *, writable: bool = False) -> Drive:
        """Add ``disk`` as the next virtio disk (an overlay of its own when ``writable``)."""
        if writable:
            overlay = create_overlay(disk.path, self.workdir / f"extra{len(self.extra)}.qcow2")
            drive = disk.drive(overlay, serial=serial)
        else:
            drive = disk.drive(snapshot=True, serial=serial)
        self.extra.append(drive)
        return drive

    def attach_blank(self, size_bytes: int, serial: Optional[str] = None,
                     sector: int = 512) -> Drive:  # fmt: skip
        path = create_blank(self.workdir / f"blank{len(self.extra)}.qcow2", size_bytes)
        drive = Drive(path, "qcow2", sector, serial=serial)
        self.extra.append(drive)
        return drive

    @property
    def root_drive(self) -> Drive:
        return self.disk.drive(self.overlay)

    def boot(
        self,
        script: Optional[str] = None,
        *,
        append: Sequence[str] = (),
        timeout: float = 300.0,
        kill_after: Optional[float] = None,
        kill_on_console: Optional[str] = None,
        kill_delay: float = 0.0,
        name: Optional[str] = None,
    ) -> BootResult:
        """Boot once (the overlay keeps what the guest wrote) and return how it went."""
        spec = BootSpec(
            kernel=self.image.kernel, initrd=self.image.initrd, root_uuid=self.disk.root_uuid,
            drives=(self.root_drive, *self.extra), script=script, append=tuple(append),
            forwards=self.forwards, timeout=timeout, kill_after=kill_after,
            kill_on_console=kill_on_console, kill_delay=kill_delay,
        )  # fmt: skip
        result = boot(spec, self.workdir, name or f"boot{len(self.boots) + 1}")
        self.boots.append(result)
        return result

    def boot_twice(
        self, first: Optional[str], second: Optional[str], *, append: Sequence[str] = (),
        timeout: float = 300.0,
    ) -> tuple[BootResult, BootResult]:  # fmt: skip
        """First boot, then a second boot on the same overlay (what every product test does)."""
        one = self.boot(first, append=append, timeout=timeout, name="first")
        two = self.boot(second, append=append, timeout=timeout, name="second")
        return one, two
