"""cryptsetup, LUKS2: read the header, manage tokens and keyslots, encrypt in place.

Every command goes through :func:`~encryptrootfs.run.run` (or ``run_streaming`` for the data
pass), with keys only on stdin or through :func:`~encryptrootfs.run.secret_fd`. cryptsetup's
exit codes (1 bad arguments / not LUKS, 2 no key matched, 3 out of memory, 4 wrong device,
5 busy) and its messages are turned into sentences here, so callers never see a raw exit code
for a failure they could explain.

The header is read from two outputs of ``luksDump``: ``--dump-json-metadata`` for keyslots,
tokens, segments and requirements, and the text dump for what lives in the binary header only
(version, UUID, label, subsystem, epoch). Both are parsed by pure functions, so the unit tier
checks the parsing against outputs recorded from a real cryptsetup.

First-boot in-place encryption, in the order the stages use it:
:func:`reencrypt_encrypt_init` (header + keyslot, UUID chosen by the caller, no data encrypted)
-> :func:`import_token_while_pending` (cryptsetup refuses token changes in that state, so the
token is written into the header's JSON area here, crash-safe) -> :func:`test_keyslot` ->
:func:`reencrypt_resume` (data pass with progress; recovers a killed pass first, and is run
again after any crash). :func:`reencrypt_abort_init` puts the plain device back if the key
cannot be made safe before the data pass starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Optional, Union

from .errors import DeviceError, RefusedError, ToolError, VerifyError
from .log import get_logger
from .run import Arg, CommandError, Secret, run, run_streaming, secret_fd

log = get_logger("luks2")

CRYPTSETUP = "cryptsetup"
Version = tuple[int, int, int]
PathArg = Union[str, "os.PathLike[str]"]

# A KMS data key has full entropy: PBKDF2 at the minimum cryptsetup accepts costs nothing in
# security and keeps unlock at milliseconds without Argon2's memory in the initramfs.
PBKDF = "pbkdf2"
PBKDF_ITERATIONS = 1000

# cryptsetup exit codes (man cryptsetup, RETURN CODES).
_EXIT_NO_KEY = 2
_EXIT_NO_MEMORY = 3
_EXIT_WRONG_DEVICE = 4
_EXIT_BUSY = 5

# cryptsetup's messages are translated; everything parsed below is the C locale's wording.
_ENV = {"LC_ALL": "C", "LANG": "C"}

_NOT_LUKS = re.compile(r"is not a valid LUKS device|Device type is not properly initialized")


# --- versions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    """A cryptsetup feature encryptrootfs uses, and the release that introduced it."""

    what: str
    since: Version


FEATURES: tuple[Feature, ...] = (
    Feature("the LUKS2 metadata as JSON (luksDump --dump-json-metadata)", (2, 4, 0)),
    Feature("in-place encryption in two steps (reencrypt --init-only, --resume-only)", (2, 4, 0)),
    Feature("progress as JSON lines (reencrypt --progress-json)", (2, 5, 0)),
    Feature("reencryption of image files (reencrypt --force-offline-reencrypt)", (2, 5, 0)),
)
MINIMUM_VERSION: Version = (2, 4, 0)
PROGRESS_JSON_SINCE: Version = (2, 5, 0)

_VERSION = re.compile(r"cryptsetup\s+v?(\d+)\.(\d+)(?:\.(\d+))?")


def _dotted(version: Sequence[int]) -> str:
    return ".".join(str(p) for p in version)


def parse_version(text: str) -> Version:
    """``(major, minor, patch)`` from ``cryptsetup --version`` output (``cryptsetup 2.6.1 ...``).

    A missing patch level counts as 0; suffixes such as ``-rc0`` or ``flags: ...`` are ignored.
    """
    match = _VERSION.search(text)
    if match is None:
        first = text.strip().splitlines()[0] if text.strip() else "nothing"
        raise ToolError(
            f"Cannot tell which cryptsetup this is: `cryptsetup --version` printed {first!r}.",
            hint="check that `cryptsetup` on PATH is the cryptsetup from the distribution",
        )
    major, minor, patch = match.groups()
    return (int(major), int(minor), int(patch or 0))


def cryptsetup_version() -> Version:
    result = run([CRYPTSETUP, "--version"], env=_ENV)
    return parse_version(result.stdout.decode(errors="replace"))


def require_cryptsetup(minimum: Version = MINIMUM_VERSION) -> Version:
    """The installed cryptsetup's version; :class:`ToolError` when it is older than ``minimum``."""
    found = cryptsetup_version()
    if found < minimum:
        needs = [f.what for f in FEATURES if found < f.since <= minimum]
        why = f" for {'; '.join(needs)}" if needs else ""
        raise ToolError(
            f"cryptsetup {_dotted(found)} is too old: encryptrootfs needs {_dotted(minimum)} "
            f"or later{why}. Nothing was changed.",
            hint="install a newer cryptsetup (Debian 12, Ubuntu 22.04 and RHEL 9 ship one)",
        )
    return found


