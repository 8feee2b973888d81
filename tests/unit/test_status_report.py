"""status: state, reencryption progress and keyslot owners from recorded cryptsetup headers;
the unlock record; the JSON schema's shape; the configured root found as boot finds it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import devices, luks2, unlock_record
from encryptrootfs.config import Config, RootKind, RootSelector
from encryptrootfs.devices import LuksFacts, Partition, Signature
from encryptrootfs.errors import DeviceError, RefusedError
from encryptrootfs.ops import status
from encryptrootfs.ops.status import TokenKind, VolumeState
from encryptrootfs.providers.base import ProviderName, WrappedKey
from encryptrootfs.token import KmsToken
from encryptrootfs.unlock_record import UnlockMethod, UnlockRecord, UnlockRecordError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "luks2"
ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def header(name: str) -> luks2.LuksHeader:
    return luks2.parse_header(
        (FIXTURES / f"{name}.json").read_text(), (FIXTURES / f"{name}.dump.txt").read_text()
    )


def with_tokens(h: luks2.LuksHeader, tokens: dict[str, dict[str, Any]]) -> luks2.LuksHeader:
    """A recorded header with other tokens, re-parsed the way read_header parses it."""
    doc = json.loads((FIXTURES / "pbkdf2-fresh.json").read_text())
    doc["tokens"] = tokens
    return luks2.parse_header(json.dumps(doc), (FIXTURES / "pbkdf2-fresh.dump.txt").read_text())


def kms_token(slots: list[str], region: str = "eu-west-1") -> dict[str, Any]:
    return {
        "type": "encryptrootfs",
        "keyslots": slots,
        "version": 1,
        "provider": "aws-kms",
        "key_id": ARN,
        "region": region,
        "ciphertext": "AQID",
        "encryption_context": {"encryptrootfs:luks_uuid": "u"},
        "created": "2026-11-28T04:39:22Z",
    }


def record(luks_uuid: str) -> UnlockRecord:
    return UnlockRecord(
        device="/dev/vda1",
        luks_uuid=luks_uuid,
        mapper="/dev/mapper/root",
        unlocked_at="2026-11-28T05:00:00Z",
        seconds=1.84,
        provider="aws-kms",
        key_id=ARN,
        region="eu-west-1",
        keyslot=0,
        attempts=2,
    )


def recovery_record(luks_uuid: str) -> UnlockRecord:
    return unlock_record.recovery_record_for(
        "/dev/vda1", luks_uuid, "/dev/mapper/root", 1, 95.2049, unlocked_at="2026-11-28T05:01:35Z"
    )


# --- reencryption progress --------------------------------------------------------------------


def test_encryption_initialised_but_not_run_is_zero_percent() -> None:
    h = header("reencrypt-pending")
    assert status.reencryption_percent(h, device_size=None) == 0.0


def test_a_killed_data_pass_reports_what_is_encrypted_outside_the_hotzone() -> None:
    # Recorded: 544 MiB encrypted (crypt), 16 MiB in the hotzone, the rest still linear.
    h = header("reencrypt-interrupted")
    live = [s for s in h.segments if not any(f.startswith("backup-") for f in s.flags)]
    done = sum(s.size or 0 for s in live if s.type == "crypt" and "in-reencryption" not in s.flags)
    total = sum(s.size or 0 for s in live)
    assert status.reencryption_percent(h, device_size=None) == round(100 * done / total, 1)
    assert 0 < status.reencryption_percent(h, device_size=None) < 100  # type: ignore[operator]


def test_no_percent_for_a_finished_device() -> None:
    assert status.reencryption_percent(header("pbkdf2-fresh"), device_size=10**9) is None


# --- states and owners ------------------------------------------------------------------------


def test_pending_with_our_token_is_reencryption_pending() -> None:
    h = header("reencrypt-pending")
    doc = json.loads((FIXTURES / "reencrypt-pending.json").read_text())
    doc["tokens"] = {"0": kms_token(["0"])}
    h = luks2.parse_header(json.dumps(doc), (FIXTURES / "reencrypt-pending.dump.txt").read_text())
    s = status.summarise_header("/dev/vda1", h)
    assert s.state is VolumeState.REENCRYPTION_PENDING
    assert s.reencryption is not None
    assert (s.reencryption.state, s.reencryption.mode, s.reencryption.percent) == (
        "pending",
        "encrypt",
        0.0,
    )
    reencrypt_slot = next(k for k in s.keyslots if k.type == "reencrypt")
    assert reencrypt_slot.token_ids == ()


def test_pending_without_our_token_is_not_ours() -> None:
    s = status.summarise_header("/dev/x", header("reencrypt-pending"))
    assert s.state is VolumeState.NOT_OURS and s.reencryption is not None


def test_encrypted_lists_tokens_by_kind_and_the_owner_of_each_keyslot() -> None:
    h = header("foreign-tokens")  # recorded: luks2-keyring, clevis and encryptrootfs tokens
    s = status.summarise_header("/dev/x", h)
    assert s.state is VolumeState.ENCRYPTED
    kinds = {t.id: t.kind for t in s.tokens}
    assert kinds == {0: TokenKind.FOREIGN, 3: TokenKind.FOREIGN, 5: TokenKind.KMS}
    ours = next(t for t in s.tokens if t.kind is TokenKind.KMS)
    # The recorded token of ours is a bare {"type", "keyslots"}: shown with why, not fatal.
    assert ours.provider is None and ours.error and "malformed" in ours.error
    (slot0,) = s.keyslots
    assert slot0.token_ids == (0, 3, 5)


def test_recovery_token_owns_its_keyslot_and_a_bad_token_of_ours_is_shown_not_fatal() -> None:
    h = with_tokens(
        header("pbkdf2-fresh"),
        {
            "0": kms_token(["0"]),
            "1": {
                "type": "encryptrootfs-recovery",
                "keyslots": ["1"],
                "version": 1,
                "created": "2026-11-28T06:00:00Z",
            },
            "2": {"type": "encryptrootfs", "keyslots": ["0"], "version": 99},
        },
    )
    s = status.summarise_header("/dev/x", h)
    by_id = {t.id: t for t in s.tokens}
    assert by_id[1].kind is TokenKind.RECOVERY and by_id[1].keyslots == (1,)
    assert by_id[2].kind is TokenKind.KMS and by_id[2].error and "version 99" in by_id[2].error
    assert s.state is VolumeState.ENCRYPTED
    assert (by_id[0].provider, by_id[0].key_id, by_id[0].region, by_id[0].created) == (
        "aws-kms",
        ARN,
        "eu-west-1",
        "2026-11-28T04:39:22Z",
    )
    assert dict(by_id[0].encryption_context or {}) == {"encryptrootfs:luks_uuid": "u"}
    assert [k.token_ids for k in s.keyslots] == [(0, 2)]
    text = status.status_text([s])
    assert "recovery passphrase, keyslot 1" in text and f"aws-kms key {ARN}" in text


def test_last_unlock_belongs_to_the_device_with_that_luks_uuid() -> None:
    h = with_tokens(header("pbkdf2-fresh"), {"0": kms_token(["0"])})
    mine = status.summarise_header("/dev/x", h, record=record(h.uuid))
    other = status.summarise_header("/dev/x", h, record=record("another-uuid"))
    assert mine.last_unlock is not None and mine.last_unlock.seconds == 1.84
    assert other.last_unlock is None
    assert "last unlock: 2026-11-28T05:00:00Z, 1.84 s" in status.status_text([mine])
    assert "last unlock: not recorded" in status.status_text([other])


def test_a_recovery_key_unlock_is_shown_with_what_it_means_and_what_to_check() -> None:
    h = with_tokens(header("pbkdf2-fresh"), {"0": kms_token(["0"])})
    s = status.summarise_header("/dev/x", h, record=recovery_record(h.uuid))
    text = status.status_text([s])
    assert (
        "  last unlock: 2026-11-28T05:01:35Z, 95.20 s, recovery key typed at the console, "
        "keyslot 1\n"
    ) in text
    assert "KMS did not unwrap the root key on this boot" in text
    assert "Check the instance role, the key policy and the" in text
    assert "key None" not in text and "(None)" not in text
    # A KMS unlock says nothing of the kind.
    kms = status.status_text([status.summarise_header("/dev/x", h, record=record(h.uuid))])
    assert "recovery key" not in kms and "KMS did not unwrap" not in kms
    (d,) = status.status_json([s])["devices"]
    assert d["last_unlock"]["method"] == "recovery-key"
    assert d["last_unlock"]["keyslot"] == 1 and d["last_unlock"]["version"] == 2
    assert [d["last_unlock"][k] for k in ("provider", "key_id", "region", "attempts")] == [
        None,
        None,
        None,
        None,
    ]


def test_json_has_the_documented_fields_for_every_device() -> None:
    h = with_tokens(header("pbkdf2-fresh"), {"0": kms_token(["0"])})
    doc = status.status_json(
        [
            status.summarise_header("/dev/x", h, record=record(h.uuid)),
            status.DeviceStatus("/dev/y", VolumeState.PLAIN, filesystem="ext4"),
            status.DeviceStatus("/dev/z", VolumeState.UNREADABLE, error="`/dev/z` does not exist."),
        ]
    )
    assert doc["schema_version"] == status.STATUS_SCHEMA_VERSION == 1
    fields = {
        "device",
        "state",
        "luks_version",
        "luks_uuid",
        "filesystem",
        "reencryption",
        "tokens",
        "keyslots",
        "last_unlock",
        "error",
    }
    assert all(set(d) == fields for d in doc["devices"])
    encrypted = doc["devices"][0]
    assert set(encrypted["tokens"][0]) == {
        "id",
        "type",
        "kind",
        "keyslots",
        "provider",
        "key_id",
        "region",
        "encryption_context",
        "created",
        "error",
    }
    assert set(encrypted["keyslots"][0]) == {
        "id",
        "type",
        "kdf",
        "iterations",
        "memory_kib",
        "token_ids",
    }
    assert set(encrypted["last_unlock"]) == {
        "version",
        "method",
        "device",
        "luks_uuid",
        "mapper",
        "unlocked_at",
        "seconds",
        "provider",
        "key_id",
        "region",
        "keyslot",
        "attempts",
    }
    assert (encrypted["last_unlock"]["method"], encrypted["last_unlock"]["version"]) == ("kms", 1)
    assert [d["state"] for d in doc["devices"]] == ["encrypted", "plain", "unreadable"]
    json.dumps(doc)  # serialisable as is


# --- the configured root ----------------------------------------------------------------------


def partition(path: str, fs_uuid: str) -> Partition:
    token = KmsToken(
        ("0",), WrappedKey(ProviderName.AWS_KMS, ARN, "eu-west-1", b"x"), fs_uuid=fs_uuid
    )
    return Partition(
        path=path,
        name=path[5:],
        disk="/dev/vda",
        number=1,
        start=0,
        size=1,
        disk_size=1,
        logical_sector=512,
        partuuid="",
        partlabel="",
        signature=Signature(type="crypto_LUKS", version="2"),
        luks=LuksFacts("luks-uuid", 2, False, (token,), ("0",)),
    )


def test_the_default_device_is_the_root_boot_would_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(root=RootSelector(RootKind.UUID, "abcd"))
    monkeypatch.setattr(
        devices, "gather", lambda: [partition("/dev/vda1", "abcd"), partition("/dev/vda2", "ef")]
    )
    assert status.configured_root(config) == "/dev/vda1"
    monkeypatch.setattr(devices, "gather", lambda: [partition("/dev/vda2", "ef")])
    with pytest.raises(DeviceError, match="No partition matches the root selector `UUID=abcd`"):
        status.configured_root(config)
    monkeypatch.setattr(
        devices, "gather", lambda: [partition("/dev/vda1", "abcd"), partition("/dev/vdb1", "abcd")]
    )
    with pytest.raises(RefusedError, match="matches 2 partitions"):
        status.configured_root(config)


# --- the unlock record ------------------------------------------------------------------------


def test_unlock_record_round_trip_is_atomic_and_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "run" / "encryptrootfs" / "last-unlock.json"
    assert unlock_record.read(path) is None
    assert unlock_record.write(record("u1"), path)
    assert unlock_record.write(record("u2"), path)
    assert unlock_record.read(path) == record("u2")
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644


def test_both_methods_round_trip_each_as_the_oldest_version_that_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "last-unlock.json"
    for written, version in ((record("u"), 1), (recovery_record("u"), 2)):
        assert unlock_record.write(written, path)
        assert json.loads(path.read_text())["version"] == version
        assert unlock_record.read(path) == written
    back = unlock_record.read(path)
    assert back is not None and back.method is UnlockMethod.RECOVERY_KEY
    assert (back.keyslot, back.seconds, back.provider, back.key_id, back.region, back.attempts) == (
        1,
        95.205,
        None,
        None,
        None,
        None,
    )


def test_a_record_from_before_the_method_field_is_a_kms_unlock(tmp_path: Path) -> None:
    path = tmp_path / "last-unlock.json"
    # Exactly what encryptrootfs wrote before there was a `method` field.
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "device": "/dev/vda1",
                "luks_uuid": "u",
                "mapper": "/dev/mapper/root",
                "unlocked_at": "2026-11-28T05:00:00Z",
                "seconds": 1.84,
                "provider": "aws-kms",
                "key_id": ARN,
                "region": "eu-west-1",
                "keyslot": 0,
                "attempts": 2,
            }
        )
    )
    back = unlock_record.read(path)
    assert back is not None and back.method is UnlockMethod.KMS
    assert back == record("u")


def test_record_for_takes_what_the_token_says() -> None:
    token = KmsToken(("3",), WrappedKey(ProviderName.AWS_KMS, ARN, "us-east-1", b"x"))
    r = unlock_record.record_for("/dev/vda1", "u", "/dev/mapper/root", token, 1.23456, attempts=1)
    assert (r.key_id, r.region, r.keyslot, r.seconds, r.provider) == (
        ARN,
        "us-east-1",
        3,
        1.235,
        "aws-kms",
    )
    assert "ciphertext" not in json.dumps(r.as_dict())


def test_unlock_record_write_failure_is_reported_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert unlock_record.write(record("u"), blocker / "last-unlock.json") is False


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"version": 3}', "has version 3; this encryptrootfs reads version 2"),
        ('{"version": 1, "device": "/dev/x"}', "luks_uuid must be a non-empty string"),
        (
            json.dumps({**record("u").as_dict(), "method": "tpm"}),
            'method must be one of kms, recovery-key, not "tpm"',
        ),
        (json.dumps({**record("u").as_dict(), "method": None}), "method must be one of"),
        (
            json.dumps({**recovery_record("u").as_dict(), "key_id": ARN}),
            "key_id must be null for a recovery-key unlock",
        ),
        (
            json.dumps({**record("u").as_dict(), "region": None}),
            "region must be a non-empty string",
        ),
    ],
)
def test_a_damaged_or_newer_unlock_record_is_a_sentence(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "last-unlock.json"
    path.write_text(content)
    with pytest.raises(UnlockRecordError, match=problem):
        unlock_record.read(path)


def test_unknown_fields_in_the_unlock_record_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "last-unlock.json"
    path.write_text(json.dumps({**record("u").as_dict(), "later_field": 1}))
    assert unlock_record.read(path) == record("u")
