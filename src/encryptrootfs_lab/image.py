"""Guest images: a Debian bookworm rootfs with this project installed, and its initramfs.

Two cached layers, each keyed by a hash of its inputs:

* **base**: debootstrap (minbase) plus a second apt stage (kernel, dracut, dbus ...) and the
  lab's fixed configuration. Built once per package list and :data:`BASE_VERSION` (~2 min).
* **product**: a copy of the base with this project installed from the working tree (host pip
  into the guest's dist-packages), the lab's guest files, the test tree, an optional config and
  chroot commands, then the initramfs built by dracut in a chroot. Rebuilt whenever the project
  code or the :class:`ImageSpec` changes (~1.5 min).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Optional

from encryptrootfs.log import get_logger
from encryptrootfs.run import run

from .cache import (
    LabError,
    building,
    cache_root,
    digest,
    locked,
    prune,
    touch,
    tree_digest,
)
from .packages import debian_packages, project_root
from .qemu import SMBIOS_APPEND_PREFIX, kernel_cmdline
from .testtree import GUEST_MANIFEST, GUEST_TREE, cached_tree

log = get_logger("lab.image")

SUITE = "bookworm"
# Bump when the base recipe (configure_base) changes in a way the package lists do not show.
# 2: mdadm, its shutdown unit masked; 3: GRUB (debconf preseeded); 4: slimmed (SLIM_PATHS);
# 5: the kernel update package fetched with the base (its apt lists are gone afterwards);
# 6: apt's package caches slimmed too
BASE_VERSION = "6"
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "cryptsetup",
    "python3",
    "e2fsprogs",
    "xfsprogs",
    "btrfs-progs",
    "util-linux",
    "fdisk",
    "iproute2",
    "ca-certificates",
    "procps",
    "cpio",
    "zstd",
    "attr",
    # data volumes: RAID0 across instance-store disks (tests/vm/test_data_volumes.py)
    "mdadm",
)
# Removed from the base after the packages are in (_slim). The kernel keeps its block, virtio,
# NVMe, dm, md, netfilter, crypto and filesystem modules; what goes is hardware no lab guest
# has (GPUs, sound, wireless, InfiniBand, media, Bluetooth ...).
SLIM_PATHS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/zoneinfo/right",
    "usr/share/zoneinfo/posix",
    *(
        f"lib/modules/{{kver}}/kernel/{d}"
        for d in (
            "sound",
            "drivers/gpu",
            "drivers/media",
            "drivers/net/wireless",
            "drivers/infiniband",
            "drivers/staging",
            "drivers/bluetooth",
            "drivers/isdn",
            "drivers/iio",
            "drivers/mtd",
            "drivers/thunderbolt",
            "drivers/usb",
            "drivers/hid",
            "drivers/input/touchscreen",
            "drivers/input/joystick",
            "drivers/input/misc",
            "drivers/net/can",
            "drivers/net/usb",
            "drivers/net/ieee802154",
            "drivers/net/wwan",
            "drivers/comedi",
            "drivers/video",
            "drivers/watchdog",
            "drivers/hwmon",
            "drivers/leds",
            "drivers/mfd",
            "drivers/platform",
            "drivers/power",
            "drivers/rtc",
            "drivers/spi",
            "drivers/i2c",
            "drivers/gnss",
            "drivers/nfc",
            "drivers/misc",
            "drivers/mmc",
            "drivers/memstick",
            "drivers/pcmcia",
            "drivers/atm",
            "drivers/firewire",
            "drivers/parport",
            "drivers/scsi/qla2xxx",
            "drivers/scsi/lpfc",
            "drivers/scsi/mpt3sas",
            "drivers/scsi/bfa",
            "drivers/scsi/qedf",
            "drivers/scsi/qedi",
            "drivers/scsi/be2iscsi",
            "drivers/scsi/megaraid",
            "drivers/scsi/aic7xxx",
            "drivers/scsi/fnic",
            "drivers/net/ethernet/mellanox",
            "drivers/net/ethernet/intel",
            "drivers/net/ethernet/broadcom",
            "drivers/net/ethernet/chelsio",
            "drivers/net/ethernet/qlogic",
            "drivers/net/ethernet/marvell",
            "drivers/net/ethernet/sfc",
            "drivers/net/ethernet/emulex",
            "drivers/net/ethernet/cisco",
            "net/wireless",
            "net/mac80211",
            "net/bluetooth",
            "net/nfc",
            "net/can",
            "net/atm",
            "net/ieee802154",
            "net/mac802154",
            "fs/ocfs2",
            "fs/gfs2",
            "fs/nfs",
            "fs/nfsd",
            "fs/ceph",
            "fs/smb",
            "fs/ntfs3",
            "fs/jfs",
            "fs/reiserfs",
            "fs/nilfs2",
            "fs/ubifs",
            "fs/afs",
            "fs/coda",
            "fs/dlm",
            "fs/orangefs",
        )
    ),
)
# debootstrap's resolver picks initramfs-tools for the kernel and that conflicts with dracut,
# so the kernel and dracut come in a second stage with apt inside the chroot.
# GRUB as a cloud image has it (issue 6): grub-pc for BIOS disks (grub-install, update-grub and
# the kernel hook that runs it), the x86_64-efi modules for UEFI disks. The lab's disks are
# made bootable by the host (bootloader.py); the guest's GRUB is what the product's first boot
# and a kernel update inside the guest use.
STAGE2_PACKAGES = (
    "linux-image-amd64",
    "dracut",
    "dracut-network",
    "dmsetup",
    "grub-pc",
    "grub-efi-amd64-bin",
)
# grub-pc asks which disks to install to; an image build has none (the lab writes the boot
# loader onto each disk), which these answers say without a prompt.
GRUB_DEBCONF = (
    "grub-pc grub-pc/install_devices multiselect \n"
    "grub-pc grub-pc/install_devices_empty boolean true\n"
)
# What a second kernel package (the same ABI's cloud flavour) is called, for the kernel update
# test: sort -V puts "-cloud-amd64" after "-amd64", so update-grub makes it the default entry.
KERNEL_UPDATE_DIR = "var/cache/erfs-lab"
# Where the base layer keeps that package (beside its rootfs).
KERNEL_UPDATE = "kernel-update"
GUEST_PYTHON = "python3.11"
GUEST_SITE = f"usr/local/lib/{GUEST_PYTHON}/dist-packages"
# The product's runtime dependencies, installed into the guest at the versions the host runs.
RUNTIME_DEPS = ("botocore", "jmespath", "python-dateutil", "six", "urllib3")
# Drivers the initramfs needs whatever the host: virtio disks and NIC, dm-crypt, every root fs.
# Added, not forced: udev and mount load them when a device or filesystem asks (forcing btrfs
# runs its raid6 benchmark, ~4 s of every TCG boot).
ADD_DRIVERS = ("virtio_blk", "virtio_net", "virtio_pci", "dm_crypt", "ext4", "xfs", "btrfs")
PROBE_MODULE = "erfslab-probe"
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
KEEP_PRODUCTS = 6


@dataclass(frozen=True)
class ImageSpec:
    """What goes into a product image. Everything here is part of the cache key.

    ``dracut_modules`` are added with ``dracut --add``; issue 4's ``encryptrootfs`` module is
    picked up from ``src/encryptrootfs/dracut/`` (copied into the chroot when present).
    ``chroot_commands`` run in the chroot after the project is installed and before dracut (e.g.
    ``("encryptrootfs", "install", ...)``). ``config_toml`` becomes
    ``/etc/encryptrootfs/config.toml``. ``lab_probe`` adds the lab-only initramfs probe module.
    """

    name: str = "plain"
    dracut_modules: tuple[str, ...] = ("crypt", "network")
    chroot_commands: tuple[tuple[str, ...], ...] = ()
    config_toml: Optional[str] = None
    lab_probe: bool = False
    extra_dracut_args: tuple[str, ...] = ()
    # A second kernel package (.deb, the cloud flavour of the same ABI) in /var/cache/erfs-lab,
    # for a kernel update inside a booted guest; fetched with the base layer (its apt lists are
    # slimmed away after that) and copied in.
    kernel_update: bool = False
    # The product from the project's Debian packages (`make deb-build`), installed in the
    # chroot as a user installs them (`apt-get install ./encryptrootfs_*.deb ...`: Debian's own
    # python3-botocore and tools), instead of host pip into /usr/local.
    from_packages: bool = False


PLAIN = ImageSpec()
PROBE = ImageSpec(name="probe", dracut_modules=("crypt", "network", PROBE_MODULE), lab_probe=True)


@dataclass(frozen=True)
class Image:
    """A built product image in the cache."""

    spec: ImageSpec
    key: str
    folder: Path
    kver: str
    build_seconds: float
    cached: bool

    @property
    def rootfs(self) -> Path:
        return self.folder / "rootfs"

    @property
    def kernel(self) -> Path:
        return self.folder / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.folder / "initrd.img"

    @property
    def manifest(self) -> Path:
        return self.rootfs / GUEST_MANIFEST


@dataclass(frozen=True)
class BuildLog:
    """Where the output of build commands goes (one file per layer build)."""

    path: Path

    def run(self, argv: Sequence[str], *, timeout: float = 1800, **env: str) -> None:
        with open(self.path, "ab") as f:
            f.write(("+ " + " ".join(argv) + "\n").encode())
            f.flush()
            # A command in the chroot gets a clean environment: the host's TMPDIR, PYTHONPATH
            # or virtualenv PATH mean nothing (or the wrong thing) inside the guest tree.
            base = CHROOT_ENV if argv[0] == "chroot" else dict(os.environ)
            full_env = {**base, **env}
            proc = subprocess.run(
                list(argv),
                stdout=f,
                stderr=subprocess.STDOUT,
                env=full_env,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        if proc.returncode != 0:
            tail = self.path.read_text(errors="replace").splitlines()[-15:]
            raise LabError(
                f"`{' '.join(argv)}` failed with exit code {proc.returncode} while building a lab "
                f"image; the partial build was removed. Last output:\n  " + "\n  ".join(tail),
                hint=f"full log: {self.path}",
            )


def _guest_data() -> Path:
    return Path(str(resources.files("encryptrootfs_lab") / "guest"))


def _mirror() -> str:
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            if line.startswith("deb "):
                return line.split()[1]
    return "http://deb.debian.org/debian"


@contextmanager
def apt_chroot(root: Path) -> Iterator[None]:
    """``root`` ready for apt: the host's resolver, no service started by a package's
    maintainer scripts (policy-rc.d), /proc, /sys and /dev; all of it gone again afterwards."""
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        with chroot_mounts(root):
            yield
    finally:
        policy.unlink()
        (root / "etc/resolv.conf").unlink()


@contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev inside ``root`` for the duration of the block; always unmounted."""
    try:
        run(["mount", "-t", "proc", "proc", root / "proc"])
        for sub in ("sys", "dev"):
            run(["mount", "--rbind", f"/{sub}", root / sub])
            run(["mount", "--make-rslave", root / sub])
        yield
    finally:
        for sub in ("dev", "sys", "proc"):
            run(["umount", "-R", root / sub], check=False)


