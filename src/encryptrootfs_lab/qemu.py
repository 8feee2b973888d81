"""One unattended guest boot under QEMU (TCG), with crash primitives.

A boot gets its kernel and initramfs with ``-kernel``/``-initrd``, its disks as virtio block
devices (qcow2 overlays per test over cached raw disks), a test script through fw_cfg
(``opt/erfs/script``, run by the guest's ``erfs-lab-runner``), the serial console in a log file
(and, while the boot runs, on a unix socket a test can type into) and a second serial port as
the results channel. ``-no-reboot`` and ``panic=-1`` make QEMU exit
on power-off, reboot and panic; a timeout, "kill after T seconds" and "kill when the console
matches" end it with SIGKILL (a power cut). A boot with a ``firmware`` has no ``-kernel``: SeaBIOS
or OVMF starts the boot loader on the first disk (see :mod:`encryptrootfs_lab.bootloader`) and
``append`` reaches the boot loader's config as an SMBIOS OEM string. Networking is QEMU user mode
with ``restrict=on``:
the guest reaches nothing but the ``guestfwd`` addresses, each relayed to a port on the host's
loopback by :mod:`encryptrootfs_lab.relay`.

QEMU runs in its own process group (the relays QEMU spawns are in it too); the group is killed
on every way out, and every group started is recorded in :data:`STARTED_GROUPS` so that a test
session can assert that nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from encryptrootfs.log import get_logger
from encryptrootfs.run import run

from .cache import LabError

log = get_logger("lab.qemu")

# The slirp network the guest lives in; forwarded addresses must lie inside it.
GUEST_NET = "169.254.169.0/24"
GUEST_HOST = "169.254.169.2"
GUEST_DHCP_START = "169.254.169.15"
IMDS_ADDRESS = "169.254.169.254"
KMS_ADDRESS = "169.254.169.250"
# TCG stalls for 10-35 s loading these (autoloaded because -cpu max shows SVM; nl80211 probe);
# probing the i440fx floppy controller costs ~5 s.
MODULE_BLACKLIST = "kvm,kvm_amd,kvm_intel,cfg80211,floppy"
FW_CFG_SCRIPT = "opt/erfs/script"
# TCG's "max" CPU without the features it emulates slowly: rep movsb/stosb fast paths (erms,
# fsrm) and AVX, which glibc's string functions and the kernel's crypto pick when offered;
# boots measured 15-20 % faster without them. AES-NI stays (the product's cipher).
GUEST_CPU = "max,-erms,-fsrm,-avx,-avx2,-fma,-f16c,-bmi1,-bmi2"
# Debian's ovmf package (4 MiB flash layout); each machine boots with its own copy of the vars.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# A firmware boot's extra kernel arguments travel as the one SMBIOS OEM string (type 11) with
# this prefix; the lab's grub.cfg reads it with GRUB's smbios command (bootloader.grub_cfg).
SMBIOS_APPEND_PREFIX = "erfs-append="
POLL_SECONDS = 0.1

# Process groups of every QEMU this process started (QEMU's pid == its group id).
STARTED_GROUPS: set[int] = set()
# (boot name, wall seconds) of every boot this process ran: what the guests cost (the test
# run's summary prints it).
BOOT_LEDGER: list[tuple[str, float]] = []


class Firmware(str, Enum):
    """What starts a boot from the disk instead of QEMU's ``-kernel``."""

    BIOS = "bios"  # SeaBIOS (QEMU's default): GRUB i386-pc in the MBR and the gap after it
    UEFI = "uefi"  # OVMF: GRUB x86_64-efi at EFI/BOOT/BOOTX64.EFI on the ESP


def kernel_cmdline(root_uuid: str, append: Sequence[str] = ()) -> str:
    """The lab's kernel command line (``-append`` of a direct boot, grub.cfg of a disk boot)."""
    return " ".join(
        [
            f"root=UUID={root_uuid}",
            "ro",
            "console=ttyS0,115200",
            "panic=-1",
            # rd.emergency=poweroff: a failed initramfs (e.g. encryptrootfs failing closed)
            # powers off, so QEMU exits at once instead of halting until the timeout.
            "rd.shell=0",
            "rd.emergency=poweroff",
            f"modprobe.blacklist={MODULE_BLACKLIST}",
            *append,
        ]
    )


def smbios_append_value(append: Sequence[str]) -> str:
    """``-smbios type=11,value=...`` for a firmware boot's extra kernel arguments.

    QEMU's option parser ends a value at a comma, so commas are doubled.
    """
    return "type=11,value=" + (SMBIOS_APPEND_PREFIX + " ".join(append)).replace(",", ",,")


