"""What every piece shares: where results go, how a guest script carries bench files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS_JSON = BENCH / "results.json"
GUEST_FILES = BENCH / "guest"
MIB = 1024 * 1024
# Every benchmark guest gets the RAM of the memory target, so their numbers compare.
GUEST_MEMORY_MIB = 512
# Outside the checkout, next to the lab cache: overlays and consoles of the benchmark boots.
WORKDIR = Path(os.environ.get("ENCRYPTROOTFS_BENCH_WORK", "/var/tmp/encryptrootfs-bench"))  # noqa: S108


def load_results() -> dict[str, Any]:
    if RESULTS_JSON.exists():
        data: dict[str, Any] = json.loads(RESULTS_JSON.read_text())
        return data
    return {}


def save_piece(name: str, data: dict[str, Any]) -> None:
    """Merge one piece's results into results.json (other pieces' results are kept)."""
    results = load_results()
    data = {
        **data,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
        },
    }
    results.setdefault("pieces", {})[name] = data
    RESULTS_JSON.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def guest_file(name: str, target: str) -> str:
    """Shell lines that write bench/guest/``name`` to ``target`` in the guest."""
    text = (GUEST_FILES / name).read_text()
    marker = "ERFS_BENCH_FILE_END"
    assert marker not in text
    return f"cat > {target} <<'{marker}'\n{text}{marker}\n"


def bench_markers(lines: str) -> list[dict[str, Any]]:
    """The ``ERFS-BENCH {json}`` lines a guest printed."""
    out = []
    for line in lines.splitlines():
        line = line.strip()
        if line.startswith("ERFS-BENCH "):
            out.append(json.loads(line[len("ERFS-BENCH ") :]))
    return out
