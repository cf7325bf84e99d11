"""Recipe 5: QuestDB rejects the flow's batches mid-run (a column's type changed under
it). The flow must stop with an error naming the table, never drop the batch; once
the table is fixed, a restart writes exactly what the golden run wrote.

(401 refusals: tests/chaos/test_security_questdb.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosRow, FlowRun, Outcome, Workload, judge

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_a_rejected_batch_stops_the_flow_and_is_written_after_the_fix(
    workload: Workload,
    golden: Outcome,
    chaos_dir: Path,
    chaos_table: list[dict[str, object]],
) -> None:
    run = FlowRun(workload, chaos_dir, "reject")
    readings = run.tables.readings.name
    row = ChaosRow("5. QuestDB rejects batches (type conflict), then fixed", runs=0)
    try:
        run.start()
        run.wait_for_log("first batch from offset")
        run.wait_for_snapshot()
        run.sql.exec(f'ALTER TABLE "{readings}" ALTER COLUMN value TYPE VARCHAR')
        deadline = time.monotonic() + 120
        while run.running():
            assert time.monotonic() < deadline, "the flow went on while QuestDB rejected rows"
            time.sleep(0.2)
        log = run.logs[-1].read_text(errors="replace")
        assert run.exits[-1] != 0
        assert "QuestDB did not take" in log and readings in log and "cast error" in log, log[
            -3000:
        ]
        row.notes.append("flow stopped, exit code " + str(run.exits[-1]))

        # Restarted while the table is still wrong: refused again, nothing skipped.
        run.start()
        while run.running():
            assert time.monotonic() < deadline + 120, "restart went on past the bad table"
            time.sleep(0.2)
        assert run.exits[-1] != 0
        row.notes.append("restart before the fix stopped too")

        run.sql.exec(f'ALTER TABLE "{readings}" ALTER COLUMN value TYPE DOUBLE')
        run.supervise()
        row.runs = run.starts
        problems = judge(chaos_table, row, run, golden)
    finally:
        run.stop()
    assert not any(problems.values()), f"{problems}; see {run.work}"
    run.drop()
