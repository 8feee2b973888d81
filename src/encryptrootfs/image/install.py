"""``encryptrootfs install``: make an image (or this machine) encrypt its root on first boot.

Run as root while an image is built. It validates and installs the configuration, copies the
dracut module into ``/usr/lib/dracut/modules.d/50encryptrootfs``, enables it for every later
dracut run (``/etc/dracut.conf.d/50-encryptrootfs.conf``, so kernel updates keep it) and
regenerates the initramfs of every installed kernel. ``--root DIR`` does the same in an image
tree; dracut then runs inside it with ``chroot``, the way image builders run it.

``install --check`` only reads, and reports what is missing for the initramfs to work.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

from ..config import DEFAULT_CONFIG_PATH, Config, RootKind, load_config
from ..errors import ConfigError, EncryptrootfsError, ExitCode, ToolError
from ..log import get_logger
from ..run import run
from ..tools import TOOLS, Need

log = get_logger("install")

MODULE_NAME = "encryptrootfs"
MODULE_DIR = "50encryptrootfs"
MODULES_D = Path("usr/lib/dracut/modules.d")
DRACUT_CONF = Path("etc/dracut.conf.d/50-encryptrootfs.conf")
DRACUT_CONF_TEXT = (
    "# Written by `encryptrootfs install`: every dracut run (kernel updates too) includes the\n"
    "# module that encrypts the root on first boot and unlocks it on every later boot.\n"
    f'add_dracutmodules+=" {MODULE_NAME} "\n'
)
# The data volumes' unit runs in the real root (docs/volumes.md). Written under /etc like the
# configuration; enabled only when the configuration has [[volumes]].
UNITS_D = Path("etc/systemd/system")
VOLUMES_UNIT = "encryptrootfs-volumes.service"
VOLUMES_WANTED_BY = "remote-fs.target"
MIN_PYTHON = (3, 9)
BIN_DIRS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")
SYSTEMD_DIRS = ("usr/lib/systemd", "lib/systemd")


class Change(str, Enum):
    """What one install step did."""

    WRITTEN = "written"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    KEPT = "kept"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class InstallResult:
    root: Path
    config: Change
    module: Change
    dracut_conf: Change
    initramfs: tuple[str, ...]  # kernel versions whose initramfs was regenerated
    volumes_unit: Change = Change.SKIPPED  # encryptrootfs-volumes.service
    volumes_enabled: bool = False  # enabled: the configuration has [[volumes]]

    def as_dict(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "config": self.config.value,
            "module": self.module.value,
            "dracut_conf": self.dracut_conf.value,
            "initramfs_regenerated": list(self.initramfs),
            "volumes_unit": self.volumes_unit.value,
            "volumes_enabled": self.volumes_enabled,
        }


def volumes_unit_source() -> Path:
    """The data volumes' systemd unit shipped as package data."""
    return Path(__file__).resolve().parents[1] / "systemd" / VOLUMES_UNIT


def _in_root(root: Path, path: Path) -> Path:
    return root / str(path).lstrip("/")


def module_source() -> Path:
    """The dracut module shipped as package data."""
    return Path(__file__).resolve().parents[1] / "dracut" / MODULE_DIR


# --------------------------------------------------------------------------------------------
# install


def _write_if_changed(path: Path, data: bytes, mode: int) -> Change:
    if path.is_file() and path.read_bytes() == data:
        return Change.UNCHANGED
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: a half-written file in /etc must never be what the next dracut run reads.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Change.UPDATED if existed else Change.WRITTEN


def install_config(root: Path, source: Optional[Path]) -> tuple[Change, Config]:
    """Validate ``source`` and install it, or validate the one already installed."""
    target = _in_root(root, DEFAULT_CONFIG_PATH)
    if source is None:
        if not target.exists():
            raise ConfigError(
                f"{target}: no configuration is installed and none was given; nothing was changed.",
                hint="run `encryptrootfs install CONFIG.toml` (examples/config.toml is a start)",
            )
        return Change.KEPT, load_config(target)
    config = load_config(source)  # an invalid file is refused before anything is written
    return _write_if_changed(target, source.read_bytes(), 0o644), config


def _tree_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _require_dracut(root: Path) -> Path:
    modules_d = _in_root(root, MODULES_D)
    if not modules_d.is_dir():
        raise ToolError(
            f"{modules_d} does not exist: dracut is not installed in {root}; nothing was changed.",
            hint="install dracut (Debian: apt-get install dracut dracut-network) and retry",
        )
    return modules_d


