"""The boot planner: every on-disk state maps to one action, or to a refusal that says why."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pytest

from encryptrootfs.boot.decide import Action, decide
from encryptrootfs.devices import LuksFacts, Partition, Signature, find_root, normalise_spec
from encryptrootfs.errors import DeviceError, RefusedError
from encryptrootfs.plan_record import PlanRecord
from encryptrootfs.providers.base import ProviderName, WrappedKey
from encryptrootfs.token import KmsToken

FS_UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
LUKS_UUID = "11111111-2222-3333-4444-555555555555"
MIB = 1024 * 1024


def token(fs_uuid: Optional[str] = FS_UUID) -> KmsToken:
    wrapped = WrappedKey(
        ProviderName.AWS_KMS,
        "arn:aws:kms:us-east-1:123456789012:key/k",
        "us-east-1",
        b"ciphertext",
        {"encryptrootfs:luks_uuid": LUKS_UUID},
    )
    return KmsToken(keyslots=("0",), wrapped=wrapped, fs_uuid=fs_uuid)


def record(**kw: Any) -> PlanRecord:
    base: dict[str, Any] = dict(
        luks_uuid=LUKS_UUID,
        partition_size=512 * MIB,
        fs_type="ext4",
        fs_uuid=FS_UUID,
        fs_label="root",
        head_sha256="h" * 64,
        token={"type": "encryptrootfs"},
    )
    base.update(kw)
    return PlanRecord(**base)


PLAIN = Signature("ext4", FS_UUID, "root")


def part(sig: Signature = PLAIN, **kw: Any) -> Partition:
    base: dict[str, Any] = dict(
        path="/dev/vda1",
        name="vda1",
        disk="/dev/vda",
        number=1,
        start=MIB,
        size=512 * MIB,
        disk_size=1024 * MIB,
        logical_sector=512,
        partuuid="aaaa-bbbb",
        partlabel="root",
        signature=sig,
    )
    base.update(kw)
    return Partition(**base)


def luks(
    pending: bool = False,
    tokens: tuple[KmsToken, ...] = (),
    version: int = 2,
    reencryption: str = "encrypt/datashift",
) -> LuksFacts:
    kind = reencryption if pending else None
    return LuksFacts(LUKS_UUID, version, pending, tokens, ("0",), reencryption=kind)


LUKS_SIG = Signature("crypto_LUKS", LUKS_UUID, "", "2")


def test_plain_supported_fs_is_encrypted() -> None:
    d = decide("UUID=" + FS_UUID, part(), first_boot_enabled=True)
    assert d.action is Action.ENCRYPT


def test_plain_fs_with_first_boot_disabled_is_left_plain() -> None:
    assert decide("x", part(), first_boot_enabled=False).action is Action.LEAVE_PLAIN


def test_encrypted_with_token_is_unlocked() -> None:
    p = part(LUKS_SIG, luks=luks(tokens=(token(),)))
    assert decide("x", p, first_boot_enabled=True).action is Action.UNLOCK


def test_pending_with_token_is_resumed() -> None:
    p = part(LUKS_SIG, luks=luks(pending=True, tokens=(token(),)))
    assert decide("x", p, first_boot_enabled=True).action is Action.RESUME


def test_header_without_token_but_matching_record_finishes_custody() -> None:
    p = part(LUKS_SIG, luks=luks(pending=True), record=record())
    assert decide("x", p, first_boot_enabled=True).action is Action.FINISH_CUSTODY


def test_record_of_another_volume_does_not_finish_custody() -> None:
    p = part(
        LUKS_SIG,
        luks=luks(pending=True),
        record=record(luks_uuid="99999999-2222-3333-4444-555555555555"),
    )
    with pytest.raises(RefusedError, match="not ours"):
        decide("x", p, first_boot_enabled=True)


def test_foreign_luks2_device_is_refused() -> None:
    p = part(LUKS_SIG, luks=luks())
    with pytest.raises(RefusedError, match="without an encryptrootfs token"):
        decide("x", p, first_boot_enabled=True)


def test_luks1_root_is_refused() -> None:
    p = part(Signature("crypto_LUKS", LUKS_UUID, "", "1"), luks=luks(version=1))
    with pytest.raises(RefusedError, match="LUKS1"):
        decide("x", p, first_boot_enabled=True)


def test_intact_head_with_record_restarts_encryption() -> None:
    p = part(record=record(), head_sha256="h" * 64, moved_sha256="m" * 64)
    assert decide("x", p, first_boot_enabled=True).action is Action.ENCRYPT


def test_torn_head_with_whole_moved_copy_is_restored() -> None:
    p = part(Signature(), record=record(), head_sha256="t" * 64, moved_sha256="h" * 64)
    assert decide("x", p, first_boot_enabled=True).action is Action.RESTORE_HEAD


def test_record_matching_neither_copy_is_refused() -> None:
    p = part(Signature(), record=record(), head_sha256="t" * 64, moved_sha256="u" * 64)
    with pytest.raises(RefusedError, match="neither its head nor the moved copy"):
        decide("x", p, first_boot_enabled=True)


@pytest.mark.parametrize("fs", ["vfat", "ntfs", "swap"])
def test_unsupported_filesystem_is_refused_by_name(fs: str) -> None:
    with pytest.raises(RefusedError, match=f"holds {fs}"):
        decide("x", part(Signature(fs, "u")), first_boot_enabled=True)


def test_no_filesystem_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="no recognised filesystem"):
        decide("x", part(Signature()), first_boot_enabled=True)


def test_ambivalent_signature_is_refused() -> None:
    with pytest.raises(RefusedError, match="ambivalent"):
        decide("x", part(Signature("ambivalent")), first_boot_enabled=True)


# --- finding the root ---------------------------------------------------------------------------


def test_fs_uuid_finds_the_plain_partition() -> None:
    p = part()
    assert (
        find_root(
            "UUID=" + FS_UUID.upper(), [p, part(Signature("ext4", "other"), path="/dev/vdb1")]
        )
        == p
    )


def test_fs_uuid_finds_the_encrypted_partition_through_its_token() -> None:
    p = part(LUKS_SIG, luks=luks(tokens=(token(),)))
    assert find_root("UUID=" + FS_UUID, [p]) == p


def test_fs_uuid_finds_a_torn_partition_through_its_plan_record() -> None:
    p = part(Signature(), record=record())
    assert find_root("UUID=" + FS_UUID, [p]) == p


def test_two_matches_are_refused_never_guessed() -> None:
    a = part()
    b = dataclasses.replace(a, path="/dev/vdb1", name="vdb1", disk="/dev/vdb")
    with pytest.raises(RefusedError, match="matches 2 partitions"):
        find_root("UUID=" + FS_UUID, [a, b])


def test_plain_copy_beside_the_encrypted_root_is_ambiguous() -> None:
    enc = part(LUKS_SIG, luks=luks(tokens=(token(),)))
    plain = part(path="/dev/vdb1", name="vdb1", disk="/dev/vdb")
    with pytest.raises(RefusedError, match="never guesses"):
        find_root("UUID=" + FS_UUID, [enc, plain])


def test_no_match_is_none_so_the_caller_can_wait() -> None:
    assert find_root("UUID=deadbeef", [part()]) is None


def test_partuuid_and_partlabel_and_path() -> None:
    p = part()
    assert find_root("PARTUUID=AAAA-BBBB", [p]) == p
    assert find_root("PARTLABEL=root", [p]) == p
    assert find_root("/dev/vda1", [p]) == p
    assert find_root("/dev/disk/by-partlabel/root", [p]) == p


def test_label_matches_fs_label() -> None:
    assert find_root("LABEL=root", [part()]) is not None
    assert find_root("LABEL=other", [part()]) is None


def test_unknown_selector_tag_is_refused() -> None:
    with pytest.raises(RefusedError, match="not understood"):
        find_root("ZFS=pool/root", [part()])


def test_by_path_forms_are_normalised() -> None:
    assert normalise_spec("/dev/disk/by-uuid/abc") == "UUID=abc"
    assert normalise_spec("/dev/vda1") == "/dev/vda1"


def test_a_damaged_token_alone_is_refused_with_the_damage_named() -> None:
    facts = LuksFacts(
        LUKS_UUID,
        2,
        False,
        (),
        ("0",),
        damaged=("token 0: the encryptrootfs token is malformed: ciphertext",),
    )
    with pytest.raises(RefusedError, match=r"cannot be read .*token 0: .*malformed"):
        decide("/dev/vda1", part(LUKS_SIG, luks=facts), first_boot_enabled=True)


def test_a_damaged_token_beside_a_good_one_is_skipped_and_said() -> None:
    facts = LuksFacts(
        LUKS_UUID,
        2,
        False,
        (token(),),
        ("0",),
        damaged=("token 1: the encryptrootfs token is malformed: version",),
    )
    d = decide("/dev/vda1", part(LUKS_SIG, luks=facts), first_boot_enabled=True)
    assert d.action is Action.UNLOCK
    assert "skipping token 1" in d.reason


@pytest.mark.parametrize("kind", ["decrypt/datashift", "reencrypt/journal", "encrypt/checksum"])
def test_a_pending_reencryption_the_first_boot_never_starts_is_refused(kind: str) -> None:
    facts = luks(pending=True, tokens=(token(),), reencryption=kind)
    with pytest.raises(RefusedError, match=r"pending reencryption of a kind .*never starts"):
        decide("/dev/vda1", part(LUKS_SIG, luks=facts), first_boot_enabled=True)


def test_the_first_boots_own_pending_encryption_is_resumed() -> None:
    facts = luks(pending=True, tokens=(token(),), reencryption="encrypt/datashift")
    d = decide("/dev/vda1", part(LUKS_SIG, luks=facts), first_boot_enabled=True)
    assert d.action is Action.RESUME


@pytest.mark.parametrize("enabled", [True, False], ids=["would-encrypt", "would-leave-plain"])
def test_a_plain_root_is_refused_when_an_encrypted_one_is_required(enabled: bool) -> None:
    with pytest.raises(RefusedError, match=r"require_encrypted is set.*neither encrypted again"):
        decide("/dev/vda1", part(PLAIN), first_boot_enabled=enabled, require_encrypted=True)


def test_an_encrypted_root_boots_when_one_is_required() -> None:
    facts = luks(tokens=(token(),))
    d = decide(
        "/dev/vda1", part(LUKS_SIG, luks=facts), first_boot_enabled=True, require_encrypted=True
    )
    assert d.action is Action.UNLOCK
