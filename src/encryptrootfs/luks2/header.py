"""The LUKS2 header as data: keyslots, segments, digests, tokens, requirements.

Pure: parsed from the two outputs of ``luksDump`` (``--dump-json-metadata`` and the text dump,
which alone has version, UUID, label, subsystem and epoch), so the unit tier checks the parser
against outputs recorded from a real cryptsetup (tests/fixtures/luks2/).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Optional, Union

from ..errors import DeviceError
from ..log import get_logger

log = get_logger("luks2")


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


def encryption_progress(
    header: LuksHeader, device_size: Optional[int]
) -> Optional[tuple[int, int]]:
    """(bytes encrypted, bytes in all) of a pending in-place *encryption*, from the header.

    While cryptsetup encrypts, the live segments (those without a ``backup-*`` flag) are the
    parts already encrypted (``crypt``) and the parts still plain (``linear``); together they
    cover the data. A ``dynamic`` segment runs to the end of the device, so its size needs
    ``device_size``; without it the share is unknown (None), as it is for any other mode or
    when nothing is pending. Used by ``status`` (the percentage) and by the data pass (what
    this boot encrypted, apart from what an earlier boot did).
    """
    state_slot = header.reencrypt_keyslot
    if not header.reencryption_pending or state_slot is None or state_slot.mode != "encrypt":
        return None
    done = total = 0
    for segment in header.segments:
        if any(f.startswith("backup-") for f in segment.flags):
            continue
        if segment.size is not None:
            size = segment.size
        elif device_size is not None:
            size = max(device_size - segment.offset, 0)
        else:
            return None
        total += size
        if segment.type == "crypt" and "in-reencryption" not in segment.flags:
            done += size
    if total <= 0:
        return None
    return done, total
