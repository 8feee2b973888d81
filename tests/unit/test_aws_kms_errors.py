"""botocore failures -> the sentence the operator reads. No network: errors built directly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from botocore import exceptions as bx

import encryptrootfs
from encryptrootfs.errors import ConfigError, KeyServiceError
from encryptrootfs.providers import ProviderName, provider_name
from encryptrootfs.providers.aws_kms import KmsCall, _OutOfTime, explain_kms_error

KEY = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
CALL = KmsCall("Decrypt", KEY, "eu-west-1", "https://kms.eu-west-1.amazonaws.com", 5, 60.0)
# Looks like key material; must never be echoed even when a service message carries it.
SECRET_B64 = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA="


def _client_error(code: str, message: str = "details", status: int = 400) -> bx.ClientError:
    return bx.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "Decrypt",
    )


@pytest.mark.parametrize(
    ("code", "sentence"),
    [
        ("AccessDeniedException", f"KMS denied Decrypt on {KEY} in eu-west-1"),
        ("DisabledException", f"the key {KEY} is disabled"),
        ("KMSInvalidStateException", "is pending deletion or in another state"),
        ("InvalidCiphertextException", "does not belong to this volume or was altered"),
        ("IncorrectKeyException", f"was not encrypted under {KEY}"),
        ("NotFoundException", f"KMS has no key {KEY} in eu-west-1"),
        ("ThrottlingException", "KMS kept throttling Decrypt past the retry budget (5 attempts"),
        ("InvalidSignatureException", "the clock of this machine is probably wrong"),
        ("RequestExpired", "the clock of this machine is probably wrong"),
        ("UnrecognizedClientException", "credentials"),
        ("ExpiredTokenException", "invalid or expired"),
        ("KMSInternalException", "KMS failed internally on Decrypt"),
        ("InvalidKeyUsageException", "cannot wrap data keys"),
        ("SomethingNewException", "KMS Decrypt on"),
    ],
)
def test_client_error_codes(code: str, sentence: str) -> None:
    error = explain_kms_error(_client_error(code), CALL)
    assert isinstance(error, KeyServiceError)
    assert sentence in str(error)
    assert "nothing was changed on disk" in str(error)


def test_signature_expired_message_means_clock_skew() -> None:
    error = explain_kms_error(
        _client_error(
            "InvalidSignatureException",
            "Signature expired: 20261128T000000Z is now earlier than 20261128T043000Z",
        ),
        CALL,
    )
    assert "clock" in error.message


@pytest.mark.parametrize(
    ("exc", "sentence"),
    [
        (
            bx.EndpointConnectionError(endpoint_url=CALL.endpoint),
            f"could not reach KMS at {CALL.endpoint}",
        ),
        (
            bx.ConnectTimeoutError(endpoint_url=CALL.endpoint),
            f"could not reach KMS at {CALL.endpoint}",
        ),
        (bx.ReadTimeoutError(endpoint_url=CALL.endpoint), "did not answer Decrypt in time"),
        (bx.NoCredentialsError(), "no AWS credentials were found"),
        (
            bx.SSLError(endpoint_url=CALL.endpoint, error="certificate verify failed"),
            "the connection to KMS",
        ),
        (_OutOfTime("the deadline passed"), "gave up on KMS Decrypt after the total time budget"),
    ],
)
def test_transport_errors(exc: Exception, sentence: str) -> None:
    assert sentence in str(explain_kms_error(exc, CALL))


@pytest.mark.parametrize("code", ["AccessDeniedException", "SomethingNewException"])
def test_messages_are_bounded_and_single_line(code: str) -> None:
    error = explain_kms_error(_client_error(code, "x\n" * 1000), CALL)
    assert "\n" not in error.message
    assert len(error.message) < 600


@pytest.mark.parametrize(
    "code",
    [
        "InvalidCiphertextException",
        "DisabledException",
        "KMSInvalidStateException",
        "IncorrectKeyException",
        "ThrottlingException",
        "InvalidSignatureException",
    ],
)
def test_fixed_sentences_do_not_echo_service_text(code: str) -> None:
    # These sentences are ours alone: whatever the service put in its message stays out.
    assert SECRET_B64 not in str(explain_kms_error(_client_error(code, SECRET_B64), CALL))


def test_botocore_is_imported_lazily() -> None:
    # Loading config, token or the registry must not pay for botocore (~100 ms, 30 MB at boot).
    package = Path(encryptrootfs.__file__).parent
    for module in [
        "config.py",
        "token.py",
        "providers/__init__.py",
        "providers/base.py",
        "providers/aws_kms.py",
        "providers/imds.py",
    ]:
        tree = ast.parse((package / module).read_text())
        for node in tree.body:  # module level only; imports inside functions are the point
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "botocore" for n in names), module


def test_unknown_provider_lists_the_known_ones() -> None:
    assert provider_name("aws-kms") is ProviderName.AWS_KMS
    with pytest.raises(ConfigError, match=r"unknown provider 'vault' \(known: aws-kms\)"):
        provider_name("vault")


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (_client_error("ThrottlingException"), True),
        (_client_error("KMSInternalException", status=500), True),
        (_client_error("SomethingNewException", status=503), True),
        (bx.EndpointConnectionError(endpoint_url=CALL.endpoint), True),
        (bx.ReadTimeoutError(endpoint_url=CALL.endpoint), True),
        (_OutOfTime("late"), True),
        (_client_error("AccessDeniedException"), False),
        (_client_error("InvalidCiphertextException"), False),
        (_client_error("DisabledException"), False),
        (_client_error("KMSInvalidStateException"), False),
        (_client_error("NotFoundException"), False),
        (_client_error("SomethingNewException", status=400), False),
    ],
)
def test_retryable_tells_the_boot_loop_whether_waiting_can_help(
    error: Exception, retryable: bool
) -> None:
    assert explain_kms_error(error, CALL).retryable is retryable
