"""What an initramfs integration supplies to the boot core, and nothing more.

The boot core (:func:`encryptrootfs.boot.boot` and the stages under ``boot/``) decides from
what is on disk and talks to cryptsetup and the key service itself. Five things differ
between initramfs generators, and only these go through an :class:`Integration`:

- **network**: how the boot waits for a route to the metadata service and makes names resolve
  (dracut: systemd-networkd or dhclient bring links up on their own, DNS comes from the
  networkd lease; initramfs-tools: ``configure_networking`` and ``/run/net-*.conf``), and how
  it is left for the real root (dracut: nothing, switch-root stops networkd; initramfs-tools:
  flush the links, as clevis and dropbear do, so cloud-init configures them afresh);
- **ask**: how a question reaches the console (dracut: systemd's password agents;
  initramfs-tools: the console itself, or plymouth);
- **hand back**: how the opened root is given to the init that mounts it (dracut: the unit's
  generator already points ``sysroot.mount`` at ``/dev/mapper/<name>``; initramfs-tools:
  ``ROOT=`` in ``/conf/param.conf`` when ``root=`` names the LUKS partition);
- **records**: where the unlock record goes for ``encryptrootfs status`` (``/run`` survives
  switch-root in both);
- **fail**: how a boot that cannot go on stops (dracut: a non-zero exit, and the unit's
  ``OnFailure=emergency.target``; initramfs-tools: the exit code, on which the ``local-top``
  script calls ``panic``).

Everything else (decide, first boot, unlock, retries, recovery prompt) is the same code for
every generator. :mod:`encryptrootfs.boot.systemd_initrd` is the one implementation today.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional, Protocol

from ..config import Config
from ..errors import EncryptrootfsError
from .ask_password import Question


class Integration(Protocol):
    """The initramfs generator's side of a boot (see the module docstring)."""

    @property
    def name(self) -> str:
        """The generator, for messages (``dracut``, ``initramfs-tools``)."""

    @property
    def record_path(self) -> Path:
        """Where the unlock record is written (read by ``status`` after switch-root)."""

    def network_up(
        self,
        config: Config,
        deadline: float,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> bool:
        """Wait (until ``deadline`` on ``clock``) until the key service can be reached; False
        when it could not be by then. Names must resolve once this returns True."""

    def network_down(self) -> None:
        """Leave the network as the real root expects to find it (called once, at the end)."""

    def ask(self, question: Question, cancel: threading.Event) -> Optional[bytearray]:
        """What a person typed at the console, or None when ``cancel`` was set first (the
        caller wipes the answer)."""

    def hand_back(self, mapper: Optional[str]) -> None:
        """Give the opened root (``/dev/mapper/<name>``, or None when it stays plain) to the
        init that mounts it."""

    def fail(self, error: EncryptrootfsError) -> int:
        """Say why the boot stops and return the process exit code; the root stays unmounted
        (what then happens, emergency shell or panic, is the generator's)."""