# --- the header -------------------------------------------------------------------------------


class ReencryptionState(str, Enum):
    """What cryptsetup would say about reencryption (libcryptsetup's crypt_reencrypt_info)."""

    NONE = "none"  # no reencryption in the header
    PENDING = "pending"  # initialised or cleanly interrupted: resume continues it
    INTERRUPTED = "interrupted"  # killed mid-hotzone: needs recovery (repair) before resuming


@dataclass(frozen=True)
class Keyslot:
    id: int
    type: str  # "luks2", or "reencrypt" for the reencryption state slot
    key_size: int  # bytes
    priority: int  # 0 ignore, 1 normal, 2 prefer
    kdf_type: Optional[str] = None  # pbkdf2 | argon2i | argon2id
    kdf_hash: Optional[str] = None  # pbkdf2 only
    iterations: Optional[int] = None  # pbkdf2 only
    time_cost: Optional[int] = None  # argon2 only
    memory: Optional[int] = None  # argon2 only, KiB
    parallel: Optional[int] = None  # argon2 only, threads
    cipher: Optional[str] = None  # keyslot area encryption
    mode: Optional[str] = None  # reencrypt slot: encrypt | decrypt | reencrypt
    direction: Optional[str] = None  # reencrypt slot: forward | backward
    resilience: Optional[str] = None  # reencrypt slot: datashift | checksum | journal | none


@dataclass(frozen=True)
class Segment:
    id: int
    type: str  # crypt | linear
    offset: int  # bytes on the data device
    size: Optional[int]  # bytes; None means "dynamic" (to the end of the device)
    encryption: Optional[str] = None
    sector_size: Optional[int] = None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Digest:
    id: int
    type: str
    keyslots: tuple[int, ...]
    segments: tuple[int, ...]


@dataclass(frozen=True)
class LuksHeader:
    """A LUKS2 header as cryptsetup reports it. ``tokens`` are the raw JSON objects."""

    uuid: str
    label: Optional[str]
    subsystem: Optional[str]
    epoch: Optional[int]
    keyslots: Mapping[str, Keyslot]
    tokens: Mapping[str, Mapping[str, Any]]
    segments: tuple[Segment, ...]
    digests: tuple[Digest, ...]
    requirements: tuple[str, ...]  # config.requirements.mandatory
    flags: tuple[str, ...]  # config.flags (persistent activation flags)
    json_size: int
    keyslots_size: int
    version: int = 2

    @property
    def reencryption_state(self) -> ReencryptionState:
        if not any(r.startswith("online-reencrypt") for r in self.requirements):
            return ReencryptionState.NONE
        if any("in-reencryption" in s.flags for s in self.segments):
            return ReencryptionState.INTERRUPTED
        return ReencryptionState.PENDING

    @property
    def reencryption_pending(self) -> bool:
        """True while a reencryption (our in-place encryption) has not finished."""
        return self.reencryption_state is not ReencryptionState.NONE or any(
            k.type == "reencrypt" for k in self.keyslots.values()
        )

    @property
    def data_pass_started(self) -> bool:
        """True once some data was encrypted (a crypt segment besides the backups).

        Before that, an initialised encryption can still be undone (reencrypt_abort_init).
        """
        return self.reencryption_pending and any(
            s.type == "crypt"
            for s in self.segments
            if not any(f.startswith("backup-") for f in s.flags)
        )

    @property
    def reencrypt_keyslot(self) -> Optional[Keyslot]:
        return next((k for k in self.keyslots.values() if k.type == "reencrypt"), None)

    @property
    def unknown_requirements(self) -> tuple[str, ...]:
        """Mandatory requirements this code does not know (cryptsetup refuses such headers)."""
        return tuple(r for r in self.requirements if not r.startswith("online-reencrypt"))

    @property
    def key_keyslots(self) -> tuple[Keyslot, ...]:
        """The keyslots that hold the volume key (not the reencryption state slot), by id."""
        return tuple(
            sorted((k for k in self.keyslots.values() if k.type != "reencrypt"), key=_by_id)
        )

    def segment_with_flag(self, flag: str) -> Optional[Segment]:
        return next((s for s in self.segments if flag in s.flags), None)

    @property
    def final_segment(self) -> Optional[Segment]:
        """The data segment as it is (or will be, when reencryption finishes)."""
        if self.reencryption_pending:
            return self.segment_with_flag("backup-final")
        live = [s for s in self.segments if not any(f.startswith("backup-") for f in s.flags)]
        return min(live, key=lambda s: s.offset) if live else None

    @property
    def data_offset(self) -> int:
        """Bytes from the start of the data device to the encrypted data (as cryptsetup does)."""
        segment = self.final_segment
        if segment is None:
            raise DeviceError(f"The LUKS2 header {self.uuid} has no data segment.")
        return segment.offset

    @property
    def cipher(self) -> Optional[str]:
        segment = self.final_segment
        return segment.encryption if segment is not None else None

    def token_ids(self, token_type: Optional[str] = None) -> tuple[int, ...]:
        return tuple(
            sorted(
                int(i)
                for i, t in self.tokens.items()
                if token_type is None or t.get("type") == token_type
            )
        )


