"""The linters are tests: mypy --strict (Python 3.9) and ruff (target py39) must be clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.lint


def _tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_mypy_strict_py39_is_clean() -> None:
    r = _tool("mypy", "--strict", "--python-version", "3.9", "src")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_is_clean() -> None:
    r = _tool("ruff", "check", "src", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean() -> None:
    r = _tool("ruff", "format", "--check", "src", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


# The packages' maintainer scripts run under /bin/sh (dash on Debian): POSIX and shellcheck-clean.
MAINTAINER_SCRIPTS = sorted(
    p
    for p in (ROOT / "debian").glob("*")
    if p.name.rsplit(".", 1)[-1] in ("postinst", "prerm", "postrm", "preinst")
)


def test_maintainer_scripts_are_posix_and_shellcheck_clean() -> None:
    assert MAINTAINER_SCRIPTS
    for script in MAINTAINER_SCRIPTS:
        r = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, f"{script}: {r.stderr}"
    r = subprocess.run(
        ["shellcheck", "--shell=sh", *map(str, MAINTAINER_SCRIPTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
