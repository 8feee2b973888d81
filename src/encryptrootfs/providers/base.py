"""The key provider contract.

A provider makes a new random volume key and hands it back twice: in plaintext (memory only,
for cryptsetup's stdin) and wrapped by the key service. Everything needed to unwrap later
lives in the :class:`WrappedKey`, which the token stores in the LUKS2 header; the plaintext
never leaves the process.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Optional, Protocol

from ..errors import VerifyError

# Pairs whose keys start with this prefix are written by encryptrootfs itself; the
# configuration may not set them (a key policy can trust them).
RESERVED_CONTEXT_PREFIX = "encryptrootfs:"
CONTEXT_LUKS_UUID = "encryptrootfs:luks_uuid"
CONTEXT_INSTANCE_ID = "encryptrootfs:instance_id"
# The instance's ARN: what a key policy compares with ``${ec2:SourceInstanceARN}``, the ARN of
# the instance whose role credentials signed the request. This pair makes the binding a rule
# KMS enforces; the instance id beside it is for people and CloudTrail.
CONTEXT_INSTANCE_ARN = "encryptrootfs:instance_arn"

# An AWS region name (eu-west-1, us-gov-west-1, cn-north-1): what a config or a token may name.
REGION_PATTERN = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")

# LUKS2 volume keys for aes-xts-plain64 with 256-bit AES are 64 bytes.
VOLUME_KEY_BYTES = 64


class ProviderName(str, Enum):
    """Known key providers; the value is what config files and tokens spell."""

    AWS_KMS = "aws-kms"

    def __str__(self) -> str:
        return self.value


def frozen_context(pairs: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only copy of an encryption context, keys sorted for a stable JSON form."""
    return MappingProxyType({k: pairs[k] for k in sorted(pairs)})


@dataclass(frozen=True)
class WrappedKey:
    """A volume key as the key service returned it: ciphertext plus what unwrapping needs."""

    provider: ProviderName
    key_id: str  # the full key ARN, as KMS reports it
    region: str
    ciphertext: bytes
    encryption_context: Mapping[str, str] = field(default_factory=lambda: frozen_context({}))

    def __post_init__(self) -> None:
        # Callers may pass a plain dict; freeze a copy so the dataclass stays immutable.
        object.__setattr__(self, "encryption_context", frozen_context(self.encryption_context))

    def __repr__(self) -> str:
        return (
            f"WrappedKey(provider={self.provider.value!r}, key_id={self.key_id!r}, "
            f"region={self.region!r}, ciphertext=<{len(self.ciphertext)} bytes>, "
            f"encryption_context={dict(self.encryption_context)!r})"
        )


@dataclass(frozen=True)
class NewKey:
    """A fresh volume key: plaintext for cryptsetup (memory only) and its wrapped form."""

    plaintext: bytearray = field(repr=False)
    wrapped: WrappedKey

    def wipe(self) -> None:
        """Overwrite the plaintext in place; call it as soon as cryptsetup has the key."""
        wipe(self.plaintext)


def partition_of(region: str) -> str:
    """The AWS partition of ``region`` (the second field of every ARN made there)."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    if region.startswith("us-iso-"):
        return "aws-iso"
    if region.startswith("us-isob-"):
        return "aws-iso-b"
    return "aws"


def instance_arn(region: str, account_id: str, instance_id: str) -> str:
    """``arn:<partition>:ec2:<region>:<account>:instance/<id>``, as ``ec2:SourceInstanceARN``."""
    return f"arn:{partition_of(region)}:ec2:{region}:{account_id}:instance/{instance_id}"


def wipe(secret: bytearray) -> None:
    """Overwrite ``secret`` with zeros in place (the best Python can do for key bytes)."""
    for i in range(len(secret)):
        secret[i] = 0


@dataclass(frozen=True)
class ProviderCheck:
    """What ``encryptrootfs kms check`` found, step by step."""

    provider: ProviderName
    credential_source: str  # e.g. "iam-role via IMDSv2", "environment variables"
    region: str
    region_source: str  # "config", "token" or "IMDS placement/region"
    endpoint: str  # the KMS endpoint actually used
    key_arn: Optional[str]  # None when the round trip failed before KMS named the key
    round_trip_ok: bool  # GenerateDataKey then Decrypt returned the same key bytes
    round_trip_error: Optional[str] = None  # the sentence explaining why it did not

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, in the order a person reads it."""
        return {
            "provider": self.provider.value,
            "credential_source": self.credential_source,
            "region": self.region,
            "region_source": self.region_source,
            "endpoint": self.endpoint,
            "key_arn": self.key_arn,
            "round_trip_ok": self.round_trip_ok,
            "round_trip_error": self.round_trip_error,
        }


