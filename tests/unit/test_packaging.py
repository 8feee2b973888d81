"""One version everywhere: the Python package, debian/changelog, the RPM spec, CHANGELOG.md and
``encryptrootfs --version``; the Debian package layout choices that the build relies on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import encryptrootfs
from encryptrootfs.cli import main
from encryptrootfs.image import install

ROOT = Path(__file__).resolve().parents[2]
VERSION = encryptrootfs.__version__


def test_version_is_pep440_and_debian_native() -> None:
    # A native Debian version has no revision (no "-"), and the RPM Version no "-" either.
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION)


def test_debian_changelog_has_the_version() -> None:
    first = (ROOT / "debian/changelog").read_text().splitlines()[0]
    assert re.match(rf"encryptrootfs \({re.escape(VERSION)}\) ", first), first


def test_rpm_spec_has_the_version() -> None:
    spec = (ROOT / "rpm/encryptrootfs.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(VERSION)}$", spec, re.M)
    changelog = spec.split("%changelog", 1)[1]
    assert re.search(rf"> - {re.escape(VERSION)}-1$", changelog, re.M)


def test_changelog_md_starts_with_the_version() -> None:
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings and headings[0] == VERSION


def test_version_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"encryptrootfs {VERSION}"


def test_triggers_and_scripts_name_what_install_writes() -> None:
    # The postinst rebuilds where enabled, the prerm/postrm name the same marker, and the
    # triggers watch the module folder `encryptrootfs install` and the package use.
    marker = "/" + str(install.DRACUT_CONF)
    assert marker in (ROOT / "debian/encryptrootfs-dracut.postinst").read_text()
    assert marker in (ROOT / "debian/encryptrootfs-dracut.postrm").read_text()
    assert marker in (ROOT / "rpm/encryptrootfs.spec").read_text()
    triggers = (ROOT / "debian/encryptrootfs-dracut.triggers").read_text()
    assert f"interest-noawait /{install.MODULES_D / install.MODULE_DIR}\n" in triggers
    assert "interest-noawait /usr/lib/python3/dist-packages/encryptrootfs\n" in triggers
    unit = f"/etc/systemd/system/{install.VOLUMES_WANTED_BY}.wants/{install.VOLUMES_UNIT}"
    assert unit in (ROOT / "debian/encryptrootfs.postrm").read_text()


def test_pyproject_builds_with_debian_12_setuptools() -> None:
    # Debian 12 builds with setuptools 66.1: no PEP 639 license string, no newer requirement.
    text = (ROOT / "pyproject.toml").read_text()
    assert 'requires = ["setuptools>=61"]' in text
    assert re.search(r"^license = \{ ?text = ", text, re.M)
