"""The configuration file: one schema, frozen dataclasses, errors that name the field.

``/etc/encryptrootfs/config.toml`` says which root to encrypt and which key service wraps its
key. Every value is checked here, before anything touches a disk or the network; an unknown key
is an error too, because a typo (``bind_instance_ids``) silently ignored would change what the
machine does at boot. docs/config.md documents every field.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Optional
from urllib.parse import urlsplit

from .errors import ConfigError
from .providers.base import (
    REGION_PATTERN,
    RESERVED_CONTEXT_PREFIX,
    ProviderName,
    frozen_context,
    parse_key_arn,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the 3.9 targets
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/encryptrootfs/config.toml")
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"

# device-mapper names: at most 127 bytes; we also keep to characters that need no quoting in
# udev rules, crypttab and shell hooks.
_MAPPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,126}$")
_REGION = REGION_PATTERN
_ALIAS = re.compile(r"^alias/[A-Za-z0-9/_-]{1,250}$")
_KEY_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_MRK_ID = re.compile(r"^mrk-[0-9a-f]{32}$")
_MAX_ATTEMPTS = 20


class RootKind(str, Enum):
    """How the root partition is named; ``cmdline`` follows the kernel's ``root=``."""

    CMDLINE = "cmdline"
    UUID = "uuid"
    LABEL = "label"
    PARTUUID = "partuuid"
    PARTLABEL = "partlabel"

    def __str__(self) -> str:
        return self.value


_ROOT_PREFIXES = {
    "UUID=": RootKind.UUID,
    "LABEL=": RootKind.LABEL,
    "PARTUUID=": RootKind.PARTUUID,
    "PARTLABEL=": RootKind.PARTLABEL,
}


@dataclass(frozen=True)
class RootSelector:
    """Which partition is the root: never a guess, always a name the admin wrote down."""

    kind: RootKind = RootKind.CMDLINE
    value: Optional[str] = None  # None for cmdline

    def __str__(self) -> str:
        if self.kind is RootKind.CMDLINE:
            return "cmdline"
        return f"{self.kind.value.upper()}={self.value}"

    def describe(self) -> str:
        """For people: where the root comes from."""
        if self.kind is RootKind.CMDLINE:
            return "root= from the kernel command line"
        return str(self)


@dataclass(frozen=True)
class AwsKmsConfig:
    """``[providers.aws_kms]``: which KMS key, where, and how long to wait for it at boot."""

    key_id: str
    region: Optional[str] = None  # None: the token's region, or IMDS placement/region
    endpoint_url: Optional[str] = None  # None: botocore's endpoint rules for the region
    # region -> KMS URL for that region; wins over endpoint_url (the fallback for the others).
    endpoints: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    encryption_context: Mapping[str, str] = field(default_factory=lambda: frozen_context({}))
    bind_instance_id: bool = False
    imds_endpoint: str = DEFAULT_IMDS_ENDPOINT
    # Plain http:// to a KMS URL whose host is not a loopback address: the data key and the
    # session token would cross the network in the clear. Only for a lab or a local proxy.
    allow_insecure_http: bool = False
    connect_timeout: float = 2.0  # seconds per KMS connection attempt
    read_timeout: float = 5.0  # seconds per KMS response
    max_attempts: int = 5  # KMS attempts per call, first try included (standard retry mode)
    total_timeout: float = 60.0  # seconds for a whole wrap or unwrap, IMDS included
    imds_attempts: int = 5  # IMDS attempts per request
    imds_timeout: float = 2.0  # seconds per IMDS attempt

    def __post_init__(self) -> None:
        object.__setattr__(self, "encryption_context", frozen_context(self.encryption_context))
        object.__setattr__(self, "endpoints", MappingProxyType(dict(self.endpoints)))

    def region_and_source(self) -> tuple[Optional[str], str]:
        """Where KMS is called for this key, and why: the configured region, else the one a
        key ARN names, else (None) the instance's, from IMDS placement/region at run time."""
        if self.region:
            return self.region, "config"
        arn = parse_key_arn(self.key_id)
        if arn is not None:
            return arn.region, "key ARN"
        return None, "IMDS placement/region"


