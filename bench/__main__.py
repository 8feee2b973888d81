"""``python -m bench [--only PIECES] [--small]``: run pieces, merge, regenerate the report."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from encryptrootfs.log import setup_logging

from . import common, disk, report

PIECES = ("initramfs", "fleet", "disk", "boot", "native")
# Names of the measures, accepted as aliases of the piece that measures them.
ALIASES = {"throughput": "disk", "memory": "disk", "unlock": "boot", "boot-overhead": "boot"}


def _runners(small: bool) -> dict[str, Callable[[], dict[str, Any]]]:
    from . import boots, fleet, initramfs, native

    return {
        "initramfs": initramfs.run,
        "fleet": lambda: fleet.run(fleet.SMALL if small else fleet.FULL),
        "disk": lambda: disk.run(disk.SMALL if small else disk.FULL),
        "boot": lambda: boots.run(boots.SMALL if small else boots.FULL),
        # No guest: the product on the host's CPU beside its peers (issue 19).
        "native": lambda: native.run(native.SMALL if small else native.FULL),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated pieces: "
        + ", ".join(PIECES)
        + " (or throughput, memory, unlock, boot-overhead)",
    )
    parser.add_argument(
        "--small", action="store_true", help="small sizes (development); results are marked small"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="regenerate RESULTS.md and the plots from results.json",
    )
    args = parser.parse_args(argv)
    setup_logging(False)
    wanted: list[str] = []
    for name in filter(None, (n.strip() for n in args.only.split(","))):
        piece = ALIASES.get(name, name)
        if piece not in PIECES:
            parser.error(f"unknown piece {name!r} (known: {', '.join(PIECES)})")
        if piece not in wanted:
            wanted.append(piece)
    if args.report_only:
        wanted = []
    elif not wanted:
        wanted = list(PIECES)
    runners = _runners(args.small)
    failed = []
    for piece in wanted:
        print(f"bench: {piece} ...", flush=True)
        start = time.monotonic()
        try:
            data = runners[piece]()
        except Exception as exc:  # one piece failing must not lose the others' numbers
            print(f"bench: {piece} FAILED: {exc}", file=sys.stderr, flush=True)
            failed.append(piece)
            continue
        data["small"] = args.small
        data["piece_seconds"] = time.monotonic() - start
        common.save_piece(piece, data)
        print(f"bench: {piece} done in {data['piece_seconds']:.0f} s", flush=True)
    report.write(common.load_results())
    print(f"bench: wrote {common.RESULTS_JSON}, {report.RESULTS_MD} and the plots")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