class BootEnd(str, Enum):
    """How a boot ended."""

    POWEROFF = "poweroff"  # the guest powered itself off
    REBOOT = "reboot"  # the guest asked for a reboot (-no-reboot turns that into an exit)
    PANIC = "panic"  # kernel panic (panic=-1 reboots at once, so QEMU exits)
    TIMEOUT = "timeout"  # the per-boot timeout expired; QEMU was killed
    KILLED = "killed"  # a crash primitive killed QEMU on purpose (power cut)
    QEMU_FAILED = "qemu-failed"  # QEMU exited with an error of its own


@dataclass(frozen=True)
class Drive:
    """A virtio block device. Order of drives = order of /dev/vdX in the guest."""

    path: Path
    format: str = "qcow2"
    logical_sector: int = 512
    readonly: bool = False
    # writes go to a throw-away temp overlay: the file itself is never changed
    snapshot: bool = False
    serial: Optional[str] = None


@dataclass(frozen=True)
class Forward:
    """``guest_address:80`` in the guest -> ``127.0.0.1:host_port`` on the host."""

    guest_address: str
    host_port: int
    guest_port: int = 80


@dataclass(frozen=True)
class BootSpec:
    """Everything one boot needs. ``kernel``/``initrd`` are None for a ``firmware`` boot."""

    kernel: Optional[Path]
    initrd: Optional[Path]
    root_uuid: str
    drives: tuple[Drive, ...]
    script: Optional[str] = None
    append: tuple[str, ...] = ()
    forwards: tuple[Forward, ...] = ()
    timeout: float = 300.0
    kill_after: Optional[float] = None
    kill_on_console: Optional[str] = None
    kill_delay: float = 0.0
    memory_mib: int = 1024
    cpus: int = 2
    # QEMU -rtc base=: the guest's clock at power-on (None: the host's time).
    rtc_base: Optional[str] = None
    # Disk write caching. "unsafe" ignores the guest's flushes (fast; right when the boot ends
    # by itself, QEMU writes everything out on exit). A boot meant to be cut needs
    # "writeback": QEMU keeps qcow2 metadata in memory until a flush, so with "unsafe" a kill
    # would lose writes the guest had flushed, which no real disk does.
    cache: str = "unsafe"
    # None: QEMU loads kernel and initrd itself. Otherwise the firmware boots the first drive.
    firmware: Optional[Firmware] = None
    # UEFI only: this machine's copy of OVMF_VARS (its NVRAM; written by the firmware).
    efi_vars: Optional[Path] = None

    def cmdline(self) -> str:
        return kernel_cmdline(self.root_uuid, self.append)


@dataclass(frozen=True)
class Marker:
    """A results line ``ERFS-NAME=value ...`` or ``ERFS-NAME value ...``."""

    name: str
    value: str

    def fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for token in self.value.split():
            if "=" in token:
                k, _, v = token.partition("=")
                out[k] = v
        return out


def parse_markers(text: str) -> tuple[Marker, ...]:
    found = []
    for line in text.splitlines():
        m = re.match(r"(ERFS-[A-Z0-9-]+)[= ]?(.*)$", line.strip())
        if m:
            found.append(Marker(m.group(1), m.group(2).strip()))
    return tuple(found)


@dataclass(frozen=True)
class BootResult:
    """What one boot produced."""

    name: str
    end: BootEnd
    wall_seconds: float
    # kept out of repr: an assertion message should show describe(), not 100 KB of console
    console: str = field(repr=False)
    results: str = field(repr=False)
    console_path: Path
    results_path: Path
    returncode: Optional[int]
    markers: tuple[Marker, ...] = field(default=())
    kill_reason: Optional[str] = None

    def marker(self, name: str) -> Optional[Marker]:
        """The last marker called ``name`` (``ERFS-`` prefix optional)."""
        full = name if name.startswith("ERFS-") else f"ERFS-{name}"
        for m in reversed(self.markers):
            if m.name == full:
                return m
        return None

    def all(self, name: str) -> list[Marker]:
        full = name if name.startswith("ERFS-") else f"ERFS-{name}"
        return [m for m in self.markers if m.name == full]

    @property
    def script_rc(self) -> Optional[int]:
        m = self.marker("RC")
        return int(m.value.split()[0]) if m and m.value.split()[0].isdigit() else None

    @property
    def booted_state(self) -> Optional[str]:
        m = self.marker("BOOTED")
        return m.fields().get("state") if m else None

    @property
    def guest_uptime_at_boot(self) -> Optional[float]:
        m = self.marker("BOOTED")
        up = m.fields().get("uptime") if m else None
        return float(up) if up else None

    @property
    def ok(self) -> bool:
        """Powered off by itself after running its script with exit code 0."""
        return self.end is BootEnd.POWEROFF and self.script_rc == 0

    def console_tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def describe(self, lines: int = 60) -> str:
        """A block for assertion messages: how it ended, the results and the console tail."""
        return (
            f"boot {self.name}: {self.end.value} after {self.wall_seconds:.1f}s"
            f" (script rc={self.script_rc}, state={self.booted_state}"
            f"{', ' + self.kill_reason if self.kill_reason else ''})\n"
            f"--- results ({self.results_path}) ---\n{self.results[-4000:]}\n"
            f"--- console tail ({self.console_path}) ---\n{self.console_tail(lines)}"
        )


