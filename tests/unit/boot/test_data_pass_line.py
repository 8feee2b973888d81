"""The line that ends a data pass: this boot's bytes over this boot's seconds.

After a power cut, cryptsetup's progress counts every encrypted byte, those of the earlier
boot too; dividing them by this boot's seconds overstated the rate. The line keeps its form
(the lab's demo report and the vm tests parse it) and names what an earlier boot did.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest

from encryptrootfs import luks2
from encryptrootfs.boot import volume
from encryptrootfs.luks2 import ReencryptProgress
from encryptrootfs_lab.demo import _FINISHED

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "luks2"
MIB = 1024 * 1024


def header(name: str) -> luks2.LuksHeader:
    return luks2.parse_header(
        (FIXTURES / f"{name}.json").read_text(), (FIXTURES / f"{name}.dump.txt").read_text()
    )


def run_pass(monkeypatch: pytest.MonkeyPatch, name: str, total: int) -> str:
    lines: list[str] = []
    monkeypatch.setattr(volume, "say", lines.append)
    monkeypatch.setattr(luks2, "read_header", lambda device, header=None: header_of[name])
    monkeypatch.setattr(volume, "device_size", lambda device: 2 * 1024 * MIB)
    now = [100.0]

    def resume(device: str, key: Any, on_progress: Callable[[ReencryptProgress], None]) -> None:
        now[0] += 10.0  # this boot's pass takes 10 s
        on_progress(ReencryptProgress(total, total, 0.0, 0))

    monkeypatch.setattr(luks2, "reencrypt_resume", resume)
    volume.data_pass("/dev/vda1", bytearray(b"k"), clock=lambda: now[0])
    return lines[-1]


header_of = {n: header(n) for n in ("reencrypt-interrupted", "reencrypt-pending")}


def test_a_resumed_pass_counts_only_this_boots_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    progress = luks2.encryption_progress(header_of["reencrypt-interrupted"], 2 * 1024 * MIB)
    assert progress is not None
    before, total = progress
    assert before == 544 * MIB  # what the earlier boot encrypted before the cut
    line = run_pass(monkeypatch, "reencrypt-interrupted", total)
    now = (total - before) // MIB
    assert line == (
        f"/dev/vda1: encryption finished: {now} MiB in 10.0 s ({now / 10:.1f} MiB/s) "
        f"({before // MIB} MiB already encrypted by an earlier boot)"
    )
    # The demo report's parser still reads it, and reads this boot's figures.
    match = _FINISHED.search(line)
    assert match is not None and match.groups() == (str(now), "10.0", f"{now / 10:.1f}")


def test_a_fresh_pass_says_nothing_about_an_earlier_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    line = run_pass(monkeypatch, "reencrypt-pending", 96 * MIB)
    assert line == "/dev/vda1: encryption finished: 96 MiB in 10.0 s (9.6 MiB/s)"
    assert re.search(r"earlier boot", line) is None
