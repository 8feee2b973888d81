"""The Debian packages as `make deb-build` makes them (reused from dist/ while newer than every
file of the tree): what each ships, what it depends on, its maintainer scripts; and the
removal check on a real LUKS2 header."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs import __version__
from encryptrootfs.image import removal
from encryptrootfs.run import run
from encryptrootfs.token import TOKEN_TYPE
from encryptrootfs_lab.packages import debian_packages

ROOT = Path(__file__).resolve().parents[2]
MODULE = "usr/lib/dracut/modules.d/50encryptrootfs"


@pytest.fixture(scope="module")
def debs() -> tuple[Path, Path]:
    return debian_packages(ROOT).all


def field(deb: Path, name: str) -> str:
    return run(["dpkg-deb", "--field", str(deb), name]).stdout.decode().strip()


def relations(deb: Path, name: str) -> set[str]:
    return {part.strip() for part in field(deb, name).split(",") if part.strip()}


def files(deb: Path) -> dict[str, str]:
    """Path (without ./) -> mode string as dpkg-deb prints it."""
    listing = run(["dpkg-deb", "--contents", str(deb)]).stdout.decode()
    result = {}
    for line in listing.splitlines():
        parts = line.split()
        result[parts[-1].removeprefix("./").rstrip("/")] = parts[0]
    return result


def control_file(deb: Path, name: str, tmp_path: Path) -> str:
    target = tmp_path / deb.stem
    run(["dpkg-deb", "--control", str(deb), str(target)])
    return (target / name).read_text()


def test_product_contents(debs: tuple[Path, Path]) -> None:
    product, _ = debs
    content = files(product)
    site = "usr/lib/python3/dist-packages"
    for path in (
        "usr/bin/encryptrootfs",
        f"{site}/encryptrootfs/cli.py",
        f"{site}/encryptrootfs/image/removal.py",
        f"{site}/encryptrootfs/dracut/50encryptrootfs/module-setup.sh",
        f"{site}/encryptrootfs/systemd/encryptrootfs-volumes.service",
        "lib/systemd/system/encryptrootfs-volumes.service",
        "usr/share/man/man8/encryptrootfs.8.gz",
        "usr/share/doc/encryptrootfs/examples/config.toml",
        "usr/share/doc/encryptrootfs/CHANGELOG.md",
    ):
        assert path in content, path
    # No lab: not its package, not its command, not its guest files.
    assert not [p for p in content if "encryptrootfs_lab" in p or "encryptrootfs-lab" in p]
    assert not [p for p in content if p.startswith(MODULE)]  # the module is the dracut package's
    # Installed, not enabled: no wants/ link in the package.
    assert not [p for p in content if ".wants/" in p]


def test_product_depends(debs: tuple[Path, Path]) -> None:
    product, _ = debs
    assert field(product, "Architecture") == "all"
    depends = relations(product, "Depends")
    for name in ("python3-botocore (>= 1.29)", "cryptsetup-bin (>= 2:2.4.3)", "dmsetup"):
        assert name in depends, depends
    for name in ("fdisk", "e2fsprogs", "udev", "ca-certificates", "python3:any"):
        assert name in depends, depends
    assert not [d for d in depends if "dracut" in d]  # the generator is the other package's
    assert relations(product, "Recommends") == {"encryptrootfs-dracut"}
    assert {"xfsprogs", "btrfs-progs", "mdadm"} <= relations(product, "Suggests")


def test_dracut_package(debs: tuple[Path, Path], tmp_path: Path) -> None:
    _, dracut = debs
    content = files(dracut)
    module_files = {p.removeprefix(f"{MODULE}/") for p in content if p.startswith(f"{MODULE}/")}
    source = ROOT / "src/encryptrootfs/dracut/50encryptrootfs"
    assert module_files == {p.name for p in source.iterdir()}
    assert content[f"{MODULE}/module-setup.sh"].startswith("-rwx")
    assert content[f"{MODULE}/encryptrootfs-generator"].startswith("-rwx")
    assert relations(dracut, "Depends") == {
        "dracut",
        "dracut-network",
        f"encryptrootfs (= {__version__})",
    }
    triggers = control_file(dracut, "triggers", tmp_path)
    assert f"interest-noawait /{MODULE}" in triggers
    assert "interest-noawait /usr/lib/python3/dist-packages/encryptrootfs" in triggers
    assert "/etc/dracut.conf.d/50-encryptrootfs.conf" in control_file(dracut, "postinst", tmp_path)


def test_prerm_runs_the_removal_check(debs: tuple[Path, Path], tmp_path: Path) -> None:
    for deb in debs:
        prerm = control_file(deb, "prerm", tmp_path)
        assert "encryptrootfs removal-check" in prerm
        assert removal.ALLOW_ENV in prerm


def test_man_page_is_the_cli_help(debs: tuple[Path, Path], tmp_path: Path) -> None:
    product, _ = debs
    run(["dpkg-deb", "--extract", str(product), str(tmp_path / "x")])
    page = gzip.decompress((tmp_path / "x/usr/share/man/man8/encryptrootfs.8.gz").read_bytes())
    text = page.decode()
    assert "removal\\-check" in text or "removal-check" in text
    assert __version__ in text


def _import_token(image: Path, token_type: str) -> None:
    doc = json.dumps({"type": token_type, "keyslots": ["0"], "version": 1})
    run(["cryptsetup", "token", "import", "--json-file", "-", str(image)], stdin=doc.encode())


def test_removal_check_reads_our_token_from_a_real_header(luks_image: Any) -> None:
    assert removal._has_our_token(str(luks_image.path)) is False
    _import_token(luks_image.path, "some-other-tool")
    assert removal._has_our_token(str(luks_image.path)) is False
    _import_token(luks_image.path, TOKEN_TYPE)
    assert removal._has_our_token(str(luks_image.path)) is True
