"""One KMS URL per region: the pure choice, the hints it feeds, and real clients over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from botocore import exceptions as bx

from encryptrootfs.config import AwsKmsConfig, Config
from encryptrootfs.errors import KeyServiceError
from encryptrootfs.providers import provider_for_key
from encryptrootfs.providers.aws_kms import (
    AwsKmsProvider,
    KmsCall,
    KmsEndpoint,
    explain_kms_error,
    kms_endpoint,
)
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from support.emulators import REGION, aws_config

KEY = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
EU_URL = "https://vpce-0abc-xyz.kms.eu-west-1.vpce.amazonaws.com"
US_URL = "https://vpce-0def-uvw.kms.us-east-1.vpce.amazonaws.com"
FALLBACK = "https://kms-proxy.internal.example"
LUKS_UUID = "5f2c7d1e-8a4b-4c3d-9e6f-0a1b2c3d4e5f"
OTHER = "us-east-1"


def test_a_region_in_the_table_gets_its_own_url_over_endpoint_url() -> None:
    cfg = AwsKmsConfig(
        key_id=KEY, endpoint_url=FALLBACK, endpoints={"eu-west-1": EU_URL, "us-east-1": US_URL}
    )
    assert kms_endpoint(cfg, "us-east-1") == KmsEndpoint(
        US_URL, "providers.aws_kms.endpoints.us-east-1"
    )
    assert kms_endpoint(cfg, "eu-west-1") == KmsEndpoint(
        EU_URL, "providers.aws_kms.endpoints.eu-west-1"
    )


def test_a_region_not_in_the_table_falls_back_to_endpoint_url() -> None:
    cfg = AwsKmsConfig(key_id=KEY, endpoint_url=FALLBACK, endpoints={"eu-west-1": EU_URL})
    assert kms_endpoint(cfg, "us-east-1") == KmsEndpoint(FALLBACK, "providers.aws_kms.endpoint_url")


def test_without_either_botocore_chooses() -> None:
    cfg = AwsKmsConfig(key_id=KEY, endpoints={"eu-west-1": EU_URL})
    assert kms_endpoint(cfg, "us-east-1") == KmsEndpoint(None, "")


def test_an_unreachable_endpoint_names_the_url_and_the_setting_that_chose_it() -> None:
    call = KmsCall(
        "Decrypt", KEY, "us-east-1", US_URL, 5, 60.0, "providers.aws_kms.endpoints.us-east-1"
    )
    error = explain_kms_error(bx.EndpointConnectionError(endpoint_url=US_URL), call)
    assert f"could not reach KMS at {US_URL}" in error.message
    assert f"{US_URL} is set by providers.aws_kms.endpoints.us-east-1" in (error.hint or "")
    botocore_url = "https://kms.us-east-1.amazonaws.com"
    call = replace(call, endpoint=botocore_url, endpoint_setting="")
    error = explain_kms_error(bx.EndpointConnectionError(endpoint_url=botocore_url), call)
    assert (
        f"{botocore_url} is botocore's address for us-east-1 "
        "(providers.aws_kms.endpoints.us-east-1 or endpoint_url can name another)"
    ) in (error.hint or "")


# -- real clients: two KMS emulators, one per region, each at its own 127.0.0.1 port --------


@pytest.fixture
def kms_other(aws_isolated: None) -> Iterator[KmsEmulator]:
    with KmsEmulator(region=OTHER) as emulator:
        yield emulator


def _config(kms: KmsEmulator, kms_other: KmsEmulator, imds: ImdsEmulator) -> Config:
    # endpoint_url (the fallback) is the home region's emulator, so even a provider that
    # ignored the table would stay on 127.0.0.1; it would just ask the wrong emulator.
    aws = aws_config(kms, imds, "alias/encryptrootfs-test", endpoints={OTHER: kms_other.url})
    return Config(aws_kms=aws)


def test_each_region_is_asked_at_its_own_url(
    kms: KmsEmulator, kms_other: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    other_key = kms_other.create_key(alias="encryptrootfs-copy")
    config = _config(kms, kms_other, imds)
    assert config.aws_kms is not None
    new = AwsKmsProvider(config.aws_kms).new_key(LUKS_UUID)  # the home region (IMDS)
    # enroll --copy --key-id K2 --region us-east-1 goes through provider_for_key.
    copy = provider_for_key(config, "alias/encryptrootfs-copy", OTHER).wrap(
        new.plaintext, new.wrapped.encryption_context
    )
    assert (new.wrapped.region, new.wrapped.key_id) == (REGION, key_arn)
    assert (copy.region, copy.key_id) == (OTHER, other_key)

    unwrapper = AwsKmsProvider(config.aws_kms)  # one provider, a client per region
    assert unwrapper.unwrap(copy) == new.plaintext
    assert unwrapper.unwrap(new.wrapped) == new.plaintext

    home = [(r.action, r.region) for r in kms.requests]
    away = [(r.action, r.region) for r in kms_other.requests]
    assert home == [("GenerateDataKey", REGION), ("Decrypt", REGION)]
    assert away == [("Encrypt", OTHER), ("Decrypt", OTHER)]


def test_a_region_whose_url_is_down_is_reported_with_that_url(
    kms: KmsEmulator, kms_other: KmsEmulator, imds: ImdsEmulator, key_arn: str
) -> None:
    kms_other.create_key(alias="encryptrootfs-copy")
    config = _config(kms, kms_other, imds)
    assert config.aws_kms is not None
    new = AwsKmsProvider(config.aws_kms).new_key(LUKS_UUID)
    copy = provider_for_key(config, "alias/encryptrootfs-copy", OTHER).wrap(
        new.plaintext, new.wrapped.encryption_context
    )
    kms_other.set_unreachable(True)
    with pytest.raises(KeyServiceError) as err:
        AwsKmsProvider(replace(config.aws_kms, max_attempts=1)).unwrap(copy)
    assert f"could not reach KMS at {kms_other.url}" in err.value.message
    assert f"is set by providers.aws_kms.endpoints.{OTHER}" in (err.value.hint or "")
    assert [r.action for r in kms.requests] == ["GenerateDataKey"]  # no detour to the fallback
