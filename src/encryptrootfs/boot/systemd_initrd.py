"""The dracut + systemd integration: ``encryptrootfs.service`` in a systemd initrd.

The unit (``dracut/50encryptrootfs/encryptrootfs.service``) runs ``python3 -m encryptrootfs
boot`` before ``sysroot.mount``; its generator points the root at ``/dev/mapper/<name>``, so
handing the root back is only the console line the lab and the operator read. A failure is a
non-zero exit, on which the unit's ``OnFailure=emergency.target`` stops the boot.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .. import unlock_record
from ..config import Config
from ..errors import EncryptrootfsError
from . import ask_password
from .network import wait_for_network


@dataclass(frozen=True)
class DracutSystemd:
    """:class:`encryptrootfs.boot.integration.Integration` for dracut's systemd initrd."""

    name: str = "dracut"
    record_path: Path = unlock_record.DEFAULT_PATH
    # None: the kernel's route table (tests give a file of their own).
    route_table: Optional[Path] = field(default=None)

    def network_up(
        self,
        config: Config,
        deadline: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> bool:
        # systemd-networkd (or network-legacy's dhclient) brings links up by itself; the boot
        # only waits for the route and writes resolv.conf from the lease.
        return wait_for_network(
            config, deadline, clock=clock, sleep=sleep, route_table=self.route_table
        )

    def network_down(self) -> None:
        # switch-root stops systemd-networkd; the real root's network configures itself.
        return None

    def ask(self, question: ask_password.Question, cancel: threading.Event) -> Optional[bytearray]:
        return ask_password.ask(question, cancel)

    def hand_back(self, mapper: Optional[str]) -> None:
        print(
            f"encryptrootfs: root ready at {mapper}"
            if mapper
            else "encryptrootfs: root left plain (first-boot encryption disabled)"
        )

    def fail(self, error: EncryptrootfsError) -> int:
        print(f"encryptrootfs: error: {error}", file=sys.stderr)
        return int(error.exit_code)
