"""The twin flow on testing connectors: same outputs with 1 and 2 workers, and every
output checked against an independent recomputation from the input."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import msgspec
import numpy as np
import pandas as pd
import pytest
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import AbortExecution, TestingSink, TestingSource, cluster_main, run_main

from connectors.kafka import KafkaRecord
from connectors.questdb import TableBatch
from flows.twin import build_flow
from schemas.raw import SchemaError, decode_raw
from schemas.transport import InputMessage
from tests.helpers import recompute_windows
from twinflow.detection import DetectorConfig
from twinflow.settings import Settings, load_settings
from twinflow.sim.faults import DegradationPlan, FaultPlan
from twinflow.sim.messages import DataFaultPlan, MessageEncoder
from twinflow.sim.scenario import Scenario, ScenarioConfig
from twinflow.twin_model import TwinModel, load_twin_model

ROOT = Path(__file__).resolve().parents[2]
START_MS = 1_790_000_000_000
PARTITIONS = 2
T = TypeVar("T")
BATCH = 150


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return load_twin_model(ROOT / "infra" / "twin-model" / "example-plant.yaml")


@pytest.fixture(scope="module")
def settings() -> Settings:
    # Idle closing depends on system time; keep it out of a run that must be repeatable.
    return load_settings().model_copy(
        update={
            "flow": load_settings().flow.model_copy(
                update={"idle_close_s": 3600.0, "stale_after_s": 3600.0}
            )
        }
    )


def _partition(entity_id: str) -> int:
    return zlib.crc32(entity_id.encode()) % PARTITIONS


@pytest.fixture(scope="module")
def raw_input(model: TwinModel) -> dict[int, list[InputMessage]]:
    scenario = Scenario(
        model,
        ScenarioConfig(
            start_ms=START_MS,
            duration_s=600.0,
            rate=120.0,
            entities=8,
            seed=21,
            faults=FaultPlan(process_fault_share=0.5, sensor_fault_share=0.5),
        ),
    )
    plan = DataFaultPlan(
        duplicate=0.02,
        out_of_order=0.02,
        late=0.01,
        malformed=0.02,
        unknown_entity=0.01,
        late_delay_s=60.0,
    )
    encoder = MessageEncoder(model, plan, seed=21)
    return _partitioned(scenario, encoder)


def _partitioned(scenario: Scenario, encoder: MessageEncoder) -> dict[int, list[InputMessage]]:
    """The scenario's messages as the partitions of twin.raw hold them."""
    by_partition: dict[int, list[InputMessage]] = {p: [] for p in range(PARTITIONS)}
    for emission in encoder.emissions(scenario.samples(), scenario.tick_ms):
        partition = _partition(emission.entity_id)
        messages = by_partition[partition]
        messages.append(
            InputMessage(
                "twin.raw", partition, len(messages), emission.publish_at_ms, emission.payload
            )
        )
    return by_partition


def _batches(
    raw_input: dict[int, list[InputMessage]], size: int
) -> list[tuple[str, list[InputMessage]]]:
    items = []
    for partition, messages in raw_input.items():
        for start in range(0, len(messages), size):
            items.append((f"twin.raw#{partition}", messages[start : start + size]))
    return items


class PartitionedSource(FixedPartitionedSource[tuple[str, T], int]):
    """Keyed items as Kafka holds them: one part per key, each read in order.

    ``abort_at`` (key, position) aborts the run there once, as a crash would; the next
    run resumes from the last snapshot.
    """

    def __init__(self, items: list[tuple[str, T]], abort_at: tuple[str, int] | None = None) -> None:
        self.parts: dict[str, list[tuple[str, T]]] = {}
        for key, value in items:
            self.parts.setdefault(key, []).append((key, value))
        self.abort_at = abort_at

    def list_parts(self) -> list[str]:
        return sorted(self.parts)

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Part[T]:
        return _Part(self, for_part, resume_state or 0)


class _Part(StatefulSourcePartition[tuple[str, T], int]):
    def __init__(self, source: PartitionedSource[T], key: str, position: int) -> None:
        self._source, self._key, self._position = source, key, position

    def next_batch(self) -> list[tuple[str, T]]:
        items = self._source.parts[self._key]
        if self._position >= len(items):
            raise StopIteration
        if self._source.abort_at == (self._key, self._position):
            self._source.abort_at = None
            raise AbortExecution()
        self._position += 1
        return [items[self._position - 1]]

    def snapshot(self) -> int:
        return self._position