def create_overlay(base: Path, overlay: Path, base_format: str = "raw") -> Path:
    """A qcow2 overlay whose writes stay out of ``base``."""
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            base_format,
            "-b",
            base.resolve(),
            overlay,
        ]
    )
    return overlay


def create_blank(path: Path, size_bytes: int) -> Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size_bytes)])
    return path


def _relay_command(port: int) -> str:
    return f"{sys.executable} -m encryptrootfs_lab.relay {port}"


def _boot_argv(spec: BootSpec) -> list[str]:
    if spec.firmware is None:
        if spec.kernel is None or spec.initrd is None:
            raise LabError(
                "A boot without a firmware needs a kernel and an initrd; QEMU was not started.",
                hint="give BootSpec kernel= and initrd=",
            )
        return ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.cmdline()]
    if spec.kernel is not None or spec.initrd is not None:
        raise LabError(
            f"A {spec.firmware.value} boot loads the kernel from the disk; QEMU was not started.",
            hint="leave BootSpec kernel and initrd at None",
        )
    if not spec.drives:
        raise LabError("A firmware boot needs a disk to boot from; QEMU was not started.")
    argv: list[str] = []
    if spec.firmware is Firmware.UEFI:
        if spec.efi_vars is None:
            raise LabError(
                "A UEFI boot needs its machine's copy of OVMF_VARS; QEMU was not started.",
                hint="give BootSpec efi_vars= (Machine does)",
            )
        argv += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={spec.efi_vars}",
        ]
    if spec.append:
        argv += ["-smbios", smbios_append_value(spec.append)]
    return argv


def console_argv(console: Path, socket_path: Optional[Path]) -> list[str]:
    """The first serial port: the guest's console, logged to ``console``.

    With ``socket_path`` it is a chardev that also listens on that unix socket (``wait=off``:
    the guest never waits for a client), so a test can type on the console (:func:`type_on`);
    the log file gets every byte the guest writes either way, as ``-serial file:`` did.
    """
    if socket_path is None:
        return ["-serial", f"file:{console}"]
    for path in (console, socket_path):
        if "," in str(path):
            raise LabError(
                f"QEMU's option syntax cannot take the path {path} (a comma); "
                "QEMU was not started.",
                hint="use a work folder without commas",
            )
    return [
        "-chardev",
        f"socket,id=con0,path={socket_path},server=on,wait=off,logfile={console},logappend=off",
        "-serial",
        "chardev:con0",
    ]


