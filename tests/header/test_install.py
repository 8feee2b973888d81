"""`encryptrootfs install` into an image tree (--root), `install --check`, and the file list the
dracut module gets from `encryptrootfs dracut-files` (a real trace by the test interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import pytest

from encryptrootfs import run as run_module
from encryptrootfs.cli import main
from encryptrootfs.errors import ConfigError, EncryptrootfsError, ExitCode, ToolError
from encryptrootfs.image.initramfs import plan_initramfs
from encryptrootfs.image.install import (
    DRACUT_CONF,
    MODULE_DIR,
    Change,
    install,
    module_source,
)
from encryptrootfs.tools import TOOLS

PROJECT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = PROJECT / "examples" / "config.toml"
MODULES_D = "usr/lib/dracut/modules.d"


def _exe(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An image tree with dracut's layout (modules.d) but nothing else installed."""
    root = tmp_path / "image"
    (root / MODULES_D / "90crypt").mkdir(parents=True)
    (root / "etc").mkdir()
    return root


def _snapshot(root: Path) -> dict[str, tuple[bytes, int, float]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_install_writes_config_module_and_dracut_conf(image: Path) -> None:
    result = install(image, EXAMPLE_CONFIG, regenerate_initramfs=False)
    assert (result.config, result.module, result.dracut_conf) == (
        Change.WRITTEN,
        Change.WRITTEN,
        Change.WRITTEN,
    )
    assert result.initramfs == ()
    config = image / "etc/encryptrootfs/config.toml"
    assert config.read_bytes() == EXAMPLE_CONFIG.read_bytes()
    module = image / MODULES_D / MODULE_DIR
    shipped = sorted(p.name for p in module_source().iterdir())
    assert sorted(p.name for p in module.iterdir()) == shipped
    assert {"module-setup.sh", "encryptrootfs.service"} <= set(shipped)
    for name in shipped:
        assert (module / name).read_bytes() == (module_source() / name).read_bytes()
    assert os.access(module / "module-setup.sh", os.X_OK)
    conf = (image / DRACUT_CONF).read_text()
    assert 'add_dracutmodules+=" encryptrootfs "' in conf.splitlines()
    # No staging or backup folders are left next to the module.
    assert sorted(p.name for p in (image / MODULES_D).iterdir()) == ["50encryptrootfs", "90crypt"]


def test_install_twice_changes_nothing_the_second_time(image: Path) -> None:
    install(image, EXAMPLE_CONFIG, regenerate_initramfs=False)
    before = _snapshot(image)
    again = install(image, EXAMPLE_CONFIG, regenerate_initramfs=False)
    assert (again.config, again.module, again.dracut_conf) == (
        Change.UNCHANGED,
        Change.UNCHANGED,
        Change.UNCHANGED,
    )
    keep = install(image, None, regenerate_initramfs=False)
    assert keep.config is Change.KEPT
    assert _snapshot(image) == before


def test_install_replaces_a_changed_module_whole(image: Path) -> None:
    install(image, EXAMPLE_CONFIG, regenerate_initramfs=False)
    module = image / MODULES_D / MODULE_DIR
    (module / "module-setup.sh").write_text("# edited by hand\n")
    (module / "stale-file").write_text("from an older version\n")
    result = install(image, None, regenerate_initramfs=False)
    assert result.module is Change.UPDATED
    assert (module / "module-setup.sh").read_bytes() == (
        module_source() / "module-setup.sh"
    ).read_bytes()
    assert not (module / "stale-file").exists()
    assert sorted(p.name for p in (image / MODULES_D).iterdir()) == ["50encryptrootfs", "90crypt"]


def test_invalid_config_is_refused_before_anything_is_written(image: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[providers.aws_kms]\nkey_id = "not a key"\n')
    before = _snapshot(image)
    with pytest.raises(ConfigError, match=r"providers\.aws_kms\.key_id"):
        install(image, bad, regenerate_initramfs=False)
    assert _snapshot(image) == before
    assert not (image / MODULES_D / MODULE_DIR).exists()


def test_no_config_given_and_none_installed_is_refused(image: Path) -> None:
    with pytest.raises(ConfigError, match="no configuration is installed"):
        install(image, None, regenerate_initramfs=False)
    assert not (image / DRACUT_CONF).exists()


def test_without_dracut_nothing_is_written(tmp_path: Path) -> None:
    root = tmp_path / "image"
    (root / "etc").mkdir(parents=True)
    with pytest.raises(ToolError, match="dracut is not installed"):
        install(root, EXAMPLE_CONFIG, regenerate_initramfs=False)
    assert not (root / "etc/encryptrootfs").exists()
    assert not (root / DRACUT_CONF).exists()


def _record_commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def spawn(
        argv: Sequence[str],
        stdin: Optional[bytes],
        timeout: Optional[float],
        env: Optional[Mapping[str, str]],
        pass_fds: Sequence[int],
    ) -> subprocess.CompletedProcess[bytes]:
        calls.append(list(argv))
        return subprocess.CompletedProcess(list(argv), 0, b"", b"")

    monkeypatch.setattr(run_module, "_spawn", spawn)
    return calls


def test_regenerates_every_installed_kernel_inside_the_image(
    image: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for kver in ("6.1.0-10-amd64", "6.1.0-9-amd64"):
        (image / "lib/modules" / kver).mkdir(parents=True)
        (image / "lib/modules" / kver / "modules.dep").write_text("")
    (image / "lib/modules/6.1.0-11-amd64").mkdir()  # leftover folder without modules
    (image / "proc/self").mkdir(parents=True)  # stands for a mounted /proc
    calls = _record_commands(monkeypatch)
    result = install(image, EXAMPLE_CONFIG)
    assert result.initramfs == ("6.1.0-9-amd64", "6.1.0-10-amd64")
    assert [c[1:] for c in calls] == [
        [str(image), "dracut", "--force", "--kver", "6.1.0-9-amd64"],
        [str(image), "dracut", "--force", "--kver", "6.1.0-10-amd64"],
    ]
    assert all(c[0].endswith("/chroot") for c in calls)


def test_regenerate_in_an_image_without_proc_says_so(
    image: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (image / "lib/modules/6.1.0-9-amd64/kernel").mkdir(parents=True)
    calls = _record_commands(monkeypatch)
    with pytest.raises(EncryptrootfsError, match="proc is not mounted"):
        install(image, EXAMPLE_CONFIG)
    assert calls == []
    # What could be installed is installed; the message says so.
    assert (image / DRACUT_CONF).exists()


def _check(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = main(["install", "--check", "--root", str(root), "--json"])
    items = json.loads(capsys.readouterr().out)
    return code, {i["name"]: i for i in items}


def test_check_names_what_is_missing(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, items = _check(image, capsys)
    assert code == ExitCode.TOOL
    assert items["tools (luks)"]["status"] == "missing"
    assert "cryptsetup (cryptsetup-bin)" in items["tools (luks)"]["detail"]
    assert "sfdisk" in items["tools (partition)"]["detail"]
    assert items["tools (xfs)"]["status"] == "warning"
    assert items["python"]["status"] == "missing"
    assert items["dracut"]["status"] == "missing"
    assert items["config"]["status"] == "missing"
    assert "no such configuration file" in items["config"]["detail"]
    assert items["network"]["status"] == "missing"
    # The text form names the same things, one per line.
    assert main(["install", "--check", "--root", str(image)]) == ExitCode.TOOL
    text = capsys.readouterr().out
    assert "MISSING  tools (luks): not installed: cryptsetup (cryptsetup-bin)" in text


def test_check_of_a_ready_image(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for tool in TOOLS:
        _exe(image / "usr/sbin" / tool.name)
    _exe(image / "usr/bin/python3.11")
    (image / "usr/bin/python3").symlink_to("python3.11")
    _exe(image / "usr/bin/dracut")
    (image / "usr/lib/dracut/dracut-version.sh").write_text("DRACUT_VERSION=059-4\n")
    _exe(image / "usr/lib/systemd/systemd-networkd")
    _exe(image / "usr/bin/dbus-daemon")
    (image / MODULES_D / "01systemd-networkd").mkdir()
    install(image, EXAMPLE_CONFIG, regenerate_initramfs=False)
    code, items = _check(image, capsys)
    assert {n: i["status"] for n, i in items.items()} == {
        "python": "ok",
        "tools (luks)": "ok",
        "tools (partition)": "ok",
        "tools (ext4)": "ok",
        "tools (xfs)": "ok",
        "tools (btrfs)": "ok",
        "tools (boot)": "ok",
        "dracut": "ok",
        "dracut module": "ok",
        "config": "ok",
        "root": "ok",
        "network": "ok",
    }
    assert code == ExitCode.OK
    assert items["python"]["detail"].startswith("3.11")
    assert items["dracut"]["detail"].startswith("059-4")
    assert "systemd-networkd + dbus-daemon" in items["network"]["detail"]
    assert "kernel command line" in items["root"]["detail"]


def test_the_trace_of_this_interpreter_selects_the_kms_path() -> None:
    plan = plan_initramfs()
    files = set(plan.files)
    installed = files | {dst for _, dst in plan.bytecode}

    def has(suffix: str) -> bool:
        # A module goes in as its source or as sourceless byte code (x.pyc where x.py was).
        return any(f.endswith((suffix, suffix + "c")) for f in installed)

    for suffix in (
        "/botocore/session.py",
        "/botocore/data/kms/2014-11-01/service-2.json.gz",
        "/botocore/data/partitions.json",
        "/encryptrootfs/boot/__init__.py",
        "/encryptrootfs/providers/aws_kms.py",
        "/urllib3/connectionpool.py",
        "/jmespath/parser.py",
        "/dateutil/parser/_parser.py",
        "/encodings/idna.py",
        "/http/client.py",
        "/json/decoder.py",
        "/os.py",
    ):
        assert has(suffix), suffix
    assert not any("/botocore/data/s3/" in f or "/botocore/data/ec2/" in f for f in files)
    assert not any("/encryptrootfs/dracut/" in f for f in files)
    assert plan.endpoints_json is not None and plan.endpoints_json.endswith("endpoints.json")
    assert plan.endpoints_json not in files
    assert any("libssl" in lib for lib in plan.libraries)
    assert any("_ssl." in f for f in files | set(plan.libraries))
    assert all(os.path.exists(f) for f in files)
    assert all(os.path.exists(pyc) and dst.endswith(".pyc") for pyc, dst in plan.bytecode)


def test_dracut_files_refuses_an_invalid_config(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[root]\nmapper_name = 'a b'\n")
    code = main(["--config", str(bad), "dracut-files", "--stage", str(tmp_path / "stage")])
    assert code == ExitCode.CONFIG
    assert "root.mapper_name" in capsys.readouterr().err
    assert not (tmp_path / "stage").exists()
