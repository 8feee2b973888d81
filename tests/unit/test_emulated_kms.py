"""The AWS KMS provider over real HTTP against the in-process KMS and IMDSv2 emulators."""

from __future__ import annotations

import base64
import http.client
import json
import time
from dataclasses import replace

import pytest

from encryptrootfs.errors import KeyServiceError
from encryptrootfs.providers.base import (
    CONTEXT_INSTANCE_ARN,
    CONTEXT_INSTANCE_ID,
    CONTEXT_LUKS_UUID,
    ProviderName,
)
from encryptrootfs.token import KmsToken, token_to_json
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from support.emulators import INSTANCE_ID, REGION, provider

LUKS_UUID = "5f2c7d1e-8a4b-4c3d-9e6f-0a1b2c3d4e5f"
CREDS_PATH = "/latest/meta-data/iam/security-credentials/"


def _secret_forms(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()]


def test_envelope_round_trip(kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> None:
    p = provider(kms, imds, "alias/encryptrootfs-test")
    new = p.new_key(LUKS_UUID)
    assert len(new.plaintext) == 64
    assert new.wrapped.provider is ProviderName.AWS_KMS
    assert new.wrapped.key_id == key_arn  # the alias was resolved to the full ARN
    assert new.wrapped.region == REGION  # from IMDS placement/region
    assert dict(new.wrapped.encryption_context) == {CONTEXT_LUKS_UUID: LUKS_UUID}
    again = provider(kms, imds, "alias/encryptrootfs-test").unwrap(new.wrapped)
    assert again == new.plaintext
    [generate] = kms.requests_for("GenerateDataKey")
    assert generate.error_code is None


def test_token_of_a_real_round_trip_holds_no_plaintext(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    new = provider(kms, imds, key_arn).new_key(LUKS_UUID)
    serialized = json.dumps(token_to_json(KmsToken(keyslots=("1",), wrapped=new.wrapped)))
    plaintext = bytes(new.plaintext)
    assert new.wrapped.ciphertext  # there is a wrapped key...
    for form in _secret_forms(plaintext):
        assert form not in serialized  # ...but no form of the plaintext
    assert plaintext not in serialized.encode()
    assert plaintext not in new.wrapped.ciphertext
    new.wipe()
    assert new.plaintext == bytearray(64)


@pytest.mark.parametrize("tamper", ["context", "ciphertext"])
def test_context_or_ciphertext_mismatch_is_refused(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str, tamper: str
) -> None:
    p = provider(kms, imds, key_arn)
    new = p.new_key(LUKS_UUID)
    if tamper == "context":
        other = {CONTEXT_LUKS_UUID: "00000000-0000-4000-8000-000000000000"}
        wrapped = replace(new.wrapped, encryption_context=other)
    else:
        blob = bytearray(new.wrapped.ciphertext)
        blob[-1] ^= 0x01
        wrapped = replace(new.wrapped, ciphertext=bytes(blob))
    with pytest.raises(KeyServiceError) as err:
        p.unwrap(wrapped)
    assert "does not belong to this volume or was altered" in str(err.value)
    assert kms.requests_for("Decrypt")[-1].error_code == "InvalidCiphertextException"
    for form in _secret_forms(bytes(new.plaintext)):
        assert form not in str(err.value)


def test_imdsv1_is_refused_and_the_provider_uses_v2(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", imds.port, timeout=5)
    conn.request("GET", "/latest/meta-data/placement/region")
    assert conn.getresponse().status == 401
    conn.close()
    imds.clear_log()
    provider(kms, imds, key_arn, region=None).new_key(LUKS_UUID)
    gets = [r for r in imds.requests if r.method == "GET"]
    assert gets and all(r.had_token and r.status == 200 for r in gets)
    assert any(r.path.startswith(CREDS_PATH) for r in gets)


@pytest.mark.parametrize(
    "path_prefix",
    ["/latest/api/token", CREDS_PATH, "/latest/meta-data/placement/region"],
)
def test_imds_500_once_then_success(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str, path_prefix: str
) -> None:
    # The key ARN names the region; pass an alias so placement/region is asked too.
    imds.fail_next(500, times=1, path_prefix=path_prefix)
    new = provider(kms, imds, "alias/encryptrootfs-test").new_key(LUKS_UUID)
    assert len(new.plaintext) == 64
    statuses = [r.status for r in imds.requests_to(path_prefix)]
    assert statuses[0] == 500 and 200 in statuses[1:]


def test_kms_throttling_a_few_times_then_success(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    p = provider(kms, imds, key_arn)
    new = p.new_key(LUKS_UUID)
    kms.inject("Decrypt", "ThrottlingException", times=2, message="Rate exceeded")
    assert p.unwrap(new.wrapped) == new.plaintext
    codes = [r.error_code for r in kms.requests_for("Decrypt")]
    assert codes == ["ThrottlingException", "ThrottlingException", None]


def test_persistent_throttling_stops_at_the_attempt_budget(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    p = provider(kms, imds, key_arn, max_attempts=3)
    new = p.new_key(LUKS_UUID)
    kms.inject("Decrypt", "ThrottlingException", times=1000)
    with pytest.raises(KeyServiceError) as err:
        p.unwrap(new.wrapped)
    # The limit reached is the attempt count, and the message says so.
    assert "KMS kept throttling Decrypt: all 3 attempts allowed " in str(err.value)
    assert "(providers.aws_kms.max_attempts) were used, in " in str(err.value)
    assert len(kms.requests_for("Decrypt")) == 3


def test_persistent_throttling_stops_at_the_time_budget(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    # 20 attempts allowed, but only 3 s: the budget, not the attempt count, must end it.
    p = provider(
        kms,
        imds,
        key_arn,
        max_attempts=20,
        total_timeout=3.0,
        connect_timeout=0.5,
        read_timeout=1.0,
    )
    new = p.new_key(LUKS_UUID)
    kms.inject("Decrypt", "ThrottlingException", times=1000)
    with pytest.raises(KeyServiceError) as err:
        p.unwrap(new.wrapped)
    attempts = len(kms.requests_for("Decrypt"))
    assert 1 <= attempts < 20
    # The limit reached is the time budget, not the 20 attempts: the message says which.
    assert f"KMS kept throttling Decrypt: {attempts} attempts in " in str(err.value)
    assert "the time budget (providers.aws_kms.total_timeout = 3 s) left no time" in str(err.value)
    assert "20 attempts" not in str(err.value)


@pytest.mark.parametrize(
    ("knob", "expected", "retryable"),
    [
        ("disabled", "it is disabled for this instance", False),
        ("refuse_tokens", "refused to issue an IMDSv2 session token", False),
        ("no_role", "no IAM role is attached to this instance", False),
        ("stopped", "did not answer", True),  # early boot: the network may come up later
    ],
)
def test_no_credentials_is_explained(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str, knob: str, expected: str, retryable: bool
) -> None:
    p = provider(kms, imds, key_arn, imds_attempts=2, imds_timeout=0.5)
    if knob == "no_role":
        imds.role_name = None
    elif knob == "stopped":
        imds.stop()
    else:
        setattr(imds, knob, True)
    with pytest.raises(KeyServiceError) as err:
        p.new_key(LUKS_UUID)
    assert str(err.value).startswith("no AWS credentials")
    assert expected in str(err.value)
    assert err.value.retryable is retryable
    assert kms.requests == []  # nothing reached KMS


def test_instance_id_binding_adds_the_context_pair(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    p = provider(kms, imds, key_arn, bind_instance_id=True, encryption_context={"purpose": "root"})
    new = p.new_key(LUKS_UUID)
    expected = {
        CONTEXT_LUKS_UUID: LUKS_UUID,
        CONTEXT_INSTANCE_ID: INSTANCE_ID,
        CONTEXT_INSTANCE_ARN: f"arn:aws:ec2:{REGION}:{imds.account_id}:instance/{INSTANCE_ID}",
        "purpose": "root",
    }
    assert dict(new.wrapped.encryption_context) == expected
    assert dict(kms.requests_for("GenerateDataKey")[0].encryption_context) == expected
    assert p.unwrap(new.wrapped) == new.plaintext
    assert dict(kms.requests_for("Decrypt")[0].encryption_context) == expected


@pytest.mark.parametrize(
    ("state", "code", "sentence"),
    [
        ("disabled", "DisabledException", "is disabled"),
        ("pending-deletion", "KMSInvalidStateException", "is pending deletion"),
    ],
)
def test_unusable_key_is_explained(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str, state: str, code: str, sentence: str
) -> None:
    p = provider(kms, imds, key_arn)
    new = p.new_key(LUKS_UUID)
    if state == "disabled":
        kms.disable_key(key_arn)
    else:
        kms.schedule_deletion(key_arn)
    for attempt in (lambda: p.unwrap(new.wrapped), lambda: p.new_key(LUKS_UUID)):
        with pytest.raises(KeyServiceError) as err:
            attempt()
        assert sentence in str(err.value)
    assert [r.error_code for r in kms.requests[-2:]] == [code, code]


def test_access_denied_is_explained(kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> None:
    p = provider(kms, imds, key_arn)
    new = p.new_key(LUKS_UUID)
    kms.deny("Decrypt")
    with pytest.raises(KeyServiceError) as err:
        p.unwrap(new.wrapped)
    assert str(err.value).startswith(f"KMS denied Decrypt on {key_arn}")
    assert "kms:Decrypt" in str(err.value)
    kms.clear_faults()
    assert p.unwrap(new.wrapped) == new.plaintext


def test_kms_unreachable_then_back(kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> None:
    p = provider(kms, imds, key_arn, max_attempts=2, connect_timeout=0.5, total_timeout=5.0)
    new = p.new_key(LUKS_UUID)
    port = kms.port
    kms.set_unreachable(True)
    with pytest.raises(KeyServiceError) as err:
        p.unwrap(new.wrapped)
    assert f"could not reach KMS at {kms.url}" in str(err.value)
    kms.set_unreachable(False)
    assert kms.port == port
    assert p.unwrap(new.wrapped) == new.plaintext


def test_check_reports_what_it_found(kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> None:
    report = provider(kms, imds, "alias/encryptrootfs-test").check()
    assert report.credential_source.startswith("iam-role via IMDSv2")
    assert (report.region, report.region_source) == (REGION, "IMDS placement/region")
    assert report.key_arn == key_arn
    assert report.endpoint == kms.url
    assert report.round_trip_ok and report.round_trip_error is None
    assert [r.action for r in kms.requests] == ["GenerateDataKey", "Decrypt"]
    configured = provider(kms, imds, key_arn.split("/")[-1], region=REGION).check()
    assert configured.region_source == "config"


def test_check_reports_a_failed_round_trip(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    kms.deny("GenerateDataKey")
    report = provider(kms, imds, key_arn).check()
    assert not report.round_trip_ok
    assert report.round_trip_error is not None
    assert report.round_trip_error.startswith("KMS denied GenerateDataKey")
    assert report.as_dict()["round_trip_ok"] is False


def test_token_bucket_throttle(kms: KmsEmulator, imds: ImdsEmulator, key_arn: str) -> None:
    p = provider(kms, imds, key_arn, max_attempts=1)
    kms.throttle(rate_per_s=0.001, burst=2)  # two requests now, the next in ~1000 s
    p.new_key(LUKS_UUID)
    p.new_key(LUKS_UUID)
    with pytest.raises(KeyServiceError, match="kept throttling GenerateDataKey"):
        p.new_key(LUKS_UUID)
    assert [r.error_code for r in kms.requests] == [None, None, "ThrottlingException"]
    kms.clear_faults()
    p.new_key(LUKS_UUID)


def test_request_log_never_holds_plaintext(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    new = provider(kms, imds, key_arn).new_key(LUKS_UUID)
    provider(kms, imds, key_arn).unwrap(new.wrapped)
    logged = repr(kms.requests)
    for form in _secret_forms(bytes(new.plaintext)):
        assert form not in logged
    assert [r.action for r in kms.requests] == ["GenerateDataKey", "Decrypt"]
    assert all(r.key_id for r in kms.requests)


def test_token_naming_another_key_is_refused(
    kms: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    p = provider(kms, imds, key_arn)
    new = p.new_key(LUKS_UUID)
    other = kms.create_key()
    with pytest.raises(KeyServiceError) as err:
        p.unwrap(replace(new.wrapped, key_id=other))
    assert f"was not encrypted under {other}" in str(err.value)
    assert kms.requests_for("Decrypt")[-1].error_code == "IncorrectKeyException"


@pytest.mark.parametrize(
    ("offset", "aws_year"),
    [
        (-3 * 365 * 86400, -3),  # this machine's clock years ahead
        (+3 * 365 * 86400, +3),  # this machine's clock years behind
    ],
)
def test_a_clock_far_off_is_explained_as_a_clock_problem(
    kms: KmsEmulator,
    imds: ImdsEmulator,
    key_arn: str,
    offset: int,
    aws_year: int,
) -> None:
    p = provider(kms, imds, key_arn)
    new = p.new_key(LUKS_UUID)
    kms.clock_offset_s = offset
    with pytest.raises(KeyServiceError) as err:
        p.unwrap(new.wrapped)
    assert "the clock of this machine is probably wrong" in str(err.value)
    # both clocks are named: this machine's and the one KMS goes by
    assert f"KMS says {time.gmtime().tm_year + aws_year}-" in str(err.value)
    assert f"it says {time.gmtime().tm_year}-" in str(err.value)
    assert not err.value.retryable
    assert kms.requests[-1].error_code == "InvalidSignatureException"
    kms.clock_offset_s = 0.0
    assert p.unwrap(new.wrapped) == new.plaintext
