"""``[boot] recovery_prompt`` and ``[boot] prefer_regions``: defaults, values, errors."""

from __future__ import annotations

from typing import Any

import pytest

from encryptrootfs.config import parse_config
from encryptrootfs.errors import ConfigError

BASE: dict[str, Any] = {"providers": {"aws_kms": {"key_id": "alias/root"}}}


def with_boot(**boot: Any) -> dict[str, Any]:
    return {**BASE, "boot": boot}


def test_defaults_prompt_on_and_header_order() -> None:
    boot = parse_config(BASE, source="t").boot
    assert boot.recovery_prompt is True
    assert boot.prefer_regions == ()


def test_values_are_read() -> None:
    boot = parse_config(
        with_boot(recovery_prompt=False, prefer_regions=["eu-west-1", "us-east-1"]), source="t"
    ).boot
    assert boot.recovery_prompt is False
    assert boot.prefer_regions == ("eu-west-1", "us-east-1")


@pytest.mark.parametrize(
    ("boot", "message"),
    [
        ({"recovery_prompt": "yes"}, "boot.recovery_prompt: must be true or false"),
        ({"prefer_regions": "eu-west-1"}, "boot.prefer_regions: must be a list of region names"),
        ({"prefer_regions": [1]}, "boot.prefer_regions: must be a list of region names"),
        ({"prefer_regions": ["Ireland"]}, "boot.prefer_regions: 'Ireland' is not an AWS region"),
        (
            {"prefer_regions": ["eu-west-1", "eu-west-1"]},
            "boot.prefer_regions: names a region twice",
        ),
    ],
)
def test_bad_values_name_the_field(boot: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(with_boot(**boot), source="t")
    assert e.value.message.startswith(message), e.value.message