def _kver(rootfs: Path) -> str:
    versions = sorted(p.name for p in (rootfs / "lib" / "modules").iterdir())
    if not versions:
        raise LabError(f"No kernel in {rootfs}/lib/modules; the base layer is broken.")
    return versions[-1]


# ---------------------------------------------------------------------------------------------
# base layer


def base_key() -> str:
    return digest(["base", BASE_VERSION, SUITE, BASE_PACKAGES, STAGE2_PACKAGES, SLIM_PATHS])


def _slim(root: Path, kver: str) -> None:
    """Drop what no lab guest reads (docs, translations, apt lists, kernel modules for hardware
    QEMU does not emulate), and keep dpkg from putting docs back on later installs.

    Every lab root is copied, written and (on a first boot) encrypted whole, so its size is
    paid in every disk build and every data pass: ~790 MiB before, ~390 MiB after."""
    for rel in SLIM_PATHS:
        target = root / rel.replace("{kver}", kver)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
    _drop_apt_state(root)
    nodoc = root / "etc/dpkg/dpkg.cfg.d/erfs-lab-nodoc"
    nodoc.parent.mkdir(parents=True, exist_ok=True)
    nodoc.write_text("".join(f"path-exclude=/usr/share/{d}/*\n" for d in ("doc", "man", "info")))


