"""Power cuts at every stage of the first boot: the next boots finish the job, nothing is lost.

Each test cuts the power (SIGKILL of QEMU, with flushes honoured so only what the guest had not
flushed is lost) at one point of the first boot, boots again (as often as needed) until the
root is encrypted, and then proves three things: the guest's test tree verifies against its
manifest, the filesystem's own read-only checker finds it clean (run on the host on the
decrypted root, see encryptrootfs_lab.offline), and every boot after a cut said where it
found the conversion. Exact points come from ``rd.encryptrootfs.break=<stage>``; "during" a
stage means a cut a short delay after the console line that starts it.

Random instants come from a seed printed in the test output; set ENCRYPTROOTFS_CUT_SEED to
replay a run.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from encryptrootfs_lab.cloud import EmulatedCloud
from encryptrootfs_lab.image import Image, build_image
from encryptrootfs_lab.layout import BTRFS_SHRINK_MIB, Disk, DiskLayout, Filesystem, build_disks
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.offline import check_encrypted_root, last_line
from encryptrootfs_lab.product import ENCRYPT, create_lab_key, encrypt_spec, inspect_script
from encryptrootfs_lab.qemu import BootEnd, BootResult
from encryptrootfs_lab.testtree import bytes_lost, cached_tree
from support.robustness import Case

NewMachine = Callable[..., Machine]
IMAGES = (ENCRYPT,)  # built with the session's others (tests/vm/conftest.py)
INSPECT = inspect_script()
MIB = 1024 * 1024

LAYOUTS = {
    "ext4-grow": DiskLayout(),  # 64 MiB free after the root: the partition grows
    "ext4-shrink": DiskLayout(free_after_mib=0),  # no free space: resize2fs shrinks
    "btrfs-shrink": DiskLayout(fs=Filesystem.BTRFS, free_after_mib=0, root_mib=BTRFS_SHRINK_MIB),
    # Five cuts of up to 3 s each must all land inside the data pass (~40-50 MiB/s under TCG):
    # a root with more to encrypt than five cuts can cover (the same disk as the flagship
    # first boot's in tests/vm/test_first_boot.py, so the cache holds one).
    "ext4-large": DiskLayout(root_mib=1152),
}

SEED = int(os.environ.get("ENCRYPTROOTFS_CUT_SEED", str(int(time.time()))))

# What the boot after a cut says it found (decide.py reasons, as printed on the console).
FRESH = "(encrypt)"  # a plain root, or a plan record with the head intact: start again
RESUME = "encryption of the root was interrupted (resume)"
CUSTODY = "the token was not: taking the wrapped key from the plan record (finish-custody)"
UNLOCK = "the root is encrypted (unlock)"


@dataclass(frozen=True)
class Cut:
    """Where one boot is cut: ``kill_delay`` seconds after the console matches ``pattern``."""

    label: str
    pattern: str
    delay: float = 0.0
    append: tuple[str, ...] = ()

    @staticmethod
    def after(stage: str) -> Cut:
        """Exactly after a first-boot stage (the boot stops there and waits)."""
        return Cut(
            f"after {stage}",
            rf"rd\.encryptrootfs\.break={stage}: stopped",
            0.5,
            (f"rd.encryptrootfs.break={stage}",),
        )


@pytest.fixture(scope="module")
def encrypt_image() -> Image:
    return build_image(ENCRYPT)


@pytest.fixture(scope="module")
def grow_image() -> Image:
    return build_image(encrypt_spec("encrypt-grow", grow=True))


class _Disks(dict[str, Disk]):
    """Disks built on first use: a btrfs disk costs a builder boot, only the tests that
    use it should pay for it."""

    def __init__(self, image: Image) -> None:
        super().__init__()
        self.image = image

    def __missing__(self, name: str) -> Disk:
        (disk,) = build_disks([LAYOUTS[name]], self.image)
        self[name] = disk
        return disk


@pytest.fixture(scope="module")
def disks(encrypt_image: Image) -> dict[str, Disk]:
    return _Disks(encrypt_image)


def _said(r: BootResult, text: str) -> bool:
    return text in r.console


def cut_and_recover(
    m: Machine,
    cloud: EmulatedCloud,
    case: Case,
    cuts: Sequence[Cut],
    tmp_path: Path,
    *,
    expect_after: Sequence[str | tuple[str, ...]],
) -> BootResult:
    """Boot with each cut in turn, then boot until the machine comes up; check the data."""
    assert len(expect_after) == len(cuts)
    for i, cut in enumerate(cuts):
        r = m.boot(
            None,
            append=cut.append,
            kill_on_console=cut.pattern,
            kill_delay=cut.delay,
            timeout=900,
            name=f"cut{i + 1}",
        )
        assert r.end is BootEnd.KILLED, f"cut {cut.label!r} never happened:\n{r.describe()}"
        case.note(f"cut {i + 1}: {cut.label} ({r.kill_reason})")
    final: BootResult | None = None
    for attempt in range(3):
        r = m.boot(INSPECT, timeout=900, name=f"after{attempt + 1}")
        if r.ok:
            final = r
            break
    boots_after = m.boots[len(cuts) :]
    assert final is not None, (
        "the machine did not come up after the cuts:\n" + m.boots[-1].describe()
    )
    # Where each boot after a cut found the conversion, and that it went on from there.
    for i, want in enumerate(expect_after):
        seen = m.boots[i + 1]
        options = (want,) if isinstance(want, str) else want
        assert any(_said(seen, w) for w in options), (
            f"boot after cut {i + 1}: expected one of {options!r}\n{seen.describe()}"
        )
    lost = bytes_lost(final.results, cached_tree()[1])
    assert lost is not None, final.describe()
    case.lost(lost)
    assert final.marker("TREE-OK") is not None and lost == 0, final.describe()
    dev = final.marker("ROOTDEV")
    assert dev is not None and dev.fields() == {"dm": "crypt", "uuid": m.disk.root_uuid}, (
        final.describe()
    )
    check = check_encrypted_root(m.overlay, m.disk, cloud.kms, tmp_path / "flat.img")
    case.note(f"fsck: {last_line(check)}; {len(boots_after)} boot(s) to finish")
    assert check.clean, check.output[-3000:]
    return final


def _machine(image: Image, disk: Disk, cloud: EmulatedCloud, new_machine: NewMachine) -> Machine:
    create_lab_key(cloud.kms)
    m: Machine = new_machine(image, disk, cloud)
    return m


@pytest.mark.slow
def test_cut_during_preflight(
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = _machine(encrypt_image, disks["ext4-grow"], cloud, new_machine)
    cut = Cut("during preflight", r"first boot: converting the ext4 root", 1.0)
    cut_and_recover(m, cloud, robustness, [cut], tmp_path, expect_after=[FRESH])


@pytest.mark.slow
@pytest.mark.parametrize(
    "cut",
    [
        Cut("during partition growth", r"growing the partition by 32 MiB", 0.2),
        Cut.after("room"),
    ],
    ids=["during", "after"],
)
def test_cut_during_partition_growth(
    cut: Cut,
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    """Cut before sfdisk's write lands, the next boot grows the partition; after it, the
    next boot finds the room and goes on."""
    m = _machine(encrypt_image, disks["ext4-grow"], cloud, new_machine)
    cut_and_recover(m, cloud, robustness, [cut], tmp_path, expect_after=[FRESH])
    again = m.boots[1].console
    if cut.append:  # the partition was grown before the cut: not grown twice
        assert "there is room already" in again, m.boots[1].describe()


@pytest.mark.parametrize(
    ("name", "pattern", "delay"),
    [
        # resize2fs itself, after the e2fsck -p that precedes it
        ("ext4-shrink", r"resize2fs to \d+ MiB", 0.3),
        pytest.param("btrfs-shrink", r"shrinking btrfs to", 1.0, marks=pytest.mark.slow),
    ],
    ids=["ext4", "btrfs"],
)
def test_cut_during_filesystem_shrink(
    name: str,
    pattern: str,
    delay: float,
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = _machine(encrypt_image, disks[name], cloud, new_machine)
    cut = Cut("during filesystem shrink", pattern, delay)
    cut_and_recover(m, cloud, robustness, [cut], tmp_path, expect_after=[FRESH])


@pytest.mark.slow
def test_cut_after_the_filesystem_shrink(
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = _machine(encrypt_image, disks["ext4-shrink"], cloud, new_machine)
    cut_and_recover(m, cloud, robustness, [Cut.after("room")], tmp_path, expect_after=[FRESH])
    assert "there is room already" in m.boots[1].console, m.boots[1].describe()


def test_cut_after_the_header_and_before_the_token(
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = _machine(encrypt_image, disks["ext4-grow"], cloud, new_machine)
    cut_and_recover(m, cloud, robustness, [Cut.after("header")], tmp_path, expect_after=[CUSTODY])


@pytest.mark.slow
def test_cut_while_the_header_is_written(
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = _machine(encrypt_image, disks["ext4-grow"], cloud, new_machine)
    cut = Cut("while --init-only writes the header", r"writing the LUKS2 header", 0.3)
    # Depending on how far cryptsetup got: the head restored, custody finished, or a restart.
    found = (FRESH, "(restore-head)", "(finish-custody)", RESUME)
    final = cut_and_recover(m, cloud, robustness, [cut], tmp_path, expect_after=[found])
    assert final.ok


@pytest.mark.slow
def test_cut_after_the_token_and_before_the_data_pass(
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = _machine(encrypt_image, disks["ext4-grow"], cloud, new_machine)
    cut_and_recover(m, cloud, robustness, [Cut.after("token")], tmp_path, expect_after=[RESUME])


def test_five_cuts_in_a_row_during_the_data_pass(
    encrypt_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    """Five random instants, each in a boot that resumes the previous cut's data pass (so
    also: cut twice, and more, in a row)."""
    rng = random.Random(SEED)
    delays = [round(rng.uniform(1.0, 3.0), 1) for _ in range(5)]
    print(f"ENCRYPTROOTFS_CUT_SEED={SEED}: cuts {delays} s into the data pass")
    robustness.note(f"seed {SEED}, delays {delays}")
    m = _machine(encrypt_image, disks["ext4-large"], cloud, new_machine)
    cuts = [Cut(f"{d} s into the data pass", r"encrypting the data in place", d) for d in delays]
    final = cut_and_recover(m, cloud, robustness, cuts, tmp_path, expect_after=[RESUME] * 5)
    # Each cut landed inside the pass: the boot after it resumed, and progress moved on.
    journal = "\n".join(x.value for x in final.all("JOURNAL"))
    assert "encryption finished" in journal, journal


@pytest.mark.slow
def test_cut_during_the_optional_grow(
    grow_image: Image,
    disks: dict[str, Disk],
    cloud: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    """``grow = true``: cut after the partition was grown and before the mapping and the
    filesystem followed, then while they follow; the next boot finishes the grow."""
    m = _machine(grow_image, disks["ext4-grow"], cloud, new_machine)
    cuts = [Cut.after("grow")]
    final = cut_and_recover(m, cloud, robustness, cuts, tmp_path, expect_after=[UNLOCK])
    journal = "\n".join(x.value for x in final.all("JOURNAL"))
    assert "ext4 grown from" in journal, journal
