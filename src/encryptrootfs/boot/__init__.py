"""``encryptrootfs boot``: what the initramfs runs before the root is mounted, every boot.

It decides from what is on disk, never from a flag file: a plain root marked for encryption
gets the first-boot stages; an interrupted conversion is finished; an encrypted root is
unwrapped and opened; anything else stops the boot with the reason and changes nothing.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

from .. import devices
from ..config import Config
from ..devices import Partition, find_root, root_spec
from ..errors import DeviceError, RefusedError
from ..providers import provider_from_config
from .console import say
from .decide import Action, Decision, decide
from .integration import Integration
from .systemd_initrd import DracutSystemd
from .unlock import unwrap_and_open

__all__ = ["boot", "root_spec"]


def locate_root(
    spec: str,
    timeout: float,
    *,
    gather: Callable[[], list[Partition]] = devices.gather,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Partition:
    """Wait (bounded) for the partition ``spec`` names to appear; refuse if several match."""
    deadline = clock() + timeout
    said = False
    while True:
        seen = gather()
        root = find_root(spec, seen)
        if root is not None:
            return root
        if clock() >= deadline:
            # An encrypted root is known by the filesystem UUID its token records: with the
            # token unreadable, say so rather than only "not found".
            damaged = "".join(
                f" {p.path} is LUKS2 with an unreadable encryptrootfs token "
                f"({'; '.join(p.luks.damaged)}): if that is the root, restore its header "
                "from a backup or open it with its recovery key."
                for p in seen
                if p.luks is not None and p.luks.damaged
            )
            raise DeviceError(
                f"No partition matches the root selector `{spec}` after {timeout:g} s; "
                f"nothing was changed.{damaged}",
                hint="check root= on the kernel command line or [root] device in the configuration",
            )
        if not said:
            say(f"waiting for the root partition `{spec}` to appear")
            said = True
        devices.wait_for_udev(5)
        sleep(1.0)


def boot(config: Config, integration: Optional[Integration] = None) -> Optional[str]:
    """Make the root ready; returns the mapper path, or None when the root stays plain.

    ``integration`` is the initramfs generator's side (network, console questions, records;
    :mod:`encryptrootfs.boot.integration`); dracut's when not given."""
    chosen: Integration = integration or DracutSystemd()
    mapper = f"/dev/mapper/{config.mapper_name}"
    if os.path.exists(mapper):
        say(f"{mapper} is already open; nothing to do")
        return mapper
    spec = root_spec(config)
    devices.wait_for_udev(30)
    root = locate_root(spec, config.boot.device_timeout)
    devices.refuse_competitors(spec, root, devices.competing_devices(spec, root))
    for _ in range(3):  # at most: restore head -> encrypt, or custody -> restore -> encrypt
        decision = decide(
            spec,
            root,
            first_boot_enabled=config.first_boot.enabled,
            require_encrypted=config.boot.require_encrypted,
        )
        say(f"{root.path}: {decision.reason} ({decision.action})")
        result = _apply(decision, config, chosen)
        if result is not _AGAIN:
            return result
        root = locate_root(spec, config.boot.device_timeout)
    raise RefusedError(f"{root.path}: the first boot did not converge; stopping.")


_AGAIN = "again"


def _apply(decision: Decision, config: Config, integration: Integration) -> Optional[str]:
    part = decision.partition
    if decision.action is Action.LEAVE_PLAIN:
        return None
    if decision.action is Action.UNLOCK:
        assert part.luks is not None
        return unwrap_and_open(part, config, part.luks.tokens, integration=integration)
    if decision.action is Action.RESUME:
        assert part.luks is not None
        return unwrap_and_open(part, config, part.luks.tokens, resume=True, integration=integration)
    # Only a first boot (or an interrupted one) needs these stages: every later boot, the
    # common case, skips importing them and the /boot, filesystem and partition code they pull.
    from . import first_boot

    if decision.action is Action.RESTORE_HEAD:
        first_boot.restore_head(part)
        return _AGAIN
    provider = provider_from_config(config)
    budget = config.boot.unlock_timeout
    if not integration.network_up(
        config, time.monotonic() + budget, clock=time.monotonic, sleep=time.sleep
    ):
        say(f"no network after {budget:g} s; trying KMS anyway")
    if decision.action is Action.FINISH_CUSTODY:
        if not first_boot.finish_custody(part, provider, config, integration):
            first_boot.restore_head(part)
        return _AGAIN
    # Action.ENCRYPT
    return first_boot.encrypt(part, config, provider, integration)