def _configure_base(root: Path) -> None:
    (root / "etc/hostname").write_text("erfslab\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 erfslab\n")
    # The real root gets its address from QEMU's DHCP; networkd needs no dbus for that.
    net = root / "etc/systemd/network"
    net.mkdir(parents=True, exist_ok=True)
    (net / "20-dhcp.network").write_text("[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "systemd-networkd.service"
    if not link.is_symlink():
        link.symlink_to("/lib/systemd/system/systemd-networkd.service")
    # Timers that would fire during a test, and a wait-online that would stall the boot;
    # mdadm's shutdown unit waits out its 90 s stop timeout under TCG at every power-off
    # (arrays the tests make are stopped by the kernel at power-off anyway), and its monthly
    # check would fire mid-test.
    for unit in (
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "dpkg-db-backup.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
        "e2scrub_reap.service",
        "systemd-networkd-wait-online.service",
        "mdadm-shutdown.service",
        "mdcheck_start.timer",
        "mdcheck_continue.timer",
        "mdmonitor-oneshot.timer",
    ):
        masked = root / "etc/systemd/system" / unit
        if not masked.is_symlink():
            masked.symlink_to("/dev/null")
    # An empty machine-id: systemd makes one per boot instead of every disk sharing one.
    (root / "etc/machine-id").write_text("")
    for old in (root / "boot").glob("initrd.img*"):
        old.unlink()


def build_base(blog: Optional[BuildLog] = None) -> Path:
    """The base rootfs (cached); returns its folder."""
    key = base_key()
    final = cache_root() / "base" / key
    with locked(f"base-{key}"):
        if final.exists():
            touch(final)
            return final / "rootfs"
        final.parent.mkdir(exist_ok=True)
        blog = blog or BuildLog(cache_root() / "logs" / f"base-{key}.log")
        blog.path.parent.mkdir(exist_ok=True)
        log.info("building the base rootfs %s (debootstrap, ~2-3 min); log: %s", key, blog.path)
        with building(final) as tmp:
            root = tmp / "rootfs"
            blog.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(root),
                    _mirror(),
                ]
            )
            answers = root / "root/erfs-debconf"
            answers.write_text(GRUB_DEBCONF)
            with apt_chroot(root):
                blog.run(["chroot", str(root), "debconf-set-selections", "/root/erfs-debconf"])
                answers.unlink()
                # INITRD=No: skips the kernel postinst's two dracut runs (~1 min each).
                blog.run(
                    [
                        "chroot",
                        str(root),
                        "apt-get",
                        "install",
                        "-y",
                        "--no-install-recommends",
                        *STAGE2_PACKAGES,
                    ],
                    DEBIAN_FRONTEND="noninteractive",
                    INITRD="No",
                )
                blog.run(["chroot", str(root), "apt-get", "clean"])
                _download_kernel_update(root, _kver(root), tmp / KERNEL_UPDATE, blog)
                _slim(root, _kver(root))
                blog.run(["chroot", str(root), "depmod", _kver(root)])
            _configure_base(root)
        touch(final)
        return final / "rootfs"


