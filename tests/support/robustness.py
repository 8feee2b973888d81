"""The robustness ledger: every power-cut, fault and bad-input case, and the user data it lost.

Tests of the matrix (issue #5) take the ``robustness`` fixture and report, once they have looked
at the data, how many bytes of the test tree were lost (0 when the tree verified or the disk
stayed byte-identical). The session prints one summary at the end (cases tried, passed, bytes
lost) and writes it as JSON, so a run's note can quote it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

# module name prefix -> kind of case
KINDS = {"test_power_cut": "power cut", "test_faults": "fault", "test_bad_input": "bad input"}


@dataclass
class Case:
    nodeid: str
    kind: str
    outcome: Optional[str] = None  # passed | failed | skipped, from the test's report
    bytes_lost: Optional[int] = None  # None: the test ended before the data was looked at
    notes: list[str] = field(default_factory=list)

    def lost(self, n: int) -> None:
        """Record what the data check found (call after every check; the counts add up)."""
        self.bytes_lost = (self.bytes_lost or 0) + n

    def disk_compared(self, unchanged: bool) -> None:
        """A case whose disk must stay byte-identical: nothing lost when it did; when it did
        not, how much user data suffered is not measured (the test fails on it anyway)."""
        if unchanged:
            self.lost(0)
        else:
            self.note("the disk changed; bytes of user data lost not measured")

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclass
class Ledger:
    cases: dict[str, Case] = field(default_factory=dict)

    def open(self, item: pytest.Item) -> Case:
        module = Path(str(item.fspath)).stem
        kind = next((k for prefix, k in KINDS.items() if module.startswith(prefix)), module)
        case = Case(item.nodeid, kind)
        self.cases[item.nodeid] = case
        return case

    def summary(self) -> dict[str, Any]:
        ran = [c for c in self.cases.values() if c.outcome in ("passed", "failed")]
        unmeasured = [c.nodeid for c in ran if c.bytes_lost is None]
        return {
            "cases_tried": len(ran),
            "cases_passed": sum(c.outcome == "passed" for c in ran),
            "bytes_lost": sum(c.bytes_lost or 0 for c in ran),
            "cases_without_data_check": unmeasured,
            "by_kind": {k: sum(c.kind == k for c in ran) for k in sorted({c.kind for c in ran})},
            "cases": [asdict(c) for c in self.cases.values()],
        }

    def lines(self) -> list[str]:
        s = self.summary()
        out = [
            f"robustness: {s['cases_tried']} cases tried, {s['cases_passed']} passed, "
            f"{s['bytes_lost']} bytes of user data lost ({s['by_kind']})"
        ]
        if s["cases_without_data_check"]:
            unmeasured: list[str] = s["cases_without_data_check"]
            out.append(
                "robustness: ended before the data could be checked: " + ", ".join(unmeasured)
            )
        return out

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(), indent=1) + "\n")


LEDGER = Ledger()
