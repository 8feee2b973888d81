"""Operating an encrypted machine, booted: key rotation (``rewrap``) and a second wrapped copy
in another region (``enroll --copy``).

The module encrypts one disk on a first boot; each test boots its own overlay of it, runs the
operator command in the real root (as an operator would over SSH), and checks the next boot
from the KMS side: which operations reached KMS, with which key, in which region. KMS runs in
two regions of one account behind the guest's one KMS address (encryptrootfs_lab.cloud).
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from encryptrootfs_lab.cloud import DEFAULT_REGION, EmulatedCloud, emulated_cloud
from encryptrootfs_lab.image import Image, build_image
from encryptrootfs_lab.layout import Disk, DiskLayout, build_disk, raw_view
from encryptrootfs_lab.machine import Machine
from encryptrootfs_lab.product import ENCRYPT, create_lab_key, inspect_script
from encryptrootfs_lab.qemu import BootResult

NewMachine = Callable[..., Machine]
INSPECT = inspect_script()
ROOT = "/dev/vda1"
OTHER_REGION = "us-east-1"

TOKENS = f"""\
echo "ERFS-TOKENS $(encryptrootfs token show {ROOT} --json | tr -d '\\n ')"
"""


@pytest.fixture(scope="module")
def image() -> Image:
    return build_image(ENCRYPT)


@pytest.fixture(scope="module")
def regions() -> Iterator[EmulatedCloud]:
    """KMS in the instance's region and in OTHER_REGION (one account) behind one guest
    address; checked stopped after the module."""
    with emulated_cloud(more_regions=(OTHER_REGION,)) as c:
        ports = c.ports
        yield c
    still = [p for p in ports if _port_open(p)]
    assert not still, f"emulator ports still answering after the module: {still}"


@pytest.fixture(scope="module")
def lab_key(regions: EmulatedCloud) -> str:
    """The ARN of the key the image's configuration names (in the first region)."""
    return create_lab_key(regions.kms)


@pytest.fixture
def cloud2(regions: EmulatedCloud) -> Iterator[EmulatedCloud]:
    """The module's clouds with every region up and empty logs, before and after."""
    _reset(regions)
    yield regions
    _reset(regions)


def _reset(c: EmulatedCloud) -> None:
    for kms in c.kms_regions.values():
        kms.set_unreachable(False)
        kms.clear_faults()
        kms.clear_log()


@pytest.fixture(scope="module")
def encrypted_disk(
    image: Image, regions: EmulatedCloud, lab_key: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Disk]:
    """A disk after its first boot (wrapped by the lab key in the first region), flattened:
    each test boots its own overlay of it."""
    plain = build_disk(DiskLayout(), image)
    work = tmp_path_factory.mktemp("encrypted")
    m = Machine(image, plain, work, forwards=regions.forwards())
    r = m.boot(INSPECT, timeout=900, name="first")
    _comes_up_encrypted(r, m)
    flat = raw_view(m.overlay, "qcow2", work / "encrypted.raw")
    m.overlay.unlink()
    yield dataclasses.replace(plain, path=flat, cached=False)
    flat.unlink()  # 1.5 GiB


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tokens(r: BootResult) -> list[dict[str, Any]]:
    m = r.marker("TOKENS")
    assert m is not None, r.describe()
    shown = json.loads(m.value)
    return [t for t in shown["tokens"] if t.get("type") == "encryptrootfs"]


def _comes_up_encrypted(r: BootResult, m: Machine) -> None:
    assert r.ok, r.describe()
    dev = r.marker("ROOTDEV")
    assert dev is not None and dev.fields() == {"dm": "crypt", "uuid": m.disk.root_uuid}, (
        r.describe()
    )


# test-all only: a whole first boot for this module, ~7 min of CI's vm budget (rewrap's
# kill-at-every-step safety is proven in the header tier, tests/header/test_rewrap.py).
@pytest.mark.slow
def test_after_rewrap_the_next_boot_decrypts_with_the_new_key_only(
    image: Image,
    encrypted_disk: Disk,
    cloud2: EmulatedCloud,
    lab_key: str,
    new_machine: NewMachine,
) -> None:
    cloud, old = cloud2, lab_key
    new = cloud.kms.create_key(description="the rotated key")
    m = new_machine(image, encrypted_disk, cloud)

    rewrap = f"encryptrootfs rewrap {ROOT} --key-id {new}\n" + TOKENS
    first = m.boot(rewrap, timeout=600, name="rewrap")
    assert first.ok, first.describe()
    (token,) = _tokens(first)
    assert token["key_id"] == new and token["region"] == DEFAULT_REGION, token
    # rewrap itself: the old key unwrapped, the new one wrapped and proven by a Decrypt
    rewrap_log = [(q.action, q.key_arn) for q in cloud.kms.requests]
    assert ("Encrypt", new) in rewrap_log and ("Decrypt", new) in rewrap_log, rewrap_log

    cloud.kms.clear_log()
    second = m.boot(INSPECT, timeout=600, name="after")
    _comes_up_encrypted(second, m)
    seen = [(q.action, q.key_arn, q.status) for q in cloud.kms.requests]
    assert seen and set(seen) == {("Decrypt", new, 200)}, seen
    assert all(q.key_arn != old for q in cloud.kms.requests), seen


# test-all only, like rewrap above (same first boot; ~3.5 min each).
@pytest.mark.slow
def test_with_the_first_region_down_the_copy_in_the_second_unlocks(
    image: Image,
    encrypted_disk: Disk,
    cloud2: EmulatedCloud,
    lab_key: str,
    new_machine: NewMachine,
) -> None:
    two_regions, first_key = cloud2, lab_key
    first_kms, second_kms = two_regions.kms, two_regions.kms_in(OTHER_REGION)
    second_key = second_kms.create_key(description="the copy's key")
    m = new_machine(image, encrypted_disk, two_regions)

    copy = (
        f"encryptrootfs enroll {ROOT} --copy --key-id {second_key} --region {OTHER_REGION}\n"
    ) + TOKENS
    first = m.boot(copy, timeout=600, name="copy")
    assert first.ok, first.describe()
    wrapped = [(t["key_id"], t["region"]) for t in _tokens(first)]
    assert sorted(wrapped) == sorted([(first_key, DEFAULT_REGION), (second_key, OTHER_REGION)]), (
        wrapped
    )
    assert two_regions.router is not None and not two_regions.router.unknown_regions

    first_kms.set_unreachable(True)
    first_kms.clear_log()
    second_kms.clear_log()
    second = m.boot(INSPECT, timeout=600, name="after")
    _comes_up_encrypted(second, m)
    said = second.console + second.results
    # the copy in the first region was tried and failed, the second one worked, and both say so
    assert f"unwrap with {first_key} ({DEFAULT_REGION}): attempt 1 failed" in said, (
        second.describe()
    )
    assert f"unwrap with {second_key} ({OTHER_REGION}): done on attempt 1" in said, (
        second.describe()
    )
    assert first_kms.requests == [], "the first region was down, yet its emulator saw requests"
    seen = [(q.action, q.key_arn, q.region, q.status) for q in second_kms.requests]
    assert seen and set(seen) == {("Decrypt", second_key, OTHER_REGION, 200)}, seen