# ---------------------------------------------------------------------------------------------
# product layer


def _dep_pins() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in RUNTIME_DEPS]


def product_key(spec: ImageSpec) -> str:
    project = project_root()
    return digest(
        [
            "product",
            base_key(),
            spec.name,
            list(spec.dracut_modules),
            [list(c) for c in spec.chroot_commands],
            spec.config_toml,
            spec.lab_probe,
            list(spec.extra_dracut_args),
            spec.kernel_update,
            spec.from_packages,
            tree_digest(project / "debian") if spec.from_packages else None,
            _dep_pins(),
            kernel_cmdline("UUID"),
            tree_digest(project / "src" / "encryptrootfs"),
            (project / "pyproject.toml").read_text(),
            tree_digest(_guest_data()),
            Path(__file__).read_text(),
        ]
    )


def _install_project(root: Path, blog: BuildLog) -> None:
    """Host pip installs the working tree and the runtime deps into the guest's site dir."""
    project = project_root()
    site = root / GUEST_SITE
    site.mkdir(parents=True, exist_ok=True)
    # A copy of just what the wheel needs: building in the checkout would leave build/ there.
    with tempfile.TemporaryDirectory(prefix="erfslab-src-") as tmp:
        src = Path(tmp) / "encryptrootfs"
        (src / "src").mkdir(parents=True)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (project / name).exists():
                shutil.copy(project / name, src / name)
        shutil.copytree(
            project / "src" / "encryptrootfs",
            src / "src" / "encryptrootfs",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        blog.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-warn-script-location",
                "--disable-pip-version-check",
                "--target",
                str(site),
                str(src),
                *_dep_pins(),
            ]
        )
    # pip's --target puts console scripts in <site>/bin with the host interpreter's path.
    shutil.rmtree(site / "bin", ignore_errors=True)
    launcher = root / "usr/local/sbin/encryptrootfs"
    launcher.write_text(
        "#!/usr/bin/python3\nimport sys\n\nfrom encryptrootfs.cli import main\n\nsys.exit(main())\n"
    )
    launcher.chmod(0o755)


