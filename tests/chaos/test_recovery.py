"""Recipes 1 and 2: the flow killed and restarted (also on other worker counts) loses
nothing and adds nothing: its QuestDB tables equal the golden run's."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosRow, FlowRun, Outcome, Workload, judge, kill_points

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
FIRST_BATCH = "first batch from offset"


def _kill_before_first_snapshot(run: FlowRun, _delay: float) -> str:
    run.wait_for_log(FIRST_BATCH)
    time.sleep(0.1)  # snapshots come every second: this is well before the first
    run.kill()
    return "before the first snapshot"


def _kill_after_snapshot(run: FlowRun, _delay: float) -> str:
    run.wait_for_log(FIRST_BATCH)
    run.wait_for_snapshot()
    run.kill()
    return "right after a snapshot"


def _kill_mid_stream(run: FlowRun, delay: float) -> str:
    run.wait_for_log(FIRST_BATCH)
    time.sleep(delay)
    run.kill()
    return f"{delay} s after its first batch"


def _kill_while_idle_windows_close(run: FlowRun, _delay: float) -> str:
    # Every reading is in; the last window of each entity closes on idleness next.
    deadline = time.monotonic() + 300
    while run.counts()["readings"] < run.workload.expected.valid_readings:
        assert run.running(), f"flow exited:\n{run.log_tail()}"
        assert time.monotonic() < deadline, "readings never complete"
        time.sleep(0.1)
    run.kill()
    return "with every reading in, before the idle windows closed"


KILLS: list[Callable[[FlowRun, float], str]] = [
    _kill_before_first_snapshot,
    _kill_after_snapshot,
    _kill_mid_stream,
    _kill_mid_stream,
    _kill_while_idle_windows_close,
]


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param(1, id="one-kill"),
        pytest.param(5, id="five-kills", marks=pytest.mark.soak),
    ],
)
def test_sigkill_and_restart_equals_golden(
    kills: int,
    workload: Workload,
    golden: Outcome,
    chaos_dir: Path,
    chaos_table: list[dict[str, object]],
) -> None:
    run = FlowRun(workload, chaos_dir, f"kill{kills}")
    plan = KILLS if kills == len(KILLS) else [_kill_after_snapshot]
    row = ChaosRow(f"1. flow SIGKILL x{kills}, restart on the same store", runs=kills + 1)
    try:
        for kill, delay in zip(plan, kill_points(seed=kills, count=kills), strict=True):
            run.start()
            row.notes.append(kill(run, delay))
        run.supervise()
        assert run.exits == [-9] * kills, f"unexpected exits {run.exits}"
        outcome = run.outcome()
        problems = judge(chaos_table, row, run, golden, outcome)
        outputs = outcome.output_copies(golden)
    finally:
        run.stop()
    # Kafka outputs are at least once: a replay after a kill re-emits what the outputs
    # had sent since the last snapshot. Every copy has its msg_id, so consumers that drop
    # repeats by it see exactly golden's messages.
    chaos_table.append(
        {
            "fault": f"12. Kafka outputs (twin.state, twin.anomalies, twin.alarms) after flow "
            f"SIGKILL x{kills}, deduplicated by msg_id",
            "runs": kills + 1,
            "lost": sum(topic["missing"] for topic in outputs.values()),
            "duplicates": sum(topic["conflicts"] for topic in outputs.values()),
            "mismatches": sum(topic["extra"] for topic in outputs.values()),
            "notes": "replayed copies (same msg_id and payload) before dedupe: "
            + ", ".join(
                f"{topic} {counts['copies']} of {counts['messages']}"
                for topic, counts in outputs.items()
            )
            + "; duplicates: ids whose copies differ",
        }
    )
    assert not any(problems.values()), f"{problems}; see {run.work}"
    for topic, counts in outputs.items():
        assert counts["missing"] == counts["extra"] == counts["conflicts"] == 0, (topic, counts)
    run.drop()


@pytest.mark.soak
def test_rescale_2_4_1_equals_golden_and_a_lost_partition_stops_the_flow(
    workload: Workload,
    golden: Outcome,
    chaos_dir: Path,
    chaos_table: list[dict[str, object]],
) -> None:
    run = FlowRun(workload, chaos_dir, "rescale")
    row = ChaosRow("2. rescale 2 -> 4 -> 1 workers (kill between)", runs=3)
    try:
        for workers in (2, 4):
            run.start(workers)
            _kill_after_snapshot(run, 0)
        run.supervise(workers=1)
        problems = judge(chaos_table, row, run, golden)
        assert not any(problems.values()), f"{problems}; see {run.work}"
        run.stop()

        rows_before = run.counts()
        (run.recovery_dir / "part-1.sqlite3").unlink()
        run.start()
        deadline = time.monotonic() + 120
        while run.running():
            assert time.monotonic() < deadline, "the flow ran on with a partition missing"
            time.sleep(0.2)
        log = run.logs[-1].read_text(errors="replace")
        assert run.exits[-1] != 0
        assert "recovery store" in log and "damaged" in log, log[-3000:]
        assert run.counts() == rows_before, "it started over from zero"
    finally:
        run.stop()
    run.drop()