@dataclass(frozen=True)
class FirstBootConfig:
    """``[first_boot]``: whether the initramfs encrypts a plain root on its first boot."""

    enabled: bool = True
    # After encrypting: grow the partition to the end of the disk, the mapping and the filesystem.
    # (Room for the header is made either way; this only decides whether the rest is used.)
    grow: bool = False
    # When GRUB on the root's disk reads /boot from the root: move /boot to a plaintext
    # partition of this size before encrypting (boot/boot_partition.py). False: refuse instead.
    move_boot: bool = True
    boot_partition_mib: int = 512


@dataclass(frozen=True)
class BootConfig:
    """``[boot]``: how long the initramfs waits before it fails closed."""

    device_timeout: float = 90.0  # seconds for the root device to appear (systemd's default)
    unlock_timeout: float = 300.0  # seconds of unwrap retries (network, IMDS, KMS) at boot
    # Ask on the console for the recovery key once KMS is failing (only when one is enrolled).
    recovery_prompt: bool = True
    prefer_regions: tuple[str, ...] = ()  # wrapped copies in these regions are tried first
    # A failed unlock gives dracut's passwordless root shell only when this is true; otherwise
    # the console says why and the machine does ``failure_action`` (the initramfs carries
    # rd.shell=0 rd.emergency=<failure_action> as its own command-line defaults).
    emergency_shell: bool = False
    failure_action: str = "poweroff"  # one of FAILURE_ACTIONS
    # Only an encrypted root boots: set once the root was converted (and the initramfs rebuilt)
    # so that a plain root swapped in is refused, never encrypted again with a new key.
    require_encrypted: bool = False


# What the machine does when the boot fails closed without a shell (dracut's rd.emergency=).
FAILURE_ACTIONS = ("poweroff", "reboot", "halt")


class Raid(str, Enum):
    """How the devices of a data volume are combined."""

    NONE = "none"  # exactly one device
    RAID0 = "raid0"  # one md RAID0 array across all of them (mdadm), encrypted as one

    def __str__(self) -> str:
        return self.value


class VolumeFilesystem(str, Enum):
    """Filesystems a data volume is formatted with."""

    EXT4 = "ext4"
    XFS = "xfs"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class VolumeConfig:
    """One ``[[volumes]]`` entry: local disks that are encrypted, formatted when blank, mounted.

    ``devices`` are absolute /dev paths or globs (``/dev/disk/by-id/nvme-Amazon_EC2_NVMe_
    Instance_Storage_*``); what they match at boot is what the volume is made of.
    """

    name: str
    devices: tuple[str, ...]
    mount: str
    raid: Raid = Raid.NONE
    filesystem: VolumeFilesystem = VolumeFilesystem.EXT4
    mapper_name: str = ""  # "" in the constructor means: the volume's name
    mount_options: tuple[str, ...] = ()
    optional: bool = False  # no matching device at boot: skip (instance types without disks)

    def __post_init__(self) -> None:
        if not self.mapper_name:
            object.__setattr__(self, "mapper_name", self.name)