def _drop_apt_state(root: Path) -> None:
    """apt's package lists, and the caches (~70 MiB) it builds from them: nothing in a booted
    lab guest installs from the network."""
    for lists in (root / "var/lib/apt/lists").glob("*_*"):
        lists.unlink()
    for cache in (root / "var/cache/apt").glob("*.bin"):
        cache.unlink()


def _install_packages(root: Path, blog: BuildLog) -> None:
    """The project's Debian packages, installed with apt in the chroot as a user does; apt
    fetches what they depend on (Debian's python3-botocore) from the host's mirror."""
    debs = debian_packages()
    inside = root / "root/erfs-debs"
    inside.mkdir()
    for deb in debs.all:
        shutil.copy(deb, inside / deb.name)
    try:
        with apt_chroot(root):
            blog.run(["chroot", str(root), "apt-get", "update", "-qq"])
            blog.run(
                [
                    "chroot",
                    str(root),
                    "apt-get",
                    "install",
                    "-y",
                    "--no-install-recommends",
                    *(f"/root/erfs-debs/{deb.name}" for deb in debs.all),
                ],
                DEBIAN_FRONTEND="noninteractive",
            )
            blog.run(["chroot", str(root), "apt-get", "clean"])
    finally:
        shutil.rmtree(inside)
    _drop_apt_state(root)


def _install_lab_files(root: Path, spec: ImageSpec) -> None:
    data = _guest_data()
    lab = root / "usr/local/lib/erfs-lab"
    lab.mkdir(parents=True, exist_ok=True)
    for name in ("erfs-lab-runner", "erfs-tree"):
        shutil.copy(data / name, lab / name)
        (lab / name).chmod(0o755)
    unit = root / "etc/systemd/system/erfs-lab.service"
    shutil.copy(data / "erfs-lab.service", unit)
    link = root / "etc/systemd/system/multi-user.target.wants/erfs-lab.service"
    link.symlink_to("/etc/systemd/system/erfs-lab.service")
    autologin = root / "etc/systemd/system/serial-getty@ttyS0.service.d"
    autologin.mkdir(parents=True, exist_ok=True)
    (autologin / "autologin.conf").write_text(
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud "
        "115200,57600,38400,9600 %I $TERM\n"
    )
    tree, manifest = cached_tree()
    (root / GUEST_TREE).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(tree), str(root / GUEST_TREE)], check=True)
    shutil.copy(manifest, root / GUEST_MANIFEST)
    modules = root / "usr/lib/dracut/modules.d"
    if spec.lab_probe:
        shutil.copytree(data / "dracut" / f"99{PROBE_MODULE}", modules / f"99{PROBE_MODULE}")
    product_dracut = project_root() / "src" / "encryptrootfs" / "dracut"
    if product_dracut.is_dir():
        # Only the modules the spec asks for: a --no-hostonly build would also pick up any
        # module whose check() says yes, and the plain image must stay the product-free baseline.
        for module in sorted(product_dracut.iterdir()):
            wanted = module.name.lstrip("0123456789") in spec.dracut_modules
            if wanted and (module / "module-setup.sh").exists():
                shutil.copytree(module, modules / module.name, dirs_exist_ok=True)
    if spec.config_toml is not None:
        (root / "etc/encryptrootfs").mkdir(parents=True, exist_ok=True)
        (root / "etc/encryptrootfs/config.toml").write_text(spec.config_toml)


def grub_append_cfg() -> str:
    """grub.cfg lines that set ``$erfs_append`` to this boot's extra kernel arguments, read from
    the SMBIOS OEM string QEMU gets (:func:`encryptrootfs_lab.qemu.smbios_append_value`)."""
    # Offset 4 of an OEM-strings structure is its string count; with the lab's single string
    # that is string number 1, which --get-string returns.
    return (
        'insmod smbios\ninsmod regexp\nset erfs_append=""\n'
        "if smbios --type 11 --get-string 4 --set erfs_oem; then\n"
        f"  regexp --set 1:erfs_append '^{SMBIOS_APPEND_PREFIX}(.*)$' \"$erfs_oem\"\n"
        "fi\n"
    )


