"""Faults of the cloud and of the header, on the first boot and on a later boot.

A fault that clears within the boot's budget (KMS unreachable then back, throttling bursts,
IMDS failing once or refusing tokens for a while) must not stop the boot: it waits, says why
on the console, and comes up. A fault that cannot clear by waiting (access denied, a context
that does not match, a clock far off, a token that is missing or damaged) fails closed at once:
the root is never mounted, the console names the cause, and the disk is byte-identical. A
foreign token beside ours is skipped.

Later-boot cases share the session's encrypted root (one first boot against the session's
emulated cloud, where the key that wraps it lives: tests/vm/conftest.py); each case boots its
own copy-on-write overlay of it.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from encryptrootfs import luks2
from encryptrootfs.token import TOKEN_TYPE
from encryptrootfs_lab.cloud import GUEST_KMS_URL, EmulatedCloud
from encryptrootfs_lab.image import Image, build_image
from encryptrootfs_lab.layout import Disk, DiskLayout, build_disk, disk_sha256
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.offline import edit_root_header
from encryptrootfs_lab.product import ENCRYPT, inspect_script
from encryptrootfs_lab.qemu import BootResult
from encryptrootfs_lab.testtree import bytes_lost, cached_tree
from support.robustness import Case
from support.session_root import EncryptedRoot

NewMachine = Callable[..., Machine]
IMAGES = (ENCRYPT,)  # built with the session's others (tests/vm/conftest.py)
INSPECT = inspect_script()


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encrypt_image() -> Image:
    return build_image(ENCRYPT)


def _reset(c: EmulatedCloud) -> None:
    c.kms.clear_faults()
    c.kms.set_unreachable(False)
    c.kms.clock_offset_s = 0.0
    c.kms.clear_log()
    c.imds.refuse_tokens = False
    c.imds.disabled = False
    c.imds.delay_s = 0.0
    c.imds.clear_log()


@pytest.fixture
def faulty(lab_cloud: EmulatedCloud) -> Iterator[EmulatedCloud]:
    """The session's cloud (its key wraps the encrypted root), with no fault set and empty
    logs; reset again afterwards."""
    _reset(lab_cloud)
    yield lab_cloud
    _reset(lab_cloud)


@pytest.fixture(scope="module")
def plain_disk(encrypt_image: Image) -> Disk:
    return build_disk(DiskLayout(), encrypt_image)


@pytest.fixture(scope="module")
def encrypted_disk(encrypted_root: EncryptedRoot) -> Disk:
    """The session's root after its first boot: every later-boot case starts here."""
    return encrypted_root.disk


def _with_header(disk: Disk, work: Path, edit: Callable[[Path], None]) -> Disk:
    """A copy of the encrypted disk whose root header ``edit`` changed."""
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "edited.raw"
    shutil.copyfile(disk.path, copy)
    edit_root_header(copy, disk, edit)
    return dataclasses.replace(disk, path=copy)


# -- helpers ---------------------------------------------------------------------------------


