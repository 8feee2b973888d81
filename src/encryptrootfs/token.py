"""The encryptrootfs token in the LUKS2 header: versioned JSON, read tolerantly.

    {"type": "encryptrootfs", "keyslots": ["0"], "version": 1, "provider": "aws-kms",
     "key_id": "arn:aws:kms:...", "region": "eu-west-1", "ciphertext": "<base64>",
     "encryption_context": {"encryptrootfs:luks_uuid": "..."}, "created": "2026-...Z",
     "created_by": "encryptrootfs 0.1.0", "fs_uuid": "...", "fs_label": "..."}

Readers skip tokens of other types (clevis, systemd-*) and ignore fields they do not know, so
a later minor addition never breaks an older initramfs; a newer ``version`` is refused with a
sentence, because its meaning may have changed. There is no field for plaintext: a token holds
only what the key service needs to unwrap. Golden fixtures live in tests/fixtures/tokens/.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from .errors import EncryptrootfsError, ExitCode
from .providers.base import CONTEXT_LUKS_UUID, REGION_PATTERN, ProviderName, WrappedKey

TOKEN_TYPE = "encryptrootfs"  # noqa: S105 - the LUKS2 token type, not a secret
TOKEN_VERSION = 1
# The token that names the recovery passphrase's keyslot (see ops/recovery.py). It holds no
# key material, only the keyslot; read here so that every reader of a header sees it alike.
RECOVERY_TOKEN_TYPE = "encryptrootfs-recovery"  # noqa: S105 - a LUKS2 token type, not a secret
RECOVERY_TOKEN_VERSION = 1


class TokenError(EncryptrootfsError):
    """A token of our type that cannot be read (malformed, or from a newer encryptrootfs)."""

    exit_code = ExitCode.VERIFY


@dataclass(frozen=True)
class KmsToken:
    """One encryptrootfs token: which keyslots it opens and the wrapped key that opens them."""

    keyslots: tuple[str, ...]
    wrapped: WrappedKey
    # Optional fields (absent in older tokens; None means absent):
    created: Optional[str] = None  # ISO 8601 UTC time of enrolment, e.g. 2026-11-28T04:39:22Z
    created_by: Optional[str] = None  # "encryptrootfs <version>" that wrote the token
    # The plain filesystem's UUID and label when encryptrootfs encrypted it in place: after
    # encryption blkid shows a LUKS UUID, so these let root=UUID=/LABEL= still find the root.
    fs_uuid: Optional[str] = None
    fs_label: Optional[str] = None


# Optional string fields, in the order they are written after the required ones.
_OPTIONAL_TEXT = ("created", "created_by", "fs_uuid", "fs_label")


def utc_now() -> str:
    """The ``created`` timestamp format: ISO 8601, UTC, whole seconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_to_json(token: KmsToken) -> dict[str, Any]:
    """The token as the JSON object that goes into the LUKS2 header."""
    w = token.wrapped
    obj: dict[str, Any] = {
        "type": TOKEN_TYPE,
        "keyslots": list(token.keyslots),
        "version": TOKEN_VERSION,
        "provider": w.provider.value,
        "key_id": w.key_id,
        "region": w.region,
        "ciphertext": base64.b64encode(w.ciphertext).decode("ascii"),
        "encryption_context": dict(w.encryption_context),
    }
    for name in _OPTIONAL_TEXT:
        value = getattr(token, name)
        if value is not None:
            obj[name] = value
    return obj