def _by_id(item: Union[Keyslot, Segment, Digest]) -> int:
    return item.id


@dataclass(frozen=True)
class DumpFields:
    """What the text ``luksDump`` shows that the JSON metadata does not (the binary header)."""

    version: int
    uuid: Optional[str]
    label: Optional[str] = None
    subsystem: Optional[str] = None
    epoch: Optional[int] = None


_DUMP_LINE = re.compile(r"^([A-Za-z][A-Za-z ]*?):\s*(.*?)\s*$")


def parse_dump_text(text: str) -> DumpFields:
    """Version, UUID, label, subsystem and epoch from ``cryptsetup luksDump`` (LUKS1 or 2)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith(("Data segments:", "Keyslots:", "Key Slot")):
            break  # the binary-header fields come first; later "Key:" lines are keyslots'
        match = _DUMP_LINE.match(line)
        if match and match.group(1) not in fields:
            fields[match.group(1)] = match.group(2)
    try:
        version = int(fields["Version"])
    except (KeyError, ValueError):
        raise DeviceError(
            "cryptsetup luksDump printed no LUKS version; the header could not be read."
        ) from None

    def optional(name: str) -> Optional[str]:
        value = fields.get(name)
        if value is None or (value.startswith("(no ") and value.endswith(")")):
            return None  # "(no label)", "(no subsystem)"
        return value

    epoch = fields.get("Epoch")
    return DumpFields(
        version=version,
        uuid=optional("UUID"),
        label=optional("Label"),
        subsystem=optional("Subsystem"),
        epoch=int(epoch) if epoch and epoch.isdigit() else None,
    )


def _int(value: Any, what: str) -> int:
    # LUKS2 JSON stores 64-bit sizes and offsets as strings, small numbers as numbers.
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DeviceError(
            f"The LUKS2 metadata has {what} = {value!r}, which is not a number."
        ) from None


def _optional_int(value: Any, what: str) -> Optional[int]:
    return None if value is None else _int(value, what)


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DeviceError(f"The LUKS2 metadata's {what} is not a JSON object.")
    return value


def _keyslot(slot_id: str, raw: Mapping[str, Any]) -> Keyslot:
    where = f"keyslots.{slot_id}"
    kdf = _object(raw.get("kdf", {}), f"{where}.kdf")
    area = _object(raw.get("area", {}), f"{where}.area")
    slot_type = str(raw.get("type", ""))
    return Keyslot(
        id=_int(slot_id, f"{where} (id)"),
        type=slot_type,
        key_size=_int(raw.get("key_size"), f"{where}.key_size"),
        # LUKS2 leaves priority out for "normal" (1).
        priority=_int(raw.get("priority", 1), f"{where}.priority"),
        kdf_type=kdf.get("type"),
        kdf_hash=kdf.get("hash"),
        iterations=_optional_int(kdf.get("iterations"), f"{where}.kdf.iterations"),
        time_cost=_optional_int(kdf.get("time"), f"{where}.kdf.time"),
        memory=_optional_int(kdf.get("memory"), f"{where}.kdf.memory"),
        parallel=_optional_int(kdf.get("cpus"), f"{where}.kdf.cpus"),
        cipher=area.get("encryption"),
        mode=raw.get("mode"),
        direction=raw.get("direction"),
        resilience=area.get("type") if slot_type == "reencrypt" else None,
    )


def _segment(segment_id: str, raw: Mapping[str, Any]) -> Segment:
    where = f"segments.{segment_id}"
    size = raw.get("size")
    return Segment(
        id=_int(segment_id, f"{where} (id)"),
        type=str(raw.get("type", "")),
        offset=_int(raw.get("offset"), f"{where}.offset"),
        size=None if size == "dynamic" else _int(size, f"{where}.size"),
        encryption=raw.get("encryption"),
        sector_size=_optional_int(raw.get("sector_size"), f"{where}.sector_size"),
        flags=tuple(str(f) for f in raw.get("flags", ())),
    )


def _digest(digest_id: str, raw: Mapping[str, Any]) -> Digest:
    where = f"digests.{digest_id}"
    return Digest(
        id=_int(digest_id, f"{where} (id)"),
        type=str(raw.get("type", "")),
        keyslots=tuple(_int(k, f"{where}.keyslots") for k in raw.get("keyslots", ())),
        segments=tuple(_int(s, f"{where}.segments") for s in raw.get("segments", ())),
    )


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def parse_header(metadata_json: str, dump_text: str) -> LuksHeader:
    """A :class:`LuksHeader` from ``luksDump --dump-json-metadata`` and ``luksDump`` output."""
    fields = parse_dump_text(dump_text)
    if fields.version != 2:
        raise DeviceError(f"The header is LUKS{fields.version}, not LUKS2.")
    if not fields.uuid:
        raise DeviceError("cryptsetup luksDump printed no UUID; the header could not be read.")
    try:
        raw = json.loads(metadata_json)
    except ValueError as exc:
        raise DeviceError(f"The LUKS2 metadata is not valid JSON ({exc}).") from None
    doc = _object(raw, "top level")
    keyslots = _object(doc.get("keyslots", {}), "keyslots")
    tokens = _object(doc.get("tokens", {}), "tokens")
    segments = _object(doc.get("segments", {}), "segments")
    digests = _object(doc.get("digests", {}), "digests")
    config = _object(doc.get("config", {}), "config")
    requirements = _object(config.get("requirements", {}), "config.requirements")
    return LuksHeader(
        uuid=fields.uuid,
        label=fields.label,
        subsystem=fields.subsystem,
        epoch=fields.epoch,
        keyslots=MappingProxyType(
            {k: _keyslot(k, _object(v, f"keyslots.{k}")) for k, v in keyslots.items()}
        ),
        tokens=MappingProxyType({k: _frozen(_object(v, f"tokens.{k}")) for k, v in tokens.items()}),
        segments=tuple(
            sorted(
                (_segment(k, _object(v, f"segments.{k}")) for k, v in segments.items()),
                key=_by_id,
            )
        ),
        digests=tuple(
            sorted(
                (_digest(k, _object(v, f"digests.{k}")) for k, v in digests.items()),
                key=_by_id,
            )
        ),
        requirements=tuple(str(r) for r in requirements.get("mandatory", ())),
        flags=tuple(str(f) for f in config.get("flags", ())),
        json_size=_int(config.get("json_size", 0), "config.json_size"),
        keyslots_size=_int(config.get("keyslots_size", 0), "config.keyslots_size"),
    )


def thaw(value: Any) -> Any:
    """A plain ``dict``/``list`` copy of a token from :attr:`LuksHeader.tokens` (for json.dumps)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


