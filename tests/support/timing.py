"""What a test run cost, printed at its end: each tier's time, the guests' time, the slowest.

Each tier's time is the sum of its tests' setup, call and teardown (a session fixture such as
an image build is paid by the first test that asks for it). The vm tier's guest time is the
wall time of every QEMU boot the run made (``encryptrootfs_lab.qemu.BOOT_LEDGER``). The same
figures go to ``.pytest_cache/encryptrootfs-timing.json``, where the README's table comes from.
pytest's own ``--durations`` (the Makefile asks for ten) lists the slowest tests.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

from encryptrootfs_lab import qemu

TIERS = ("unit", "header", "vm", "lint")
REPORT = Path(".pytest_cache") / "encryptrootfs-timing.json"

_tier_seconds: dict[str, float] = defaultdict(float)
_tier_tests: dict[str, set[str]] = defaultdict(set)
_started = time.monotonic()


def _tier(report: pytest.TestReport) -> str:
    keywords = report.keywords
    return next((t for t in TIERS if t in keywords), "other")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    tier = _tier(report)
    _tier_seconds[tier] += report.duration
    _tier_tests[tier].add(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _tier_seconds:
        return
    wall = time.monotonic() - _started
    boots = qemu.BOOT_LEDGER
    guest = sum(seconds for _, seconds in boots)
    tiers = {
        t: {"tests": len(_tier_tests[t]), "seconds": round(_tier_seconds[t], 1)}
        for t in (*TIERS, "other")
        if t in _tier_seconds
    }
    write = terminalreporter.write_line
    write(
        "time per tier: "
        + ", ".join(
            f"{t} {v['seconds'] / 60:.1f} min ({v['tests']} tests)" for t, v in tiers.items()
        )
        + f"; whole run {wall / 60:.1f} min"
    )
    if boots:
        write(
            f"vm tier guest time: {len(boots)} QEMU boots, {guest / 60:.1f} min "
            f"({guest / len(boots):.0f} s per boot)"
        )
    report = Path(str(terminalreporter.config.rootpath)) / REPORT
    report.parent.mkdir(exist_ok=True)
    report.write_text(
        json.dumps(
            {
                "wall_seconds": round(wall, 1),
                "tiers": tiers,
                "boots": len(boots),
                "guest_seconds": round(guest, 1),
            },
            indent=1,
        )
        + "\n"
    )