@dataclass(frozen=True)
class Config:
    root: RootSelector = field(default_factory=RootSelector)
    mapper_name: str = "root"
    provider: ProviderName = ProviderName.AWS_KMS
    aws_kms: Optional[AwsKmsConfig] = None
    first_boot: FirstBootConfig = field(default_factory=FirstBootConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    source: str = "<defaults>"  # where the configuration was read from, for messages
    volumes: tuple[VolumeConfig, ...] = ()  # [[volumes]]: data volumes, in the file's order


class _Table:
    """One TOML table being read: typed getters that name the field, unknown keys refused."""

    def __init__(self, data: Mapping[str, Any], path: str, source: str) -> None:
        self.data = data
        self.path = path
        self.source = source
        self.seen: set[str] = set()

    def field_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ConfigError:
        return _error(self.field_path(key), problem, self.source)

    def get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def string(self, key: str, default: Optional[str] = None) -> Optional[str]:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_toml_type(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {_toml_type(value)}")
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number of seconds, not {_toml_type(value)}")
        if not value > 0 or value != value or value == float("inf"):
            raise self.error(key, f"must be a positive number of seconds, not {value}")
        return float(value)

    def mib(self, key: str, default: int, low: int, high: int) -> int:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number of MiB, not {_toml_type(value)}")
        if not low <= value <= high:
            raise self.error(key, f"must be between {low} and {high} MiB, not {value}")
        return int(value)

    def count(self, key: str, default: int) -> int:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number, not {_toml_type(value)}")
        if not 1 <= value <= _MAX_ATTEMPTS:
            raise self.error(key, f"must be between 1 and {_MAX_ATTEMPTS}, not {value}")
        return int(value)

    def table(self, key: str) -> Optional[_Table]:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            where = self.field_path(key)
            raise self.error(key, f"must be a table ([{where}]), not {_toml_type(value)}")
        return _Table(value, self.field_path(key), self.source)

    def finish(self) -> None:
        unknown = sorted(k for k in self.data if k not in self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen)) or "none"
            raise self.error(unknown[0], f"unknown setting (known here: {known})")


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _error(path: str, problem: str, source: str) -> ConfigError:
    return ConfigError(
        f"{path}: {problem}",
        hint=f"fix {source} (nothing was changed); docs/config.md lists every setting",
    )


def load_config(path: Path = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate the configuration file at ``path``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such configuration file",
            hint="create it (examples/config.toml is a starting point) or pass another path",
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"{path}: is not valid TOML: {e}", hint="nothing was changed; fix the syntax"
        ) from None
    return parse_config(data, source=str(path))


def parse_config(data: Mapping[str, Any], *, source: str) -> Config:
    """Validate already-parsed TOML ``data``; ``source`` names it in messages."""
    top = _Table(data, "", source)
    root_table = top.table("root") or _Table({}, "root", source)
    root = _parse_root_device(root_table)
    # Defaults are the dataclass fields' (one place); the parsers only validate.
    mapper_name = root_table.string("mapper_name", Config.mapper_name) or Config.mapper_name
    if not _MAPPER_NAME.match(mapper_name):
        raise root_table.error(
            "mapper_name",
            "must be 1-127 characters of letters, digits, '_', '.', '+' or '-', starting "
            f"with a letter or digit, not {mapper_name!r}",
        )
    root_table.finish()

    provider_value = top.string("provider", ProviderName.AWS_KMS.value)
    try:
        provider = ProviderName(provider_value)
    except ValueError:
        raise top.error(
            "provider", f"unknown provider {provider_value!r} (known: {_known_providers()})"
        ) from None

    aws_kms: Optional[AwsKmsConfig] = None
    providers = top.table("providers")
    if providers is not None:
        for name in providers.data:
            if name.replace("_", "-") not in {p.value for p in ProviderName}:
                raise providers.error(name, f"unknown provider (known: {_known_providers()})")
        aws_table = providers.table("aws_kms")
        if aws_table is not None:
            aws_kms = _parse_aws_kms(aws_table)
        providers.finish()
    if provider is ProviderName.AWS_KMS and aws_kms is None:
        raise _error(
            "providers.aws_kms",
            "missing: the aws-kms provider needs a [providers.aws_kms] table with key_id",
            source,
        )

    first_boot_table = top.table("first_boot") or _Table({}, "first_boot", source)
    first_boot = FirstBootConfig(
        enabled=first_boot_table.boolean("enabled", FirstBootConfig.enabled),
        grow=first_boot_table.boolean("grow", FirstBootConfig.grow),
        move_boot=first_boot_table.boolean("move_boot", FirstBootConfig.move_boot),
        boot_partition_mib=first_boot_table.mib(
            "boot_partition_mib", FirstBootConfig.boot_partition_mib, 64, 8192
        ),
    )
    first_boot_table.finish()
    boot_table = top.table("boot") or _Table({}, "boot", source)
    boot = BootConfig(
        device_timeout=boot_table.seconds("device_timeout", BootConfig.device_timeout),
        unlock_timeout=boot_table.seconds("unlock_timeout", BootConfig.unlock_timeout),
        recovery_prompt=boot_table.boolean("recovery_prompt", BootConfig.recovery_prompt),
        prefer_regions=_parse_prefer_regions(boot_table),
        emergency_shell=boot_table.boolean("emergency_shell", BootConfig.emergency_shell),
        failure_action=_parse_failure_action(boot_table),
        require_encrypted=boot_table.boolean("require_encrypted", BootConfig.require_encrypted),
    )
    boot_table.finish()
    volumes = _parse_volumes(top, mapper_name)
    top.finish()
    return Config(
        root=root,
        mapper_name=mapper_name,
        provider=provider,
        aws_kms=aws_kms,
        first_boot=first_boot,
        boot=boot,
        source=source,
        volumes=volumes,
    )


def _parse_failure_action(table: _Table) -> str:
    value = table.string("failure_action", BootConfig.failure_action) or BootConfig.failure_action
    if value not in FAILURE_ACTIONS:
        raise table.error("failure_action", f"must be one of {', '.join(FAILURE_ACTIONS)}")
    return value


def _parse_prefer_regions(table: _Table) -> tuple[str, ...]:
    value = table.get("prefer_regions")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise table.error(
            "prefer_regions",
            "must be a list of region names such as "
            f'["eu-west-1", "us-east-1"], not {_toml_type(value)}',
        )
    for region in value:
        if not _REGION.match(region):
            raise table.error(
                "prefer_regions", f"{region!r} is not an AWS region name (e.g. eu-west-1)"
            )
    if len(set(value)) != len(value):
        raise table.error("prefer_regions", "names a region twice")
    return tuple(value)


def _known_providers() -> str:
    return ", ".join(p.value for p in ProviderName)


def _parse_root_device(table: _Table) -> RootSelector:
    device = table.string("device", "cmdline") or "cmdline"
    if device == "cmdline":
        return RootSelector(RootKind.CMDLINE, None)
    for prefix, kind in _ROOT_PREFIXES.items():
        if device.upper().startswith(prefix):
            value = device[len(prefix) :]
            if not value or any(c.isspace() for c in value) or '"' in value:
                raise table.error("device", f"{prefix} needs a value without spaces or quotes")
            return RootSelector(kind, value)
    raise table.error(
        "device",
        'must be "cmdline" or one of UUID=..., LABEL=..., PARTUUID=..., PARTLABEL=... '
        f"(a device path could name another disk after a reboot), not {device!r}",
    )


def _check_url(table: _Table, key: str, value: str) -> str:
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
        parts = urlsplit("")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not port_ok
        or parts.username is not None
        or parts.query
        or parts.fragment
    ):
        raise table.error(
            key, f"must be an http:// or https:// URL with a host and no credentials, not {value!r}"
        )
    return value.rstrip("/")


