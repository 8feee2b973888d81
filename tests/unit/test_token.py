"""The LUKS2 token: golden fixtures for every version, tolerant reading, no plaintext field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs.errors import EncryptrootfsError, ExitCode
from encryptrootfs.providers.base import ProviderName, WrappedKey
from encryptrootfs.token import (
    TOKEN_TYPE,
    TOKEN_VERSION,
    KmsToken,
    TokenError,
    token_from_json,
    token_to_json,
    utc_now,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tokens"
ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
LUKS_UUID = "5f2c7d1e-8a4b-4c3d-9e6f-0a1b2c3d4e5f"


def _load(name: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / name).read_text())
    assert isinstance(data, dict)
    return data


def _parsed(name: str) -> KmsToken:
    token = token_from_json(_load(name))
    assert token is not None
    return token


def test_v1_minimal_fixture_parses() -> None:
    token = _parsed("v1-minimal.json")
    assert token.keyslots == ("1",)
    assert token.wrapped.provider is ProviderName.AWS_KMS
    assert token.wrapped.key_id == ARN
    assert token.wrapped.region == "eu-west-1"
    assert token.wrapped.ciphertext.endswith(b"encryptrootfs-golden-fixture")
    assert dict(token.wrapped.encryption_context) == {"encryptrootfs:luks_uuid": LUKS_UUID}
    assert token.created is None and token.created_by is None


def test_v1_minimal_reserialises_byte_for_byte() -> None:
    text = (FIXTURES / "v1-minimal.json").read_text()
    assert json.dumps(token_to_json(_parsed("v1-minimal.json")), indent=2) + "\n" == text


def test_optional_fields_are_read_and_unknown_fields_ignored() -> None:
    token = _parsed("v1-optional-and-unknown-fields.json")
    assert token.keyslots == ("1", "2")
    assert token.created == "2026-11-28T04:39:22Z"
    assert token.created_by == "encryptrootfs 0.1.0"
    assert (token.fs_uuid, token.fs_label) == (
        "0a1b2c3d-1111-2222-3333-444455556666",
        "cloudimg-rootfs",
    )
    assert token.wrapped.encryption_context["encryptrootfs:instance_id"] == "i-0abc1234def567890"
    out = token_to_json(token)
    assert "future_field" not in out and "note" not in out
    assert out["created"] == "2026-11-28T04:39:22Z"


@pytest.mark.parametrize("name", ["foreign-clevis.json", "foreign-systemd-tpm2.json"])
def test_foreign_tokens_are_skipped(name: str) -> None:
    assert token_from_json(_load(name)) is None


def test_newer_version_is_refused_with_a_sentence() -> None:
    with pytest.raises(TokenError) as err:
        token_from_json(_load("v2-newer-version.json"))
    assert "version 2" in err.value.message and "upgrade" in str(err.value)


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("malformed-ciphertext.json", "ciphertext: is not valid base64"),
        ("malformed-missing-key-id.json", "key_id: must be a non-empty string"),
        ("malformed-keyslots.json", "keyslots: must be a non-empty list"),
        ("malformed-provider.json", "provider: unknown provider 'vault' (known: aws-kms)"),
        ("malformed-context.json", "encryption_context: must be an object of strings"),
        ("malformed-version.json", "version: must be a whole number"),
    ],
)
def test_malformed_tokens_raise_a_clear_error(name: str, field: str) -> None:
    with pytest.raises(TokenError) as err:
        token_from_json(_load(name))
    assert err.value.message.startswith(f"the encryptrootfs token is malformed: {field}")
    assert isinstance(err.value, EncryptrootfsError)
    assert err.value.exit_code is ExitCode.VERIFY


def test_round_trip() -> None:
    wrapped = WrappedKey(
        provider=ProviderName.AWS_KMS,
        key_id=ARN,
        region="eu-west-1",
        ciphertext=b"\x00\x01binary\xff" * 10,
        encryption_context={"encryptrootfs:luks_uuid": LUKS_UUID, "a": "b"},
    )
    token = KmsToken(
        keyslots=("3",),
        wrapped=wrapped,
        created=utc_now(),
        created_by="x 1",
        fs_uuid="0a1b2c3d-1111-2222-3333-444455556666",
        fs_label="cloudimg-rootfs",
    )
    obj = token_to_json(token)
    assert obj["type"] == TOKEN_TYPE and obj["version"] == TOKEN_VERSION == 1
    assert list(obj)[:8] == [
        "type",
        "keyslots",
        "version",
        "provider",
        "key_id",
        "region",
        "ciphertext",
        "encryption_context",
    ]
    again = token_from_json(json.loads(json.dumps(obj)))
    assert again == token


def test_there_is_no_field_for_plaintext() -> None:
    token_fields = {f.name for f in dataclasses.fields(KmsToken)}
    wrapped_fields = {f.name for f in dataclasses.fields(WrappedKey)}
    assert token_fields == {"keyslots", "wrapped", "created", "created_by", "fs_uuid", "fs_label"}
    assert wrapped_fields == {"provider", "key_id", "region", "ciphertext", "encryption_context"}


def test_not_an_object() -> None:
    with pytest.raises(TokenError, match="not a JSON object"):
        token_from_json(["type", "encryptrootfs"])  # type: ignore[arg-type]


def test_utc_now_format() -> None:
    stamp = utc_now()
    assert len(stamp) == 20 and stamp.endswith("Z") and stamp[10] == "T"
