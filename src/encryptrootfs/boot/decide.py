"""The planner: from what is on disk (facts) and the configuration, decide what this boot does.

Pure: no I/O, so every state of a power-cut first boot can be unit-tested. Whatever the disk
holds that is not one of the known states is refused with the reason, and nothing is changed
(DESIGN.md invariants 1 and 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..devices import Partition
from ..errors import DeviceError, RefusedError

SUPPORTED_FILESYSTEMS = ("ext4", "xfs", "btrfs")


class Action(str, Enum):
    ENCRYPT = "encrypt"  # plain root: run the first-boot stages
    RESTORE_HEAD = "restore-head"  # --init-only was cut mid-write: put the head back, then encrypt
    FINISH_CUSTODY = "finish-custody"  # header written, token not: import it from the plan record
    RESUME = "resume"  # the data pass was cut: unwrap and resume it
    UNLOCK = "unlock"  # encrypted: unwrap and open
    LEAVE_PLAIN = "leave-plain"  # plain root and first-boot encryption disabled

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Decision:
    action: Action
    partition: Partition
    reason: str


def decide(
    spec: str, root: Partition, *, first_boot_enabled: bool, require_encrypted: bool = False
) -> Decision:
    """What to do with the root partition, from its state and the configuration.

    ``require_encrypted`` (``[boot] require_encrypted``, set once the root was converted):
    only an encrypted root is acceptable; a plain one (encrypt again, leave plain, or finish
    a conversion) is a swapped disk or a downgrade, and is refused."""
    decision = _decide(spec, root, first_boot_enabled=first_boot_enabled)
    if require_encrypted and decision.action not in (Action.UNLOCK, Action.RESUME):
        raise RefusedError(
            f"The root {root.path} is not an encrypted root ({decision.reason}), and "
            "[boot] require_encrypted is set: this machine's root was already converted, so a "
            "plain root here is a swapped disk or a downgrade. It is neither encrypted again "
            "nor booted plain. Nothing was changed.",
            hint="boot the machine's encrypted root; if a plain root is really meant, rebuild "
            "the initramfs with [boot] require_encrypted = false",
        )
    return decision


def _decide(spec: str, root: Partition, *, first_boot_enabled: bool) -> Decision:
    p = root
    if p.record is not None and (p.luks is None or p.luks.version != 2):
        # A plan record without a LUKS2 header: the previous first boot stopped before or
        # during --init-only's header write.
        if p.head_sha256 is not None and p.head_sha256 == p.record.head_sha256:
            return Decision(
                Action.ENCRYPT,
                p,
                "a previous first boot stopped before the "
                "LUKS2 header was written; the filesystem is intact: starting again",
            )
        if p.moved_sha256 is not None and p.moved_sha256 == p.record.head_sha256:
            return Decision(
                Action.RESTORE_HEAD,
                p,
                "a previous first boot was cut while the "
                "LUKS2 header was being written; the moved copy of the head is whole",
            )
        raise RefusedError(
            f"{p.path} carries an encryptrootfs plan record, but neither its head nor the "
            "moved copy of the head matches what was recorded; nothing was changed.",
            hint="do not boot this disk again; attach it to another machine and inspect it",
        )
    if p.luks is not None:
        if p.luks.version != 2:
            raise RefusedError(
                f"The root {p.path} is LUKS{p.luks.version}; encryptrootfs manages LUKS2 "
                "only. Nothing was changed.",
                hint="unlock it by other means, or convert it with `cryptsetup convert`",
            )
        if p.luks.tokens:
            skipped = "".join(f"; skipping {d}" for d in p.luks.damaged)
            if p.luks.reencryption_pending:
                refuse_foreign_reencryption(p)
                return Decision(
                    Action.RESUME, p, "encryption of the root was interrupted" + skipped
                )
            return Decision(Action.UNLOCK, p, "the root is encrypted" + skipped)
        if p.luks.damaged:
            raise RefusedError(
                f"The root {p.path} is encrypted, but its encryptrootfs token cannot be read "
                f"({'; '.join(p.luks.damaged)}), so there is no wrapped key to ask KMS for. "
                "The root stays locked; nothing was changed.",
                hint="restore the LUKS2 header from its backup (cryptsetup luksHeaderRestore), "
                "or open the root with its recovery key and re-enroll",
            )
        if (
            p.luks.reencryption_pending
            and p.record is not None
            and p.record.luks_uuid == p.luks.uuid
        ):
            return Decision(
                Action.FINISH_CUSTODY,
                p,
                "the LUKS2 header was written but the "
                "token was not: taking the wrapped key from the plan record",
            )
        raise RefusedError(
            f"The root {p.path} is a LUKS2 device without an encryptrootfs token; it is not "
            "ours to unlock. Nothing was changed.",
            hint=f"enroll a KMS-wrapped key with `encryptrootfs enroll {p.path}`",
        )
    fs = p.signature.type
    if fs in SUPPORTED_FILESYSTEMS:
        if not first_boot_enabled:
            return Decision(Action.LEAVE_PLAIN, p, "first-boot encryption is disabled")
        return Decision(Action.ENCRYPT, p, f"the root is a plain {fs} filesystem")
    if fs == "ambivalent":
        raise RefusedError(
            f"{p.path} carries more than one signature (blkid: ambivalent); encryptrootfs "
            "will not guess which is real. Nothing was changed.",
            hint="wipe the stale signature with `wipefs` after checking which one it is",
        )
    if not fs:
        raise DeviceError(
            f"The root {p.path} holds no recognised filesystem; nothing was changed.",
            hint=f"check that `{spec}` names the root partition",
        )
    raise RefusedError(
        f"The root {p.path} holds {fs}, which encryptrootfs cannot convert in place "
        f"(supported: {', '.join(SUPPORTED_FILESYSTEMS)}). Nothing was changed.",
    )


def refuse_foreign_reencryption(p: Partition) -> None:
    """Resume only what the first boot starts: ``encrypt`` with a data shift. Anything else
    (a ``decrypt`` or ``reencrypt`` written into the header) would have the unattended unlock
    run it with the real key, e.g. write plaintext back to the disk."""
    assert p.luks is not None
    mode, _, resilience = (p.luks.reencryption or "").partition("/")
    if mode != "encrypt" or not resilience.startswith("datashift"):
        raise RefusedError(
            f"The root {p.path} has a pending reencryption of a kind encryptrootfs never "
            f"starts ({p.luks.reencryption or 'unknown'}; the first boot writes "
            "encrypt/datashift): the header was changed by something else. The root stays "
            "locked; nothing was changed.",
            hint="inspect the header on another machine (cryptsetup luksDump); do not resume it "
            "with the volume key",
        )