# --- running cryptsetup -----------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def _explain(exc: CommandError, device: str, changed: str = "Nothing was changed.") -> Exception:
    """The sentence for a cryptsetup failure that has a known cause; else the CommandError."""
    said = exc.stderr
    if _NOT_LUKS.search(said):
        return DeviceError(f"`{device}` is not a LUKS device. {changed}")
    if exc.returncode == _EXIT_WRONG_DEVICE or "does not exist or access denied" in said:
        detail = _last_line(said)
        detail = "" if "does not exist or access denied" in detail else f" ({detail})"
        return DeviceError(
            f"`{device}` does not exist or cannot be opened{detail}. {changed}",
            hint="check the device path and run as root",
        )
    if exc.returncode == _EXIT_NO_KEY:
        return VerifyError(f"No keyslot of `{device}` opened with this key. {changed}")
    if exc.returncode == _EXIT_NO_MEMORY:
        return ToolError(
            f"cryptsetup ran out of memory on `{device}` ({_last_line(said)}). {changed}",
            hint="a keyslot with Argon2 may need more memory than this machine has",
        )
    if exc.returncode == _EXIT_BUSY:
        return DeviceError(f"`{device}` is busy or already in use ({_last_line(said)}). {changed}")
    return exc


def _cryptsetup(
    args: Sequence[Arg],
    device: str,
    *,
    stdin: Optional[Secret] = None,
    pass_fds: Sequence[int] = (),
    changed: str = "Nothing was changed.",
) -> str:
    """Run cryptsetup, map its failure to a sentence, return its stdout."""
    try:
        result = run([CRYPTSETUP, *args], stdin=stdin, env=_ENV, pass_fds=pass_fds)
    except CommandError as exc:
        raise _explain(exc, device, changed) from None
    return result.stdout.decode(errors="replace")


def _header_args(header: Optional[PathArg]) -> list[str]:
    return ["--header", os.fspath(header)] if header is not None else []


def _name(device: PathArg) -> str:
    return os.fspath(device)


# --- reading ----------------------------------------------------------------------------------


def is_luks(device: PathArg) -> bool:
    """True when ``device`` starts with a LUKS header (version 1 or 2)."""
    name = _name(device)
    try:
        run([CRYPTSETUP, "isLuks", name], env=_ENV)
    except CommandError as exc:
        if exc.returncode == 1:
            return False
        raise _explain(exc, name) from None
    return True


def luks_version(device: PathArg) -> Optional[int]:
    """1 or 2 for a LUKS device, None for anything else. A missing device raises DeviceError."""
    name = _name(device)
    try:
        result = run([CRYPTSETUP, "luksDump", name], env=_ENV)
    except CommandError as exc:
        error = _explain(exc, name)
        if isinstance(error, DeviceError) and _NOT_LUKS.search(exc.stderr):
            return None
        raise error from None
    return parse_dump_text(result.stdout.decode(errors="replace")).version