# AWS's own KMS host names carry the region they serve (kms.eu-west-1.amazonaws.com,
# vpce-....kms.eu-west-1.vpce.amazonaws.com); other hosts (proxies) may say anything.
_AWS_HOST_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_kms_url(table: _Table, key: str, value: str, allow_insecure_http: bool) -> str:
    """A KMS URL: https://, or http:// to a loopback address or with allow_insecure_http."""
    url = _check_url(table, key, value)
    parts = urlsplit(url)
    if (
        parts.scheme == "http"
        and not allow_insecure_http
        and not _is_loopback(parts.hostname or "")
    ):
        raise table.error(
            key,
            f"{url!r} is plain http://: the data key KMS returns and the instance's session "
            "token would cross the network in the clear. Use https://, or set "
            "providers.aws_kms.allow_insecure_http = true (a lab, or a proxy on this machine)",
        )
    return url


def _parse_endpoints(aws_table: _Table, allow_insecure_http: bool) -> dict[str, str]:
    """``[providers.aws_kms.endpoints]``: region name -> the KMS URL for that region."""
    table = aws_table.table("endpoints")
    if table is None:
        return {}
    endpoints: dict[str, str] = {}
    for region, value in table.data.items():
        table.seen.add(region)
        if not _REGION.match(region):
            raise table.error(
                region,
                f"{region!r} is not an AWS region name: each key of this table is a "
                'region and its value the KMS URL for it, e.g. "eu-west-1" = "https://..."',
            )
        if not isinstance(value, str) or not value.strip():
            what = "an empty string" if isinstance(value, str) else _toml_type(value)
            raise table.error(region, f"must be the KMS URL for {region} as a string, not {what}")
        url = _check_kms_url(table, region, value, allow_insecure_http)
        host = (urlsplit(url).hostname or "").lower()
        if host.endswith(_AWS_HOST_SUFFIXES):
            named = [label for label in host.split(".") if _REGION.match(label)]
            if named and region not in named:
                # KMS in one region neither serves another region's keys nor accepts a
                # request signed for another region: every call through it would fail.
                raise table.error(
                    region,
                    f"{url!r} is an AWS endpoint in {named[0]}, not in {region}; "
                    f"give {region} a URL of its own region",
                )
        endpoints[region] = url
    return endpoints


