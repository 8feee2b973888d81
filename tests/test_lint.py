"""The linters are tests (mkosi's CI as the model): mypy --strict on the product (Python 3.9, what
the targets ship) and on the tests (the host's Python, which runs them), ruff check and ruff
format --check on src, tests and bench, and shellcheck on every shell file the product and the
lab ship."""

from __future__ import annotations

import shutil
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


def test_mypy_strict_on_the_tests_is_clean() -> None:
    # The tests run on the host only: checked for its Python (pytest itself needs 3.10 syntax).
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    r = _tool("mypy", "--strict", "--python-version", host, "tests")
    assert r.returncode == 0, r.stdout + r.stderr


def shell_files() -> list[Path]:
    """Every shell script under src/ (product and lab): *.sh, or a #! line naming a shell."""
    found = []
    for path in sorted((ROOT / "src").rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        with open(path, "rb") as f:
            first = f.readline()
        if path.suffix == ".sh" or (first.startswith(b"#!") and first.rstrip().endswith(b"sh")):
            found.append(path)
    return found


def test_shellcheck_is_clean() -> None:
    files = shell_files()
    names = {p.name for p in files}
    assert {"module-setup.sh", "encryptrootfs-generator", "erfs-lab-runner"} <= names
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: `make deps` installs it (Debian package shellcheck)"
    r = subprocess.run(
        [shellcheck, "--external-sources", *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
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
