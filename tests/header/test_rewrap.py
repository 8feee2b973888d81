"""`encryptrootfs rewrap`: a token's key moves to another KMS key and region without touching
the keyslots, and a kill after any step leaves a device whose `token verify` passes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import luks2
from encryptrootfs.config import load_config
from encryptrootfs.errors import ExitCode
from encryptrootfs.ops.rewrap import STEPS, planned
from encryptrootfs.providers import provider_for_key, provider_for_token
from encryptrootfs.run import run
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
    """A key in another region of the same emulated account."""
    return KmsEmulator(region=OTHER_REGION, account_id=kms.account_id).create_key(
        alias="encryptrootfs-other"
    )


def keyslot_state(path: Path) -> dict[str, Any]:
    """What must not change: keyslots (with their salts and areas) and digests."""
    out = run(["cryptsetup", "luksDump", "--dump-json-metadata", str(path)]).stdout
    doc = json.loads(out)
    return {"keyslots": doc["keyslots"], "digests": doc["digests"]}


def our_tokens(path: Path) -> dict[int, dict[str, Any]]:
    header = luks2.read_header(path)
    return {i: luks2.export_token(path, i) for i in header.token_ids(TOKEN_TYPE)}


def enrolled(cli: Cli, luks_image: Any) -> int:
    r = cli("enroll", str(luks_image.path), "--json", stdin=luks_image.passphrase)
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["token_id"])


def test_rewrap_moves_the_token_to_the_new_key_and_nothing_else(
    cli: Cli, luks_image: Any, kms: KmsEmulator, key_arn: str, other_key: str
) -> None:
    old_id = enrolled(cli, luks_image)
    (old,) = our_tokens(luks_image.path).values()
    slots_before = keyslot_state(luks_image.path)

    r = cli("rewrap", str(luks_image.path), "--key-id", other_key, "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert done["old_token_id"] == old_id and done["old_key_id"] == key_arn
    assert done["key_id"] == other_key and done["region"] == OTHER_REGION
    assert done["resumed"] is False

    tokens = our_tokens(luks_image.path)
    assert list(tokens) == [done["token_id"]]
    (new,) = tokens.values()
    assert new["key_id"] == other_key and new["region"] == OTHER_REGION
    assert new["keyslots"] == old["keyslots"]
    assert new["encryption_context"] == old["encryption_context"]
    assert new["ciphertext"] != old["ciphertext"]
    assert keyslot_state(luks_image.path) == slots_before

    kms.clear_log()
    r = cli("token", "verify", str(luks_image.path))
    assert r.returncode == 0, r.stdout + r.stderr
    decrypts = kms.requests_for("Decrypt")
    assert decrypts and {d.key_id for d in decrypts} == {other_key}

    # The same key bytes, now only under the new KMS key; none of them in any output.
    secret = unwrap(kms, old)
    out = "\n".join(cli.transcript)
    for form in (secret.hex(), base64.b64encode(secret).decode(), secret.decode("latin-1")):
        assert form not in out


@pytest.mark.parametrize("steps_done", range(len(STEPS) + 1))
def test_a_kill_after_any_step_leaves_a_device_that_verifies_and_a_rerun_finishes(
    cli: Cli, luks_image: Any, other_key: str, steps_done: int
) -> None:
    old_id = enrolled(cli, luks_image)
    slots_before = keyslot_state(luks_image.path)
    config = load_config(cli.config)
    with planned(
        str(luks_image.path),
        lambda w: provider_for_token(config, w),
        provider_for_key(config, other_key, None),
    ) as job:
        for step in job.steps[:steps_done]:
            step.run()
    # Here the process is gone as far as the disk can tell: only steps_done steps happened.

    r = cli("token", "verify", str(luks_image.path), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    verified = json.loads(r.stdout)
    assert all(v["ok"] for v in verified)
    keys = {v["key_id"] for v in verified}
    if steps_done < STEPS.index("import") + 1:
        assert old_id in {v["token_id"] for v in verified} and other_key not in keys
    elif steps_done < len(STEPS):
        assert len(verified) == 2 and other_key in keys  # both copies unlock
    else:
        assert keys == {other_key}
    assert keyslot_state(luks_image.path) == slots_before

    if steps_done == len(STEPS):
        return
    r = cli(
        "rewrap", str(luks_image.path), "--key-id", other_key, "--token-id", str(old_id), "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed"] is (steps_done >= STEPS.index("import") + 1)
    tokens = our_tokens(luks_image.path)
    assert [t["key_id"] for t in tokens.values()] == [other_key]
    assert cli("token", "verify", str(luks_image.path)).returncode == 0
    assert keyslot_state(luks_image.path) == slots_before


def test_a_new_copy_that_does_not_unwrap_at_verify_is_removed_and_the_old_token_stays(
    cli: Cli, luks_image: Any, kms: KmsEmulator, other_key: str
) -> None:
    old_id = enrolled(cli, luks_image)
    config = load_config(cli.config)
    with planned(
        str(luks_image.path),
        lambda w: provider_for_token(config, w),
        provider_for_key(config, other_key, None),
    ) as job:
        unwrap, wrap, import_, verify, _ = job.steps
        unwrap.run()
        wrap.run()
        import_.run()
        assert len(our_tokens(luks_image.path)) == 2
        kms.deny("Decrypt")
        with pytest.raises(Exception, match="denied"):
            verify.run()
        kms.clear_faults()
    assert list(our_tokens(luks_image.path)) == [old_id]
    assert cli("token", "verify", str(luks_image.path)).returncode == 0


def test_rewrap_refuses_the_key_it_already_has_and_changes_nothing(
    cli: Cli, luks_image: Any, key_arn: str
) -> None:
    enrolled(cli, luks_image)
    before = our_tokens(luks_image.path)
    r = cli("rewrap", str(luks_image.path), "--key-id", key_arn)
    assert r.returncode == ExitCode.REFUSED
    assert "already wrapped by" in r.stderr and "nothing was changed" in r.stderr
    assert our_tokens(luks_image.path) == before


def test_rewrap_region_that_contradicts_the_arn_is_a_config_error(
    cli: Cli, luks_image: Any, other_key: str
) -> None:
    enrolled(cli, luks_image)
    r = cli("rewrap", str(luks_image.path), "--key-id", other_key, "--region", REGION)
    assert r.returncode == ExitCode.CONFIG
    assert "differs from the region in the key ARN" in r.stderr
