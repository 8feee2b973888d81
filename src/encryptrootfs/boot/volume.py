"""Operations on the root volume with its key in hand: the data pass and opening the mapping."""

from __future__ import annotations

import os
import time

from .. import luks2
from ..config import Config
from ..token import KmsToken
from .console import ProgressPrinter, say


def data_pass(device: str, key: bytearray) -> None:
    say(f"{device}: encrypting the data in place; safe to power off, the next boot resumes")
    start = time.monotonic()
    luks2.reencrypt_resume(device, key, on_progress=ProgressPrinter(device))
    say(f"{device}: encryption finished in {time.monotonic() - start:.0f} s")


def open_root(device: str, config: Config, key: bytearray, token: KmsToken) -> str:
    name = config.mapper_name
    mapper = f"/dev/mapper/{name}"
    if os.path.exists(mapper):
        return mapper
    luks2.open_device(device, name, key, keyslot=int(token.keyslots[0]))
    say(f"{device}: opened as {mapper}")
    return mapper