class KeyProvider(Protocol):
    """What every provider does; see providers/aws_kms.py for the reference implementation."""

    name: ProviderName

    def new_key(self, luks_uuid: str) -> NewKey:
        """Make a random volume key bound to the LUKS2 volume ``luks_uuid``."""
        ...

    def unwrap(self, wrapped: WrappedKey) -> bytearray:
        """The plaintext volume key; the caller wipes it when done."""
        ...

    def check(self) -> ProviderCheck:
        """Credentials, region and a wrap/unwrap round trip, without touching any device."""
        ...


class KeyWrapper(KeyProvider, Protocol):
    """A provider that can also wrap a key it did not make (rewrap, copies of a token).

    The key is the one a token already holds, so the new wrapped copy opens the same keyslots
    and the volume key is never touched.
    """

    def wrap(
        self, plaintext: bytes | bytearray, encryption_context: Mapping[str, str]
    ) -> WrappedKey:
        """``plaintext`` wrapped under this provider's key, bound to ``encryption_context``."""
        ...


# --------------------------------------------------------------------------------------------
# The custody proof: before a wrapped key is trusted with a keyslot (first boot, enroll, a
# volume) or stored as a new copy (copies, rewrap), it is unwrapped once and compared, in
# constant time, with the key it must give back; the unwrapped bytes are wiped either way.

# Said whenever the proof fails: a key service that answers Decrypt with other bytes is not
# the one configured (a proxy, a wrong endpoint), and a keyslot must never depend on it.
ROUND_TRIP_HINT = (
    "check that the endpoint really is AWS KMS (providers.aws_kms.endpoints / endpoint_url)"
)


class Unwrapper(Protocol):
    def unwrap(self, wrapped: WrappedKey) -> bytearray: ...


def prove_round_trip(
    unwrapper: Unwrapper, wrapped: WrappedKey, key: bytes | bytearray, *, unchanged: str
) -> None:
    """Raise :class:`VerifyError` unless ``wrapped`` unwraps to exactly ``key``.

    ``unchanged`` completes the sentence with what the caller has (not) written, e.g.
    "nothing was changed on /dev/vdb"."""
    back = unwrapper.unwrap(wrapped)
    try:
        if not hmac.compare_digest(back, key):  # bytes-like: no unwipeable copies
            raise VerifyError(
                f"KMS returned a different key on unwrap; {unchanged}.", hint=ROUND_TRIP_HINT
            )
    finally:
        wipe(back)


def new_proven_key(provider: KeyProvider, luks_uuid: str, *, unchanged: str) -> NewKey:
    """A new data key for ``luks_uuid`` whose wrapped form is proven to unwrap to it."""
    new = provider.new_key(luks_uuid)
    try:
        prove_round_trip(provider, new.wrapped, new.plaintext, unchanged=unchanged)
    except BaseException:
        new.wipe()
        raise
    return new


# --------------------------------------------------------------------------------------------
# The key ARN, parsed in one place: the config validates with it, and the region a key ARN
# names decides where KMS is called (before the configured region's default or IMDS's).

_KEY_ARN = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):kms:(?P<region>[a-z0-9-]+):(?P<account>[0-9]{12}):"
    r"(?P<resource>key/[A-Za-z0-9-]+|alias/[A-Za-z0-9/_-]+)$"
)


@dataclass(frozen=True)
class KeyArn:
    partition: str  # aws, aws-cn, aws-us-gov
    region: str
    account: str
    resource: str  # key/<id> or alias/<name>


def parse_key_arn(key_id: str) -> Optional[KeyArn]:
    """The parts of a KMS key (or alias) ARN; None when ``key_id`` is not one."""
    match = _KEY_ARN.match(key_id)
    if match is None:
        return None
    return KeyArn(**match.groupdict())
