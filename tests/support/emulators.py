"""Helpers for tests against the emulators (fixtures: tests/conftest.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from encryptrootfs.config import AwsKmsConfig
from encryptrootfs.providers.aws_kms import AwsKmsProvider
from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator

REGION = "eu-west-1"
INSTANCE_ID = "i-0abc1234def567890"


def aws_config(kms: KmsEmulator, imds: ImdsEmulator, key_id: str, **changes: Any) -> AwsKmsConfig:
    """A config pointing at the emulators, with budgets small enough for tests."""
    base = AwsKmsConfig(
        key_id=key_id,
        endpoint_url=kms.url,
        imds_endpoint=imds.url,
        connect_timeout=1.0,
        read_timeout=2.0,
        max_attempts=4,
        total_timeout=20.0,
        imds_attempts=3,
        imds_timeout=1.0,
    )
    return replace(base, **changes)


def provider(kms: KmsEmulator, imds: ImdsEmulator, key_id: str, **changes: Any) -> AwsKmsProvider:
    return AwsKmsProvider(aws_config(kms, imds, key_id, **changes))
