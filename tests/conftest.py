"""Test tiers: the folder a test lives in gives its marker (unit, header, vm).

Also the emulator fixtures every tier uses: the KMS emulator (moto over HTTP) and the IMDSv2
emulator, in-process on 127.0.0.1, with botocore isolated from the host (no AWS_* variables,
no ~/.aws files), so the only credentials come from the IMDS emulator and the only endpoint is
the KMS emulator.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from encryptrootfs_lab.emulators import ImdsEmulator, KmsEmulator
from support.emulators import INSTANCE_ID, REGION
from support.robustness import LEDGER, Case

# Each tier's time, the guests' time (tests/support/timing.py).
pytest_plugins = ["support.timing"]

TESTS = Path(__file__).parent
TIERS = ("unit", "header", "vm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).relative_to(TESTS)
        tier = rel.parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if tier in ("header", "vm") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason=f"the {tier} tier needs root"))


@pytest.fixture
def aws_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-aws-credentials"))


@pytest.fixture
def kms(aws_isolated: None) -> Iterator[KmsEmulator]:
    with KmsEmulator(region=REGION) as emulator:
        yield emulator


@pytest.fixture
def imds(aws_isolated: None) -> Iterator[ImdsEmulator]:
    with ImdsEmulator(region=REGION, instance_id=INSTANCE_ID) as emulator:
        yield emulator


@pytest.fixture
def key_arn(kms: KmsEmulator) -> str:
    return kms.create_key(alias="encryptrootfs-test")


# --- the robustness ledger (tests/support/robustness.py) ---------------------------------------

ROBUSTNESS_KEY = pytest.StashKey[Case]()
ROBUSTNESS_REPORT = Path(".pytest_cache") / "encryptrootfs-robustness.json"


@pytest.fixture
def robustness(request: pytest.FixtureRequest) -> Case:
    """This test is a case of the power-cut / fault / bad-input matrix; report bytes lost."""
    case = LEDGER.open(request.node)
    request.node.stash[ROBUSTNESS_KEY] = case
    return case


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report: pytest.TestReport = yield
    case = item.stash.get(ROBUSTNESS_KEY, None)
    ran = report.when == "call" or report.outcome != "passed"
    if case is not None and ran and case.outcome in (None, "passed"):
        case.outcome = report.outcome
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER.cases:
        return
    for line in LEDGER.lines():
        terminalreporter.write_line(line)
    LEDGER.write(Path(str(terminalreporter.config.rootpath)) / ROBUSTNESS_REPORT)
