"""Fail-closed defaults (security review 2): no shell on a failed unlock, https to KMS, no core
dumps. (The generator's command-line handling runs a shell: tests/header/test_generator.py.)"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from encryptrootfs.config import BootConfig, parse_config
from encryptrootfs.errors import ConfigError
from encryptrootfs.image.initramfs import (
    FAILURE_CMDLINE_PATH,
    InitramfsFiles,
    failure_cmdline,
    manifest_lines,
)

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "encryptrootfs"
KEY = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def _config(aws: dict[str, Any], boot: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"providers": {"aws_kms": {"key_id": KEY, **aws}}}
    if boot is not None:
        data["boot"] = boot
    return data


def _plan(**changes: Any) -> InitramfsFiles:
    return InitramfsFiles(
        python="/usr/bin/python3.11",
        python_links=("/usr/bin/python3",),
        files=(),
        libraries=(),
        bytecode=(),
        endpoints_json=None,
        programs=("cryptsetup",),
        **changes,
    )


def test_the_initramfs_gives_no_shell_and_powers_off_by_default(tmp_path: Path) -> None:
    boot = parse_config(_config({}), source="t").boot
    assert not boot.emergency_shell and boot.failure_action == "poweroff"
    lines = manifest_lines(_plan(cmdline_defaults=failure_cmdline(boot)), tmp_path)
    staged = [line.split("\t") for line in lines if line.endswith(FAILURE_CMDLINE_PATH)]
    [[kind, source, target]] = staged
    assert kind == "staged" and target == "/etc/cmdline.d/49-encryptrootfs-failure.conf"
    assert Path(source).read_text() == "rd.shell=0 rd.emergency=poweroff\n"
    # The default of the plan itself is the same: no code path builds an initramfs with a shell.
    assert _plan().cmdline_defaults == "rd.shell=0 rd.emergency=poweroff"


@pytest.mark.parametrize(
    ("boot", "expected"),
    [
        ({"failure_action": "reboot"}, "rd.shell=0 rd.emergency=reboot"),
        ({"emergency_shell": True}, "rd.shell=1"),
    ],
)
def test_boot_settings_choose_the_failure(boot: dict[str, Any], expected: str) -> None:
    assert failure_cmdline(parse_config(_config({}, boot), source="t").boot) == expected


def test_an_unknown_failure_action_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"boot\.failure_action: must be one of poweroff"):
        parse_config(_config({}, {"failure_action": "shell"}), source="t")
    assert BootConfig().failure_action == "poweroff"


@pytest.mark.parametrize(
    "setting",
    [
        {"endpoint_url": "http://kms.internal.example:8080"},
        {"endpoints": {"us-east-1": "http://10.0.0.5"}},
    ],
)
def test_plain_http_kms_is_refused_unless_allowed(setting: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"plain http://.*allow_insecure_http = true"):
        parse_config(_config(setting), source="t")
    allowed = parse_config(_config({**setting, "allow_insecure_http": True}), source="t")
    assert allowed.aws_kms is not None and allowed.aws_kms.allow_insecure_http


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:4566", "http://localhost:4566", "http://[::1]:4566", "https://x.y"]
)
def test_https_and_loopback_http_are_accepted(url: str) -> None:
    config = parse_config(_config({"endpoint_url": url}), source="t")
    assert config.aws_kms is not None and not config.aws_kms.allow_insecure_http


def test_the_lab_config_allows_its_plain_http_emulator(tmp_path: Path) -> None:
    from encryptrootfs.config import load_config
    from encryptrootfs_lab.cloud import GUEST_KMS_URL
    from encryptrootfs_lab.product import lab_config

    path = tmp_path / "config.toml"
    path.write_text(lab_config())
    config = load_config(path)
    assert config.aws_kms is not None and config.aws_kms.allow_insecure_http
    assert config.aws_kms.endpoint_url == GUEST_KMS_URL.rstrip("/")
    path.write_text(lab_config().replace("allow_insecure_http = true", ""))
    with pytest.raises(ConfigError, match="plain http://"):
        load_config(path)


@pytest.mark.parametrize(
    "unit",
    [
        PACKAGE / "dracut" / "50encryptrootfs" / "encryptrootfs.service",
        PACKAGE / "systemd" / "encryptrootfs-volumes.service",
    ],
)
def test_both_units_forbid_core_dumps(unit: Path) -> None:
    text = unit.read_text()
    service = text[text.index("[Service]") :]
    assert "\nLimitCORE=0\n" in service.split("\n[", 1)[0] + "\n"


def test_the_key_reaches_the_command_as_the_callers_wipeable_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from encryptrootfs import run as run_module

    seen: list[object] = []

    def spawn(argv: Any, stdin: Any, *rest: Any) -> Any:
        import subprocess

        seen.append(stdin)
        return subprocess.CompletedProcess(list(argv), 0, b"", b"")

    monkeypatch.setattr(run_module, "_spawn", spawn)
    key = bytearray(b"k" * 64)
    run_module.run(["cryptsetup", "open"], stdin=key)
    assert seen[0] is key  # no bytes copy that could not be wiped


def test_the_cli_turns_core_dumps_off() -> None:
    import resource

    from encryptrootfs.cli import no_core_dumps

    before = resource.getrlimit(resource.RLIMIT_CORE)
    try:
        no_core_dumps()
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
    finally:
        # Raising the hard limit back needs privilege; the test tier runs as root.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_CORE, before)


def test_reusing_a_data_disk_is_advised_as_a_discard_not_a_signature_wipe() -> None:
    from encryptrootfs.config import VolumeConfig
    from encryptrootfs.ops.volumes import _refuse

    error = _refuse(VolumeConfig("scratch", ("/dev/nvme1n1",), "/scratch"), "not blank")
    assert "blkdiscard DEVICE" in str(error) and "old data readable" in str(error)


def test_with_require_encrypted_the_root_is_mounted_from_the_mapping(tmp_path: Path) -> None:
    from encryptrootfs.image.initramfs import SYSROOT_DROPIN_PATH

    lines = manifest_lines(_plan(sysroot_mapper="root"), tmp_path)
    [[_, source, target]] = [
        line.split("\t") for line in lines if line.endswith(SYSROOT_DROPIN_PATH)
    ]
    assert target == "/etc/systemd/system/sysroot.mount.d/50-encryptrootfs.conf"
    assert Path(source).read_text() == "[Mount]\nWhat=/dev/mapper/root\n"
    # Without it (a root may stay plain) no drop-in: a plain root has no mapping to mount.
    assert not any(SYSROOT_DROPIN_PATH in line for line in manifest_lines(_plan(), tmp_path))
