"""The recovery passphrase's form (what a person reads and types) and the recovery token; the
order in which several wrapped copies would be tried."""

from __future__ import annotations

import math
import re

import pytest

from encryptrootfs import passphrase
from encryptrootfs.ops import recovery
from encryptrootfs.providers.base import ProviderName, WrappedKey
from encryptrootfs.token import RECOVERY_TOKEN_TYPE, KmsToken, order_tokens

FORM = re.compile(rb"^[0-9a-hjkmnp-tv-z]{5}(-[0-9a-hjkmnp-tv-z]{5}){7}$")


def test_a_new_passphrase_has_the_printed_form_and_at_least_128_bits() -> None:
    keys = {bytes(passphrase.new_passphrase()) for _ in range(200)}
    assert len(keys) == 200
    assert all(FORM.match(k) for k in keys)
    assert passphrase.ENTROPY_BITS == 40 * math.log2(len(passphrase.ALPHABET)) == 200
    assert not set("ilou") & set(passphrase.ALPHABET)
    # Every character of the alphabet turns up: the draw is not a narrower set.
    assert set(b"".join(keys).decode()) - {"-"} == set(passphrase.ALPHABET)


def test_what_a_person_types_is_read_as_the_passphrase() -> None:
    key = bytes(passphrase.new_passphrase())
    assert passphrase.normalise(key) == key
    assert passphrase.normalise(key.decode().upper()) == key
    assert passphrase.normalise(key.decode().replace("-", "")) == key
    assert passphrase.normalise(" ".join(key.decode().split("-")) + "\n") == key
    typed = key.decode().replace("0", "O").replace("1", "l")
    assert passphrase.normalise(typed) == key


@pytest.mark.parametrize("typed", ["", "abcde-fghjk", "u" * 40, "a" * 41, "abcde!" * 8])
def test_what_cannot_be_a_recovery_key_is_refused(typed: str) -> None:
    with pytest.raises(ValueError, match="8 groups of 5"):
        passphrase.normalise(typed)


def test_the_recovery_token_names_its_keyslot_only() -> None:
    token = recovery.recovery_token_json(4)
    assert token["type"] == RECOVERY_TOKEN_TYPE == "encryptrootfs-recovery"
    assert token["keyslots"] == ["4"] and token["version"] == 1
    assert set(token) == {"type", "keyslots", "version", "format", "created", "created_by"}


def test_the_added_result_never_shows_the_passphrase() -> None:
    added = recovery.RecoveryAdded("/dev/x", 2, 1, 65536, bytearray(b"abcde-secret"))
    assert "abcde" not in repr(added)


def _token(region: str) -> KmsToken:
    return KmsToken(("0",), WrappedKey(ProviderName.AWS_KMS, f"arn:{region}", region, b"x"))


def test_tokens_in_preferred_regions_come_first_the_rest_keep_their_order() -> None:
    a, b, c, d = (_token(r) for r in ("us-east-1", "eu-west-1", "ap-south-1", "eu-west-1"))
    assert order_tokens([a, b, c, d], []) == [a, b, c, d]
    assert order_tokens([a, b, c, d], ["eu-west-1"]) == [b, d, a, c]
    assert order_tokens([a, b, c, d], ["ap-south-1", "us-east-1"]) == [c, a, b, d]