def install_module(root: Path, source: Optional[Path] = None) -> Change:
    """Copy the dracut module into ``root``'s modules.d (replaced whole, atomically)."""
    source = source or module_source()
    modules_d = _require_dracut(root)
    target = modules_d / MODULE_DIR
    wanted = _tree_files(source)
    if target.is_dir() and _tree_files(target) == wanted:
        return Change.UNCHANGED
    existed = target.exists()
    staging = Path(tempfile.mkdtemp(dir=modules_d, prefix=f".{MODULE_DIR}."))
    try:
        for rel, data in wanted.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            # dracut sources module-setup.sh; the other files are data (units, configs).
            dest.chmod(0o755 if rel.endswith(".sh") else 0o644)
        staging.chmod(0o755)
        if existed:
            old = modules_d / f".{MODULE_DIR}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Change.UPDATED if existed else Change.WRITTEN


def install_dracut_conf(root: Path) -> Change:
    return _write_if_changed(_in_root(root, DRACUT_CONF), DRACUT_CONF_TEXT.encode(), 0o644)


def install_volumes_unit(root: Path, config: Config) -> tuple[Change, bool]:
    """Write the data volumes' unit; enable it exactly when ``config`` has [[volumes]].

    Enabling is the symlink ``systemctl enable`` makes (no systemd needed in an image tree);
    a configuration without volumes removes it, so the unit never runs for nothing.
    """
    units = _in_root(root, UNITS_D)
    change = _write_if_changed(units / VOLUMES_UNIT, volumes_unit_source().read_bytes(), 0o644)
    link = units / f"{VOLUMES_WANTED_BY}.wants" / VOLUMES_UNIT
    target = Path("/") / UNITS_D / VOLUMES_UNIT
    enabled = bool(config.volumes)
    if enabled and not (link.is_symlink() and Path(os.readlink(link)) == target):
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        change = change if change is not Change.UNCHANGED else Change.UPDATED
    elif not enabled and (link.is_symlink() or link.exists()):
        link.unlink()
        change = change if change is not Change.UNCHANGED else Change.UPDATED
    return change, enabled


def _require_volumes_unit(config: Config) -> None:
    if config.volumes and not volumes_unit_source().is_file():
        raise EncryptrootfsError(
            f"The configuration has [[volumes]] but {volumes_unit_source()} is missing from "
            "this installation of encryptrootfs; nothing was changed.",
            hint="reinstall encryptrootfs: its package data is incomplete",
        )


def installed_kernels(root: Path) -> list[str]:
    """Kernel versions with modules in ``root`` (each gets its own initramfs)."""
    modules = _in_root(root, Path("lib/modules"))
    if not modules.is_dir():
        return []
    return sorted(
        (
            p.name
            for p in modules.iterdir()
            if p.is_dir() and ((p / "modules.dep").exists() or (p / "kernel").is_dir())
        ),
        key=_version_key,
    )


def _version_key(version: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"[.-]", version)]


def dracut_argv(root: Path, kver: str) -> list[str]:
    """The dracut command for ``kver``: its default output path, the system's dracut.conf."""
    argv = ["dracut", "--force", "--kver", kver]
    if root.resolve() != Path("/"):
        return ["chroot", str(root), *argv]
    return argv


def regenerate(root: Path, kernels: Sequence[str]) -> tuple[str, ...]:
    if root.resolve() != Path("/") and not (root / "proc" / "self").exists():
        raise EncryptrootfsError(
            f"{root}/proc is not mounted: dracut in the image needs /proc, /sys and /dev; the "
            "configuration and the module are installed, no initramfs was regenerated.",
            hint=f"mount them (mount -t proc proc {root}/proc; mount --rbind /sys {root}/sys; "
            f"mount --rbind /dev {root}/dev) or pass --no-regenerate and run dracut yourself",
        )
    done = []
    for kver in kernels:
        log.info("regenerating the initramfs of %s (dracut, about a minute)", kver)
        run(
            dracut_argv(root, kver),
            hint="the module and configuration stay installed; fix "
            "the error above and run `encryptrootfs install` again",
        )
        done.append(kver)
    return tuple(done)


