"""No tracebacks for users: a missing file is a sentence naming it, a bug is one line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from encryptrootfs import cli
from encryptrootfs.errors import ExitCode


def config(tmp_path: Path) -> str:
    path = tmp_path / "config.toml"
    path.write_text('[providers.aws_kms]\nkey_id = "alias/root"\n')
    return str(path)


def test_a_missing_key_file_is_a_sentence_that_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    argv = ["--config", config(tmp_path), "enroll", "--key-file", str(missing), "/dev/vdb"]
    assert cli.main(argv) == ExitCode.FAILURE
    err = capsys.readouterr().err
    assert err.startswith(f"encryptrootfs: error: cannot use `{missing}`: No such file")
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_an_unexpected_error_is_one_line_that_asks_for_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise KeyError("tokens")

    monkeypatch.setattr(cli, "cmd_config_check", broken)
    assert cli.main(["config", "check", config(tmp_path)]) == ExitCode.FAILURE
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "encryptrootfs: error: unexpected KeyError: 'tokens'; the command stopped there. "
        "Run it again with --debug and report it."
    ]