def type_on(socket_path: Path, text: str, *, settle: float = 1.0) -> None:
    """Send ``text`` to the guest's console, as typed on its serial port (``\n`` is Enter).

    One connection per call, closed after ``settle`` seconds so QEMU has taken every byte in
    (it reads as fast as the UART's FIFO empties); nothing is read from it, so the console
    output meanwhile goes only to the log file.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10.0)
        try:
            s.connect(str(socket_path))
        except OSError as exc:
            raise LabError(
                f"Cannot reach the guest's console at {socket_path}: {exc}; is the "
                "boot still running?"
            ) from None
        s.sendall(text.encode())
        time.sleep(settle)


def qemu_argv(
    spec: BootSpec,
    console: Path,
    results: Path,
    script: Optional[Path],
    console_socket: Optional[Path] = None,
) -> list[str]:
    netdev = (
        f"user,id=n0,restrict=on,net={GUEST_NET},host={GUEST_HOST},dhcpstart={GUEST_DHCP_START}"
    )
    for fwd in spec.forwards:
        netdev += (
            f",guestfwd=tcp:{fwd.guest_address}:{fwd.guest_port}-cmd:"
            f"{_relay_command(fwd.host_port)}"
        )
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        GUEST_CPU,
        "-smp",
        str(spec.cpus),
        "-m",
        str(spec.memory_mib),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        *_boot_argv(spec),
        # romfile= (firmware boots): no iPXE; the firmware boots the disk and nothing else.
        "-netdev",
        netdev,
        "-device",
        "virtio-net-pci,netdev=n0" + (",romfile=" if spec.firmware else ""),
        "-device",
        "virtio-rng-pci",
        *console_argv(console, console_socket),
        "-serial",
        f"file:{results}",
    ]
    if spec.rtc_base is not None:
        argv += ["-rtc", f"base={spec.rtc_base}"]
    for i, d in enumerate(spec.drives):
        opts = f"file={d.path},format={d.format},if=none,id=d{i},cache={spec.cache}"
        if d.readonly:
            opts += ",readonly=on"
        if d.snapshot:
            opts += ",snapshot=on"
        dev = f"virtio-blk-pci,drive=d{i}"
        if d.logical_sector != 512:
            dev += f",logical_block_size={d.logical_sector},physical_block_size={d.logical_sector}"
        if d.serial:
            dev += f",serial={d.serial}"
        if spec.firmware is not None and i == 0:
            dev += ",bootindex=0"
        argv += ["-drive", opts, "-device", dev]
    if script is not None:
        argv += ["-fw_cfg", f"name={FW_CFG_SCRIPT},file={script}"]
    return argv


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace").replace("\r", "")
    except FileNotFoundError:
        return ""


def _classify(console: str, returncode: int) -> BootEnd:
    if returncode != 0:
        return BootEnd.QEMU_FAILED
    if "Kernel panic" in console:
        return BootEnd.PANIC
    if "reboot: Power down" in console:
        return BootEnd.POWEROFF
    if "reboot: Restarting system" in console:
        return BootEnd.REBOOT
    return BootEnd.POWEROFF


def boot(
    spec: BootSpec, workdir: Path, name: str = "boot", console_socket: Optional[Path] = None
) -> BootResult:
    """Run one boot to its end; returns how it ended and what it printed.

    ``console_socket``: where the console listens for typing (:func:`type_on`) while the boot
    runs; a unix socket path must be short (108 bytes), so it lives outside ``workdir``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    console = workdir / f"{name}.console.log"
    results = workdir / f"{name}.results.log"
    stderr_path = workdir / f"{name}.qemu.log"
    script_path: Optional[Path] = None
    if spec.script is not None:
        script_path = workdir / f"{name}.script.sh"
        script_path.write_text(spec.script)
    for p in (console, results):
        p.unlink(missing_ok=True)
    if console_socket is not None:
        console_socket.unlink(missing_ok=True)
    argv = qemu_argv(spec, console, results, script_path, console_socket)
    (workdir / f"{name}.qemu-cmd").write_text(" ".join(argv) + "\n")
    pattern = re.compile(spec.kill_on_console) if spec.kill_on_console else None
    env = dict(os.environ)
    # The relays QEMU spawns must import this package even from an uninstalled checkout.
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log.info("boot %s: starting QEMU (timeout %.0fs)", name, spec.timeout)
    started = time.monotonic()
    end: Optional[BootEnd] = None
    reason: Optional[str] = None
    matched_at: Optional[float] = None
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
            env=env,
        )
    STARTED_GROUPS.add(proc.pid)
    try:
        seen = 0
        while proc.poll() is None:
            time.sleep(POLL_SECONDS)
            elapsed = time.monotonic() - started
            if pattern is not None and matched_at is None:
                text = _read_text(console)
                # only the new part (plus an overlap for a match across two reads)
                if pattern.search(text, max(0, seen - 512)):
                    matched_at = elapsed
                    reason = f"console matched {spec.kill_on_console!r} at {elapsed:.1f}s"
                seen = len(text)
            if matched_at is not None and elapsed >= matched_at + spec.kill_delay:
                end = BootEnd.KILLED
                break
            if spec.kill_after is not None and elapsed >= spec.kill_after:
                end, reason = BootEnd.KILLED, f"killed after {spec.kill_after:.1f}s"
                break
            if elapsed >= spec.timeout:
                end, reason = BootEnd.TIMEOUT, f"no power-off within {spec.timeout:.0f}s"
                break
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL: to the guest this is a power cut
        proc.wait()
        _kill_group(proc.pid)
        if console_socket is not None:
            console_socket.unlink(missing_ok=True)
    wall = time.monotonic() - started
    BOOT_LEDGER.append((name, wall))
    console_text = _read_text(console)
    if end is None:
        end = _classify(console_text, proc.returncode)
        if end is BootEnd.QEMU_FAILED:
            reason = _read_text(stderr_path).strip()[-2000:]
    results_text = _read_text(results)
    result = BootResult(
        name=name,
        end=end,
        wall_seconds=wall,
        console=console_text,
        results=results_text,
        console_path=console,
        results_path=results,
        returncode=proc.returncode,
        markers=parse_markers(results_text),
        kill_reason=reason,
    )
    log.info("boot %s: %s after %.1fs", name, end.value, wall)
    if end is BootEnd.QEMU_FAILED:
        raise LabError(
            f"QEMU could not run boot {name} (exit code {proc.returncode}): {reason}",
            hint=f"the command is in {workdir / (name + '.qemu-cmd')}",
        )
    return result
