import json
from datetime import UTC, datetime

import msgspec
import pandas as pd

from flows.outputs import deadletter_batches, kafka_records, table_batches
from schemas.deadletter import Source, dead_letter, encode
from schemas.outputs import (
    COUNTS,
    Alarm,
    AlarmEvent,
    AlarmKind,
    Contribution,
    Counts,
    Status,
    TwinState,
)
from schemas.raw import Reason
from schemas.transport import InputMessage
from twinflow.settings import TopicSettings
from twinflow.tables import tables
from twinflow.twin import StepOutput


def test_dead_letters_become_rows_and_strangers_are_kept() -> None:
    letter = dead_letter(
        b"{bad",
        Reason.BAD_JSON,
        "truncated",
        Source(kind="mqtt", topic="plant/a/b/pump-001/telemetry"),
        datetime(2026, 11, 1, 12, 0, 0, 123000, tzinfo=UTC),
        entity_id="pump-001",
    )
    messages = [
        InputMessage("twin.deadletter", 0, 7, 1_793_000_000_000, encode(letter)),
        InputMessage("twin.deadletter", 0, 8, 1_793_000_000_500, b"not a dead letter"),
    ]
    (batch,) = deadletter_batches(messages, tables())
    assert batch.spec.name == "deadletters"
    rows = batch.frame.to_dict("records")
    assert rows[0]["reason"] == "bad_json"
    assert rows[0]["source"] == "plant/a/b/pump-001/telemetry"
    assert rows[0]["entity"] == "pump-001"
    assert rows[0]["ts"].value // 1_000_000 == 1_793_534_400_123
    assert rows[1]["reason"] == "schema"
    assert rows[1]["source_kind"] == "kafka"
    assert rows[1]["kafka_offset"] == 8
    assert rows[1]["payload_excerpt"] == "not a dead letter"
    assert deadletter_batches([], tables()) == []


def _alarm(event: AlarmEvent, ts_ms: int, end_ms: int | None) -> Alarm:
    return Alarm(
        msg_id=f"pump-001@1000/{event.value}",
        alarm_id="pump-001@1000",
        entity_id="pump-001",
        kind=AlarmKind.ANOMALY,
        event=event,
        active=end_ms is None,
        ts_ms=ts_ms,
        start_ms=1_000,
        end_ms=end_ms,
        peak_score=8.5,
        threshold=3.0,
        anomalous_windows=3,
        contributions=[
            Contribution("flow", "mean", 140.0, 95.0, 105.0, 0.7),
            Contribution("current", "mean", 30.0, 20.0, 25.0, 0.2),
            Contribution("flow", "std", 9.0, 0.0, 2.0, 0.1),
        ],
    )


def test_alarm_transitions_become_rows_and_keyed_messages() -> None:
    raised = _alarm(AlarmEvent.RAISED, 11_000, None)
    cleared = _alarm(AlarmEvent.CLEARED, 61_000, 31_000)
    out = StepOutput(alarms=[raised, cleared])
    (batch,) = table_batches(out, tables("p_"))
    assert batch.spec.name == "p_alarms"
    rows = batch.frame.to_dict("records")
    assert [(r["event"], r["active"], r["ts"].value // 1_000_000) for r in rows] == [
        ("raised", True, 11_000),
        ("cleared", False, 61_000),
    ]
    assert pd.isna(rows[0]["end"]) and rows[1]["end"].value // 1_000_000 == 31_000
    assert rows[0]["start"].value // 1_000_000 == 1_000
    assert rows[1]["top_sensors"] == "flow,current"
    assert json.loads(rows[1]["explanation"])[0]["expected_high"] == 105.0
    records = kafka_records(out, TopicSettings())
    assert [(r.topic, r.key) for r in records] == [("twin.alarms", b"pump-001")] * 2
    assert [json.loads(r.value)["event"] for r in records] == ["raised", "cleared"]


def test_twin_state_rows_carry_the_active_alarms_and_their_count() -> None:
    state = TwinState(
        msg_id="pump-001@20000",
        entity_id="pump-001",
        ts_ms=20_000,
        status=Status.ALARM,
        health=40.0,
        anomaly_score=9.5,
        threshold=3.0,
        sensors={},
        derived={},
        counts=Counts(readings=20, anomalies=2, alarms=1),
        active_alarms=["pump-001@1000"],
    )
    quiet = msgspec.structs.replace(state, ts_ms=30_000, active_alarms=[], status=Status.OK)
    (batch,) = table_batches(StepOutput(states=[state, quiet]), tables())
    rows = batch.frame.to_dict("records")
    assert [(r["active_alarms"], r["alarms"], r["status"]) for r in rows] == [
        ("pump-001@1000", 1, "ALARM"),
        ("", 1, "OK"),
    ]
    # Every count the struct declares has its column, windows included.
    assert {name: rows[0][name] for name in COUNTS} == msgspec.structs.asdict(state.counts)
    assert "windows" in COUNTS