def _parse_aws_kms(table: _Table) -> AwsKmsConfig:
    key_id = table.string("key_id")
    if key_id is None:
        raise table.error("key_id", "missing: name the KMS key (ARN, alias/... or key id)")
    arn = parse_key_arn(key_id)
    if key_id.startswith("alias/aws/") or ":alias/aws/" in key_id:
        raise table.error(
            "key_id", "AWS managed keys (alias/aws/...) cannot wrap data keys; use a customer key"
        )
    if not (arn or _ALIAS.match(key_id) or _KEY_UUID.match(key_id) or _MRK_ID.match(key_id)):
        raise table.error("key_id", f"must be an ARN, alias/... or key id, not {key_id!r}")

    defaults = AwsKmsConfig(key_id=key_id)  # every default of the table, from one place
    region = table.string("region")
    if region is not None and not _REGION.match(region):
        raise table.error("region", f"must be an AWS region such as us-east-1, not {region!r}")
    if arn and region is not None and arn.region != region:
        raise table.error(
            "region",
            f"{region!r} differs from the region in key_id ({arn.region!r}); "
            "drop region or make them agree",
        )

    allow_http = table.boolean("allow_insecure_http", defaults.allow_insecure_http)
    endpoint_url = table.string("endpoint_url")
    if endpoint_url is not None:
        endpoint_url = _check_kms_url(table, "endpoint_url", endpoint_url, allow_http)
    endpoints = _parse_endpoints(table, allow_http)
    imds_endpoint = _check_url(
        table, "imds_endpoint", table.string("imds_endpoint", defaults.imds_endpoint) or ""
    )

    context: dict[str, str] = {}
    context_table = table.table("encryption_context")
    if context_table is not None:
        for key, value in context_table.data.items():
            context_table.seen.add(key)
            if key.startswith(RESERVED_CONTEXT_PREFIX):
                raise context_table.error(
                    key, f"keys starting with {RESERVED_CONTEXT_PREFIX!r} are set by encryptrootfs"
                )
            if not key:
                raise context_table.error(key, "keys must not be empty")
            if not isinstance(value, str):
                raise context_table.error(key, f"must be a string, not {_toml_type(value)}")
            context[key] = value

    connect_timeout = table.seconds("connect_timeout", defaults.connect_timeout)
    read_timeout = table.seconds("read_timeout", defaults.read_timeout)
    max_attempts = table.count("max_attempts", defaults.max_attempts)
    total_timeout = table.seconds("total_timeout", defaults.total_timeout)
    imds_attempts = table.count("imds_attempts", defaults.imds_attempts)
    imds_timeout = table.seconds("imds_timeout", defaults.imds_timeout)
    # One KMS attempt must fit in the whole budget, else every unwrap fails by construction.
    if total_timeout < connect_timeout + read_timeout:
        raise table.error(
            "total_timeout",
            f"{total_timeout:g} s is shorter than one KMS attempt "
            f"(connect_timeout + read_timeout = {connect_timeout + read_timeout:g} s)",
        )
    if total_timeout < imds_timeout:
        raise table.error(
            "total_timeout",
            f"{total_timeout:g} s is shorter than one IMDS attempt "
            f"(imds_timeout = {imds_timeout:g} s)",
        )
    bind_instance_id = table.boolean("bind_instance_id", defaults.bind_instance_id)
    table.finish()
    return AwsKmsConfig(
        key_id=key_id,
        region=region,
        endpoint_url=endpoint_url,
        endpoints=endpoints,
        encryption_context=context,
        bind_instance_id=bind_instance_id,
        imds_endpoint=imds_endpoint,
        allow_insecure_http=allow_http,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_attempts=max_attempts,
        total_timeout=total_timeout,
        imds_attempts=imds_attempts,
        imds_timeout=imds_timeout,
    )


