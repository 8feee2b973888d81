"""Instance binding enforced by KMS (the key policy), with an early refusal on the client.

The KMS emulator evaluates the example key policy (emulators/policy.py) and knows which
instance signed each request (trust_instance), as AWS derives ``${ec2:SourceInstanceARN}``
from instance-role credentials.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs.config import load_config
from encryptrootfs.errors import KeyServiceError, VerifyError
from encryptrootfs.providers.aws_kms import AwsKmsProvider
from encryptrootfs.providers.base import (
    CONTEXT_INSTANCE_ARN,
    CONTEXT_INSTANCE_ID,
    CONTEXT_LUKS_UUID,
    instance_arn,
)
from encryptrootfs.token import KmsToken, TokenError, token_from_json, token_to_json
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from encryptrootfs_lab.emulators.policy import KmsRequestFacts, PolicyError, allows
from support.emulators import REGION, provider

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY_POLICY = json.loads((EXAMPLES / "kms-key-policy.json").read_text())
IAM_POLICY = json.loads((EXAMPLES / "iam-policy-instance-role.json").read_text())
ACCOUNT = "111122223333"  # the examples' account
ROLE = "encryptrootfs-instance"  # the examples' instance role
LUKS_UUID = "5f2c7d1e-8a4b-4c3d-9e6f-0a1b2c3d4e5f"


@pytest.fixture
def instance_a(aws_isolated: None) -> Iterator[ImdsEmulator]:
    with ImdsEmulator(REGION, "i-0aaaaaaaaaaaaaaaa", ROLE, ACCOUNT) as emulator:
        yield emulator


@pytest.fixture
def instance_b(aws_isolated: None) -> Iterator[ImdsEmulator]:
    with ImdsEmulator(REGION, "i-0bbbbbbbbbbbbbbbb", ROLE, ACCOUNT) as emulator:
        yield emulator


def _example_context() -> dict[str, str]:
    config = load_config(EXAMPLES / "config.toml")
    assert (
        config.aws_kms is not None and config.aws_kms.bind_instance_id
    )  # the examples' policy needs the binding
    return dict(config.aws_kms.encryption_context)


def _bound(kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> AwsKmsProvider:
    return provider(
        kms, imds, key_arn, bind_instance_id=True, encryption_context=_example_context()
    )


def test_binding_puts_the_instance_arn_in_the_context(
    kms: KmsEmulator, instance_a: ImdsEmulator, key_arn: str
) -> None:
    new = _bound(kms, instance_a, key_arn).new_key(LUKS_UUID)
    context = new.wrapped.encryption_context
    assert context[CONTEXT_INSTANCE_ID] == "i-0aaaaaaaaaaaaaaaa"
    assert context[CONTEXT_INSTANCE_ARN] == (
        f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0aaaaaaaaaaaaaaaa"
    )
    new.wipe()


def test_a_token_bound_to_another_instance_is_refused_before_any_kms_request(
    kms: KmsEmulator, instance_a: ImdsEmulator, instance_b: ImdsEmulator, key_arn: str
) -> None:
    new = _bound(kms, instance_a, key_arn).new_key(LUKS_UUID)
    new.wipe()
    kms.clear_log()
    with pytest.raises(KeyServiceError) as caught:
        _bound(kms, instance_b, key_arn).unwrap(new.wrapped)
    message = str(caught.value)
    assert "bound to the instance" in message and "i-0bbbbbbbbbbbbbbbb" in message
    assert "KMS was not asked" in message
    assert kms.requests == []


def test_the_example_key_policy_refuses_another_instance_in_the_emulator(
    kms: KmsEmulator,
    instance_a: ImdsEmulator,
    instance_b: ImdsEmulator,
    key_arn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The boundary is KMS: with the client's own check out of the way, the example key
    policy still refuses the Decrypt from instance B and allows it from instance A."""
    kms.key_policy = KEY_POLICY
    kms.trust_instance(instance_a)
    kms.trust_instance(instance_b)
    new = _bound(kms, instance_a, key_arn).new_key(LUKS_UUID)
    monkeypatch.setattr(AwsKmsProvider, "_refuse_other_instance", lambda *_: None)
    with pytest.raises(KeyServiceError, match="KMS denied Decrypt"):
        _bound(kms, instance_b, key_arn).unwrap(new.wrapped)
    assert _bound(kms, instance_a, key_arn).unwrap(new.wrapped) == new.plaintext
    new.wipe()


def test_every_call_the_code_makes_passes_both_example_policies(
    kms: KmsEmulator, instance_a: ImdsEmulator, key_arn: str
) -> None:
    """First boot (GenerateDataKey), later boots (Decrypt), ``kms check`` (both, with its
    purpose pair) and rewrap / ``enroll --copy`` (Encrypt of the token's context), with
    examples/config.toml's context, under examples/kms-key-policy.json; then each request
    KMS saw against examples/iam-policy-instance-role.json."""
    kms.key_policy = KEY_POLICY
    kms.trust_instance(instance_a)
    p = _bound(kms, instance_a, key_arn)
    new = p.new_key(LUKS_UUID)
    assert p.unwrap(new.wrapped) == new.plaintext
    check = p.check()
    assert check.round_trip_ok, check.round_trip_error
    copy = p.wrap(new.plaintext, new.wrapped.encryption_context)
    assert p.unwrap(copy) == new.plaintext
    new.wipe()
    actions = {r.action for r in kms.requests}
    assert actions == {"GenerateDataKey", "Decrypt", "Encrypt"}
    assert all(r.error_code is None for r in kms.requests)
    arn = instance_arn(REGION, ACCOUNT, instance_a.instance_id)
    for r in kms.requests:
        facts = KmsRequestFacts(
            f"kms:{r.action}",
            f"arn:aws:iam::{ACCOUNT}:role/{ROLE}",
            dict(r.encryption_context),
            {"ec2:SourceInstanceARN": arn},
        )
        assert allows(IAM_POLICY, facts), r