def token_from_json(obj: Mapping[str, Any]) -> Optional[KmsToken]:
    """Our token from a LUKS2 token object; None for another program's token."""
    if not isinstance(obj, Mapping):
        raise TokenError(f"a LUKS2 token is not a JSON object but {type(obj).__name__}")
    if obj.get("type") != TOKEN_TYPE:
        return None
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _malformed("version", f"must be a whole number >= 1, not {version!r}")
    if version > TOKEN_VERSION:
        raise TokenError(
            f"the encryptrootfs token has version {version}, but this encryptrootfs reads "
            f"version {TOKEN_VERSION} only.",
            hint="it was written by a newer encryptrootfs: upgrade this one (and the initramfs); "
            "nothing was changed",
        )
    keyslots = obj.get("keyslots")
    # A tuple is what a frozen view of the header (luks2.read_header) holds for a JSON list.
    if (
        not isinstance(keyslots, (list, tuple))
        or not keyslots
        or not all(isinstance(k, str) and k.isdigit() for k in keyslots)
    ):
        raise _malformed("keyslots", f'must be a non-empty list like ["0"], not {keyslots!r}')
    provider_value = obj.get("provider")
    try:
        provider = ProviderName(provider_value)
    except ValueError:
        known = ", ".join(p.value for p in ProviderName)
        problem = f"unknown provider {provider_value!r} (known: {known})"
        raise _malformed("provider", problem) from None
    key_id = _text(obj, "key_id")
    region = _text(obj, "region")
    if not REGION_PATTERN.match(region):
        # A crafted region would make botocore fail outside the KMS retry loop; as a damaged
        # token it is skipped and named, and the next copy is tried.
        raise _malformed("region", f"is not an AWS region name: {region[:64]!r}")
    ciphertext = _base64(obj, "ciphertext")
    context = obj.get("encryption_context")
    if not isinstance(context, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise _malformed("encryption_context", "must be an object of strings to strings")
    optional: dict[str, str] = {}
    for name in _OPTIONAL_TEXT:
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise _malformed(name, f"must be a string, not {value!r}")
        if value is not None:
            optional[name] = value
    return KmsToken(
        keyslots=tuple(keyslots),
        wrapped=WrappedKey(
            provider=provider,
            key_id=key_id,
            region=region,
            ciphertext=ciphertext,
            encryption_context=dict(context),
        ),
        **optional,
    )


def not_for_volume(token: KmsToken, luks_uuid: str) -> Optional[str]:
    """Why ``token`` does not belong to the LUKS2 volume ``luks_uuid``, or None when it does.

    Checked before any KMS request: a token copied from another volume's header is refused
    with a sentence instead of a KMS error (KMS itself refuses it too: the UUID is part of the
    encryption context the ciphertext is bound to)."""
    bound = token.wrapped.encryption_context.get(CONTEXT_LUKS_UUID)
    if bound is None:
        return f"its encryption context names no volume ({CONTEXT_LUKS_UUID} is missing)"
    if bound.lower() != luks_uuid.lower():
        return f"it was made for the LUKS2 volume {bound}, and this header is {luks_uuid}"
    return None


def _malformed(field: str, problem: str) -> TokenError:
    return TokenError(
        f"the encryptrootfs token is malformed: {field}: {problem}",
        hint="the LUKS2 header was edited or damaged; re-enroll with another key "
        "(encryptrootfs enroll); nothing was changed",
    )


def _text(obj: Mapping[str, Any], field: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str) or not value:
        raise _malformed(field, f"must be a non-empty string, not {value!r}")
    return value


def _base64(obj: Mapping[str, Any], field: str) -> bytes:
    value = obj.get(field)
    if not isinstance(value, str) or not value:
        raise _malformed(field, "must be non-empty base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(field, "is not valid base64") from None


# --------------------------------------------------------------------------------------------
# Reading every token of a header: one policy for the boot, status, token show|verify, volumes
# and the recovery key.
#
# - ours and readable: used;
# - ours and damaged (malformed, or from a newer encryptrootfs): skipped and named as
#   "token N: why", never fatal on its own: the header may hold a good copy beside it, and a
#   damaged token must not stop a boot that another copy can unlock;
# - recovery tokens: listed with the keyslots they name;
# - foreign (clevis, systemd-*): listed by type, never touched.


@dataclass(frozen=True)
class HeaderToken:
    """One token of a header as every reader sees it."""

    id: int
    type: str
    keyslots: tuple[int, ...]  # as the JSON names them (digits only)
    token: Optional[KmsToken] = None  # ours and readable
    damaged: Optional[str] = None  # ours but unreadable: why
    created: Optional[str] = None  # a recovery token's "created"

    @property
    def ours(self) -> bool:
        return self.type == TOKEN_TYPE

    def why_skipped(self) -> str:
        """The one wording for a damaged token, on the console and in every report."""
        return f"token {self.id}: {self.damaged}"


@dataclass(frozen=True)
class HeaderTokens:
    all: tuple[HeaderToken, ...]

    @property
    def usable(self) -> tuple[HeaderToken, ...]:
        """Our readable tokens, in header order."""
        return tuple(t for t in self.all if t.token is not None)

    @property
    def kms(self) -> tuple[KmsToken, ...]:
        return tuple(t.token for t in self.all if t.token is not None)

    @property
    def damaged(self) -> tuple[str, ...]:
        """``token N: why`` for each of our tokens that cannot be read (skipped)."""
        return tuple(t.why_skipped() for t in self.all if t.damaged is not None)

    @property
    def recovery(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """(token id, keyslots) of every recovery token."""
        return tuple((t.id, t.keyslots) for t in self.all if t.type == RECOVERY_TOKEN_TYPE)


def read_tokens(tokens: Mapping[str, Mapping[str, Any]]) -> HeaderTokens:
    """Every token of a header (``LuksHeader.tokens``), in id order, read by the policy above."""
    out = []
    for key, raw in sorted(tokens.items(), key=lambda kv: int(kv[0])):
        token_type = str(raw.get("type", "?"))
        slots = tuple(int(s) for s in raw.get("keyslots", ()) if str(s).isdigit())
        token = damaged = created = None
        if token_type == TOKEN_TYPE:
            try:
                token = token_from_json(raw)
            except TokenError as exc:
                damaged = exc.message
        elif token_type == RECOVERY_TOKEN_TYPE:
            value = raw.get("created")
            created = value if isinstance(value, str) else None
        out.append(HeaderToken(int(key), token_type, slots, token, damaged, created))
    return HeaderTokens(tuple(out))


def order_tokens(tokens: Sequence[KmsToken], preferred_regions: Sequence[str]) -> list[KmsToken]:
    """``tokens`` with those in ``preferred_regions`` first, in that order; the rest keep
    their header order (``[boot] prefer_regions``)."""
    rank = {region: i for i, region in enumerate(preferred_regions)}
    indexed = list(enumerate(tokens))
    indexed.sort(key=lambda it: (rank.get(it[1].wrapped.region, len(rank)), it[0]))
    return [t for _, t in indexed]
