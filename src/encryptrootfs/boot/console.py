"""What the boot says on the console: short lines, one event each, readable on a serial port."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..log import get_logger
from ..luks2 import ReencryptProgress

log = get_logger("boot")
MIB = 1024 * 1024


def say(message: str) -> None:
    log.info("%s", message)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def progress_line(device: str, p: ReencryptProgress) -> str:
    pct = 100.0 * p.done_bytes / p.total_bytes if p.total_bytes else 0.0
    line = f"encrypting {device}: {pct:5.1f}% ({p.done_bytes // MIB} of {p.total_bytes // MIB} MiB)"
    if p.mib_per_s:
        line += f", {p.mib_per_s:.1f} MiB/s"
    if p.eta_s is not None and p.done_bytes < p.total_bytes:
        line += f", about {_duration(p.eta_s)} left"
    return line


@dataclass
class ProgressPrinter:
    """Prints a progress line at most every ``interval`` seconds, and always the last one."""

    device: str
    interval: float = 5.0
    clock: Callable[[], float] = time.monotonic
    emit: Callable[[str], None] = say
    _last: Optional[float] = field(default=None, init=False)
    last: Optional[ReencryptProgress] = field(default=None, init=False)

    def __call__(self, p: ReencryptProgress) -> None:
        self.last = p
        now = self.clock()
        finished = p.total_bytes > 0 and p.done_bytes >= p.total_bytes
        if self._last is None or now - self._last >= self.interval or finished:
            self._last = now
            self.emit(progress_line(self.device, p))
