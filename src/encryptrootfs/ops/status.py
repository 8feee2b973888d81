"""``encryptrootfs status``: what each managed device is, who holds its keys, how it last opened.

Read-only: it reads LUKS2 headers (luksDump), blkid signatures and the unlock record the
initramfs wrote (:mod:`encryptrootfs.unlock_record`); it calls no key service and opens
nothing. The JSON form is a versioned interface documented in docs/status.md; the parts that
decide (state, reencryption progress, keyslot owners) are pure functions of a parsed header.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from .. import luks2
from ..config import Config
from ..errors import DeviceError, EncryptrootfsError
from ..log import get_logger
from ..token import RECOVERY_TOKEN_TYPE, read_tokens
from ..unlock_record import UnlockMethod, UnlockRecord

log = get_logger("status")

# Bump on any change a reader could trip over (a field removed, renamed or changing meaning);
# new fields are added without a bump. docs/status.md is the reference.
STATUS_SCHEMA_VERSION = 1


# Under a recovery-key unlock: what it means and what to look at. The boot's console output
# (`journalctl -b`) has the line that says why KMS was failing.
RECOVERY_UNLOCK_ADVICE = (
    "KMS did not unwrap the root key on this boot (unreachable, or it refused), so a person",
    "opened the root with the recovery key. Check the instance role, the key policy and the",
    "network path to KMS; `journalctl -b` shows the line that says why KMS was failing.",
)


class VolumeState(str, Enum):
    ENCRYPTED = "encrypted"  # LUKS2 with an encryptrootfs token, nothing pending
    REENCRYPTION_PENDING = "reencryption-pending"  # our token, in-place encryption unfinished
    PLAIN = "plain"  # no LUKS header (a plain filesystem, or nothing recognised)
    NOT_OURS = "not-ours"  # LUKS1, or LUKS2 without an encryptrootfs token
    UNREADABLE = "unreadable"  # missing, or its header could not be read (see error)

    def __str__(self) -> str:
        return self.value


class TokenKind(str, Enum):
    KMS = "kms"  # an encryptrootfs token: a key wrapped by a key service
    RECOVERY = "recovery"  # an encryptrootfs-recovery token: names the recovery keyslot
    FOREIGN = "foreign"  # another program's token (clevis, systemd-*), listed by type only


@dataclass(frozen=True)
class TokenSummary:
    id: int
    type: str
    kind: TokenKind
    keyslots: tuple[int, ...]
    provider: Optional[str] = None
    key_id: Optional[str] = None
    region: Optional[str] = None
    encryption_context: Optional[Mapping[str, str]] = None
    created: Optional[str] = None
    error: Optional[str] = None  # an encryptrootfs token that could not be read

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "kind": self.kind.value,
            "keyslots": list(self.keyslots),
            "provider": self.provider,
            "key_id": self.key_id,
            "region": self.region,
            "encryption_context": (
                dict(self.encryption_context) if self.encryption_context is not None else None
            ),
            "created": self.created,
            "error": self.error,
        }


@dataclass(frozen=True)
class KeyslotSummary:
    id: int
    type: str  # luks2, or reencrypt for the reencryption state slot
    kdf: Optional[str]
    iterations: Optional[int]  # pbkdf2
    memory_kib: Optional[int]  # argon2
    token_ids: tuple[int, ...]  # the tokens that name this keyslot; () for none

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "kdf": self.kdf,
            "iterations": self.iterations,
            "memory_kib": self.memory_kib,
            "token_ids": list(self.token_ids),
        }


@dataclass(frozen=True)
class Reencryption:
    state: str  # luks2.ReencryptionState value: pending | interrupted
    mode: Optional[str]  # encrypt | decrypt | reencrypt
    percent: Optional[float]  # share of the data already in its final form; None if unknown

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "mode": self.mode, "percent": self.percent}


@dataclass(frozen=True)
class DeviceStatus:
    device: str
    state: VolumeState
    luks_version: Optional[int] = None
    luks_uuid: Optional[str] = None
    filesystem: Optional[str] = None  # plain devices: what blkid recognises
    reencryption: Optional[Reencryption] = None
    tokens: tuple[TokenSummary, ...] = ()
    keyslots: tuple[KeyslotSummary, ...] = ()
    last_unlock: Optional[UnlockRecord] = None
    error: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "state": self.state.value,
            "luks_version": self.luks_version,
            "luks_uuid": self.luks_uuid,
            "filesystem": self.filesystem,
            "reencryption": self.reencryption.as_dict() if self.reencryption else None,
            "tokens": [t.as_dict() for t in self.tokens],
            "keyslots": [k.as_dict() for k in self.keyslots],
            "last_unlock": self.last_unlock.as_dict() if self.last_unlock else None,
            "error": self.error,
        }


# --- pure: from a parsed header ---------------------------------------------------------------


def reencryption_percent(header: luks2.LuksHeader, device_size: Optional[int]) -> Optional[float]:
    """How much of an in-place *encryption* is done (see :func:`luks2.encryption_progress`)."""
    progress = luks2.encryption_progress(header, device_size)
    if progress is None:
        return None
    done, total = progress
    return round(100.0 * done / total, 1)


def summarise_tokens(header: luks2.LuksHeader) -> tuple[TokenSummary, ...]:
    out = []
    for found in read_tokens(header.tokens).all:
        key, token_type, token = found.id, found.type, found.token
        slots = tuple(sorted(found.keyslots))
        if found.damaged is not None:
            out.append(TokenSummary(key, token_type, TokenKind.KMS, slots, error=found.damaged))
        elif token is not None:
            w = token.wrapped
            out.append(
                TokenSummary(
                    key,
                    token_type,
                    TokenKind.KMS,
                    slots,
                    provider=w.provider.value,
                    key_id=w.key_id,
                    region=w.region,
                    encryption_context=dict(w.encryption_context),
                    created=token.created,
                )
            )
        elif token_type == RECOVERY_TOKEN_TYPE:
            out.append(
                TokenSummary(key, token_type, TokenKind.RECOVERY, slots, created=found.created)
            )
        else:
            out.append(TokenSummary(key, token_type, TokenKind.FOREIGN, slots))
    return tuple(out)


def summarise_keyslots(
    header: luks2.LuksHeader, tokens: Sequence[TokenSummary]
) -> tuple[KeyslotSummary, ...]:
    return tuple(
        KeyslotSummary(
            id=slot.id,
            type=slot.type,
            kdf=slot.kdf_type,
            iterations=slot.iterations,
            memory_kib=slot.memory,
            token_ids=tuple(t.id for t in tokens if slot.id in t.keyslots),
        )
        for slot in sorted(header.keyslots.values(), key=lambda k: k.id)
    )


def summarise_header(
    device: str,
    header: luks2.LuksHeader,
    *,
    device_size: Optional[int] = None,
    record: Optional[UnlockRecord] = None,
) -> DeviceStatus:
    """The status of a LUKS2 device from its parsed header (and the last unlock record)."""
    tokens = summarise_tokens(header)
    ours = any(t.kind is TokenKind.KMS for t in tokens)
    reencryption = None
    if header.reencryption_pending:
        slot = header.reencrypt_keyslot
        reencryption = Reencryption(
            state=header.reencryption_state.value
            if header.reencryption_state is not luks2.ReencryptionState.NONE
            else luks2.ReencryptionState.PENDING.value,
            mode=slot.mode if slot is not None else None,
            percent=reencryption_percent(header, device_size),
        )
    if not ours:
        state = VolumeState.NOT_OURS
    elif reencryption is not None:
        state = VolumeState.REENCRYPTION_PENDING
    else:
        state = VolumeState.ENCRYPTED
    return DeviceStatus(
        device=device,
        state=state,
        luks_version=2,
        luks_uuid=header.uuid,
        reencryption=reencryption,
        tokens=tokens,
        keyslots=summarise_keyslots(header, tokens),
        last_unlock=record if record is not None and record.luks_uuid == header.uuid else None,
    )


# --- reading devices --------------------------------------------------------------------------


def device_status(device: str, record: Optional[UnlockRecord] = None) -> DeviceStatus:
    """Everything ``status`` says about one device; problems become an ``unreadable`` entry."""
    from ..devices import device_size, probe_signature

    try:
        if not os.path.exists(device):
            raise DeviceError(f"`{device}` does not exist.")
        version = luks2.luks_version(device)
        if version is None:
            signature, _ = probe_signature(device)
            return DeviceStatus(device, VolumeState.PLAIN, filesystem=signature.type or None)
        if version != 2:
            dump = luks2.read_dump(device)
            return DeviceStatus(
                device, VolumeState.NOT_OURS, luks_version=version, luks_uuid=dump.uuid
            )
        header = luks2.read_header(device)
        return summarise_header(device, header, device_size=device_size(device), record=record)
    except EncryptrootfsError as exc:
        return DeviceStatus(device, VolumeState.UNREADABLE, error=exc.message)


def configured_root(config: Config) -> str:
    """The root partition ``encryptrootfs boot`` would pick, found the same way (read-only)."""
    from ..devices import find_root, gather, root_spec

    spec = root_spec(config)
    root = find_root(spec, gather())
    if root is None:
        raise DeviceError(
            f"No partition matches the root selector `{spec}`.",
            hint="name the device: `encryptrootfs status DEVICE`",
        )
    return root.path


def gather_status(devices: Iterable[str], record: Optional[UnlockRecord]) -> list[DeviceStatus]:
    seen: list[str] = []
    for device in devices:
        if device not in seen:
            seen.append(device)
    return [device_status(d, record) for d in seen]


def status_json(statuses: Sequence[DeviceStatus]) -> dict[str, Any]:
    return {"schema_version": STATUS_SCHEMA_VERSION, "devices": [s.as_dict() for s in statuses]}


def status_text(statuses: Sequence[DeviceStatus]) -> str:
    """The same facts for a person, one device after another."""
    lines: list[str] = []
    for s in statuses:
        head = f"{s.device}: {s.state.value}"
        if s.state is VolumeState.PLAIN:
            head += f" ({s.filesystem or 'no recognised filesystem'})"
        elif s.luks_uuid:
            head += f" (LUKS{s.luks_version} {s.luks_uuid})"
        lines.append(head)
        if s.error:
            lines.append(f"  error: {s.error}")
        if s.reencryption is not None:
            r = s.reencryption
            done = f"{r.percent:g}% done" if r.percent is not None else "progress unknown"
            lines.append(f"  reencryption: {r.state} ({r.mode or '?'}), {done}")
        for t in s.tokens:
            slots = ",".join(str(k) for k in t.keyslots) or "none"
            if t.kind is TokenKind.KMS and t.error is None:
                created = f", created {t.created}" if t.created else ""
                lines.append(
                    f"  token {t.id}: {t.provider} key {t.key_id} region {t.region}, "
                    f"keyslots {slots}{created}"
                )
                for name, value in sorted((t.encryption_context or {}).items()):
                    lines.append(f"    context {name} = {value}")
            elif t.kind is TokenKind.KMS:
                lines.append(f"  token {t.id}: {t.type}, unreadable: {t.error}")
            elif t.kind is TokenKind.RECOVERY:
                lines.append(f"  token {t.id}: recovery passphrase, keyslot {slots}")
            else:
                lines.append(f"  token {t.id}: {t.type} (not ours), keyslots {slots}")
        for k in s.keyslots:
            cost = (
                f"{k.iterations} iterations"
                if k.iterations is not None
                else f"{k.memory_kib} KiB"
                if k.memory_kib is not None
                else ""
            )
            owner = (
                (", token " + ",".join(str(i) for i in k.token_ids))
                if k.token_ids
                else ", no token"
            )
            lines.append(f"  keyslot {k.id}: {k.type} {k.kdf or ''} {cost}".rstrip() + owner)
        u = s.last_unlock
        if u is not None and u.method is UnlockMethod.RECOVERY_KEY:
            lines.append(
                f"  last unlock: {u.unlocked_at}, {u.seconds:.2f} s, recovery key "
                f"typed at the console, keyslot {u.keyslot}"
            )
            lines.extend("    " + line for line in RECOVERY_UNLOCK_ADVICE)
        elif u is not None:
            lines.append(
                f"  last unlock: {u.unlocked_at}, {u.seconds:.2f} s, key {u.key_id} "
                f"({u.region}), keyslot {u.keyslot}"
            )
        elif s.state in (VolumeState.ENCRYPTED, VolumeState.REENCRYPTION_PENDING):
            lines.append("  last unlock: not recorded this boot")
    return "\n".join(lines) + "\n"
