"""Key providers: one closed registry keyed by :class:`ProviderName`.

Each entry imports its module only when used, so that botocore (heavy: ~100 ms and 30 MB) is
loaded only when an AWS key is actually wrapped or unwrapped, and so that the initramfs carries
only the configured provider.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Optional, Union

from ..errors import ConfigError
from .base import (
    KeyProvider,
    KeyWrapper,
    NewKey,
    ProviderCheck,
    ProviderName,
    WrappedKey,
    parse_key_arn,
)

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "KeyProvider",
    "KeyWrapper",
    "NewKey",
    "ProviderCheck",
    "ProviderName",
    "WrappedKey",
    "provider_for_key",
    "provider_for_token",
    "provider_from_config",
    "provider_name",
]


def _aws_kms(config: Config) -> KeyProvider:
    from .aws_kms import AwsKmsProvider

    if config.aws_kms is None:
        raise ConfigError(
            "providers.aws_kms: missing: the aws-kms provider needs a [providers.aws_kms] table"
        )
    return AwsKmsProvider(config.aws_kms)


_REGISTRY: dict[ProviderName, Callable[[Config], KeyProvider]] = {
    ProviderName.AWS_KMS: _aws_kms,
}


def provider_name(name: Union[str, ProviderName]) -> ProviderName:
    """``name`` as a :class:`ProviderName`; an unknown name is an error listing the known ones."""
    try:
        return ProviderName(name)
    except ValueError:
        known = ", ".join(p.value for p in _REGISTRY)
        raise ConfigError(f"provider: unknown provider {str(name)!r} (known: {known})") from None


def provider_from_config(config: Config) -> KeyProvider:
    """The provider the configuration names, ready to make new keys and to unwrap."""
    return _REGISTRY[provider_name(config.provider)](config)


def provider_for_token(config: Config, wrapped: WrappedKey) -> KeyProvider:
    """The provider that can unwrap ``wrapped``.

    The token carries the key, the region and the context; the configuration contributes only
    how to reach the service (endpoint, timeouts), so a token written under an older
    configuration still unwraps.
    """
    return _REGISTRY[provider_name(wrapped.provider)](config)


def provider_for_key(config: Config, key_id: Optional[str], region: Optional[str]) -> KeyWrapper:
    """The configured provider, aimed at another key and/or region (rewrap, copies).

    Only the key and the region change; how the service is reached (endpoint, credentials,
    budgets) stays as configured. ``None`` keeps the configured value.
    """
    from .aws_kms import AwsKmsProvider

    provider = provider_name(config.provider)
    if provider is not ProviderName.AWS_KMS or config.aws_kms is None:
        raise ConfigError(
            "providers.aws_kms: missing: wrapping for another key needs a [providers.aws_kms] "
            "table (how to reach KMS)"
        )
    aws = config.aws_kms
    new_key = key_id or aws.key_id
    arn = parse_key_arn(key_id) if key_id else None
    if arn is not None:
        arn_region = arn.region
        if region and arn_region and region != arn_region:
            raise ConfigError(
                f"--region {region} differs from the region in the key ARN ({arn_region}); "
                "nothing was changed",
                hint="drop --region or make them agree",
            )
        # A key ARN names its region; the configured one may be another region's.
        region = region or arn_region or None
    elif key_id and region is None:
        # A bare alias or key id: resolved in the configured region (or IMDS's), as at enroll.
        region = aws.region
    return AwsKmsProvider(dataclasses.replace(aws, key_id=new_key, region=region or aws.region))
