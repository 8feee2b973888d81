"""`encryptrootfs enroll / token show / token verify` as a person runs them: the real command
(a subprocess), a file-backed LUKS2 image, and the KMS and IMDS emulators over HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import luks2
from encryptrootfs.errors import ExitCode
from encryptrootfs.run import run
from encryptrootfs.token import TOKEN_TYPE
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from encryptrootfs_lab.offline import unwrap
from support.cli import Cli, emulator_config
from support.emulators import REGION

HEADER_BYTES = 16 * 1024 * 1024


@pytest.fixture
def config(tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> Path:
    return emulator_config(tmp_path / "config.toml", kms, imds, {"fleet": "web"})


@pytest.fixture
def cli(config: Path) -> Cli:
    return Cli(config)


def header_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(HEADER_BYTES)).hexdigest()


def our_token(path: Path) -> tuple[int, dict[str, object]]:
    header = luks2.read_header(path)
    (token_id,) = header.token_ids(TOKEN_TYPE)
    return token_id, luks2.export_token(path, token_id)


def test_enroll_show_verify_and_no_secret_anywhere(
    cli: Cli, luks_image: Any, kms: KmsEmulator, key_arn: str
) -> None:
    r = cli("enroll", str(luks_image.path), "--json", stdin=luks_image.passphrase)
    assert r.returncode == 0, r.stderr
    enrolled = json.loads(r.stdout)
    assert enrolled["key_id"] == key_arn

    header = luks2.read_header(luks_image.path)
    slot = header.keyslots[str(enrolled["keyslot"])]
    assert slot.kdf_type == "pbkdf2"
    assert slot.iterations == 1000

    r = cli("token", "show", str(luks_image.path), "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    (token,) = [t for t in shown["tokens"] if t["type"] == TOKEN_TYPE]
    assert token["provider"] == "aws-kms"
    assert token["key_id"] == key_arn
    assert token["region"] == REGION
    assert token["encryption_context"] == {"encryptrootfs:luks_uuid": header.uuid, "fleet": "web"}
    assert token["keyslots"] == [str(enrolled["keyslot"])]

    r = cli("token", "show", str(luks_image.path))
    assert f"key {key_arn}" in r.stdout and "pbkdf2 1000 iterations" in r.stdout

    r = cli("token", "verify", str(luks_image.path))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout

    # Decrypt calls carried the volume's context.
    decrypts = kms.requests_for("Decrypt")
    assert decrypts and all(
        d.encryption_context.get("encryptrootfs:luks_uuid") == header.uuid for d in decrypts
    )

    _, exported = our_token(luks_image.path)
    secret = unwrap(kms, exported)
    assert len(secret) == 64
    output = "\n".join(cli.transcript)
    for form in (
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        secret.decode("latin-1"),
    ):
        assert form not in output
    assert "+ " in output  # --debug really logged the commands that were searched


@pytest.mark.parametrize("field", ["ciphertext", "encryption_context"])
def test_tampered_token_fails_verify_clearly_and_changes_nothing(
    cli: Cli, luks_image: Any, field: str
) -> None:
    assert cli("enroll", str(luks_image.path), stdin=luks_image.passphrase).returncode == 0
    token_id, token = our_token(luks_image.path)
    if field == "ciphertext":
        raw = bytearray(base64.b64decode(str(token["ciphertext"])))
        raw[-1] ^= 0x01
        token["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    else:
        ctx = dict(token["encryption_context"])  # type: ignore[call-overload]
        ctx["fleet"] = "db"
        token["encryption_context"] = ctx
    luks2.import_token(luks_image.path, token, token_id=token_id, replace=True)
    before = header_hash(luks_image.path)

    r = cli("token", "verify", str(luks_image.path))
    assert r.returncode == ExitCode.VERIFY
    assert "FAILED" in r.stdout
    assert "does not belong to this volume or was altered" in r.stdout
    assert header_hash(luks_image.path) == before


def test_enroll_with_a_wrong_key_changes_nothing(cli: Cli, luks_image: Any) -> None:
    before = header_hash(luks_image.path)
    r = cli("enroll", str(luks_image.path), stdin=b"not-the-passphrase")
    assert r.returncode == ExitCode.VERIFY
    assert "does not open any keyslot" in r.stderr and "nothing was changed" in r.stderr
    assert header_hash(luks_image.path) == before


def test_enroll_refuses_luks1_and_plain_files(cli: Cli, tmp_path: Path) -> None:
    luks1 = tmp_path / "luks1.img"
    luks1.write_bytes(b"")
    os.truncate(luks1, 32 * 1024 * 1024)
    run(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks1",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            "-",
            str(luks1),
        ],
        stdin=b"pw",
    )
    r = cli("enroll", str(luks1), stdin=b"pw")
    assert r.returncode == ExitCode.DEVICE
    assert "LUKS1" in r.stderr and "tokens need LUKS2" in r.stderr

    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * 1024 * 1024)
    r = cli("enroll", str(plain), stdin=b"pw")
    assert r.returncode == ExitCode.DEVICE
    assert "is not a LUKS device" in r.stderr


def test_verify_without_our_token_says_how_to_enroll(cli: Cli, luks_image: Any) -> None:
    r = cli("token", "verify", str(luks_image.path))
    assert r.returncode == ExitCode.VERIFY
    assert "no encryptrootfs token" in r.stderr and "encryptrootfs enroll" in r.stderr


def test_kms_check_and_config_check(cli: Cli, key_arn: str, config: Path) -> None:
    r = cli("kms", "check", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["key_arn"] == key_arn
    assert report["round_trip_ok"] is True
    assert report["region"] == REGION and report["region_source"].startswith("IMDS")
    assert "IMDS" in report["credential_source"]

    r = cli("config", "check")
    assert r.returncode == 0 and "valid" in r.stdout
    bad = config.parent / "bad.toml"
    bad.write_text('[providers.aws_kms]\nkey_id = "not a key"\n')
    r = cli("config", "check", str(bad))
    assert r.returncode == ExitCode.CONFIG
    assert "providers.aws_kms.key_id" in r.stderr
