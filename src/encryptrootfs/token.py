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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from .errors import EncryptrootfsError, ExitCode
from .providers.base import ProviderName, WrappedKey

TOKEN_TYPE = "encryptrootfs"  # noqa: S105 - the LUKS2 token type, not a secret
TOKEN_VERSION = 1


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
