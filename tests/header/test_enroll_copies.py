"""`encryptrootfs enroll --copy`: a second token holds the same key wrapped by another KMS key
in another region, names the same keyslot, and unlocks on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import luks2
from encryptrootfs.errors import ExitCode
from encryptrootfs.token import TOKEN_TYPE
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from encryptrootfs_lab.offline import unwrap
from support.cli import Cli, emulator_config
from support.emulators import REGION

OTHER_REGION = "us-east-1"


@pytest.fixture
def cli(tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> Cli:
    return Cli(emulator_config(tmp_path / "config.toml", kms, imds, {"fleet": "web"}))


@pytest.fixture
def other_key(kms: KmsEmulator) -> str:
    return KmsEmulator(region=OTHER_REGION, account_id=kms.account_id).create_key(
        alias="encryptrootfs-other"
    )


def tokens(path: Path) -> dict[int, dict[str, Any]]:
    header = luks2.read_header(path)
    return {i: luks2.export_token(path, i) for i in header.token_ids(TOKEN_TYPE)}


def test_a_copy_in_another_region_wraps_the_same_key_for_the_same_keyslot(
    cli: Cli, luks_image: Any, kms: KmsEmulator, key_arn: str, other_key: str
) -> None:
    r = cli("enroll", str(luks_image.path), "--json", stdin=luks_image.passphrase)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    keyslots_before = luks2.read_header(luks_image.path).keyslots

    r = cli("enroll", str(luks_image.path), "--copy", "--key-id", other_key, "--json")
    assert r.returncode == 0, r.stderr
    copy = json.loads(r.stdout)
    assert copy["source_token_id"] == first["token_id"]
    assert (copy["key_id"], copy["region"]) == (other_key, OTHER_REGION)
    assert copy["keyslots"] == [first["keyslot"]]

    both = tokens(luks_image.path)
    assert set(both) == {first["token_id"], copy["token_id"]}
    old, new = both[first["token_id"]], both[copy["token_id"]]
    assert (old["region"], new["region"]) == (REGION, OTHER_REGION)
    assert new["keyslots"] == old["keyslots"]
    assert new["encryption_context"] == old["encryption_context"]
    assert unwrap(kms, old) == unwrap(kms, new)  # one key, two wrappings
    assert luks2.read_header(luks_image.path).keyslots == keyslots_before

    r = cli("token", "verify", str(luks_image.path), "--json")
    assert r.returncode == 0 and all(v["ok"] for v in json.loads(r.stdout))

    # The first key gone: the copy alone still unwraps and opens the keyslot.
    kms.disable_key(key_arn)
    r = cli("token", "verify", str(luks_image.path), "--json")
    results = {v["token_id"]: v for v in json.loads(r.stdout)}
    assert results[first["token_id"]]["ok"] is False
    assert "disabled" in results[first["token_id"]]["reason"]
    assert results[copy["token_id"]]["ok"] is True


def test_a_copy_with_the_key_already_there_is_refused(
    cli: Cli, luks_image: Any, key_arn: str, other_key: str
) -> None:
    assert cli("enroll", str(luks_image.path), stdin=luks_image.passphrase).returncode == 0
    before = tokens(luks_image.path)
    r = cli("enroll", str(luks_image.path), "--copy", "--key-id", key_arn)
    assert r.returncode == ExitCode.REFUSED and "already wraps this key" in r.stderr
    assert tokens(luks_image.path) == before

    assert cli("enroll", str(luks_image.path), "--copy", "--key-id", other_key).returncode == 0
    # Two tokens now: a further copy must say which one it starts from.
    r = cli("enroll", str(luks_image.path), "--copy", "--key-id", other_key)
    assert r.returncode == ExitCode.REFUSED and "--token-id" in r.stderr


def test_copy_options_without_copy_are_refused(cli: Cli, luks_image: Any, other_key: str) -> None:
    r = cli("enroll", str(luks_image.path), "--key-id", other_key, stdin=luks_image.passphrase)
    assert r.returncode != 0 and "go with --copy" in r.stderr
    assert tokens(luks_image.path) == {}
