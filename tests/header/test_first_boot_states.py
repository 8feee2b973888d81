"""Power cuts around `--init-only`, replayed on file-backed images with real cryptsetup.

Each test stops the first boot at one instant (by doing the stages up to there by hand), then
lets the planner look at the image as the next boot would, and checks that the action it picks
finishes the job with nothing lost.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import devices, luks2, plan_record
from encryptrootfs.boot import first_boot
from encryptrootfs.boot.decide import Action, decide
from encryptrootfs.config import parse_config
from encryptrootfs.devices import Partition
from encryptrootfs.errors import RefusedError
from encryptrootfs.plan_record import REDUCE_DEVICE_SIZE, PlanRecord
from encryptrootfs.providers.aws_kms import AwsKmsProvider
from encryptrootfs.providers.base import NewKey
from encryptrootfs.run import run
from encryptrootfs.token import token_to_json
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from support.emulators import provider

MIB = 1024 * 1024
SIZE = 96 * MIB
# Only the retry budget of the boot matters here; the provider is built by the fixture.
CONFIG = parse_config(
    {
        "providers": {"aws_kms": {"key_id": "alias/encryptrootfs-test"}},
        "boot": {"unlock_timeout": 30},
    },
    source="test",
)


@pytest.fixture
def kms_provider(kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> AwsKmsProvider:
    return provider(kms, imds, "alias/encryptrootfs-test")


def probe(image: Path) -> Partition:
    return devices.probe(str(image), SIZE)


def start_first_boot(image: Path, p: AwsKmsProvider) -> tuple[NewKey, PlanRecord]:
    """Stages 1-3 as the boot does them: verified new key, plan record on the disk."""
    part = probe(image)
    luks_uuid = str(uuid.uuid4())
    key = first_boot.verified_new_key(p, luks_uuid)
    token = first_boot.new_token(key.wrapped, 0, part)
    record = PlanRecord(
        luks_uuid,
        SIZE,
        "ext4",
        part.signature.uuid,
        part.signature.label,
        plan_record.head_sha256(str(image)),
        token_to_json(token),
    )
    plan_record.write(str(image), record)
    return key, record


def init_header(image: Path, key: NewKey, record: PlanRecord) -> None:
    luks2.reencrypt_encrypt_init(
        image, key.plaintext, uuid=record.luks_uuid, reduce_device_size=REDUCE_DEVICE_SIZE
    )


def fsck_clean(image: Path) -> bool:
    return run(["e2fsck", "-n", "-f", str(image)], check=False).returncode == 0


def assert_files_intact(image: Path, ext4: Any, images: Any) -> None:
    for inside, digest in ext4.files.items():
        assert hashlib.sha256(images.read_file_in_ext4(image, inside)).hexdigest() == digest


def test_cut_before_the_header_starts_again(
    make_ext4_image: Any, kms_provider: AwsKmsProvider
) -> None:
    ext4 = make_ext4_image(SIZE)
    key, _ = start_first_boot(ext4.path, kms_provider)
    key.wipe()
    d = decide("x", probe(ext4.path), first_boot_enabled=True)
    assert d.action is Action.ENCRYPT
    assert "stopped before the LUKS2 header was written" in d.reason


def test_cut_between_header_and_token_is_finished_from_the_plan_record(
    make_ext4_image: Any, kms_provider: AwsKmsProvider, images: Any, tmp_path: Path
) -> None:
    ext4 = make_ext4_image(SIZE)
    key, record = start_first_boot(ext4.path, kms_provider)
    init_header(ext4.path, key, record)
    key.wipe()  # the power cut: the plaintext key is gone with the RAM

    part = probe(ext4.path)
    assert decide("x", part, first_boot_enabled=True).action is Action.FINISH_CUSTODY
    assert first_boot.finish_custody(part, kms_provider, CONFIG) is True

    part = probe(ext4.path)
    assert part.luks is not None and part.luks.tokens
    assert decide("x", part, first_boot_enabled=True).action is Action.RESUME

    # The resumed data pass, as a later boot runs it, with the key unwrapped from the token.
    unwrapped = kms_provider.unwrap(part.luks.tokens[0].wrapped)
    luks2.reencrypt_resume(ext4.path, unwrapped, force_offline=True)
    part = probe(ext4.path)
    assert part.luks is not None and not part.luks.reencryption_pending
    assert decide("x", part, first_boot_enabled=True).action is Action.UNLOCK
    assert not images.contains(ext4.path, images.marker)

    images.decrypt(ext4.path, bytes(unwrapped), tmp_path)
    assert fsck_clean(ext4.path)
    assert_files_intact(ext4.path, ext4, images)


def test_torn_header_write_is_undone_from_the_moved_copy(
    make_ext4_image: Any, kms_provider: AwsKmsProvider, images: Any
) -> None:
    ext4 = make_ext4_image(SIZE)
    key, record = start_first_boot(ext4.path, kms_provider)
    init_header(ext4.path, key, record)
    key.wipe()
    # The header area was being written when the power went: both LUKS2 header copies are
    # gone and the keyslot area is half written.
    with open(ext4.path, "r+b") as f:
        f.write(b"\x5a" * (8 * MIB))

    part = probe(ext4.path)
    assert part.signature.type == ""
    d = decide("x", part, first_boot_enabled=True)
    assert d.action is Action.RESTORE_HEAD
    first_boot.restore_head(part)

    part = probe(ext4.path)
    assert part.signature.type == "ext4" and part.record is None
    assert decide("x", part, first_boot_enabled=True).action is Action.ENCRYPT
    assert fsck_clean(ext4.path)
    assert_files_intact(ext4.path, ext4, images)


def test_torn_keyslot_area_falls_back_to_restoring_the_head(
    make_ext4_image: Any, kms_provider: AwsKmsProvider, images: Any
) -> None:
    ext4 = make_ext4_image(SIZE)
    key, record = start_first_boot(ext4.path, kms_provider)
    init_header(ext4.path, key, record)
    key.wipe()
    dump = run(["cryptsetup", "luksDump", "--dump-json-metadata", str(ext4.path)]).stdout
    area_offset = int(json.loads(dump)["keyslots"]["0"]["area"]["offset"])
    with open(ext4.path, "r+b") as f:  # the header JSON is whole, the key material is not
        f.seek(area_offset)
        f.write(b"\x00" * 4096)

    part = probe(ext4.path)
    assert decide("x", part, first_boot_enabled=True).action is Action.FINISH_CUSTODY
    assert first_boot.finish_custody(part, kms_provider, CONFIG) is False
    first_boot.restore_head(part)
    part = probe(ext4.path)
    assert part.signature.type == "ext4"
    assert fsck_clean(ext4.path)
    assert_files_intact(ext4.path, ext4, images)


def test_plan_record_that_matches_nothing_changes_nothing(
    make_ext4_image: Any, kms_provider: AwsKmsProvider
) -> None:
    ext4 = make_ext4_image(SIZE)
    key, _ = start_first_boot(ext4.path, kms_provider)
    key.wipe()
    with open(ext4.path, "r+b") as f:  # the head changed behind the record's back
        f.write(b"\x11" * 4096)
        f.seek(SIZE - MIB)
        f.write(b"\x22" * 4096)
    before = ext4.path.read_bytes()
    with pytest.raises(RefusedError, match="nothing was changed"):
        decide("x", probe(ext4.path), first_boot_enabled=True)
    assert ext4.path.read_bytes() == before


def test_ext4_with_a_journal_to_replay_is_repaired_before_the_read_only_check(
    make_ext4_image: Any,
) -> None:
    """A boot cut while the /boot move had the root mounted leaves a journal to replay: the
    next preflight replays it (e2fsck -p) and goes on, instead of refusing forever."""
    from encryptrootfs.boot import filesystems

    img = make_ext4_image(64 * 1024 * 1024)
    run(["debugfs", "-w", "-R", "feature needs_recovery", str(img.path)])
    header = run(["dumpe2fs", "-h", str(img.path)], check=False).stdout.decode()
    assert "journal needs recovery" in (filesystems.ext4_unclean(header) or "")
    filesystems.check_readonly("ext4", str(img.path))
    after = run(["dumpe2fs", "-h", str(img.path)], check=False).stdout.decode()
    assert filesystems.ext4_unclean(after) is None
    assert run(["e2fsck", "-n", "-f", str(img.path)], check=False).returncode == 0
