"""vm tier fixtures: cached images and disks, per-test overlays, emulators, leak checks.

Images and disks come from the lab cache (built on demand, reused across runs). Each test gets
its own qcow2 overlays, its own emulators and its own work folder; guests run one at a time.
When a test fails, the console tail of every boot it made is attached to its report. At the
end of the session no QEMU (and so no relay) and no emulator started by this run may be left.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from encryptrootfs_lab import qemu
from encryptrootfs_lab.cloud import EmulatedCloud, emulated_cloud
from encryptrootfs_lab.image import PLAIN, PROBE, Image, ImageSpec, build_base, build_image
from encryptrootfs_lab.layout import (
    BTRFS_SHRINK_MIB,
    Disk,
    DiskLayout,
    Filesystem,
    build_disk,
    build_disks,
    raw_view,
)
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.product import ENCRYPT, LAB_KEY_ALIAS, create_lab_key, inspect_script
from support.session_root import EncryptedRoot

BOOTS_KEY = pytest.StashKey[list[Machine]]()
# (host, port) of every emulator this session started
EMULATOR_PORTS: list[int] = []


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _leftovers() -> list[str]:
    left = [f"QEMU process group {g}" for g in sorted(qemu.STARTED_GROUPS) if qemu.group_alive(g)]
    left += [f"emulator on 127.0.0.1:{p}" for p in EMULATOR_PORTS if _port_open(p)]
    return left


def _declared_images(session: pytest.Session) -> list[ImageSpec]:
    """The product images the selected tests' modules declare (their ``IMAGES``), in order."""
    specs: dict[ImageSpec, None] = {}
    for item in session.items:
        for spec in getattr(getattr(item, "module", None), "IMAGES", ()):
            specs[spec] = None
    return list(specs)


@pytest.fixture(scope="session", autouse=True)
def images_built_together(request: pytest.FixtureRequest) -> None:
    """Every image the selected vm tests declare, built before the first of them runs, two at
    a time. A product build is mostly one process at a time (cp, pip, dracut), so on the
    2-core CI machine two builds side by side take little more than one; built on first use,
    one after another, they cost a cold run minutes. Cached images cost nothing here."""
    specs = _declared_images(request.session)
    if not specs:
        return
    build_base()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="image") as pool:
        list(pool.map(build_image, specs))


@pytest.fixture(scope="session")
def plain_image() -> Image:
    return build_image(PLAIN)


@pytest.fixture(scope="session")
def probe_image() -> Image:
    return build_image(PROBE)


_IMAGES: dict[ImageSpec, Image] = {}


@pytest.fixture(scope="session")
def image_for() -> Callable[[ImageSpec], Image]:
    """``image_for(spec)``: the product image for any ImageSpec, built once per session."""

    def get(spec: ImageSpec) -> Image:
        if spec not in _IMAGES:
            _IMAGES[spec] = build_image(spec)
        return _IMAGES[spec]

    return get


@pytest.fixture(scope="session")
def root_disk(plain_image: Image) -> Disk:
    """The default bootable disk: ext4 root on GPT with 64 MiB free after it."""
    return build_disk(DiskLayout(), plain_image)


@contextmanager
def _checked_cloud(scope: str, *, lab_key: bool) -> Iterator[EmulatedCloud]:
    """Both emulators for one ``scope`` (test, module, session), optionally with the lab
    images' key; checked stopped when the scope ends."""
    with emulated_cloud() as c:
        ports = [c.kms.port, c.imds.port]
        EMULATOR_PORTS.extend(ports)
        if lab_key:
            create_lab_key(c.kms)
        yield c
    still = [p for p in ports if _port_open(p)]
    assert not still, f"emulator ports still answering after the {scope}: {still}"


@pytest.fixture
def cloud() -> Iterator[EmulatedCloud]:
    """KMS + IMDS emulators for one test, with request logs."""
    with _checked_cloud("test", lab_key=False) as c:
        yield c


@pytest.fixture(scope="module")
def module_cloud() -> Iterator[EmulatedCloud]:
    """KMS + IMDS emulators shared by one test module (e.g. a disk encrypted once and booted
    by every test: its wrapping key lives in these), with the lab images' key created."""
    with _checked_cloud("module", lab_key=True) as c:
        yield c


# Every xfs/btrfs disk of the default product image that the CI subset boots. They are filled
# in one builder guest boot (tests/vm/test_bad_input_boot.py and test_first_boot.py ask for
# this fixture before their own build_disks call, which then finds them cached): one boot
# instead of one per module. A layout missing here still works, at the price of a boot.
GUEST_FILLED = (
    DiskLayout(fs=Filesystem.XFS, free_after_mib=0),  # refused: XFS cannot shrink
    DiskLayout(fs=Filesystem.XFS),  # grows
    DiskLayout(fs=Filesystem.BTRFS, free_after_mib=0, root_mib=BTRFS_SHRINK_MIB),  # shrinks
)


