"""``rd.encryptrootfs.break=``: the first boot stops after the stage it names, and only then."""

from __future__ import annotations

import pytest

from encryptrootfs.boot import breakpoints
from encryptrootfs.boot.breakpoints import requested, stop_after


def test_requested_reads_every_named_stage_and_ignores_unknown_ones() -> None:
    line = "root=UUID=x ro rd.encryptrootfs.break=header,bogus quiet rd.encryptrootfs.break=grow"
    assert requested(line) == {"header", "grow"}
    assert requested("root=UUID=x rd.break=pre-mount") == frozenset()
    assert requested("rd.encryptrootfs.break") == frozenset()


def test_stop_after_hangs_only_at_the_requested_stage(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    synced: list[bool] = []
    monkeypatch.setattr("os.sync", lambda: synced.append(True))
    hung: list[str] = []
    line = "ro rd.encryptrootfs.break=token"
    with caplog.at_level("INFO", logger="encryptrootfs"):
        for stage in breakpoints.STAGES:
            stop_after(stage, cmdline=line, hang=lambda s=stage: hung.append(s))  # type: ignore[misc]
    assert hung == ["token"]
    assert synced == [True]
    assert "stopped after the token stage" in caplog.text


def test_an_unknown_stage_name_in_the_code_is_a_programming_error() -> None:
    with pytest.raises(AssertionError):
        stop_after("nonsense", cmdline="")
