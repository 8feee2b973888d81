"""Operations on the root volume with its key in hand: the data pass and opening the mapping."""

from __future__ import annotations

import os
import time
from typing import Callable

from .. import luks2
from ..config import Config
from ..devices import device_size
from ..errors import EncryptrootfsError
from ..log import get_logger
from ..token import KmsToken
from .console import MIB, ProgressPrinter, say

log = get_logger("boot.volume")


def data_pass(device: str, key: bytearray, *, clock: Callable[[], float] = time.monotonic) -> None:
    say(f"{device}: encrypting the data in place; safe to power off, the next boot resumes")
    before = encrypted_before(device)
    start = clock()
    printer = ProgressPrinter(device)
    luks2.reencrypt_resume(device, key, on_progress=printer)
    seconds = clock() - start
    # cryptsetup counts every encrypted byte, those of an earlier (cut) boot too; the rate is
    # this boot's bytes over this boot's seconds. The lab's demo and vm tests parse this line.
    done = printer.last.done_bytes if printer.last else 0
    now = max(done - before, 0)
    rate = f" ({now / MIB / seconds:.1f} MiB/s)" if now and seconds > 0 else ""
    earlier = f" ({before // MIB} MiB already encrypted by an earlier boot)" if before else ""
    say(f"{device}: encryption finished: {now // MIB} MiB in {seconds:.1f} s{rate}{earlier}")


def encrypted_before(device: str) -> int:
    """Bytes the header says are encrypted already (0 on a fresh pass, or if unknown)."""
    try:
        progress = luks2.encryption_progress(luks2.read_header(device), device_size(device))
    except EncryptrootfsError as exc:
        log.debug("%s: cannot tell how much an earlier boot encrypted: %s", device, exc)
        return 0
    return progress[0] if progress is not None else 0


def open_root(device: str, config: Config, key: bytearray, token: KmsToken) -> str:
    name = config.mapper_name
    mapper = f"/dev/mapper/{name}"
    if os.path.exists(mapper):
        return mapper
    luks2.open_device(device, name, key, keyslot=int(token.keyslots[0]))
    say(f"{device}: opened as {mapper}")
    return mapper
