"""What an install ships: the wheel holds the product (``encryptrootfs``) and nothing of the
lab, and it builds with the setuptools that distributions ship (Debian 12: 66.1).

The build runs in a virtualenv of its own with setuptools pinned there (no build isolation),
from a copy of the checkout, so nothing is written into the tree. pip fetches setuptools from
its cache or PyPI; without either the test is skipped with the reason, never passed.
"""

from __future__ import annotations

import shutil
import subprocess
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.lint

DEBIAN_12_SETUPTOOLS = "66.1.1"


def test_the_wheel_holds_the_product_only_and_builds_with_debian_12s_setuptools(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    got = subprocess.run(
        [*pip, "install", f"setuptools=={DEBIAN_12_SETUPTOOLS}", "wheel"],
        capture_output=True,
        text=True,
        check=False,
    )
    if got.returncode != 0:
        pytest.skip(
            f"setuptools {DEBIAN_12_SETUPTOOLS} unavailable (no cache, no PyPI): {got.stderr}"
        )
    out = tmp_path / "dist"
    built = subprocess.run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(out), str(tree)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("encryptrootfs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("encryptrootfs_lab")]
    assert "encryptrootfs/cli.py" in names
    assert "encryptrootfs/dracut/50encryptrootfs/module-setup.sh" in names
    assert "encryptrootfs/systemd/encryptrootfs-volumes.service" in names
    assert "encryptrootfs/luks2/header.py" in names and "encryptrootfs/py.typed" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "encryptrootfs = encryptrootfs.cli:main" in scripts
    assert "encryptrootfs-lab" not in scripts