def install(
    root: Path = Path("/"),
    config_source: Optional[Path] = None,
    *,
    regenerate_initramfs: bool = True,
    kernels: Optional[Sequence[str]] = None,
) -> InstallResult:
    """Install and enable everything in ``root``; each step is idempotent."""
    if not root.is_dir():
        raise EncryptrootfsError(f"{root} is not a folder; nothing was changed.")
    # Everything is checked before the first write: dracut's presence, then the config.
    _require_dracut(root)
    if config_source is not None:
        _require_volumes_unit(load_config(config_source))
    config_change, config = install_config(root, config_source)
    _require_volumes_unit(config)  # (a kept config was not written either)
    module_change = install_module(root)
    conf_change = install_dracut_conf(root)
    unit_change, unit_enabled = Change.SKIPPED, False
    if volumes_unit_source().is_file():
        unit_change, unit_enabled = install_volumes_unit(root, config)
    else:
        log.warning(
            "%s is not in this installation: the data volumes' unit was not "
            "installed (the configuration has no [[volumes]])",
            volumes_unit_source(),
        )
    done: tuple[str, ...] = ()
    if regenerate_initramfs:
        targets = list(kernels) if kernels else installed_kernels(root)
        if not targets:
            raise EncryptrootfsError(
                f"no kernel is installed in {root}/lib/modules, so no initramfs was "
                "regenerated (configuration, module and dracut.conf.d are installed).",
                hint="install a kernel; its package runs dracut, which now includes the module",
            )
        done = regenerate(root, targets)
    return InstallResult(
        root, config_change, module_change, conf_change, done, unit_change, unit_enabled
    )


# --------------------------------------------------------------------------------------------
# install --check


class Status(str, Enum):
    OK = "ok"
    WARNING = "warning"  # works, but something is off (e.g. an optional file-system tool)
    MISSING = "missing"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CheckItem:
    name: str
    status: Status
    detail: str
    exit_code: ExitCode = ExitCode.FAILURE  # what a MISSING item makes the command return

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail}


def find_program(root: Path, name: str) -> Optional[Path]:
    for d in BIN_DIRS:
        candidate = root / d / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _systemd_file(root: Path, name: str) -> Optional[Path]:
    for d in SYSTEMD_DIRS:
        if (root / d / name).exists():
            return root / d / name
    return None


def check_tools(root: Path) -> list[CheckItem]:
    items = []
    for need in Need:
        tools = [t for t in TOOLS if t.need is need]
        missing = [t for t in tools if find_program(root, t.name) is None]
        required = need in (Need.LUKS, Need.PARTITION)
        if not missing:
            items.append(
                CheckItem(f"tools ({need.value})", Status.OK, ", ".join(t.name for t in tools))
            )
            continue
        names = ", ".join(f"{t.name} ({t.package})" for t in missing)
        if required:
            items.append(
                CheckItem(
                    f"tools ({need.value})",
                    Status.MISSING,
                    f"not installed: {names}",
                    ExitCode.TOOL,
                )
            )
        elif need is Need.BOOT:
            items.append(
                CheckItem(
                    f"tools ({need.value})",
                    Status.WARNING,
                    f"not installed: {names}; a root whose /boot GRUB reads from it is refused",
                )
            )
        else:
            items.append(
                CheckItem(
                    f"tools ({need.value})",
                    Status.WARNING,
                    f"not installed: {names}; {need.value} roots are refused",
                )
            )
    return items


def check_python(root: Path) -> CheckItem:
    if root.resolve() == Path("/"):
        version = sys.version_info[:2]
        where = sys.executable
    else:
        python = find_program(root, "python3")
        if python is None:
            return CheckItem("python", Status.MISSING, "python3 is not installed", ExitCode.TOOL)
        # The image's python3 cannot be asked without chroot; its file name says the version.
        match = re.search(r"python(\d+)\.(\d+)$", os.path.realpath(python))
        if match is None:
            linked = os.readlink(python) if python.is_symlink() else ""
            match = re.search(r"python(\d+)\.(\d+)$", linked)
        if match is None:
            return CheckItem("python", Status.WARNING, f"{python}: version unknown")
        version = (int(match.group(1)), int(match.group(2)))
        where = str(python)
    text = f"{version[0]}.{version[1]} ({where})"
    if version < MIN_PYTHON:
        return CheckItem("python", Status.MISSING, f"{text}: 3.9 or newer is needed", ExitCode.TOOL)
    return CheckItem("python", Status.OK, text)


def dracut_version(root: Path) -> Optional[str]:
    version_file = root / "usr/lib/dracut/dracut-version.sh"
    try:
        text = version_file.read_text()
    except OSError:
        return None
    match = re.search(r"DRACUT_VERSION=['\"]?([0-9][^'\"\s]*)", text)
    return match.group(1) if match else "unknown"