def on_console(m: Machine, name: str, pattern: str, action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` once boot ``name`` of ``m`` prints ``pattern`` (a fault that clears)."""
    console = m.workdir / f"{name}.console.log"
    deadline = time.monotonic() + 900

    def watch() -> None:
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                text = console.read_bytes().decode(errors="replace")
            except FileNotFoundError:
                continue
            if pattern in text:
                action()
                return

    t = threading.Thread(target=watch, name=f"watch-{name}", daemon=True)
    t.start()
    return t


def comes_up(r: BootResult, m: Machine, case: Case) -> None:
    """The boot reached the real root on the encrypted device and the tree verified."""
    lost = bytes_lost(r.results, cached_tree()[1])
    if lost is not None:
        case.lost(lost)
    assert r.ok, r.describe()
    assert r.marker("TREE-OK") is not None and lost == 0, r.describe()
    dev = r.marker("ROOTDEV")
    assert dev is not None and dev.fields() == {"dm": "crypt", "uuid": m.disk.root_uuid}, (
        r.describe()
    )


def fails_closed(
    r: BootResult, m: Machine, before: str, tmp_path: Path, case: Case, *causes: str
) -> None:
    """The root was never mounted, the console names the cause, the disk is unchanged."""
    assert r.marker("BEGIN") is None, "the root was mounted:\n" + r.describe()
    for cause in causes:
        assert cause.lower() in r.console.lower(), f"{cause!r} not on the console:\n" + r.describe()
    after = disk_sha256(m.overlay, scratch=tmp_path / "flat.img")
    case.disk_compared(after == before)
    assert after == before, "the disk changed"


def _sha(m: Machine, tmp_path: Path) -> str:
    return disk_sha256(m.overlay, scratch=tmp_path / "flat.img")


# -- first boot ------------------------------------------------------------------------------


@pytest.mark.slow
def test_first_boot_waits_for_kms_unreachable_then_back(
    encrypt_image: Image,
    plain_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
) -> None:
    m = new_machine(encrypt_image, plain_disk, faulty)
    faulty.kms.set_unreachable(True)
    on_console(m, "first", "attempt 1 failed", lambda: faulty.kms.set_unreachable(False))
    r = m.boot(INSPECT, timeout=900, name="first")
    # (through the lab's relay an unreachable KMS is a connection closed at once)
    assert (
        "new data key from KMS: attempt 1 failed: the connection to KMS at "
        f"{GUEST_KMS_URL} failed" in r.console
    ), r.describe()
    comes_up(r, m, robustness)


@pytest.mark.slow
def test_first_boot_rides_out_throttling_bursts(
    encrypt_image: Image,
    plain_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
) -> None:
    m = new_machine(encrypt_image, plain_disk, faulty)
    faulty.kms.inject("GenerateDataKey", "ThrottlingException", times=6)
    faulty.kms.inject("Decrypt", "ThrottlingException", times=6)
    r = m.boot(INSPECT, timeout=900, name="first")
    comes_up(r, m, robustness)
    throttled = [q for q in faulty.kms.requests if q.error_code == "ThrottlingException"]
    assert len(throttled) == 12, [q.action for q in throttled]


@pytest.mark.slow
def test_first_boot_survives_imds_failing_once(
    encrypt_image: Image,
    plain_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
) -> None:
    m = new_machine(encrypt_image, plain_disk, faulty)
    faulty.imds.fail_next(500, times=1, path_prefix="/latest/meta-data/iam")
    r = m.boot(INSPECT, timeout=900, name="first")
    comes_up(r, m, robustness)
    assert any(q.status == 500 for q in faulty.imds.requests), faulty.imds.requests


def test_first_boot_kms_access_denied_changes_nothing(
    encrypt_image: Image,
    plain_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = new_machine(encrypt_image, plain_disk, faulty)
    before = _sha(m, tmp_path)
    faulty.kms.deny("GenerateDataKey")
    r = m.boot(INSPECT, timeout=600, name="first")
    fails_closed(
        r, m, before, tmp_path, robustness, "KMS denied GenerateDataKey", "nothing was changed"
    )


@pytest.mark.slow
def test_first_boot_context_mismatch_changes_nothing(
    encrypt_image: Image,
    plain_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    """The proof that the new key unwraps (before anything is written) meets a KMS that says
    the context does not match: nothing is written."""
    m = new_machine(encrypt_image, plain_disk, faulty)
    before = _sha(m, tmp_path)
    faulty.kms.inject("Decrypt", "InvalidCiphertextException", times=1000)
    r = m.boot(INSPECT, timeout=600, name="first")
    fails_closed(
        r,
        m,
        before,
        tmp_path,
        robustness,
        "encryption context does not match",
        "nothing was changed",
    )


@pytest.mark.parametrize(
    ("rtc", "cause"),
    [
        # systemd moves a clock older than its build date up to that date (bookworm: 2026-04),
        # still months off: KMS rejects the signature and the boot says it is the clock
        ("2020-01-01", "the clock of this machine is probably wrong (it says 20"),
        pytest.param(
            "2036-06-01",
            "the clock of this machine is probably wrong (it says 2036",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["2020", "2036"],
)
def test_first_boot_with_the_clock_far_off_changes_nothing(
    rtc: str,
    cause: str,
    encrypt_image: Image,
    plain_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = new_machine(encrypt_image, plain_disk, faulty)
    before = _sha(m, tmp_path)
    r = m.boot(INSPECT, timeout=600, name="first", rtc_base=rtc)
    fails_closed(r, m, before, tmp_path, robustness, cause, ", KMS says 20")


# -- later boots -----------------------------------------------------------------------------


def test_later_boot_waits_for_kms_unreachable_then_back(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
) -> None:
    m = new_machine(encrypt_image, encrypted_disk, faulty)
    faulty.kms.set_unreachable(True)
    on_console(m, "later", "attempt 2 failed", lambda: faulty.kms.set_unreachable(False))
    r = m.boot(INSPECT, timeout=900, name="later")
    assert f"attempt 2 failed: the connection to KMS at {GUEST_KMS_URL} failed" in r.console, (
        r.describe()
    )
    comes_up(r, m, robustness)


@pytest.mark.slow
def test_later_boot_with_kms_gone_for_the_whole_budget_fails_closed(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    """KMS never comes back: after `[boot] unlock_timeout` (120 s in the lab) the boot
    stops, says how long it tried and why, and the disk is untouched."""
    m = new_machine(encrypt_image, encrypted_disk, faulty)
    before = _sha(m, tmp_path)
    faulty.kms.set_unreachable(True)
    r = m.boot(INSPECT, timeout=900, name="later")
    fails_closed(
        r,
        m,
        before,
        tmp_path,
        robustness,
        "Could not unwrap the root key within 120 s",
        f"the connection to KMS at {GUEST_KMS_URL} failed",
        "The root stays locked",
    )


@pytest.mark.slow
def test_later_boot_rides_out_throttling_bursts(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
) -> None:
    m = new_machine(encrypt_image, encrypted_disk, faulty)
    faulty.kms.inject("Decrypt", "ThrottlingException", times=10)
    r = m.boot(INSPECT, timeout=900, name="later")
    comes_up(r, m, robustness)
    codes = [q.error_code for q in faulty.kms.requests_for("Decrypt")]
    assert codes.count("ThrottlingException") == 10 and codes[-1] is None, codes


def test_later_boot_kms_access_denied_fails_closed(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = new_machine(encrypt_image, encrypted_disk, faulty)
    before = _sha(m, tmp_path)
    faulty.kms.deny("Decrypt")
    r = m.boot(INSPECT, timeout=600, name="later")
    fails_closed(r, m, before, tmp_path, robustness, "KMS denied Decrypt", "The root stays locked")


def test_later_boot_context_mismatch_fails_closed(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    """The token's encryption context was altered: KMS refuses to unwrap."""

    def alter_context(header: Path) -> None:
        (tid,) = luks2.read_header(header).token_ids(TOKEN_TYPE)
        token = dict(luks2.export_token(header, tid))
        token["encryption_context"] = {**token["encryption_context"], "fleet": "other"}
        luks2.import_token(header, token, token_id=tid, replace=True)

    disk = _with_header(encrypted_disk, tmp_path / "disk", alter_context)
    m = new_machine(encrypt_image, disk, faulty)
    before = _sha(m, tmp_path)
    r = m.boot(INSPECT, timeout=600, name="later")
    fails_closed(
        r,
        m,
        before,
        tmp_path,
        robustness,
        "encryption context does not match",
        "The root stays locked",
    )


@pytest.mark.slow
def test_later_boot_imds_refusing_tokens_fails_closed(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    """HTTP 403 on the token PUT is IMDS disabled (or hop-limited) for the instance: a setting,
    not a passing fault, so the boot stops at once and says which."""
    m = new_machine(encrypt_image, encrypted_disk, faulty)
    before = _sha(m, tmp_path)
    faulty.imds.refuse_tokens = True
    r = m.boot(INSPECT, timeout=600, name="later")
    fails_closed(
        r,
        m,
        before,
        tmp_path,
        robustness,
        "refused to issue an IMDSv2 session token (HTTP 403)",
        "The root stays locked",
    )


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["not-answering", "fail-once"])
def test_later_boot_imds_faults(
    fault: str,
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
) -> None:
    """IMDS not answering for a while, or failing once: the boot says it is waiting on IMDS
    and comes up when IMDS does."""
    m = new_machine(encrypt_image, encrypted_disk, faulty)
    imds = faulty.imds
    if fault == "not-answering":
        imds.delay_s = 30.0
        on_console(m, "later", "attempt 1 failed", lambda: setattr(imds, "delay_s", 0.0))
        said = "did not answer"
    else:
        imds.fail_next(500, times=1)
        said = ""
    r = m.boot(INSPECT, timeout=900, name="later")
    assert said in r.console, r.describe()
    comes_up(r, m, robustness)
    if fault == "fail-once":
        assert any(q.status == 500 for q in imds.requests), imds.requests


@pytest.mark.slow
def test_later_boot_with_the_token_missing_fails_closed(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    def remove(header: Path) -> None:
        (tid,) = luks2.read_header(header).token_ids(TOKEN_TYPE)
        luks2.remove_token(header, tid)

    disk = _with_header(encrypted_disk, tmp_path / "disk", remove)
    m = new_machine(encrypt_image, disk, faulty)
    before = _sha(m, tmp_path)
    r = m.boot(INSPECT, timeout=600, name="later")
    # root=UUID= names the filesystem inside; without the token nothing says which LUKS2
    # device holds it, so the boot cannot even find its root, and says so.
    fails_closed(r, m, before, tmp_path, robustness, "No partition matches the root selector")


def test_later_boot_with_the_token_corrupted_fails_closed(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    def corrupt(header: Path) -> None:
        (tid,) = luks2.read_header(header).token_ids(TOKEN_TYPE)
        token = dict(luks2.export_token(header, tid))
        token["ciphertext"] = "not base64 at all!"
        luks2.import_token(header, token, token_id=tid, replace=True)

    disk = _with_header(encrypted_disk, tmp_path / "disk", corrupt)
    m = new_machine(encrypt_image, disk, faulty)
    before = _sha(m, tmp_path)
    r = m.boot(INSPECT, timeout=600, name="later")
    fails_closed(r, m, before, tmp_path, robustness, "unreadable encryptrootfs token", "ciphertext")


def test_later_boot_skips_a_foreign_token(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    def add_foreign(header: Path) -> None:
        # clevis' token (cryptsetup has no plugin that checks its fields) on our keyslot
        luks2.import_token(
            header,
            {"type": "clevis", "keyslots": ["0"], "jwe": {"protected": "eyJhbGciOiJFQ0RILUVTIn0"}},
        )

    disk = _with_header(encrypted_disk, tmp_path / "disk", add_foreign)
    m = new_machine(encrypt_image, disk, faulty)
    r = m.boot(INSPECT, timeout=600, name="later")
    comes_up(r, m, robustness)
    assert [q.action for q in faulty.kms.requests] == ["Decrypt"]


def test_later_boot_with_the_clock_far_off_fails_closed(
    encrypt_image: Image,
    encrypted_disk: Disk,
    faulty: EmulatedCloud,
    new_machine: NewMachine,
    robustness: Case,
    tmp_path: Path,
) -> None:
    m = new_machine(encrypt_image, encrypted_disk, faulty)
    before = _sha(m, tmp_path)
    r = m.boot(INSPECT, timeout=600, name="later", rtc_base="2020-01-01")
    # (systemd may have moved a clock older than its own build date up to that date)
    fails_closed(
        r,
        m,
        before,
        tmp_path,
        robustness,
        "InvalidSignatureException",
        "the clock of this machine is probably wrong (it says 20",
        ", KMS says 20",
    )