def read_header(device: PathArg, header: Optional[PathArg] = None) -> LuksHeader:
    """The LUKS2 header of ``device`` (or of the detached ``header`` file)."""
    name = _name(device)
    where = _name(header) if header is not None else name
    args = [*_header_args(header), name]
    dump = _cryptsetup(["luksDump", *args], where)
    fields = parse_dump_text(dump)
    if fields.version != 2:
        raise DeviceError(
            f"`{where}` is LUKS{fields.version}; encryptrootfs needs LUKS2. Nothing was changed.",
            hint=f"`cryptsetup convert --type luks2 {where}` converts it (back up the header "
            "first)",
        )
    metadata = _cryptsetup(["luksDump", "--dump-json-metadata", *args], where)
    return parse_header(metadata, dump)


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
        out = run([CRYPTSETUP, *args, *_header_args(header), name], stdin=data, env=_ENV).stdout
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
        out = run([CRYPTSETUP, *args], env=_ENV).stdout
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
        run([CRYPTSETUP, *args], env=_ENV)
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


# --- keyslots ---------------------------------------------------------------------------------

_KEYSLOT_CREATED = re.compile(r"Key slot (\d+) created")


def _add_key(
    name: str,
    pbkdf_args: Sequence[str],
    existing_key: Secret,
    new_secret: Secret,
    keyslot: Optional[int],
    header: Optional[PathArg],
) -> int:
    """``luksAddKey`` with the existing key on stdin and the new secret through a pipe as
    ``/dev/fd/N`` (read whole: no newline added or stripped); returns the new keyslot."""
    with secret_fd(new_secret) as fd:
        args = [
            "-v",
            "luksAddKey",
            "--batch-mode",
            *pbkdf_args,
            "--key-file",
            "-",
            "--new-keyfile",
            f"/dev/fd/{fd}",
        ]
        if keyslot is not None:
            # Alone, --key-slot names the new slot in every 2.x (2.6 keeps that meaning when
            # --new-key-slot is absent); --new-key-slot exists only from 2.6.
            args += ["--key-slot", str(keyslot)]
        try:
            out = run(
                [CRYPTSETUP, *args, *_header_args(header), name],
                stdin=existing_key,
                env=_ENV,
                pass_fds=(fd,),
            ).stdout
        except CommandError as exc:
            if exc.returncode == _EXIT_NO_KEY:
                raise VerifyError(
                    f"The existing key opens no keyslot of `{name}`; no keyslot was added."
                ) from None
            if "is full" in exc.stderr or "not available" in exc.stderr:
                raise DeviceError(
                    f"Keyslot {keyslot} of `{name}` is taken; no keyslot was added.",
                    hint="choose a free keyslot or let cryptsetup pick one",
                ) from None
            raise _explain(exc, name, "No keyslot was added.") from None
    match = _KEYSLOT_CREATED.search(out.decode(errors="replace"))
    if match:
        return int(match.group(1))
    if keyslot is not None:
        return keyslot
    raise ToolError(f"cryptsetup added a keyslot to `{name}` but did not say which.")


def add_keyslot(
    device: PathArg,
    *,
    existing_key: Secret,
    new_key: Secret,
    keyslot: Optional[int] = None,
    header: Optional[PathArg] = None,
) -> int:
    """Add a keyslot for ``new_key`` (PBKDF2, 1000 iterations), authorised by ``existing_key``.

    The existing key goes on stdin, the new one through a pipe as ``/dev/fd/N``. Returns the
    number of the new keyslot.
    """
    pbkdf = ["--pbkdf", PBKDF, "--pbkdf-force-iterations", str(PBKDF_ITERATIONS)]
    return _add_key(_name(device), pbkdf, existing_key, new_key, keyslot, header)


# A human passphrase gets Argon2id, capped so a small initramfs can afford to open it.
RECOVERY_PBKDF = "argon2id"
RECOVERY_MEMORY_KIB = 65536
RECOVERY_ITER_TIME_MS = 2000  # cryptsetup's own default unlock time


def add_passphrase_keyslot(
    device: PathArg,
    *,
    existing_key: Secret,
    passphrase: Secret,
    memory_kib: int = RECOVERY_MEMORY_KIB,
    iter_time_ms: int = RECOVERY_ITER_TIME_MS,
    keyslot: Optional[int] = None,
    header: Optional[PathArg] = None,
) -> int:
    """Add an Argon2id keyslot for a human ``passphrase``, authorised by ``existing_key``.

    ``memory_kib`` is the most cryptsetup may use (its benchmark may pick less, never more);
    ``iter_time_ms`` is the unlock time the benchmark aims for on this machine. The existing
    key goes on stdin, the passphrase through a pipe as ``/dev/fd/N`` (read whole: no newline
    is added or stripped). Returns the new keyslot's number.
    """
    if not 8 * 1024 <= memory_kib <= 4 * 1024 * 1024:
        raise ValueError("memory_kib must be between 8 MiB and 4 GiB")
    if iter_time_ms < 1:
        raise ValueError("iter_time_ms must be positive")
    pbkdf = [
        "--pbkdf",
        RECOVERY_PBKDF,
        "--pbkdf-memory",
        str(memory_kib),
        "--iter-time",
        str(iter_time_ms),
    ]
    return _add_key(_name(device), pbkdf, existing_key, passphrase, keyslot, header)