def _run(
    settings: Settings,
    model: TwinModel,
    raw_input: dict[int, list[InputMessage]],
    workers: int,
    batch: int = BATCH,
    detector: DetectorConfig | None = None,
) -> tuple[list[TableBatch], list[KafkaRecord]]:
    rows: list[TableBatch] = []
    records: list[KafkaRecord] = []
    flow = build_flow(
        settings,
        model,
        raw_source=PartitionedSource(_batches(raw_input, batch)),
        deadletter_source=TestingSource([]),
        questdb_sink=TestingSink(rows),
        kafka_sink=TestingSink(records),
        detector=detector,
        clock=lambda: START_MS,
    )
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return rows, records


def _frames(rows: list[TableBatch]) -> dict[str, pd.DataFrame]:
    frames: dict[str, list[pd.DataFrame]] = {}
    for batch in rows:
        frames.setdefault(batch.spec.name, []).append(batch.frame)
    return {name: pd.concat(parts, ignore_index=True) for name, parts in frames.items()}


def _canonical(frames: dict[str, pd.DataFrame]) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: sorted(map(tuple, frame.astype(str).itertuples(index=False)))
        for name, frame in frames.items()
    }


@pytest.fixture(scope="module")
def one_worker(
    settings: Settings, model: TwinModel, raw_input: dict[int, list[InputMessage]]
) -> tuple[list[TableBatch], list[KafkaRecord]]:
    return _run(settings, model, raw_input, workers=1)


def test_one_and_two_workers_give_identical_outputs(
    settings: Settings,
    model: TwinModel,
    raw_input: dict[int, list[InputMessage]],
    one_worker: tuple[list[TableBatch], list[KafkaRecord]],
) -> None:
    two_rows, two_records = _run(settings, model, raw_input, workers=2)
    one_rows, one_records = one_worker
    assert _canonical(_frames(two_rows)) == _canonical(_frames(one_rows))
    key = lambda r: (r.topic, r.key, r.value)  # noqa: E731
    assert sorted(map(key, two_records)) == sorted(map(key, one_records))
    assert {"readings", "sensor_windows", "twin_state"} <= set(_frames(one_rows))


def _expected(
    model: TwinModel, raw_input: dict[int, list[InputMessage]]
) -> tuple[set[tuple[str, str, int]], Counter[str]]:
    """Valid readings and dead-letter reasons, recomputed straight from the contract."""
    keys: set[tuple[str, str, int]] = set()
    reasons: Counter[str] = Counter()
    for messages in raw_input.values():
        for message in messages:
            try:
                raw = decode_raw(message.value)
            except SchemaError as exc:
                reasons[exc.reason.value] += 1
                continue
            entity = model.by_id.get(raw.entity_id)
            if entity is None:
                reasons["unknown_entity"] += 1
                continue
            for sensor, value, unit in raw.readings():
                spec = model.sensors_of(entity.id)[sensor]
                conversion = spec.conversion(unit)
                assert conversion is not None
                low, high = spec.range
                if not low <= conversion.to_canonical(value) <= high:
                    reasons["out_of_range"] += 1
                    continue
                keys.add((entity.id, sensor, raw.ts_ms))
    return keys, reasons


def test_every_valid_reading_once_and_every_bad_one_dead_lettered(
    model: TwinModel,
    raw_input: dict[int, list[InputMessage]],
    one_worker: tuple[list[TableBatch], list[KafkaRecord]],
) -> None:
    rows, records = one_worker
    readings = _frames(rows)["readings"]
    got = list(
        zip(
            readings["entity"],
            readings["sensor"],
            readings["ts"].astype("int64") // 1_000_000,
            strict=True,
        )
    )
    expected_keys, expected_reasons = _expected(model, raw_input)
    assert len(got) == len(set(got)), "a reading was written twice"
    assert set(got) == expected_keys
    letters = [json.loads(r.value) for r in records if r.topic == "twin.deadletter"]
    assert Counter(letter["reason"] for letter in letters) == expected_reasons
    assert all(
        letter["source"]["kind"] == "kafka" and letter["source"]["offset"] >= 0
        for letter in letters
    )
    assert expected_reasons["bad_json"] and expected_reasons["unknown_entity"]


