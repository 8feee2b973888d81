"""Operations on the root volume with its key in hand: the data pass and opening the mapping."""

from __future__ import annotations

import os
import time

from .. import luks2
from ..config import Config
from ..token import KmsToken
from .console import MIB, ProgressPrinter, say


def data_pass(device: str, key: bytearray) -> None:
    say(f"{device}: encrypting the data in place; safe to power off, the next boot resumes")
    start = time.monotonic()
    printer = ProgressPrinter(device)
    luks2.reencrypt_resume(device, key, on_progress=printer)
    seconds = time.monotonic() - start
    done = printer.last.done_bytes if printer.last else 0
    rate = f" ({done / MIB / seconds:.1f} MiB/s)" if done and seconds > 0 else ""
    say(f"{device}: encryption finished: {done // MIB} MiB in {seconds:.1f} s{rate}")


def open_root(device: str, config: Config, key: bytearray, token: KmsToken) -> str:
    name = config.mapper_name
    mapper = f"/dev/mapper/{name}"
    if os.path.exists(mapper):
        return mapper
    luks2.open_device(device, name, key, keyslot=int(token.keyslots[0]))
    say(f"{device}: opened as {mapper}")
    return mapper
