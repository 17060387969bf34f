"""The fault-injection suite: real processes (daphne, Celery worker, Meta-World robot agents, Redis, PostgreSQL)
and real faults (SIGKILL, a restarted service, a namespace link down, a full disk).

Each test fills one row of the fault table (``outcome`` fixture); the table is printed at the end of the run as
Markdown and written to test-output/faults.json. Faults that need root or PostgreSQL are skipped where they cannot
run, and fail instead of skipping when SOP_REQUIRE_FAULTS=1 (CI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, launcher, log_dir  # noqa: F401  (fixtures: real processes on the test database)

RESULTS: list[dict] = []
COLUMNS = ("fault", "result", "episodes", "lost", "duplicated", "checkpoint versions", "robots back",
           "loop p99 max (ms)", "notes")


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("SOP_REQUIRE_FAULTS") == "1":
        pytest.fail(f"SOP_REQUIRE_FAULTS=1 but this fault cannot be injected here: {why}")
    pytest.skip(why)


@pytest.fixture
def outcome(request):
    """This test's row of the fault table; the test fills in what it measured."""
    row = {"fault": request.node.function.__doc__.strip().splitlines()[0].rstrip("."), "result": "not run"}
    RESULTS.append(row)
    request.node.fault_row = row
    return row


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    row = getattr(item, "fault_row", None)
    if row is not None and report.when == "call":
        row["result"] = "passed" if report.passed else ("skipped" if report.skipped else "FAILED")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    rows = RESULTS
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    (out / "faults.json").write_text(json.dumps({"command": "pytest tests/faults", "faults": rows}, indent=2))
    terminalreporter.section("fault injection")
    terminalreporter.write_line("| " + " | ".join(COLUMNS) + " |")
    terminalreporter.write_line("|" + "---|" * len(COLUMNS))
    for row in rows:
        terminalreporter.write_line("| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |")
    terminalreporter.write_line(f"(also in {Path('test-output') / 'faults.json'})")
