"""Operator verdicts end to end: Kafka -> twin flow -> QuestDB, judged with the CLI.

pump-001 runs steadily, then a planned speed change lifts its flow for good. The flow
raises an alarm; an operator rejects it with ``twinflow alarms reject``; the entity is
back to OK within a few windows and does not alarm again on the new level. A second
flow, SIGKILLed after a snapshot and restarted on its recovery store, reads the same
topics (the verdict now long in its topic) and must decide exactly the same.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest

from connectors.questdb import QuestDBHttp
from tests.helpers import snapshot_epoch, twinflow_cli, wait_for_wal
from tests.integration.flows import create_topics, flow_process, produce, table_rows, wait_until
from twinflow.settings import Settings
from twinflow.tables import tables

pytestmark = pytest.mark.integration

SHIFT_S = 2100
"""The planned change: after 35 min of steady running (the warm-up is 30 min)."""
FIRST_S, LAST_S = 2400, 3300
"""Seconds of plant time produced before the verdict, and in all."""


def _readings(start_ms: int, seconds: range) -> list[bytes]:
    """pump-001's telemetry, one message a second; its flow steps up at SHIFT_S."""
    rng = np.random.default_rng(7)
    noise = rng.normal(0.0, 1.0, size=(LAST_S, 5))
    messages = []
    for second in seconds:
        n = noise[second].tolist()
        body = {
            "entity_id": "pump-001",
            "ts": start_ms + second * 1000,
            "values": {
                "flow": (150.0 if second >= SHIFT_S else 120.0) + 1.5 * n[0],
                "discharge_pressure": 8.0 + 0.05 * n[1],
                "motor_current": 90.0 + 0.6 * n[2],
                "vibration_rms": 2.5 + 0.05 * n[3],
                "bearing_temp": 50.0 + 0.1 * n[4],
            },
        }
        messages.append(msgspec.json.encode(body))
    return messages


ALARM_COLUMNS = 'alarm_id, event, active, ts, start, "end", acknowledged, verdict, operator, note'
STATE_COLUMNS = "ts, status, anomaly_score, threshold, readings, anomalies, alarms, active_alarms"


@pytest.fixture(scope="module")
def topics(stack: Settings) -> Iterator[dict[str, str]]:
    suffix = f"{int(time.time())}{os.getpid() % 1000:03d}"
    names = {name: f"fb.{name}.{suffix}" for name in ("raw", "deadletter", "feedback", "commands")}
    yield names


def test_a_rejected_alarm_ends_and_a_restarted_flow_decides_the_same(
    stack: Settings, topics: dict[str, str], tmp_path: Path
) -> None:
    sql = QuestDBHttp(stack.questdb)
    create_topics(stack, topics)
    start_ms = (int(time.time()) - 2 * 3600) * 1000
    produce(stack, topics["raw"], _readings(start_ms, range(FIRST_S)))

    live = flow_process(stack, topics, tmp_path, "live")
    names = tables(live.env["TWINFLOW_QUESTDB__TABLE_PREFIX"])
    live.start()
    try:
        wait_until(
            lambda: any(
                row[1] == "raised" for row in table_rows(sql, names.alarms.name, ALARM_COLUMNS)
            ),
            live,
            "an alarm on the speed change",
        )
        alarm_id = table_rows(sql, names.alarms.name, ALARM_COLUMNS)[0][0]
        judged = twinflow_cli(
            live.env, "alarms", "reject", str(alarm_id), "--note", "planned", "--user", "ann"
        )
        assert judged.returncode == 0, judged.stderr
        assert f"sent reject for {alarm_id} as ann" in judged.stdout

        produce(stack, topics["raw"], _readings(start_ms, range(FIRST_S, LAST_S)))
        # The last window the watermark (newest reading - 5 s) closes ends after this.
        last_window = start_ms + (LAST_S - 20) * 1000

        def finished() -> bool:
            states = table_rows(sql, names.twin_state.name, "ts")
            return bool(states) and str(states[-1][0]) >= _iso(last_window)

        wait_until(finished, live, "the last window's state")
        wait_for_wal(sql, [names.alarms.name, names.twin_state.name])
        alarms = table_rows(sql, names.alarms.name, ALARM_COLUMNS)
        assert [(row[0], row[1], row[2]) for row in alarms] == [
            (alarm_id, "raised", True),
            (alarm_id, "rejected", False),
        ]
        rejected = alarms[1]
        assert rejected[7:] == ("rejected", "ann", "planned")
        # Back to OK at once; no alarm and no anomaly on the new level. While the
        # new operating point settles in, the score may come near the threshold (WARN)
        # for a window or two.
        states = table_rows(sql, names.twin_state.name, STATE_COLUMNS)
        after = [row for row in states if str(row[0]) > str(rejected[3])]
        assert len(after) > 60
        assert after[0][1] == "OK" and not after[0][7]
        assert all(row[1] in {"OK", "WARN"} for row in after)
        assert sum(row[1] == "WARN" for row in after) <= 5, [r for r in after if r[1] != "OK"]
        assert after[-1][5] == after[0][5], "anomalies after the verdict"

        listed = twinflow_cli(live.env, "alarms", "--json", "--entity", "pump-001")
        assert listed.returncode == 0, listed.stderr
        [summary] = json.loads(listed.stdout)
        assert (summary["active"], summary["verdict"], summary["operator"]) == (
            False,
            "rejected",
            "ann",
        )
        again = twinflow_cli(live.env, "alarms", "confirm", str(alarm_id))
        assert again.returncode == 1 and "has ended (rejected" in again.stderr, again.stderr
        unknown = twinflow_cli(live.env, "alarms", "ack", "pump-001@1")
        assert unknown.returncode == 1 and "unknown alarm pump-001@1" in unknown.stderr
    finally:
        live.stop()

    # The same topics again, from the start, killed once after a snapshot.
    replayed = flow_process(stack, topics, tmp_path, "replayed")
    again_names = tables(replayed.env["TWINFLOW_QUESTDB__TABLE_PREFIX"])
    # One message per batch, so the first snapshot comes well before the end.
    replayed.env["TWINFLOW_FLOW__BATCH_SIZE"] = "1"
    replayed.start()
    try:
        wait_until(lambda: snapshot_epoch(replayed.recovery) >= 1, replayed, "a snapshot")
        replayed.kill()
        del replayed.env["TWINFLOW_FLOW__BATCH_SIZE"]
        assert len(table_rows(sql, again_names.twin_state.name, "ts")) < len(states), (
            "killed after it had finished: the restart would prove nothing"
        )
        replayed.start()

        def caught_up() -> bool:
            return len(table_rows(sql, again_names.twin_state.name, "ts")) >= len(states)

        wait_until(caught_up, replayed, "the restarted flow's last state")
        wait_for_wal(sql, [again_names.alarms.name, again_names.twin_state.name])
    finally:
        replayed.stop()
    assert table_rows(sql, again_names.alarms.name, ALARM_COLUMNS) == alarms
    assert table_rows(sql, again_names.twin_state.name, STATE_COLUMNS) == states


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000))
