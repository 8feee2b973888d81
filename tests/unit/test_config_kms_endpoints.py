"""``[providers.aws_kms.endpoints]``: one KMS URL per region, checked like endpoint_url."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from encryptrootfs.config import load_config, parse_config
from encryptrootfs.errors import ConfigError, ExitCode
from encryptrootfs.image.install import Status, check_config, install_config

ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
EU_URL = "https://vpce-0abc-xyz.kms.eu-west-1.vpce.amazonaws.com"
US_URL = "https://vpce-0def-uvw.kms.us-east-1.vpce.amazonaws.com"
GOOD = f"""
[providers.aws_kms]
key_id = "{ARN}"
endpoint_url = "https://kms-proxy.internal.example:8443/"

[providers.aws_kms.endpoints]
"eu-west-1" = "{EU_URL}/"
us-east-1 = "{US_URL}"
"""


def _aws(**aws: Any) -> dict[str, Any]:
    return {"providers": {"aws_kms": {"key_id": ARN, **aws}}}


def test_a_table_of_region_urls_is_read_next_to_endpoint_url(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(GOOD)
    aws = load_config(path).aws_kms
    assert aws is not None
    # Trailing "/" dropped as for endpoint_url; endpoint_url stays: the other regions' URL.
    assert dict(aws.endpoints) == {"eu-west-1": EU_URL, "us-east-1": US_URL}
    assert aws.endpoint_url == "https://kms-proxy.internal.example:8443"
    with pytest.raises(TypeError):
        aws.endpoints["ap-south-1"] = "https://x.example"  # type: ignore[index]


def test_no_table_means_no_per_region_urls() -> None:
    aws = parse_config(_aws(), source="test").aws_kms
    assert aws is not None and dict(aws.endpoints) == {}


def test_a_proxy_host_may_carry_any_region_label() -> None:
    # Not an AWS host name: the label says nothing about which region KMS answers for.
    url = "https://kms.eu-west-1.proxy.example"
    aws = parse_config(_aws(endpoints={"us-east-1": url}), source="test").aws_kms
    assert aws is not None and aws.endpoints["us-east-1"] == url


BAD = [
    (
        {"us-east-1": "vpce-0def.kms.us-east-1.vpce.amazonaws.com"},
        "providers.aws_kms.endpoints.us-east-1: must be an http:// or https:// URL with a host and "
        "no credentials, not 'vpce-0def.kms.us-east-1.vpce.amazonaws.com'",
    ),
    (
        {"us-east-1": "https://user:pw@kms.example"},
        "providers.aws_kms.endpoints.us-east-1: must be an http:// or https:// URL",
    ),
    (
        {"us-east-1": 443},
        "providers.aws_kms.endpoints.us-east-1: must be the KMS URL for us-east-1 as a string, "
        "not a number",
    ),
    (
        {"us-east-1": " "},
        "providers.aws_kms.endpoints.us-east-1: must be the KMS URL for us-east-1 as a string, "
        "not an empty string",
    ),
    (
        {"Virginia": US_URL},
        "providers.aws_kms.endpoints.Virginia: 'Virginia' is not an AWS region name",
    ),
    (
        {"us-east-1": EU_URL},
        f"providers.aws_kms.endpoints.us-east-1: '{EU_URL}' is an AWS endpoint in eu-west-1, not "
        "in us-east-1",
    ),
    (
        {"us-east-1": "https://kms.eu-west-1.amazonaws.com"},
        "providers.aws_kms.endpoints.us-east-1: 'https://kms.eu-west-1.amazonaws.com' is an AWS "
        "endpoint in eu-west-1",
    ),
    (
        US_URL,
        "providers.aws_kms.endpoints: must be a table ([providers.aws_kms.endpoints]), "
        "not a string",
    ),
    (
        [US_URL],
        "providers.aws_kms.endpoints: must be a table ([providers.aws_kms.endpoints]), not a list",
    ),
]


@pytest.mark.parametrize(("endpoints", "message"), BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_endpoints_name_the_key_the_value_and_what_is_expected(
    endpoints: Any, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_aws(endpoints=endpoints), source="/etc/encryptrootfs/config.toml")
    assert err.value.message.startswith(message), err.value.message
    assert err.value.exit_code is ExitCode.CONFIG
    assert "/etc/encryptrootfs/config.toml" in str(err.value)


def _bad_file(folder: Path) -> Path:
    path = folder / "config.toml"
    path.write_text(GOOD.replace('us-east-1 = "', 'us-east-1 = "ftp://'))
    return path


def test_install_check_reports_a_bad_endpoint(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "encryptrootfs"
    etc.mkdir(parents=True)
    _bad_file(etc)
    item, config = check_config(tmp_path)
    assert config is None
    assert item.status is Status.MISSING and item.exit_code is ExitCode.CONFIG
    assert item.detail.startswith("providers.aws_kms.endpoints.us-east-1: must be an http://")


def test_install_refuses_a_bad_endpoint_before_writing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ConfigError, match=r"^providers\.aws_kms\.endpoints\.us-east-1: must be"):
        install_config(root, _bad_file(tmp_path))
    assert not (root / "etc").exists()