def kill_keyslot(
    device: PathArg,
    keyslot: int,
    *,
    existing_key: Optional[Secret] = None,
    header: Optional[PathArg] = None,
    allow_last: bool = False,
) -> None:
    """Wipe ``keyslot`` (rollbacks). With ``existing_key``, cryptsetup first checks that key
    opens another keyslot. The last key keyslot is never wiped unless ``allow_last``."""
    name = _name(device)
    current = read_header(device, header)
    slot = current.keyslots.get(str(keyslot))
    if slot is None:
        raise DeviceError(f"`{name}` has no keyslot {keyslot}; nothing was changed.")
    others = [k for k in current.key_keyslots if k.id != keyslot]
    if slot.type != "reencrypt" and not others and not allow_last:
        raise RefusedError(
            f"Keyslot {keyslot} is the last keyslot of `{name}`: wiping it would lose the data. "
            "Nothing was changed."
        )
    args = ["luksKillSlot", "--batch-mode"]
    if existing_key is not None:
        args += ["--key-file", "-"]
    try:
        # Without a key, stdin is empty: cryptsetup reads nothing and (in batch mode) proceeds.
        run(
            [CRYPTSETUP, *args, *_header_args(header), name, str(keyslot)],
            stdin=existing_key,
            env=_ENV,
        )
    except CommandError as exc:
        if exc.returncode == _EXIT_NO_KEY:
            raise VerifyError(
                f"The given key opens no other keyslot of `{name}`, so keyslot {keyslot} was kept."
            ) from None
        raise _explain(exc, name) from None


def _test_passphrase(
    device: PathArg, key: Secret, keyslot: Optional[int], header: Optional[PathArg]
) -> bool:
    name = _name(device)
    args = ["open", "--test-passphrase", "--key-file", "-"]
    if keyslot is not None:
        args += ["--key-slot", str(keyslot)]
    try:
        run([CRYPTSETUP, *args, *_header_args(header), name], stdin=key, env=_ENV)
    except CommandError as exc:
        if exc.returncode == _EXIT_NO_KEY:
            return False
        if keyslot is not None and "No usable keyslot" in exc.stderr:
            raise DeviceError(f"`{name}` has no usable keyslot {keyslot}.") from None
        raise _explain(exc, name) from None
    return True


def test_keyslot(
    device: PathArg, key: Secret, keyslot: int, header: Optional[PathArg] = None
) -> bool:
    """True when ``key`` opens ``keyslot``; False for a wrong key. Opens nothing."""
    return _test_passphrase(device, key, keyslot, header)


def test_any_keyslot(device: PathArg, key: Secret, header: Optional[PathArg] = None) -> bool:
    """True when ``key`` opens some keyslot of ``device``. Opens nothing."""
    return _test_passphrase(device, key, None, header)


# Not collected as tests when a test module imports them.
test_keyslot.__test__ = False  # type: ignore[attr-defined]
test_any_keyslot.__test__ = False  # type: ignore[attr-defined]


# --- in-place encryption ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReencryptProgress:
    done_bytes: int
    total_bytes: int
    mib_per_s: float
    eta_s: Optional[float]  # None until cryptsetup has measured a speed

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0


