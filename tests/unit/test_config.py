"""The configuration schema: defaults, and a field-path message for every mistake."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_IMDS_ENDPOINT,
    AwsKmsConfig,
    BootConfig,
    Config,
    FirstBootConfig,
    RootKind,
    RootSelector,
    load_config,
    parse_config,
)
from encryptrootfs.errors import ConfigError, ExitCode
from encryptrootfs.providers import ProviderName

REPO = Path(__file__).resolve().parents[2]
ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
MINIMAL: dict[str, Any] = {"providers": {"aws_kms": {"key_id": ARN}}}


def _with(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def test_minimal_config_gets_the_documented_defaults() -> None:
    config = parse_config(MINIMAL, source="test")
    assert config == Config(
        root=RootSelector(RootKind.CMDLINE, None),
        mapper_name="root",
        provider=ProviderName.AWS_KMS,
        aws_kms=AwsKmsConfig(key_id=ARN),
        first_boot=FirstBootConfig(enabled=True, grow=False),
        boot=BootConfig(device_timeout=90.0, unlock_timeout=300.0),
        source="test",
    )
    aws = config.aws_kms
    assert aws is not None
    assert aws.region is None and aws.endpoint_url is None and not aws.bind_instance_id
    assert aws.imds_endpoint == DEFAULT_IMDS_ENDPOINT == "http://169.254.169.254"
    assert dict(aws.encryption_context) == {}
    assert (aws.max_attempts, aws.imds_attempts) == (5, 5)
    assert aws.total_timeout >= aws.connect_timeout + aws.read_timeout
    assert Path("/etc/encryptrootfs/config.toml") == DEFAULT_CONFIG_PATH


def test_full_config_parses() -> None:
    data = {
        "provider": "aws-kms",
        "root": {"device": "PARTLABEL=root", "mapper_name": "cryptroot"},
        "providers": {
            "aws_kms": {
                "key_id": "alias/encryptrootfs/prod",
                "region": "us-gov-west-1",
                "endpoint_url": "https://kms-fips.us-gov-west-1.amazonaws.com/",
                "bind_instance_id": True,
                "imds_endpoint": "http://[fd00:ec2::254]",
                "connect_timeout": 1,
                "read_timeout": 3.5,
                "max_attempts": 8,
                "total_timeout": 120,
                "imds_attempts": 10,
                "imds_timeout": 1.5,
                "encryption_context": {"purpose": "rootfs", "fleet": "db"},
            }
        },
        "first_boot": {"enabled": False, "grow": True},
        "boot": {"device_timeout": 30, "unlock_timeout": 600.5},
    }
    config = parse_config(data, source="test")
    assert config.root == RootSelector(RootKind.PARTLABEL, "root")
    assert config.mapper_name == "cryptroot"
    assert config.first_boot == FirstBootConfig(enabled=False, grow=True)
    assert config.boot == BootConfig(device_timeout=30.0, unlock_timeout=600.5)
    aws = config.aws_kms
    assert aws is not None
    assert aws.endpoint_url == "https://kms-fips.us-gov-west-1.amazonaws.com"
    assert aws.imds_endpoint == "http://[fd00:ec2::254]"
    assert (aws.connect_timeout, aws.total_timeout, aws.max_attempts) == (1.0, 120.0, 8)
    assert dict(aws.encryption_context) == {"fleet": "db", "purpose": "rootfs"}
    with pytest.raises(TypeError):
        aws.encryption_context["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("device", "kind", "value"),
    [
        ("cmdline", RootKind.CMDLINE, None),
        (
            "UUID=0a1b2c3d-1111-2222-3333-444455556666",
            RootKind.UUID,
            "0a1b2c3d-1111-2222-3333-444455556666",
        ),
        ("LABEL=cloudimg-rootfs", RootKind.LABEL, "cloudimg-rootfs"),
        ("PARTUUID=6c1d-02", RootKind.PARTUUID, "6c1d-02"),
        ("PARTLABEL=root", RootKind.PARTLABEL, "root"),
    ],
)
def test_root_selectors(device: str, kind: RootKind, value: str) -> None:
    config = parse_config(_with("root.device", device), source="test")
    assert config.root == RootSelector(kind, value)
    assert str(config.root) == device


@pytest.mark.parametrize(
    "key_id",
    [
        ARN,
        "arn:aws:kms:eu-west-1:111122223333:alias/root",
        "alias/root-keys/eu",
        "1234abcd-12ab-34cd-56ef-1234567890ab",
        "mrk-1234abcd12ab34cd56ef1234567890ab",
    ],
)
def test_key_id_forms(key_id: str) -> None:
    config = parse_config(_with("providers.aws_kms.key_id", key_id), source="test")
    assert config.aws_kms is not None and config.aws_kms.key_id == key_id


# (field path, bad value, expected message start; "@" stands for "<field path>:")
BAD = [
    ("providers.aws_kms.key_id", "my-key", "@ must be an ARN, alias/... or key id"),
    ("providers.aws_kms.key_id", "alias/aws/ebs", "@ AWS managed keys"),
    ("providers.aws_kms.key_id", 42, "@ must be a string"),
    ("providers.aws_kms.region", "Europe", "@ must be an AWS region"),
    ("providers.aws_kms.region", "us-east-1", "@ 'us-east-1' differs from the region in key_id"),
    ("providers.aws_kms.endpoint_url", "kms.local:4566", "@ must be an http:// or https:// URL"),
    (
        "providers.aws_kms.endpoint_url",
        "https://user:pw@kms.example",
        "@ must be an http:// or https:// URL",
    ),
    (
        "providers.aws_kms.imds_endpoint",
        "ftp://169.254.169.254",
        "@ must be an http:// or https:// URL",
    ),
    (
        "providers.aws_kms.encryption_context",
        {"encryptrootfs:luks_uuid": "x"},
        "providers.aws_kms.encryption_context.encryptrootfs:luks_uuid: keys starting with",
    ),
    (
        "providers.aws_kms.encryption_context",
        {"n": 1},
        "providers.aws_kms.encryption_context.n: must be a string",
    ),
    ("providers.aws_kms.encryption_context", "purpose=root", "@ must be a table"),
    ("providers.aws_kms.connect_timeout", 0, "@ must be a positive"),
    ("providers.aws_kms.read_timeout", "5s", "@ must be a number"),
    ("providers.aws_kms.max_attempts", 0, "@ must be between 1 and"),
    ("providers.aws_kms.max_attempts", 2.5, "@ must be a whole number"),
    ("providers.aws_kms.imds_attempts", True, "@ must be a whole"),
    ("providers.aws_kms.total_timeout", 3, "@ 3 s is shorter than one KMS attempt"),
    ("providers.aws_kms.bind_instance_id", "yes", "@ must be true or false"),
    ("providers.aws_kms.bind_instance_ids", True, "@ unknown"),
    ("providers.gcp_kms", {"key": "x"}, "@ unknown provider (known: aws-kms)"),
    ("provider", "vault", "@ unknown provider 'vault' (known: aws-kms)"),
    ("root.device", "/dev/nvme0n1p1", 'root.device: must be "cmdline" or one of UUID='),
    ("root.device", "UUID=", "@ UUID= needs a value"),
    ("root.mapper_name", "../root", "@ must be 1-127 characters"),
    ("root.mapper_name", "", "@ must not be empty"),
    ("root.mount", "/", "@ unknown setting"),
    ("first_boot.enabled", 1, "@ must be true or false"),
    ("first_boot", True, "@ must be a table"),
    ("boot.unlock_timeout", -1, "@ must be a positive number of seconds"),
    ("boot.device_timeout", "90", "@ must be a number of seconds"),
    ("extra", 1, "@ unknown setting"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_config_names_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_with(path, value), source="/etc/encryptrootfs/config.toml")
    expected = message.replace("@", f"{path}:", 1) if message.startswith("@") else message
    assert err.value.message.startswith(expected), err.value.message
    assert err.value.exit_code is ExitCode.CONFIG
    assert "/etc/encryptrootfs/config.toml" in str(err.value)  # the hint names the file


def test_missing_provider_table_and_key() -> None:
    with pytest.raises(ConfigError, match=r"^providers\.aws_kms: missing"):
        parse_config({}, source="test")
    with pytest.raises(ConfigError, match=r"^providers\.aws_kms\.key_id: missing"):
        parse_config({"providers": {"aws_kms": {}}}, source="test")


def test_load_config_reads_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[root]\ndevice = "LABEL=root"\n\n[providers.aws_kms]\nkey_id = "alias/root"\n'
        '[providers.aws_kms.encryption_context]\npurpose = "rootfs"\n'
    )
    config = load_config(path)
    assert config.root == RootSelector(RootKind.LABEL, "root")
    assert config.aws_kms is not None
    assert dict(config.aws_kms.encryption_context) == {"purpose": "rootfs"}
    assert config.source == str(path)


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such configuration file") as err:
        load_config(missing)
    assert err.value.message.startswith(str(missing))
    broken = tmp_path / "broken.toml"
    broken.write_text("[providers.aws_kms\nkey_id = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML") as err:
        load_config(broken)
    assert err.value.message.startswith(str(broken))


def test_the_shipped_example_is_valid() -> None:
    config = load_config(REPO / "examples" / "config.toml")
    assert config.aws_kms is not None
    assert dict(config.aws_kms.encryption_context) == {"purpose": "rootfs"}


@pytest.mark.parametrize(
    ("aws", "said"),
    [
        ({"key_id": "alias/root"}, "region: (from IMDS placement/region)"),
        (
            {"key_id": "arn:aws:kms:ap-south-1:111122223333:key/1234abcd-12ab"},
            "region: ap-south-1 (from the key ARN)",
        ),
        ({"key_id": "alias/root", "region": "eu-west-1"}, "region: eu-west-1 (from the config)"),
    ],
)
def test_config_check_names_where_the_region_comes_from(
    aws: dict[str, str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from encryptrootfs import cli

    path = tmp_path / "config.toml"
    path.write_text("[providers.aws_kms]\n" + "".join(f'{k} = "{v}"\n' for k, v in aws.items()))
    assert cli.main(["config", "check", str(path)]) == 0
    assert f"  {said}\n" in capsys.readouterr().out
