"""`encryptrootfs status --json` for each state, on real images: plain, reencryption pending,
encrypted (with and without an unlock record, with a recovery key), foreign LUKS2, missing."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import luks2, unlock_record
from encryptrootfs.errors import ExitCode
from encryptrootfs.token import KmsToken, token_to_json
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from support.cli import Cli, emulator_config
from support.emulators import REGION, provider

MIB = 1024 * 1024


@pytest.fixture
def cli(tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> Cli:
    return Cli(emulator_config(tmp_path / "config.toml", kms, imds))


def status(cli: Cli, *args: str, code: int = 0) -> dict[str, Any]:
    r = cli("status", "--json", *args)
    assert r.returncode == code, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    assert doc["schema_version"] == 1
    return doc


def test_plain_filesystem(cli: Cli, make_ext4_image: Any, tmp_path: Path) -> None:
    ext4 = make_ext4_image(96 * MIB)
    (d,) = status(cli, str(ext4.path), "--record", str(tmp_path / "none"))["devices"]
    assert d["state"] == "plain" and d["filesystem"] == "ext4"
    assert d["luks_uuid"] is None and d["tokens"] == [] and d["last_unlock"] is None


def test_encryption_pending(
    cli: Cli,
    make_ext4_image: Any,
    kms: KmsEmulator,
    imds: ImdsEmulator,
    key_arn: str,
    tmp_path: Path,
) -> None:
    ext4 = make_ext4_image(96 * MIB)
    luks_uuid = str(uuid.uuid4())
    new = provider(kms, imds, key_arn).new_key(luks_uuid)
    try:
        slot = luks2.reencrypt_encrypt_init(
            ext4.path, new.plaintext, uuid=luks_uuid, reduce_device_size=32 * MIB
        )
    finally:
        new.wipe()
    token = KmsToken((str(slot),), new.wrapped, created="2026-11-28T00:00:00Z")
    luks2.import_token_while_pending(ext4.path, token_to_json(token))

    (d,) = status(cli, str(ext4.path), "--record", str(tmp_path / "none"))["devices"]
    assert d["state"] == "reencryption-pending" and d["luks_uuid"] == luks_uuid
    assert d["reencryption"] == {"state": "pending", "mode": "encrypt", "percent": 0.0}
    (token,) = d["tokens"]
    assert (token["kind"], token["key_id"], token["region"]) == ("kms", key_arn, REGION)
    assert token["encryption_context"] == {"encryptrootfs:luks_uuid": luks_uuid}
    assert token["created"] == "2026-11-28T00:00:00Z"
    kinds = {k["type"]: k for k in d["keyslots"]}
    assert kinds["luks2"]["token_ids"] == [token["id"]]
    assert kinds["reencrypt"]["token_ids"] == []

    text = cli("status", str(ext4.path), "--record", str(tmp_path / "none")).stdout
    assert "reencryption: pending (encrypt), 0% done" in text


def test_encrypted_with_and_without_the_unlock_record(
    cli: Cli, luks_image: Any, key_arn: str, tmp_path: Path
) -> None:
    r = cli("enroll", str(luks_image.path), "--json", stdin=luks_image.passphrase)
    assert r.returncode == 0, r.stderr
    enrolled = json.loads(r.stdout)
    record_path = tmp_path / "run" / "last-unlock.json"

    (d,) = status(cli, str(luks_image.path), "--record", str(record_path))["devices"]
    assert d["state"] == "encrypted" and d["reencryption"] is None
    assert d["last_unlock"] is None
    (token,) = d["tokens"]
    assert token["key_id"] == key_arn and token["keyslots"] == [enrolled["keyslot"]]
    owners = {k["id"]: k["token_ids"] for k in d["keyslots"]}
    assert owners == {0: [], enrolled["keyslot"]: [token["id"]]}
    slot = next(k for k in d["keyslots"] if k["id"] == enrolled["keyslot"])
    assert (slot["kdf"], slot["iterations"]) == ("pbkdf2", 1000)

    # What the initramfs would have written after opening this device.
    luks_uuid = d["luks_uuid"]
    assert unlock_record.write(
        unlock_record.UnlockRecord(
            device="/dev/vda1",
            luks_uuid=luks_uuid,
            mapper="/dev/mapper/root",
            unlocked_at="2026-11-28T05:00:00Z",
            seconds=2.5,
            provider="aws-kms",
            key_id=key_arn,
            region=REGION,
            keyslot=enrolled["keyslot"],
            attempts=1,
        ),
        record_path,
    )
    (d,) = status(cli, str(luks_image.path), "--record", str(record_path))["devices"]
    assert d["last_unlock"]["key_id"] == key_arn and d["last_unlock"]["seconds"] == 2.5
    assert d["last_unlock"]["keyslot"] == enrolled["keyslot"]

    r = cli("recovery-key", "add", str(luks_image.path), "--iter-time", "200", "--json")
    assert r.returncode == 0, r.stderr
    added = json.loads(r.stdout)
    (d,) = status(cli, str(luks_image.path), "--record", str(record_path))["devices"]
    rec = next(t for t in d["tokens"] if t["kind"] == "recovery")
    assert rec["keyslots"] == [added["keyslot"]] and rec["type"] == "encryptrootfs-recovery"
    slot = next(k for k in d["keyslots"] if k["id"] == added["keyslot"])
    assert slot["kdf"] == "argon2id" and slot["memory_kib"] <= 65536
    assert slot["token_ids"] == [rec["id"]]
    assert added["recovery_key"] not in json.dumps(d)


def test_foreign_luks2_and_a_missing_device(cli: Cli, luks_image: Any, tmp_path: Path) -> None:
    luks2.import_token(luks_image.path, {"type": "clevis", "keyslots": ["0"]})
    missing = tmp_path / "no-such.img"
    doc = status(
        cli,
        str(luks_image.path),
        str(missing),
        "--record",
        str(tmp_path / "none"),
        code=ExitCode.DEVICE,
    )
    foreign, gone = doc["devices"]
    assert foreign["state"] == "not-ours" and foreign["luks_version"] == 2
    assert foreign["tokens"] == [
        {
            "id": 0,
            "type": "clevis",
            "kind": "foreign",
            "keyslots": [0],
            "provider": None,
            "key_id": None,
            "region": None,
            "encryption_context": None,
            "created": None,
            "error": None,
        }
    ]
    assert gone["state"] == "unreadable" and "does not exist" in gone["error"]
    assert not os.path.exists(missing)