def test_window_features_match_a_recomputation_from_readings(
    settings: Settings, one_worker: tuple[list[TableBatch], list[KafkaRecord]]
) -> None:
    frames = _frames(one_worker[0])
    readings, windows = frames["readings"], frames["sensor_windows"]
    length_ms = int(settings.flow.window_s * 1000)
    readings = readings.assign(
        ts_ms=readings["ts"].astype("int64") // 1_000_000,
    )
    late = {
        (r["entity_id"], r["sensor"], r["ts_ms"])
        for r in (json.loads(x.value) for x in one_worker[1] if x.topic == "twin.late")
    }
    recomputed = recompute_windows(readings, late, length_ms)
    windows = windows.assign(start=windows["ts"].astype("int64") // 1_000_000).set_index(
        ["entity", "sensor", "start"]
    )
    assert len(windows) > 100
    joined = windows.join(recomputed, how="left")
    assert (joined["count"] == joined["count_re"]).all()
    for column in ("mean", "min", "max", "std"):
        np.testing.assert_allclose(joined[column], joined[f"{column}_re"], rtol=1e-9, atol=1e-9)


def test_output_messages_validate_against_their_schemas(
    one_worker: tuple[list[TableBatch], list[KafkaRecord]],
) -> None:
    schema_dir = ROOT / "schemas" / "json"
    schemas = {
        "twin.state": json.loads((schema_dir / "twin_state.v1.schema.json").read_text()),
        "twin.anomalies": json.loads((schema_dir / "anomaly.v1.schema.json").read_text()),
        "twin.alarms": json.loads((schema_dir / "alarm.v1.schema.json").read_text()),
        "twin.late": json.loads((schema_dir / "late_reading.v1.schema.json").read_text()),
        "twin.deadletter": json.loads((schema_dir / "deadletter.v1.schema.json").read_text()),
    }
    seen: Counter[str] = Counter()
    for record in one_worker[1]:
        document = msgspec.json.decode(record.value)
        jsonschema.validate(document, schemas[record.topic])
        assert record.key is not None and record.key.decode() == (
            document.get("entity_id") or document["source"]["topic"]
        )
        seen[record.topic] += 1
    assert seen["twin.state"] and seen["twin.late"] and seen["twin.deadletter"]


def test_batch_boundaries_do_not_change_the_results(
    settings: Settings,
    model: TwinModel,
    raw_input: dict[int, list[InputMessage]],
    one_worker: tuple[list[TableBatch], list[KafkaRecord]],
) -> None:
    rows, records = _run(settings, model, raw_input, workers=1, batch=7)
    assert _canonical(_frames(rows)) == _canonical(_frames(one_worker[0]))
    assert sorted(r.value for r in records) == sorted(r.value for r in one_worker[1])


def test_a_run_killed_and_resumed_from_its_snapshots_gives_the_same_results(
    settings: Settings,
    model: TwinModel,
    raw_input: dict[int, list[InputMessage]],
    one_worker: tuple[list[TableBatch], list[KafkaRecord]],
    tmp_path: Path,
) -> None:
    # Every batch is an epoch, so each partition's offset and twins are snapshotted after
    # each, and the resumed run reads them back from Bytewax's recovery store.
    batches = _batches(raw_input, BATCH)
    key = batches[0][0]
    middle = sum(1 for k, _ in batches if k == key) // 2
    rows: list[TableBatch] = []
    records: list[KafkaRecord] = []
    flow = build_flow(
        settings,
        model,
        raw_source=PartitionedSource(batches, abort_at=(key, middle)),
        deadletter_source=TestingSource([]),
        questdb_sink=TestingSink(rows),
        kafka_sink=TestingSink(records),
        clock=lambda: START_MS,
    )
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(str(tmp_path))
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)  # stops at ABORT
    readings = len(_frames(one_worker[0])["readings"])
    assert 0 < len(_frames(rows)["readings"]) < readings
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    # The resumed run replays at most the batch in flight; its rows are the same again.
    resumed = {name: frame.drop_duplicates() for name, frame in _frames(rows).items()}
    assert _canonical(resumed) == _canonical(_frames(one_worker[0]))
    assert {r.value for r in records} == {r.value for r in one_worker[1]}


# Alarms need a warmed-up model: 2-s windows and a 60-window warm-up give the 10 minutes
# of plant 300 windows per entity, and alarms re-baselined after 30 windows give every
# kind of transition.
ALARM_DETECTOR = DetectorConfig(warmup_windows=60, rebaseline_after=0.5)


@pytest.fixture(scope="module")
def alarm_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"flow": settings.flow.model_copy(update={"window_s": 2.0})})