@pytest.mark.parametrize(
    "change",
    [
        {CONTEXT_INSTANCE_ARN: f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0bbbbbbbbbbbbbbbb"},
        {"other": "pair"},  # a context key outside the allowed list
    ],
)
def test_the_example_key_policy_refuses_foreign_contexts(change: dict[str, str]) -> None:
    arn = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0aaaaaaaaaaaaaaaa"
    context = {CONTEXT_LUKS_UUID: LUKS_UUID, CONTEXT_INSTANCE_ARN: arn, **change}
    role = f"arn:aws:iam::{ACCOUNT}:role/{ROLE}"
    facts = KmsRequestFacts("kms:Decrypt", role, context, {"ec2:SourceInstanceARN": arn})
    assert not allows(KEY_POLICY, facts)
    unbound = {CONTEXT_LUKS_UUID: LUKS_UUID}  # no binding: denied too
    assert not allows(KEY_POLICY, KmsRequestFacts("kms:Decrypt", role, unbound, {}))


def _statement(sid: str) -> dict[str, Any]:
    [found] = [s for s in KEY_POLICY["Statement"] if s["Sid"] == sid]
    return dict(found)


def test_the_example_key_policy_has_an_account_root_and_separated_admin_rights() -> None:
    root = _statement("AccountRootCanRepairThisPolicy")
    assert root["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    assert "kms:PutKeyPolicy" in root["Action"]
    admin = _statement("KeyAdministrationWithoutKeyUse")
    for action in ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:ReEncrypt*"):
        admin_facts = KmsRequestFacts(action, admin["Principal"]["AWS"])
        assert not allows({"Statement": [admin]}, admin_facts), action
    # Admins cannot grant themselves key use, nor delete the key.
    for action in ("kms:PutKeyPolicy", "kms:CreateGrant", "kms:ScheduleKeyDeletion"):
        assert action not in admin["Action"]


def test_the_policy_evaluator_refuses_operators_it_does_not_know() -> None:
    policy = {
        "Statement": [
            {"Effect": "Allow", "Action": "kms:Decrypt", "Condition": {"NumericEquals": {"a": 1}}}
        ]
    }
    with pytest.raises(PolicyError):
        allows(policy, KmsRequestFacts("kms:Decrypt", "x", {}, {"a": "1"}))


def _token(context: dict[str, str], region: str = REGION) -> KmsToken:
    obj = {
        "type": "encryptrootfs",
        "keyslots": ["0"],
        "version": 1,
        "provider": "aws-kms",
        "key_id": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "region": region,
        "ciphertext": "AAAA",
        "encryption_context": context,
    }
    token = token_from_json(obj)
    assert token is not None
    assert token_from_json(token_to_json(token)) == token
    return token


def test_a_token_for_another_volume_is_refused_before_any_kms_request() -> None:
    from encryptrootfs.boot.unlock import tokens_for_volume

    mine = _token({CONTEXT_LUKS_UUID: LUKS_UUID})
    other = _token({CONTEXT_LUKS_UUID: "00000000-0000-4000-8000-000000000000"})
    assert tokens_for_volume("/dev/vda2", LUKS_UUID.upper(), [other, mine]) == [mine]
    with pytest.raises(VerifyError) as caught:
        tokens_for_volume("/dev/vda2", LUKS_UUID, [other, _token({})])
    message = str(caught.value)
    assert "no encryptrootfs token in this header belongs to it" in message
    assert "00000000-0000-4000-8000-000000000000" in message and "KMS was not asked" in message


@pytest.mark.parametrize("region", ["evil.example.com/x", "EU-WEST-1", "eu-west-1.evil"])
def test_a_token_with_a_crafted_region_is_a_damaged_token(region: str) -> None:
    with pytest.raises(TokenError, match="region: is not an AWS region name"):
        _token({CONTEXT_LUKS_UUID: LUKS_UUID}, region=region)


@pytest.mark.parametrize(
    ("configured", "returned", "why"),
    [
        (
            f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1111",
            f"arn:aws:kms:{REGION}:{ACCOUNT}:key/2222",
            "another key",
        ),
        (
            f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/root",
            f"arn:aws:kms:{REGION}:999999999999:key/2222",
            "account 999999999999",
        ),
        ("1111", f"arn:aws:kms:{REGION}:{ACCOUNT}:key/2222", "another key"),
        ("alias/root", f"arn:aws:kms:us-east-1:{ACCOUNT}:key/2222", "lives in us-east-1"),
        ("alias/root", "", "must report a key ARN"),
    ],
)
def test_a_foreign_key_from_generate_data_key_is_refused(
    configured: str, returned: str, why: str
) -> None:
    from encryptrootfs.providers.aws_kms import _not_the_configured_key

    assert why in _not_the_configured_key(configured, REGION, returned)
    same = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1111"
    assert _not_the_configured_key(same, REGION, same) == ""
    assert _not_the_configured_key("alias/root", REGION, same) == ""


@pytest.mark.parametrize("name", ["iam-policy-instance-role.json", "kms-key-policy.json"])
def test_the_example_policies_pass_an_iam_policy_linter(name: str) -> None:
    parliament = pytest.importorskip("parliament")
    findings = parliament.analyze_policy_string(
        (EXAMPLES / name).read_text(), ignore_private_auditors=True
    ).findings
    issues = {f.issue for f in findings}
    # In a key policy "Resource": "*" means this key (the linter reads it as an identity policy).
    allowed = {"RESOURCE_STAR"} if name == "kms-key-policy.json" else set()
    assert issues <= allowed, [(f.issue, f.detail) for f in findings]