def parse_progress_line(line: str) -> Optional[ReencryptProgress]:
    """One ``--progress-json`` line of cryptsetup >= 2.5; None for any other line.

    cryptsetup's own ``eta_ms`` divides the whole device by the speed of this run, which is
    wrong after a resume; the ETA here is what is left divided by the speed.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        raw = json.loads(text)
        done = int(raw["device_bytes"])
        total = int(raw["device_size"])
        speed = int(raw.get("speed", 0))  # bytes per second
    except (ValueError, KeyError, TypeError):
        return None
    eta = max(total - done, 0) / speed if speed > 0 else None
    return ReencryptProgress(done, total, speed / (1024 * 1024), eta)


def _check_uuid(value: str) -> str:
    try:
        canonical = str(uuid_module.UUID(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a UUID") from None
    if canonical != value.lower():
        raise ValueError(f"{value!r} is not a UUID in the canonical 8-4-4-4-12 form")
    return canonical


def reencrypt_encrypt_init(
    device: PathArg,
    key: Secret,
    *,
    uuid: str,
    reduce_device_size: Optional[int] = None,
    header: Optional[PathArg] = None,
    label: Optional[str] = None,
    subsystem: Optional[str] = None,
    cipher: Optional[str] = None,
    key_size_bits: Optional[int] = None,
    sector_size: Optional[int] = None,
) -> int:
    """Write a LUKS2 header with a pending encryption of ``device``; no data is encrypted yet.

    ``uuid`` is chosen by the caller beforehand (the wrapped key's encryption context binds to
    it). With the header on the device, ``reduce_device_size`` bytes at the end of the device
    must be unused (the filesystem shrunk or the partition grown): cryptsetup moves the first
    data there and puts the header (half of it) at the start. Returns the new keyslot's id.
    """
    name = _name(device)
    wanted = _check_uuid(uuid)
    if header is None and not reduce_device_size:
        raise ValueError("encryption with the header on the device needs reduce_device_size")
    if reduce_device_size is not None and (reduce_device_size <= 0 or reduce_device_size % 512):
        raise ValueError("reduce_device_size must be a positive multiple of 512 bytes")
    target = _name(header) if header is not None else name
    if os.path.exists(target) and is_luks(target):
        raise RefusedError(
            f"`{target}` already has a LUKS header; encryption was not started and nothing "
            "was changed.",
            hint="a pending encryption is resumed, not started again",
        )
    args = [
        "reencrypt",
        "--encrypt",
        "--type",
        "luks2",
        "--init-only",
        "--batch-mode",
        "--uuid",
        wanted,
        "--pbkdf",
        PBKDF,
        "--pbkdf-force-iterations",
        str(PBKDF_ITERATIONS),
        "--key-file",
        "-",
    ]
    if reduce_device_size is not None:
        args += ["--reduce-device-size", f"{reduce_device_size}"]
    for option, value in (
        ("--label", label),
        ("--subsystem", subsystem),
        ("--cipher", cipher),
        ("--key-size", key_size_bits),
        ("--sector-size", sector_size),
    ):
        if value is not None:
            args += [option, str(value)]
    _cryptsetup([*args, *_header_args(header), name], name, stdin=key)
    written = read_header(device, header)
    if written.uuid != wanted:
        raise VerifyError(
            f"cryptsetup wrote the LUKS header of `{name}` with UUID {written.uuid}, not the "
            f"requested {wanted}; no data was encrypted yet.",
        )
    if not written.reencryption_pending or not written.key_keyslots:
        raise VerifyError(
            f"cryptsetup wrote a header on `{name}` without a pending encryption; no data was "
            "encrypted yet."
        )
    return written.key_keyslots[0].id


def reencrypt_recover(device: PathArg, key: Secret, *, header: Optional[PathArg] = None) -> None:
    """Recover a reencryption that was killed mid-hotzone (``cryptsetup repair``)."""
    name = _name(device)
    log.info("recovering the interrupted encryption of %s", name)
    _cryptsetup(
        ["repair", "--batch-mode", "--key-file", "-", *_header_args(header), name],
        name,
        stdin=key,
        changed="The interrupted encryption was not recovered; the next attempt can retry.",
    )


_ABORT_CHUNK = 1024 * 1024


def reencrypt_abort_init(device: PathArg, *, header: Optional[PathArg] = None) -> None:
    """Undo :func:`reencrypt_encrypt_init` before any data was encrypted: the device is plain
    again, byte for byte over the filesystem's extent.

    Init with the header on the device moved the first ``data_offset`` bytes of the data to the
    freed tail and wrote the header where they were; nothing else changed. Those bytes are
    copied back, last chunk first and the chunk holding both header copies last: until that
    final write the header still describes the state, so a crash leaves a device on which this
    can simply run again. With a detached header the device was never written: delete the
    header file instead (this only checks that nothing was encrypted).
    """
    name = _name(device)
    current = read_header(device, header)
    state_slot = current.reencrypt_keyslot
    live = [s for s in current.segments if not any(f.startswith("backup-") for f in s.flags)]
    if (
        current.reencryption_state is not ReencryptionState.PENDING
        or state_slot is None
        or state_slot.mode != "encrypt"
        or current.data_pass_started
    ):
        raise RefusedError(
            f"`{name}` is not an initialised encryption with no data encrypted yet, so it "
            "cannot be undone; nothing was changed.",
            hint="a started encryption can only be finished (reencrypt_resume)",
        )
    if header is not None:
        return
    moved = current.segment_with_flag("backup-moved-segment")
    first = min(live, key=lambda s: s.id) if live else None
    if (
        moved is None
        or moved.size is None
        or first is None
        or (first.offset, first.size) != (moved.offset, moved.size)
    ):
        raise RefusedError(
            f"The header of `{name}` does not show where the moved data is; nothing was changed."
        )
    log.info("undoing the encryption set-up of %s (%d bytes back to the start)", name, moved.size)
    starts = list(range(0, moved.size, _ABORT_CHUNK))
    fd = os.open(name, os.O_RDWR)
    try:
        for start in [*reversed(starts[1:]), starts[0]]:
            if start == starts[0]:
                os.fsync(fd)  # everything else is down before the header goes
            length = min(_ABORT_CHUNK, moved.size - start)
            data = os.pread(fd, length, moved.offset + start)
            if len(data) != length:
                raise DeviceError(f"Short read from `{name}` at {moved.offset + start}.")
            os.pwrite(fd, data, start)
        os.fsync(fd)
    finally:
        os.close(fd)
    if is_luks(device):
        raise VerifyError(f"`{name}` still has a LUKS header after the set-up was undone.")


def reencrypt_resume(
    device: PathArg,
    key: Secret,
    *,
    header: Optional[PathArg] = None,
    force_offline: bool = False,
    on_progress: Optional[Callable[[ReencryptProgress], None]] = None,
    progress_interval_s: Optional[int] = None,
) -> bool:
    """Run (or continue) the pending data pass until the whole device is encrypted.

    Recovers first when the previous pass was killed mid-way. ``force_offline`` is needed for
    image files (cryptsetup cannot tell whether a file is in use). ``on_progress`` gets
    cryptsetup's progress (every ``progress_interval_s``, default half a second); an exception
    from it stops cryptsetup, which leaves a state the next resume recovers from. Returns False
    when there was nothing to do.
    """
    name = _name(device)
    state = read_header(device, header).reencryption_state
    if state is ReencryptionState.NONE:
        log.info("%s has no pending encryption; nothing to resume", name)
        return False
    if state is ReencryptionState.INTERRUPTED:
        reencrypt_recover(device, key, header=header)
    version = cryptsetup_version()
    if force_offline:
        require_cryptsetup(PROGRESS_JSON_SINCE)
    args = ["reencrypt", "--resume-only", "--batch-mode", "--key-file", "-"]
    if force_offline:
        args.append("--force-offline-reencrypt")
    if version >= PROGRESS_JSON_SINCE:
        args.append("--progress-json")
        if progress_interval_s is not None:
            args += ["--progress-frequency", str(progress_interval_s)]
    elif on_progress is not None:
        log.info("cryptsetup %s reports no progress in batch mode", _dotted(version))

    def on_line(line: str) -> None:
        progress = parse_progress_line(line)
        if progress is None:
            if line.strip():
                log.debug("cryptsetup: %s", line)
        elif on_progress is not None:
            on_progress(progress)

    changed = "The encryption stopped at its last checkpoint; resuming continues from there."
    try:
        run_streaming(
            [CRYPTSETUP, *args, *_header_args(header), name],
            stdin=key,
            env=_ENV,
            on_line=on_line,
        )
    except CommandError as exc:
        raise _explain(exc, name, changed) from None
    if read_header(device, header).reencryption_pending:
        raise DeviceError(
            f"cryptsetup finished but `{name}` still has a pending encryption. " + changed
        )
    return True


# --- activation (needs device-mapper: exercised by the vm tier) -------------------------------


def open_device(
    device: PathArg,
    name: str,
    key: Secret,
    *,
    keyslot: Optional[int] = None,
    header: Optional[PathArg] = None,
) -> str:
    """Open ``device`` as ``/dev/mapper/<name>`` with ``key``; the mapper path."""
    dev = _name(device)
    args = ["open", "--type", "luks2", "--key-file", "-"]
    if keyslot is not None:
        args += ["--key-slot", str(keyslot)]
    try:
        run([CRYPTSETUP, *args, *_header_args(header), dev, name], stdin=key, env=_ENV)
    except CommandError as exc:
        if exc.returncode == _EXIT_BUSY:
            raise DeviceError(
                f"Cannot open `{dev}` as {name}: a device named {name} already exists or "
                f"`{dev}` is in use ({_last_line(exc.stderr)}).",
                hint=f"`cryptsetup status {name}` shows what holds the name",
            ) from None
        raise _explain(exc, dev, f"`{dev}` was not opened.") from None
    return f"/dev/mapper/{name}"


def resize_device(
    name: str, key: Optional[Secret] = None, *, size_bytes: Optional[int] = None
) -> None:
    """Grow (or set) the size of the open ``/dev/mapper/<name>`` to its backing device's.

    LUKS2 keeps the volume key in the kernel keyring by default, and then cryptsetup needs a
    key to resize: pass it (it goes on stdin).
    """
    args = ["resize"]
    if key is not None:
        args += ["--key-file", "-"]
    if size_bytes is not None:
        if size_bytes <= 0 or size_bytes % 512:
            raise ValueError("size_bytes must be a positive multiple of 512")
        args += ["--size", str(size_bytes // 512)]
    _cryptsetup(
        [*args, name],
        f"/dev/mapper/{name}",
        stdin=key,
        changed=f"/dev/mapper/{name} keeps its size.",
    )


def close_device(name: str) -> None:
    try:
        run([CRYPTSETUP, "close", name], env=_ENV)
    except CommandError as exc:
        if exc.returncode == _EXIT_WRONG_DEVICE or "is not active" in exc.stderr:
            raise DeviceError(f"There is no open device named {name}.") from None
        if exc.returncode == _EXIT_BUSY:
            raise DeviceError(
                f"/dev/mapper/{name} is still in use (mounted?) and stays open.",
                hint="unmount what is on it first",
            ) from None
        raise
    log.debug("closed /dev/mapper/%s", name)