# --- [[volumes]] ----------------------------------------------------------------------------

# Used as the md array's name and the default mapper name: short, no quoting needed anywhere.
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_MOUNT_OPTION = re.compile(r"^[^\s,]+$")
# Folders the system needs before the volumes' unit runs (it waits for the network): a volume
# mounted over one of them would hide what the running system already uses.
_SYSTEM_MOUNTS = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/lib",
        "/lib32",
        "/lib64",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/sys",
        "/usr",
        "/var",
    }
)


def _parse_volumes(top: _Table, root_mapper: str) -> tuple[VolumeConfig, ...]:
    raw = top.get("volumes")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(v, Mapping) for v in raw):
        raise top.error(
            "volumes", f"must be an array of tables ([[volumes]] sections), not {_toml_type(raw)}"
        )
    volumes: list[VolumeConfig] = []
    for index, entry in enumerate(raw):
        volume = _parse_volume(_Table(entry, f"volumes[{index}]", top.source))
        table = _Table(entry, f"volumes[{index}]", top.source)
        for other in volumes:
            if other.name == volume.name:
                raise table.error("name", f"{volume.name!r} is already the name of another volume")
            if other.mapper_name == volume.mapper_name:
                raise table.error(
                    "mapper_name",
                    f"{volume.mapper_name!r} is already the mapper name of volume {other.name!r}",
                )
            if _nested(other.mount, volume.mount):
                raise table.error(
                    "mount",
                    f"{volume.mount} and the mount of volume {other.name!r} "
                    f"({other.mount}) are the same or one is inside the other; give each "
                    "volume a folder of its own",
                )
        if volume.mapper_name == root_mapper:
            raise table.error(
                "mapper_name",
                f"{volume.mapper_name!r} is the root's mapper name ([root] mapper_name)",
            )
        volumes.append(volume)
    return tuple(volumes)


def _nested(a: str, b: str) -> bool:
    return a == b or b.startswith(a + "/") or a.startswith(b + "/")