def _alarms(records: list[KafkaRecord]) -> list[dict[str, Any]]:
    return sorted(
        (msgspec.json.decode(r.value) for r in records if r.topic == "twin.alarms"),
        key=lambda alarm: alarm["msg_id"],
    )


def test_alarms_are_identical_under_one_and_two_workers(
    alarm_settings: Settings, model: TwinModel, raw_input: dict[int, list[InputMessage]]
) -> None:
    one_rows, one_records = _run(
        alarm_settings, model, raw_input, workers=1, detector=ALARM_DETECTOR
    )
    two_rows, two_records = _run(
        alarm_settings, model, raw_input, workers=2, detector=ALARM_DETECTOR
    )
    alarms = _alarms(one_records)
    assert _alarms(two_records) == alarms
    assert {alarm["event"] for alarm in alarms} == {"raised", "cleared", "rebaselined"}
    schema = json.loads((ROOT / "schemas" / "json" / "alarm.v1.schema.json").read_text())
    for alarm in alarms:
        jsonschema.validate(alarm, schema)
    one, two = _canonical(_frames(one_rows)), _canonical(_frames(two_rows))
    assert two["alarms"] == one["alarms"]
    assert two["twin_state"] == one["twin_state"]
    # The table holds what the topic carries, one row per transition.
    table = _frames(one_rows)["alarms"]
    assert sorted(zip(table["alarm_id"], table["event"], strict=True)) == sorted(
        (alarm["alarm_id"], alarm["event"]) for alarm in alarms
    )
    # A state says ALARM exactly while it names an active alarm.
    states = [msgspec.json.decode(r.value) for r in one_records if r.topic == "twin.state"]
    assert any(state["active_alarms"] for state in states)
    assert all(
        (state["status"] == "ALARM") == any("@" in a.split("/")[0] for a in state["active_alarms"])
        for state in states
    )


# Predictive maintenance needs hours of event time: 40 hours of 4 machines read once a
# minute (a day to learn, then pump-001 wears out within about 14 hours).
HOUR_S = 3600.0


@pytest.fixture(scope="module")
def wear_input(model: TwinModel) -> dict[int, list[InputMessage]]:
    entities = 4
    sensors = sum(len(model.sensors_of(e.id)) for e in model.entities[:entities])
    scenario = Scenario(
        model,
        ScenarioConfig(
            start_ms=START_MS,
            duration_s=40 * HOUR_S,
            rate=sensors / 60.0,
            entities=entities,
            seed=5,
            faults=FaultPlan(process_fault_share=0.0, sensor_fault_share=0.0),
            daily_load=0.15,
            degradation=DegradationPlan(
                entity_ids=("pump-001",),
                min_ramp_s=12 * HOUR_S,
                max_ramp_s=14 * HOUR_S,
                warmup_s=25 * HOUR_S,
            ),
        ),
    )
    encoder = MessageEncoder(model, DataFaultPlan(), seed=5)
    return _partitioned(scenario, encoder)


def test_maintenance_forecasts_are_identical_under_one_and_two_workers(
    settings: Settings, model: TwinModel, wear_input: dict[int, list[InputMessage]]
) -> None:
    one_rows, one_records = _run(settings, model, wear_input, workers=1)
    two_rows, two_records = _run(settings, model, wear_input, workers=2)
    pieces_rows, _ = _run(settings, model, wear_input, workers=1, batch=7)
    one = _canonical(_frames(one_rows))
    assert _canonical(_frames(two_rows)) == one
    assert _canonical(_frames(pieces_rows)) == one
    forecasts = _frames(one_rows)["forecasts"]
    assert set(forecasts["entity"]) == {"pump-001"}  # the one that wears
    assert "vibration_rms" in set(forecasts["sensor"])
    due = [a for a in _alarms(one_records) if a["kind"] == "maintenance_due"]
    assert due and due[0]["entity_id"] == "pump-001" and due[0]["event"] == "raised"
    assert due[0]["forecast"]["sensor"] == "vibration_rms"
    assert _alarms(two_records) == _alarms(one_records)
    schema = json.loads((ROOT / "schemas" / "json" / "twin_state.v1.schema.json").read_text())
    states = [msgspec.json.decode(r.value) for r in one_records if r.topic == "twin.state"]
    told = [s for s in states if s["forecasts"]]
    assert told and all(s["entity_id"] == "pump-001" for s in told)
    for state in told[-3:]:
        jsonschema.validate(state, schema)
