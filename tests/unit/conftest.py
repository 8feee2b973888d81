"""Unit tier: no root and no subprocess. Any attempt to run a real command fails the test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from encryptrootfs import run as run_module


@pytest.fixture(autouse=True)
def _no_real_commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(argv: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unit test tried to run a real command: {argv!r}")

    monkeypatch.setattr(run_module, "_spawn", refuse)
    monkeypatch.setattr("subprocess.Popen", refuse)
    yield