def _parse_volume(table: _Table) -> VolumeConfig:
    name = table.string("name")
    if name is None:
        raise table.error("name", 'missing: give the volume a name (e.g. "data")')
    if not _VOLUME_NAME.match(name):
        raise table.error(
            "name",
            "must be 1-32 characters of letters, digits, '_' or '-', "
            f"starting with a letter or digit, not {name!r}",
        )
    devices = _parse_selectors(table)

    raid_value = table.string("raid", Raid.NONE.value) or Raid.NONE.value
    try:
        raid = Raid(raid_value)
    except ValueError:
        known = ", ".join(f'"{r.value}"' for r in Raid)
        raise table.error("raid", f"must be one of {known}, not {raid_value!r}") from None
    explicit = [d for d in devices if not _is_glob(d)]
    if raid is Raid.NONE and len(devices) > 1:
        raise table.error(
            "devices",
            f'raid = "none" takes one device, and {len(devices)} are listed'
            + (" (explicit paths)" if len(explicit) == len(devices) else "")
            + '; list one, or set raid = "raid0" to combine them',
        )

    fs_value = table.string("filesystem", VolumeFilesystem.EXT4.value) or ""
    try:
        filesystem = VolumeFilesystem(fs_value)
    except ValueError:
        known = ", ".join(f'"{f.value}"' for f in VolumeFilesystem)
        raise table.error("filesystem", f"must be one of {known}, not {fs_value!r}") from None

    mount = table.string("mount")
    if mount is None:
        raise table.error("mount", 'missing: the folder to mount the volume on (e.g. "/data")')
    mount = _check_mount(table, mount)

    mapper_name = table.string("mapper_name", name) or name
    if not _MAPPER_NAME.match(mapper_name):
        raise table.error(
            "mapper_name",
            "must be 1-127 characters of letters, digits, '_', '.', '+' or '-', "
            f"starting with a letter or digit, not {mapper_name!r}",
        )

    options = table.get("mount_options")
    if options is None:
        options = []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise table.error(
            "mount_options",
            f'must be a list of strings such as ["noatime"], not {_toml_type(options)}',
        )
    for option in options:
        if not _MOUNT_OPTION.match(option):
            raise table.error(
                "mount_options",
                "each option is one word without spaces or "
                f'commas (write ["noatime", "nodev"]), not {option!r}',
            )
    optional = table.boolean("optional", VolumeConfig.optional)
    table.finish()
    return VolumeConfig(
        name=name,
        devices=devices,
        mount=mount,
        raid=raid,
        filesystem=filesystem,
        mapper_name=mapper_name,
        mount_options=tuple(options),
        optional=optional,
    )


def _is_glob(selector: str) -> bool:
    return any(c in selector for c in "*?[")


def _parse_selectors(table: _Table) -> tuple[str, ...]:
    value = table.get("devices")
    if value is None:
        raise table.error(
            "devices",
            "missing: list the disks, e.g. "
            '["/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*"]',
        )
    if not isinstance(value, list) or not value:
        raise table.error(
            "devices",
            "must be a non-empty list of device paths or globs, not "
            + ("an empty list" if isinstance(value, list) else _toml_type(value)),
        )
    seen: list[str] = []
    for index, item in enumerate(value):
        where = f"devices[{index}]"
        if not isinstance(item, str):
            raise table.error(where, f"must be a string, not {_toml_type(item)}")
        parts = item.split("/")
        if (
            not item.startswith("/dev/")
            or any(c.isspace() for c in item)
            or ".." in parts
            or "." in parts
            or item.endswith("/")
        ):
            raise table.error(
                where,
                "must be an absolute path under /dev/ (globs allowed), "
                f"without spaces, '.' or '..', not {item!r}",
            )
        if item in seen:
            raise table.error(where, f"{item!r} is listed twice")
        seen.append(item)
    return tuple(seen)


def _check_mount(table: _Table, mount: str) -> str:
    parts = mount.split("/")
    if (
        not mount.startswith("/")
        or any(c.isspace() for c in mount)
        or ".." in parts
        or "." in parts
        or "//" in mount
    ):
        raise table.error(
            "mount",
            f"must be an absolute folder path without spaces, '.', '..' or '//', not {mount!r}",
        )
    mount = mount.rstrip("/") or "/"
    if mount in _SYSTEM_MOUNTS:
        raise table.error(
            "mount",
            f"{mount} is a system folder that is in use before the "
            "volumes are mounted; choose a folder of its own, e.g. /data",
        )
    return mount