def grub_defaults() -> str:
    """/etc/default/grub.d/erfs-lab.cfg: what update-grub in the guest needs to write a grub.cfg
    that boots the lab's way (serial console, the lab's kernel command line, no menu wait)."""
    # root=UUID=... ro come from update-grub itself; the rest is the lab's command line, plus
    # $erfs_append, which GRUB expands when the entry runs.
    args = " ".join(kernel_cmdline("UUID").split()[2:]) + " \\$erfs_append"
    return (
        "# encryptrootfs lab (encryptrootfs_lab.image)\n"
        "GRUB_TIMEOUT=0\nGRUB_DISABLE_RECOVERY=true\nGRUB_DISABLE_OS_PROBER=true\n"
        "GRUB_DISABLE_SUBMENU=y\nGRUB_TERMINAL=serial\n"
        'GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n'
        f'GRUB_CMDLINE_LINUX_DEFAULT=""\nGRUB_CMDLINE_LINUX="{args}"\n'
    )


def _install_grub_config(root: Path) -> None:
    defaults = root / "etc/default/grub.d"
    defaults.mkdir(parents=True, exist_ok=True)
    (defaults / "erfs-lab.cfg").write_text(grub_defaults())
    script = root / "etc/grub.d/01_erfs_lab"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "#!/bin/sh\n# encryptrootfs lab: per-boot kernel arguments\ncat <<'EOF'\n"
        + grub_append_cfg()
        + "EOF\n"
    )
    script.chmod(0o755)


def _download_kernel_update(root: Path, kver: str, target: Path, blog: BuildLog) -> None:
    """The cloud flavour of the image's kernel ABI as a .deb in ``target`` (beside the base
    rootfs, not in it: only the images that ask for it carry it)."""
    if not kver.endswith("-amd64"):
        raise LabError(f"The image's kernel {kver} is not an -amd64 flavour; no update package.")
    package = "linux-image-" + kver[: -len("amd64")] + "cloud-amd64"
    inside = root / "root/erfs-kernel-update"
    inside.mkdir()
    blog.run(
        [
            "chroot",
            str(root),
            "sh",
            "-c",
            f"cd /root/erfs-kernel-update && apt-get download {package}",
        ]
    )
    shutil.move(str(inside), str(target))


def build_image(spec: ImageSpec = PLAIN) -> Image:
    """The product image for ``spec`` (cached); builds the base first when needed."""
    started = time.monotonic()
    key = product_key(spec)
    final = cache_root() / "product" / key
    with locked(f"product-{key}"):
        if final.exists():
            touch(final)
            return Image(spec, key, final, _kver(final / "rootfs"), 0.0, cached=True)
        base = build_base()
        final.parent.mkdir(exist_ok=True)
        blog = BuildLog(cache_root() / "logs" / f"product-{spec.name}-{key}.log")
        blog.path.unlink(missing_ok=True)
        log.info("building the %s image %s (~1.5 min); log: %s", spec.name, key, blog.path)
        with building(final) as tmp:
            root = tmp / "rootfs"
            blog.run(["cp", "-a", "--reflink=auto", str(base), str(root)])
            if spec.from_packages:
                _install_packages(root, blog)
            else:
                _install_project(root, blog)
            _install_lab_files(root, spec)
            _install_grub_config(root)
            kver = _kver(root)
            if spec.kernel_update:
                folder = root / KERNEL_UPDATE_DIR
                folder.mkdir(parents=True, exist_ok=True)
                for deb in sorted((base.parent / KERNEL_UPDATE).glob("*.deb")):
                    shutil.copy(deb, folder / deb.name)
            with chroot_mounts(root):
                for command in spec.chroot_commands:
                    blog.run(["chroot", str(root), *command])
                blog.run(
                    [
                        "chroot",
                        str(root),
                        "dracut",
                        "--force",
                        "--no-hostonly",
                        "--kver",
                        kver,
                        "--add-drivers",
                        " ".join(ADD_DRIVERS),
                        "--add",
                        " ".join(spec.dracut_modules),
                        *spec.extra_dracut_args,
                        "/boot/erfslab-initrd.img",
                    ]
                )
            shutil.move(str(root / "boot/erfslab-initrd.img"), str(tmp / "initrd.img"))
            shutil.copy(root / "boot" / f"vmlinuz-{kver}", tmp / "vmlinuz")
        touch(final)
        seconds = time.monotonic() - started
        (final / "build-seconds").write_text(f"{seconds:.1f}\n")
    prune(final.parent, KEEP_PRODUCTS)
    return Image(spec, key, final, kver, seconds, cached=False)
