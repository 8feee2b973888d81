"""`encryptrootfs recovery-key add/remove` on a file-backed LUKS2 image with the KMS emulator."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import luks2
from encryptrootfs.errors import ExitCode
from encryptrootfs.passphrase import normalise
from encryptrootfs.run import run
from encryptrootfs.token import RECOVERY_TOKEN_TYPE
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from support.cli import Cli, emulator_config

KEY_FORMAT = re.compile(r"^[0-9a-hjkmnp-tv-z]{5}(-[0-9a-hjkmnp-tv-z]{5}){7}$")
FAST = ("--iter-time", "200")  # the tier tests the keyslot's shape, not the KDF's cost


@pytest.fixture
def cli(tmp_path: Path, kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> Cli:
    return Cli(emulator_config(tmp_path / "config.toml", kms, imds))


@pytest.fixture
def enrolled(cli: Cli, luks_image: Any) -> int:
    """The image with a KMS token; returns the KMS keyslot."""
    r = cli("enroll", str(luks_image.path), "--json", stdin=luks_image.passphrase)
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["keyslot"])


def add(cli: Cli, path: Path) -> dict[str, Any]:
    r = cli("recovery-key", "add", str(path), *FAST, "--json")
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_the_printed_key_opens_its_own_argon2id_keyslot_capped_at_64_mib(
    cli: Cli, luks_image: Any, enrolled: int
) -> None:
    r = cli("recovery-key", "add", str(luks_image.path), *FAST)
    assert r.returncode == 0, r.stderr
    (key,) = [w for w in r.stdout.split() if KEY_FORMAT.match(w)]
    assert "only time it is shown" in r.stdout
    assert key not in r.stderr  # the --debug log of every command run never carries it

    header = luks2.read_header(luks_image.path)
    (token_id,) = header.token_ids(RECOVERY_TOKEN_TYPE)
    token = luks2.export_token(luks_image.path, token_id)
    slot = int(token["keyslots"][0])
    assert slot not in (0, enrolled)
    assert header.keyslots[str(slot)].kdf_type == "argon2id"
    assert 0 < (header.keyslots[str(slot)].memory or 0) <= 65536
    assert token["version"] == 1 and token["format"] == "crockford32-8x5"

    assert luks2.test_keyslot(luks_image.path, key.encode(), slot)
    # What a person might type at the encryptrootfs prompt is the same passphrase.
    sloppy = key.upper().replace("-", " ").replace("0", "O").replace("1", "l")
    assert luks2.test_keyslot(luks_image.path, normalise(sloppy), slot)
    assert not luks2.test_keyslot(luks_image.path, key.encode() + b"\n", slot)
    # The KMS key and the original passphrase still open their own keyslots.
    assert cli("token", "verify", str(luks_image.path)).returncode == 0
    assert luks2.test_keyslot(luks_image.path, luks_image.passphrase, 0)


def test_a_second_recovery_key_is_refused(cli: Cli, luks_image: Any, enrolled: int) -> None:
    add(cli, luks_image.path)
    before = luks2.read_header(luks_image.path)
    r = cli("recovery-key", "add", str(luks_image.path), *FAST)
    assert r.returncode == ExitCode.REFUSED
    assert "already has a recovery key" in r.stderr and "recovery-key remove" in r.stderr
    after = luks2.read_header(luks_image.path)
    assert (after.keyslots, after.tokens) == (before.keyslots, before.tokens)


def test_remove_kills_only_the_recovery_keyslot(cli: Cli, luks_image: Any, enrolled: int) -> None:
    added = add(cli, luks_image.path)
    key = added["recovery_key"].encode()
    before = luks2.read_header(luks_image.path)

    r = cli("recovery-key", "remove", str(luks_image.path), "--json")
    assert r.returncode == 0, r.stderr
    removed = json.loads(r.stdout)
    assert removed["keyslots"] == [added["keyslot"]]

    after = luks2.read_header(luks_image.path)
    assert set(after.keyslots) == set(before.keyslots) - {str(added["keyslot"])}
    assert after.token_ids(RECOVERY_TOKEN_TYPE) == ()
    assert not luks2.test_any_keyslot(luks_image.path, key)
    assert cli("token", "verify", str(luks_image.path)).returncode == 0
    assert luks2.test_keyslot(luks_image.path, luks_image.passphrase, 0)


def test_remove_after_a_kill_between_slot_and_token_finishes(
    cli: Cli, luks_image: Any, enrolled: int
) -> None:
    added = add(cli, luks_image.path)
    # The first half of a remove: the keyslot is gone, cryptsetup emptied the token's list.
    run(["cryptsetup", "luksKillSlot", "--batch-mode", str(luks_image.path), str(added["keyslot"])])
    header = luks2.read_header(luks_image.path)
    assert header.tokens[str(added["token_id"])]["keyslots"] == ()

    r = cli("recovery-key", "remove", str(luks_image.path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["keyslots"] == []
    assert luks2.read_header(luks_image.path).token_ids(RECOVERY_TOKEN_TYPE) == ()
    assert cli("token", "verify", str(luks_image.path)).returncode == 0


def test_remove_without_a_recovery_key_changes_nothing(
    cli: Cli, luks_image: Any, enrolled: int
) -> None:
    before = luks2.read_header(luks_image.path)
    r = cli("recovery-key", "remove", str(luks_image.path))
    assert r.returncode == ExitCode.DEVICE
    assert "has no recovery key" in r.stderr
    assert luks2.read_header(luks_image.path).keyslots == before.keyslots


def test_add_needs_a_kms_token_to_authorise_it(cli: Cli, luks_image: Any) -> None:
    r = cli("recovery-key", "add", str(luks_image.path), *FAST)
    assert r.returncode == ExitCode.VERIFY
    assert "no encryptrootfs token" in r.stderr and "nothing was changed" in r.stderr
    assert list(luks2.read_header(luks_image.path).keyslots) == ["0"]
