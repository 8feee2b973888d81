"""The recovery passphrase's format: what ``recovery-key add`` prints and the boot prompt reads.

8 groups of 5 characters from Crockford's base32 alphabet (no i, l, o, u: nothing to confuse),
200 bits of entropy. Apart from :mod:`encryptrootfs.ops.recovery` (which writes the keyslot) so
that the boot's prompt reads a typed key without importing the operator's verbs.
"""

from __future__ import annotations

import secrets
from typing import Union

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
GROUPS = 8
GROUP_LENGTH = 5
FORMAT = "crockford32-8x5"
# log2(32) = 5 bits a character
ENTROPY_BITS = GROUPS * GROUP_LENGTH * 5
_LOOKALIKES = {"o": "0", "i": "1", "l": "1"}


def new_passphrase() -> bytearray:
    """A fresh recovery passphrase, ``xxxxx-xxxxx-...`` (ASCII bytes)."""
    out = bytearray()
    for group in range(GROUPS):
        if group:
            out += b"-"
        for _ in range(GROUP_LENGTH):
            out.append(ord(ALPHABET[secrets.randbelow(len(ALPHABET))]))
    return out


def normalise(typed: Union[str, bytes, bytearray]) -> bytearray:
    """What a person typed, as the passphrase in the keyslot (ValueError if it cannot be).

    Spaces and dashes are ignored, case does not matter, o/i/l are read as 0/1/1.
    """
    text = (
        typed.decode("ascii", errors="replace") if isinstance(typed, (bytes, bytearray)) else typed
    )
    chars = [_LOOKALIKES.get(c, c) for c in text.lower() if c not in " -\t\r\n"]
    if len(chars) != GROUPS * GROUP_LENGTH or any(c not in ALPHABET for c in chars):
        raise ValueError(f"a recovery key is {GROUPS} groups of {GROUP_LENGTH} letters and digits")
    out = bytearray()
    for i, c in enumerate(chars):
        if i and i % GROUP_LENGTH == 0:
            out += b"-"
        out.append(ord(c))
    return out
