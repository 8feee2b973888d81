"""Tokens: import, export, remove through cryptsetup, and the crash-safe writer for a token
while in-place encryption is pending (which cryptsetup itself refuses)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import DeviceError, RefusedError, ToolError, VerifyError
from ..log import get_logger
from ..run import CommandError
from .cryptsetup import (
    PathArg,
    _explain,
    _header_args,
    _name,
    read_header,
    run_cryptsetup,
)
from .header import ReencryptionState, thaw

log = get_logger("luks2")


# --- tokens -----------------------------------------------------------------------------------

_TOKEN_CREATED = re.compile(r"Token (\d+) created")


def import_token(
    device: PathArg,
    token: Mapping[str, Any],
    *,
    token_id: Optional[int] = None,
    replace: bool = False,
    header: Optional[PathArg] = None,
) -> int:
    """Store ``token`` (JSON object with ``type`` and ``keyslots``) in the header; its id.

    While an in-place encryption is pending (after :func:`reencrypt_encrypt_init`), cryptsetup
    refuses token changes; the token is then written by :func:`import_token_while_pending`.
    """
    name = _name(device)
    if not isinstance(token.get("type"), str) or not isinstance(token.get("keyslots"), list):
        raise ValueError("a LUKS2 token needs a string 'type' and a list 'keyslots'")
    args = ["-v", "token", "import", "--json-file", "-"]
    if token_id is not None:
        args += ["--token-id", str(token_id)]
        if replace:
            args.append("--token-replace")
    data = json.dumps(token, separators=(",", ":"), sort_keys=True).encode()
    try:
        out = run_cryptsetup([*args, *_header_args(header), name], stdin=data).stdout
    except CommandError as exc:
        if "in use" in exc.stderr and token_id is not None:
            raise DeviceError(
                f"`{name}` already has a token {token_id}; nothing was changed.",
                hint="pick another token id, or replace it on purpose",
            ) from None
        error = _explain(exc, name)
        if error is not exc or not read_header(device, header).reencryption_pending:
            raise error from None
        if replace:
            raise DeviceError(
                f"cryptsetup does not change tokens of `{name}` while its encryption is "
                "pending, and a token is not replaced behind its back; nothing was changed.",
            ) from None
        # cryptsetup refuses any token change while the reencryption requirement is set, which
        # is exactly when the first boot must store the wrapped key (see below).
        log.debug("cryptsetup refused the token (encryption pending); writing it directly")
        return import_token_while_pending(device, token, token_id=token_id, header=header)
    match = _TOKEN_CREATED.search(out.decode(errors="replace"))
    if match:
        return int(match.group(1))
    if token_id is not None:
        return token_id
    raise ToolError(
        f"cryptsetup imported a token into `{name}` but did not say which id it got.",
        hint="`cryptsetup luksDump` lists the tokens",
    )


def export_token(
    device: PathArg, token_id: int, *, header: Optional[PathArg] = None
) -> dict[str, Any]:
    name = _name(device)
    args = ["token", "export", "--token-id", str(token_id), *_header_args(header), name]
    try:
        out = run_cryptsetup(args).stdout
    except CommandError as exc:
        if "Failed to get token" in exc.stderr:
            raise DeviceError(f"`{name}` has no token {token_id}.") from None
        raise _explain(exc, name) from None
    value = json.loads(out.decode())
    if not isinstance(value, dict):
        raise DeviceError(f"Token {token_id} of `{name}` is not a JSON object.")
    return value


def remove_token(device: PathArg, token_id: int, *, header: Optional[PathArg] = None) -> None:
    name = _name(device)
    args = ["token", "remove", "--token-id", str(token_id), *_header_args(header), name]
    try:
        run_cryptsetup(args)
    except CommandError as exc:
        if "is not in use" in exc.stderr:
            raise DeviceError(f"`{name}` has no token {token_id}; nothing was changed.") from None
        raise _explain(exc, name) from None


# --- a token while encryption is pending ------------------------------------------------------
#
# cryptsetup (2.6.1, and 2.7 alike) refuses every token change while the header carries the
# "online-reencrypt" requirement (crypt_token_json_set -> onlyLUKS2 -> unmet requirements). The
# first boot needs the wrapped key in the header *before* the data pass starts (DESIGN.md,
# invariant 3), so the token is written into the JSON area directly, the way libcryptsetup
# writes metadata (luks2_disk_metadata.c): both copies, primary first, sequence id + 1, each
# copy written without checksum, then its JSON area, then with its checksum. A crash leaves
# one valid copy (old or new); cryptsetup picks the valid / newer one and repairs the other.
# Tokens are not covered by the reencryption digest, so cryptsetup resumes such a header.

_BIN_LEN = 4096
_MAGICS = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")  # primary, secondary
_CSUM = slice(448, 512)
_TOKENS_MAX = 32


@dataclass(frozen=True)
class _DiskCopy:
    offset: int
    binary: bytes  # the 4096-byte binary header as on disk
    json_area: bytes
    seqid: int
    hdr_size: int
    checksum_alg: str


def _read_copy(fd: int, offset: int, secondary: bool, where: str) -> _DiskCopy:
    binary = os.pread(fd, _BIN_LEN, offset)
    which = "secondary" if secondary else "primary"
    bad = f"The {which} LUKS2 header of `{where}` "
    if len(binary) != _BIN_LEN or binary[:6] != _MAGICS[secondary]:
        raise DeviceError(
            bad + "is missing; nothing was changed.",
            hint=f"`cryptsetup repair {where}` may restore it",
        )
    version = int.from_bytes(binary[6:8], "big")
    hdr_size = int.from_bytes(binary[8:16], "big")
    seqid = int.from_bytes(binary[16:24], "big")
    hdr_offset = int.from_bytes(binary[256:264], "big")
    alg = binary[72:104].split(b"\0", 1)[0].decode("ascii", errors="replace")
    if version != 2 or hdr_offset != offset or not 16384 <= hdr_size <= 4 * 1024 * 1024:
        raise DeviceError(bad + "is not a LUKS2 header this code can update; nothing was changed.")
    json_area = os.pread(fd, hdr_size - _BIN_LEN, offset + _BIN_LEN)
    try:
        digest = hashlib.new(alg)
    except ValueError:
        raise DeviceError(
            bad + f"uses the checksum {alg!r}, unknown here; nothing was changed."
        ) from None
    digest.update(binary[: _CSUM.start] + bytes(64) + binary[_CSUM.stop :])
    digest.update(json_area)
    stored = binary[_CSUM]
    if stored != digest.digest().ljust(64, b"\0"):
        raise DeviceError(
            bad + "fails its checksum; nothing was changed.",
            hint=f"`cryptsetup repair {where}` restores it from the other copy",
        )
    return _DiskCopy(offset, binary, json_area, seqid, hdr_size, alg)


def _write_copy(fd: int, copy: _DiskCopy, seqid: int, json_area: bytes) -> None:
    binary = bytearray(copy.binary)
    binary[16:24] = seqid.to_bytes(8, "big")
    binary[_CSUM] = bytes(64)
    digest = hashlib.new(copy.checksum_alg)
    digest.update(bytes(binary))
    digest.update(json_area)
    os.pwrite(fd, bytes(binary), copy.offset)  # invalid until the checksum lands
    os.pwrite(fd, json_area, copy.offset + _BIN_LEN)
    binary[_CSUM] = digest.digest().ljust(64, b"\0")
    os.pwrite(fd, bytes(binary), copy.offset)
    os.fsync(fd)


def import_token_while_pending(
    device: PathArg,
    token: Mapping[str, Any],
    *,
    token_id: Optional[int] = None,
    header: Optional[PathArg] = None,
) -> int:
    """Store ``token`` in a header whose in-place encryption is initialised but not finished.

    Only for that state (cryptsetup itself refuses it then; everywhere else use
    :func:`import_token`). Nothing may use the device meanwhile (first boot, before it is
    opened). The result is read back through cryptsetup. Returns the token id.
    """
    name = _name(device)
    where = _name(header) if header is not None else name
    if not isinstance(token.get("type"), str) or not isinstance(token.get("keyslots"), list):
        raise ValueError("a LUKS2 token needs a string 'type' and a list 'keyslots'")
    before = read_header(device, header)
    if not before.reencryption_pending:
        raise RefusedError(
            f"`{where}` has no pending encryption; its tokens are changed through cryptsetup "
            "(import_token). Nothing was changed."
        )
    if before.reencryption_state is ReencryptionState.INTERRUPTED:
        raise RefusedError(
            f"The encryption of `{name}` was interrupted mid-step and must be recovered first "
            "(reencrypt_recover). Nothing was changed."
        )
    missing = [s for s in token["keyslots"] if str(s) not in before.keyslots]
    if missing or not all(isinstance(s, str) for s in token["keyslots"]):
        raise ValueError(f"token keyslots must be ids of existing keyslots (not {missing})")
    fd = os.open(where, os.O_RDWR)
    try:
        primary = _read_copy(fd, 0, False, where)
        secondary = _read_copy(fd, primary.hdr_size, True, where)
        if (primary.seqid, primary.json_area) != (secondary.seqid, secondary.json_area):
            raise DeviceError(
                f"The two LUKS2 header copies of `{where}` differ; nothing was changed.",
                hint=f"`cryptsetup repair {where}` makes them agree",
            )
        metadata = json.loads(primary.json_area.split(b"\0", 1)[0].decode())
        tokens = metadata.setdefault("tokens", {})
        if token_id is None:
            free = [i for i in range(_TOKENS_MAX) if str(i) not in tokens]
            if not free:
                raise DeviceError(f"`{where}` has no free token id; nothing was changed.")
            token_id = free[0]
        elif not 0 <= token_id < _TOKENS_MAX:
            raise ValueError(f"token ids go from 0 to {_TOKENS_MAX - 1}")
        elif str(token_id) in tokens:
            raise DeviceError(f"`{where}` already has a token {token_id}; nothing was changed.")
        tokens[str(token_id)] = dict(token)
        # json-c's plain form, as cryptsetup writes it.
        text = json.dumps(metadata, separators=(",", ":")).encode()
        area = len(primary.json_area)
        if len(text) >= area:
            raise DeviceError(
                f"The token does not fit in the {area}-byte JSON area of `{where}`; nothing "
                "was changed."
            )
        json_area = text + bytes(area - len(text))
        seqid = primary.seqid + 1
        _write_copy(fd, primary, seqid, json_area)
        _write_copy(fd, secondary, seqid, json_area)
    finally:
        os.close(fd)
    stored = read_header(device, header).tokens.get(str(token_id))
    if stored is None or thaw(stored) != json.loads(json.dumps(dict(token))):
        raise VerifyError(f"Token {token_id} did not read back from `{where}` as written.")
    log.info("stored token %d in the header of %s (encryption pending)", token_id, where)
    return token_id
