"""The JSON Schema files and the decoders must agree on what the contracts allow."""

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from schemas import outputs
from schemas.control import Verdict
from schemas.deadletter import FULL_PAYLOAD_LIMIT, Source, dead_letter, encode
from schemas.outputs import Alarm, AlarmEvent, Counts, SensorState, Status, TwinState
from schemas.raw import Reason, SchemaError, decode_raw
from twinflow.detection import DetectorConfig, EntityMonitor

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "json"
RAW = json.loads((SCHEMAS / "raw_reading.v1.schema.json").read_text())
DEAD = json.loads((SCHEMAS / "deadletter.v1.schema.json").read_text())
ALARM = json.loads((SCHEMAS / "alarm.v1.schema.json").read_text())
STATE = json.loads((SCHEMAS / "twin_state.v1.schema.json").read_text())
CHECKER = jsonschema.Draft202012Validator(RAW, format_checker=jsonschema.FormatChecker())

VALID = [
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1767225600000, "value": 12.5},
    {
        "entity_id": "pump-001",
        "sensor": "flow",
        "ts": "2026-01-01T00:00:00.123Z",
        "value": 1,
        "unit": "l/s",
        "quality": "good",
        "seq": 7,
        "source": "opcua:ns=2;s=pump-001/flow",
    },
    {
        "entity_id": "pump-001",
        "ts": "2026-01-01T02:00:00+02:00",
        "values": {"flow": 1, "x": 2.5},
        "units": {"flow": "gpm"},
        "seq": 1,
    },
]
INVALID = [
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1, "value": "1"},
    {"entity_id": "pump-001", "sensor": "flow", "value": 1},
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1},
    {"entity_id": "pump-001", "ts": 1, "values": {}},
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1, "value": 1, "values": {"a": 1}},
    {"entity_id": "pump-001", "sensor": "flow", "ts": "2026-01-01T00:00:00", "value": 1},
    {"entity_id": "pump-001", "sensor": "flow", "ts": -5, "value": 1},
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1, "value": True},
]


@pytest.mark.parametrize("document", VALID)
def test_valid_raw_messages_pass_both(document: dict[str, object]) -> None:
    CHECKER.validate(document)
    decode_raw(json.dumps(document).encode())


@pytest.mark.parametrize("document", INVALID)
def test_invalid_raw_messages_fail_both(document: dict[str, object]) -> None:
    assert not CHECKER.is_valid(document)
    with pytest.raises(SchemaError):
        decode_raw(json.dumps(document).encode())


@pytest.mark.parametrize("size", [0, 10, FULL_PAYLOAD_LIMIT + 1])
def test_dead_letters_match_their_schema(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    letter = dead_letter(
        payload,
        Reason.BAD_JSON,
        "d" * 5000,
        Source(kind="kafka", topic="twin.raw", partition=3, offset=42),
        datetime(2026, 1, 1, tzinfo=UTC),
        entity_id=None,
    )
    document = json.loads(encode(letter))
    jsonschema.validate(document, DEAD, format_checker=jsonschema.FormatChecker())
    assert document["payload_size"] == size
    assert (document["payload_b64"] is None) == (size > FULL_PAYLOAD_LIMIT)
    assert len(document["detail"]) == 1000
    assert document["reason"] == "bad_json"
    assert set(DEAD["properties"]["reason"]["enum"]) == {reason.value for reason in Reason}


def test_output_schema_files_match_the_structs() -> None:
    from schemas.generate import SCHEMA_DIR, output_schemas

    for file_name, schema in output_schemas().items():
        published = json.loads((SCHEMA_DIR / file_name).read_text())
        assert published == schema, f"{file_name} is stale: run python -m schemas.generate"


def _monitored_alarms() -> list[Alarm]:
    """Every kind of alarm transition, produced by the flow's own monitor."""
    monitor = EntityMonitor(
        "pump-001",
        DetectorConfig(
            warmup_windows=60,
            smoothing=(1.0,),
            min_count=10,
            periods=(),
            clear_windows=3,
            rebaseline_after=0.2,
        ),
    )
    levels = [100.0 + i % 3 for i in range(80)] + [140.0] * 4 + [101.0] * 4 + [180.0] * 20
    levels += [60.0] * 4
    # The first alarm is acknowledged; the third confirmed, then rejected.
    verdicts = {1: [Verdict.ACK], 3: [Verdict.CONFIRM, Verdict.REJECT]}
    alarms: list[Alarm] = []
    for i, flow in enumerate(levels):
        for alarm in monitor.process({"flow.mean": flow}, i * 10_000, (i + 1) * 10_000).alarms:
            alarms.append(alarm)
            if alarm.event is AlarmEvent.RAISED:
                raised = sum(a.event is AlarmEvent.RAISED for a in alarms)
                for verdict in verdicts.get(raised, []):
                    alarms += monitor.feedback(alarm.alarm_id, verdict, "ann", "seen")
    return alarms


def test_alarm_messages_match_their_schema() -> None:
    alarms = _monitored_alarms()
    assert {alarm.event for alarm in alarms} == set(AlarmEvent)
    for alarm in alarms:
        document = json.loads(outputs.encode(alarm))
        jsonschema.validate(document, ALARM)
        assert (document["end_ms"] is None) == document["active"]
    assert any(json.loads(outputs.encode(alarm))["contributions"] for alarm in alarms)
    for wrong in ({"event": "snoozed"}, {"end_ms": "later"}, {"version": 2}):
        document = {**json.loads(outputs.encode(alarms[0])), **wrong}
        assert not jsonschema.Draft202012Validator(ALARM).is_valid(document), wrong


def test_twin_states_with_active_alarms_match_their_schema() -> None:
    state = TwinState(
        msg_id="pump-001@20000",
        entity_id="pump-001",
        ts_ms=20_000,
        status=Status.ALARM,
        health=40.0,
        anomaly_score=9.5,
        threshold=3.0,
        sensors={"flow": SensorState(140.0, 19_000, 0, "l/s")},
        derived={"efficiency": None},
        counts=Counts(readings=20, windows=2, anomalies=1, alarms=1),
        active_alarms=["pump-001@10000"],
    )
    document = json.loads(outputs.encode(state))
    jsonschema.validate(document, STATE)
    assert document["active_alarms"] == ["pump-001@10000"]
    assert document["counts"]["alarms"] == 1
    assert not jsonschema.Draft202012Validator(STATE).is_valid({**document, "active_alarms": "x"})