def check_dracut(root: Path) -> list[CheckItem]:
    dracut = find_program(root, "dracut")
    version = dracut_version(root)
    if dracut is None or version is None:
        return [
            CheckItem(
                "dracut",
                Status.MISSING,
                "dracut is not installed (Debian: dracut dracut-network)",
                ExitCode.TOOL,
            )
        ]
    items = [CheckItem("dracut", Status.OK, f"{version} ({dracut})")]
    module = _in_root(root, MODULES_D) / MODULE_DIR
    conf = _in_root(root, DRACUT_CONF)
    if (module / "module-setup.sh").exists() and conf.exists():
        same = _tree_files(module) == _tree_files(module_source())
        items.append(
            CheckItem(
                "dracut module",
                Status.OK if same else Status.WARNING,
                f"{MODULE_DIR} installed and enabled"
                + ("" if same else "; differs from this version (run `encryptrootfs install`)"),
            )
        )
    else:
        items.append(
            CheckItem(
                "dracut module",
                Status.MISSING,
                "not installed or not enabled (run `encryptrootfs install`)",
            )
        )
    return items


def check_config(root: Path) -> tuple[CheckItem, Optional[Config]]:
    path = _in_root(root, DEFAULT_CONFIG_PATH)
    try:
        config = load_config(path)
    except ConfigError as e:
        return CheckItem("config", Status.MISSING, e.message, ExitCode.CONFIG), None
    return CheckItem("config", Status.OK, f"{path}: valid ({config.provider.value})"), config


_ROOT_TAGS = ("UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=")


def check_root(root: Path, config: Optional[Config], cmdline: Optional[str]) -> CheckItem:
    if config is None:
        return CheckItem(
            "root", Status.MISSING, "unknown: the configuration is not valid", ExitCode.CONFIG
        )
    if config.root.kind is not RootKind.CMDLINE:
        return CheckItem("root", Status.OK, f"{config.root} (from the configuration)")
    if root.resolve() != Path("/") or cmdline is None:
        return CheckItem(
            "root",
            Status.OK,
            "root= of the kernel command line at boot (not checked here: this is an image tree)",
        )
    from ..devices import cmdline_root

    spec = cmdline_root(cmdline)
    if not spec:
        return CheckItem(
            "root",
            Status.MISSING,
            "the kernel command line has no root= and the configuration names "
            "none; set [root] device",
            ExitCode.REFUSED,
        )
    if not spec.upper().startswith(_ROOT_TAGS):
        return CheckItem(
            "root",
            Status.WARNING,
            f"root={spec}: a device path may name another disk after a reboot; "
            'prefer root=UUID=... or [root] device = "UUID=..."',
        )
    return CheckItem("root", Status.OK, f"root={spec} (this machine's kernel command line)")


def check_network(root: Path) -> CheckItem:
    modules = _in_root(root, MODULES_D)
    networkd = _systemd_file(root, "systemd-networkd")
    dbus = find_program(root, "dbus-daemon") or find_program(root, "dbus-broker")
    if networkd is not None and dbus is not None and (modules / "01systemd-networkd").is_dir():
        return CheckItem(
            "network", Status.OK, f"systemd-networkd + {dbus.name} (dracut 01systemd-networkd)"
        )
    dhclient = find_program(root, "dhclient")
    if dhclient is not None and (modules / "35network-legacy").is_dir():
        why = "no dbus" if networkd is not None and dbus is None else "no systemd-networkd"
        return CheckItem(
            "network",
            Status.OK,
            f"network-legacy (dhclient; {why}: ~9 s slower per boot than "
            "systemd-networkd with dbus)",
        )
    return CheckItem(
        "network",
        Status.MISSING,
        "no network backend for the initramfs: install dracut-network and dbus "
        "(systemd-networkd backend) or isc-dhcp-client (network-legacy)",
        ExitCode.TOOL,
    )


def check_readiness(root: Path = Path("/"), cmdline: Optional[str] = None) -> list[CheckItem]:
    """Everything ``install`` and the initramfs need, read-only."""
    if cmdline is None and root.resolve() == Path("/"):
        try:
            cmdline = Path("/proc/cmdline").read_text()
        except OSError:
            cmdline = None
    items = [check_python(root), *check_tools(root), *check_dracut(root)]
    config_item, config = check_config(root)
    items += [config_item, check_root(root, config, cmdline), check_network(root)]
    return items


def readiness_exit_code(items: Sequence[CheckItem]) -> ExitCode:
    for item in items:
        if item.status is Status.MISSING:
            return item.exit_code
    return ExitCode.OK
