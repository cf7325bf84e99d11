"""The chaos tier's workload and golden run, shared by every recipe of a session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import FlowRun, Outcome, Workload, produce
from twinflow.settings import Settings


@pytest.fixture(scope="session")
def chaos_dir(stack: Settings) -> Path:
    """Logs and recovery stores of the chaos runs (kept for a look after a failure)."""
    path = stack.state_dir / "chaos"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def workload(stack: Settings, chaos_dir: Path) -> Workload:
    """The seeded workload, produced once to the session's Kafka."""
    return produce(stack, chaos_dir)


@pytest.fixture(scope="session")
def golden(workload: Workload, chaos_dir: Path) -> Iterator[Outcome]:
    """The workload through the flow with no fault: what every fault run must equal."""
    run = FlowRun(workload, chaos_dir, "golden")
    try:
        run.supervise(restart=False)
        outcome = run.outcome()
    finally:
        run.stop()
    problems = outcome.problems(workload, None)
    assert not any(problems.values()), f"the golden run itself is wrong: {problems}"
    assert len(outcome.rows["sensor_windows"]) == workload.expected.all_windows
    # Every closed window's score is in twin_state (anomalies holds only those over the
    # threshold, none for this steady plant): scores are compared there.
    scores = [row[4] for row in outcome.rows["twin_state"] if row[4] is not None]
    assert len(scores) > workload.expected.closed_windows // 10, "few scored windows"
    yield outcome
    run.drop()
