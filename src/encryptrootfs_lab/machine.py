"""A test machine: one image, one root disk overlay, extra disks, and the boots it has made.

Boots of one :class:`Machine` share its qcow2 overlay, so a second boot sees what the first
wrote (or half-wrote, when a crash primitive cut the power). The cached raw disk under the
overlay never changes.

``boot_from_disk`` boots through the disk's own boot loader (a disk from
:func:`encryptrootfs_lab.bootloader.build_boot_disk`) instead of QEMU's ``-kernel``; a UEFI
machine keeps its own copy of the OVMF variables next to its overlay, as a real machine keeps
its NVRAM.

While a boot runs, :meth:`Machine.type_line` types on its serial console (a test's watcher
thread answers a prompt it saw in the console log).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .cache import LabError, cache_root, touch
from .image import Image
from .layout import Disk
from .qemu import (
    OVMF_VARS,
    BootResult,
    BootSpec,
    Drive,
    Firmware,
    Forward,
    boot,
    create_blank,
    create_overlay,
    type_on,
)


@dataclass
class Machine:
    image: Image
    disk: Disk
    workdir: Path
    forwards: tuple[Forward, ...] = ()
    extra: list[Drive] = field(default_factory=list)
    boots: list[BootResult] = field(default_factory=list)
    # None: QEMU loads the image's kernel and initrd. BIOS/UEFI: the firmware boots the disk.
    boot_from_disk: Optional[Firmware] = None
    overlay: Path = field(init=False)
    efi_vars: Optional[Path] = field(init=False, default=None)
    # The running boot's console socket (see type_line); None between boots.
    console_socket: Optional[Path] = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.overlay = create_overlay(self.disk.path, self.workdir / "root.qcow2")
        if self.boot_from_disk is Firmware.UEFI:
            self.efi_vars = self.workdir / "efi-vars.fd"
            shutil.copyfile(OVMF_VARS, self.efi_vars)

    def attach(self, disk: Disk, serial: Optional[str] = None, *, writable: bool = False) -> Drive:
        """Add ``disk`` as the next virtio disk (an overlay of its own when ``writable``)."""
        if writable:
            overlay = create_overlay(disk.path, self.workdir / f"extra{len(self.extra)}.qcow2")
            drive = disk.drive(overlay, serial=serial)
        else:
            drive = disk.drive(snapshot=True, serial=serial)
        self.extra.append(drive)
        return drive

    def attach_blank(
        self, size_bytes: int, serial: Optional[str] = None, sector: int = 512
    ) -> Drive:
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
        memory_mib: Optional[int] = None,
        rtc_base: Optional[str] = None,
    ) -> BootResult:
        """Boot once (the overlay keeps what the guest wrote) and return how it went.

        ``memory_mib``: the guest's RAM (default: :class:`BootSpec`'s), e.g. for the benchmarks'
        512 MiB guest. ``rtc_base``: the guest's clock at power-on (QEMU ``-rtc base=``, e.g.
        ``2020-01-01``), for a machine whose clock is far off. A boot with a crash primitive
        writes its disks with flushes honoured, so a cut loses only what the guest had not
        flushed, as on real hardware.
        """
        direct = self.boot_from_disk is None
        spec = BootSpec(
            kernel=self.image.kernel if direct else None,
            initrd=self.image.initrd if direct else None,
            root_uuid=self.disk.root_uuid,
            drives=(self.root_drive, *self.extra),
            script=script,
            append=tuple(append),
            forwards=self.forwards,
            timeout=timeout,
            kill_after=kill_after,
            kill_on_console=kill_on_console,
            kill_delay=kill_delay,
            memory_mib=BootSpec.memory_mib if memory_mib is None else memory_mib,
            rtc_base=rtc_base,
            cache="writeback" if kill_after is not None or kill_on_console else "unsafe",
            firmware=self.boot_from_disk,
            efi_vars=self.efi_vars,
        )
        # Recently used: the cache keeps what a running session still boots (cache.prune).
        for entry in (self.image.folder, self.disk.path.parent):
            if entry.is_dir() and entry.parent.parent == cache_root():
                touch(entry)
        # A unix socket path has at most 108 bytes: a short folder of its own, not workdir.
        folder = Path(tempfile.mkdtemp(prefix="erfs-con-"))
        self.console_socket = folder / "console.sock"
        try:
            result = boot(
                spec,
                self.workdir,
                name or f"boot{len(self.boots) + 1}",
                console_socket=self.console_socket,
            )
        finally:
            self.console_socket = None
            shutil.rmtree(folder, ignore_errors=True)
        self.boots.append(result)
        return result

    def type_line(self, line: str) -> None:
        """Type ``line`` and Enter on the console of the boot that is running (from another
        thread: :meth:`boot` blocks until the guest is off)."""
        if "\n" in line or "\r" in line:
            raise ValueError("one line at a time")
        socket_path = self.console_socket
        if socket_path is None:
            raise LabError("No boot of this machine is running; nothing was typed.")
        type_on(socket_path, line + "\n")

    def boot_twice(
        self,
        first: Optional[str],
        second: Optional[str],
        *,
        append: Sequence[str] = (),
        timeout: float = 300.0,
    ) -> tuple[BootResult, BootResult]:
        """First boot, then a second boot on the same overlay (what every product test does)."""
        one = self.boot(first, append=append, timeout=timeout, name="first")
        two = self.boot(second, append=append, timeout=timeout, name="second")
        return one, two