@pytest.fixture(scope="session")
def filled_disks() -> list[Disk]:
    return build_disks(GUEST_FILLED, build_image(ENCRYPT))


# The session's one first boot of the default product image: a root larger than the guest's
# 1024 MiB of RAM (the data pass never holds the root in memory).
FIRST_BOOT_LAYOUT = DiskLayout(root_mib=1152)


@pytest.fixture(scope="session")
def lab_cloud() -> Iterator[EmulatedCloud]:
    """KMS + IMDS emulators for the whole session, with the lab images' key: the key that
    wraps :func:`encrypted_root` lives here, so every test booting that root uses this cloud
    (and leaves it without faults and with empty logs, see tests/vm/test_faults.py)."""
    with _checked_cloud("session", lab_key=True) as c:
        yield c


@pytest.fixture(scope="session")
def encrypted_root(
    lab_cloud: EmulatedCloud, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EncryptedRoot]:
    """One first boot per session, shared by the flagship first-boot test and every later-boot
    case (a first boot is the most expensive boot there is: the whole root is rewritten)."""
    image = build_image(ENCRYPT)
    plain = build_disk(FIRST_BOOT_LAYOUT, image)
    work = tmp_path_factory.mktemp("encrypted-root")
    lab_cloud.kms.clear_log()
    m = Machine(image, plain, work, forwards=lab_cloud.forwards())
    first = m.boot(inspect_script(), timeout=900, name="first")
    requests = tuple(lab_cloud.kms.requests)
    lab_cloud.kms.clear_log()
    assert first.ok and first.marker("TREE-OK") is not None, first.describe()
    flat = raw_view(m.overlay, "qcow2", work / "encrypted.raw")
    m.overlay.unlink()
    key_arn = lab_cloud.kms.key_arn(LAB_KEY_ALIAS)
    yield EncryptedRoot(
        image, plain, replace(plain, path=flat, cached=False), first, requests, key_arn
    )
    flat.unlink()


@pytest.fixture
def machines(request: pytest.FixtureRequest) -> Iterator[list[Machine]]:
    """Machines made by this test (for the failure report and the leak check)."""
    made: list[Machine] = []
    request.node.stash[BOOTS_KEY] = made
    started = set(qemu.STARTED_GROUPS)
    yield made
    mine = qemu.STARTED_GROUPS - started
    alive = [g for g in mine if qemu.group_alive(g)]
    assert not alive, f"QEMU process groups of this test still alive: {alive}"


# Files this big in a passed test's folder are removed at once: a first boot rewrites the whole
# root into its overlay (~1.5 GiB), and a session holds dozens of such tests on a disk with a
# few tens of GiB free. A failed test keeps everything for the post-mortem.
BIG_FILE_BYTES = 64 * 1024 * 1024
CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.fixture
def new_machine(machines: list[Machine], tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """``new_machine(image, disk, cloud=None) -> Machine`` with its own overlay in tmp_path."""

    def make(image: Image, disk: Disk, cloud: EmulatedCloud | None = None) -> Machine:
        m = Machine(
            image, disk, tmp_path / f"m{len(machines)}", forwards=cloud.forwards() if cloud else ()
        )
        machines.append(m)
        return m

    yield make
    report = request.node.stash.get(CALL_REPORT, None)
    if report is not None and report.passed:
        for f in tmp_path.rglob("*"):
            if f.is_file() and f.stat().st_size >= BIG_FILE_BYTES:
                f.unlink()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    if not report.failed:
        return
    for m in item.stash.get(BOOTS_KEY, []):
        for b in m.boots:
            report.sections.append(
                (
                    f"boot {b.name} ({b.end.value}, {b.wall_seconds:.1f}s)",
                    f"console: {b.console_path}\nresults: {b.results_path}\n"
                    f"--- results ---\n{b.results[-3000:]}\n--- console tail ---\n"
                    f"{b.console_tail(80)}",
                )
            )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not qemu.STARTED_GROUPS and not EMULATOR_PORTS:
        return
    left = _leftovers()
    for g in qemu.STARTED_GROUPS:
        if qemu.group_alive(g):
            os.killpg(g, 9)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if left:
        msg = "vm tier: left behind after the session (now killed): " + ", ".join(left)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        msg = (
            f"vm tier: no QEMU, relay or emulator left ({len(qemu.STARTED_GROUPS)} QEMU runs, "
            f"{len(EMULATOR_PORTS)} emulator servers)"
        )
    if reporter is not None:
        reporter.write_line(msg)
