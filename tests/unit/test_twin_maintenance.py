"""Predictive maintenance inside the twins of a partition: forecasts, state, alarm, tables."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from flows.outputs import table_batches
from schemas.control import Feedback, Verdict
from schemas.outputs import AlarmEvent, AlarmKind
from schemas.transport import ControlBatch, ControlMessage, InputMessage
from twinflow.detection import DetectorConfig
from twinflow.settings import load_settings
from twinflow.tables import tables
from twinflow.twin import PartitionTwins, StepOutput
from twinflow.twin_model import load_twin_model

MODEL = load_twin_model(
    Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
)
START = 1_793_000_000_000
MINUTE_MS = 60_000
RAMP_FROM_MIN = 24 * 60
"""A day of a healthy pump (learned first), then its bearing wears: +0.2 mm/s an hour."""


def _message(minute: int, noise: float) -> InputMessage:
    ts = START + minute * MINUTE_MS
    wear = max(minute - RAMP_FROM_MIN, 0) / 60 * 0.2
    body = {
        "entity_id": "pump-001",
        "ts": ts,
        "values": {"vibration_rms": 2.5 + wear + noise, "bearing_temp": 50.0 + 10 * noise},
    }
    return InputMessage("twin.raw", 0, minute, ts, msgspec.json.encode(body))


def _run(minutes: int, batch: int) -> tuple[PartitionTwins, StepOutput]:
    noise = np.random.default_rng(1).normal(0.0, 0.05, minutes)
    messages = [_message(m, float(noise[m])) for m in range(minutes)]
    twins = PartitionTwins(MODEL, load_settings().flow, DetectorConfig())
    joined = StepOutput()
    for first in range(0, minutes, batch):
        out = twins.step(messages[first : first + batch], 0)
        joined.alarms += out.alarms
        joined.states += out.states
        joined.forecasts += out.forecasts
    return twins, joined


def test_a_wearing_pump_is_forecast_and_due_for_maintenance() -> None:
    twins, out = _run(36 * 60, 500)
    forecasts = [f for entity, f in out.forecasts if entity == "pump-001"]
    assert forecasts and {f.sensor for f in forecasts} == {"vibration_rms"}
    assert all(f.limit == "alarm_high" and f.limit_value == 7.1 for f in forecasts)
    assert all(f.ts_ms > START + RAMP_FROM_MIN * MINUTE_MS for f in forecasts)
    due = [a for a in out.alarms if a.kind is AlarmKind.MAINTENANCE_DUE]
    assert [a.event for a in due] == [AlarmEvent.RAISED]
    assert due[0].forecast is not None and due[0].forecast.sensor == "vibration_rms"
    # The state tells the latest forecast from its own time, and lists the alarm.
    state = out.states[-1]
    told = state.forecasts["vibration_rms"]
    made = twins.entities["pump-001"].maintenance.forecasts["vibration_rms"]
    assert told.ts_ms == state.ts_ms >= made.ts_ms
    assert told.crossing_ms() == made.crossing_ms()
    assert due[0].alarm_id in state.active_alarms
    # The anomaly model alarms on its own; the counts hold both kinds.
    raised = sum(a.event is AlarmEvent.RAISED for a in out.alarms)
    assert state.counts.alarms == raised


def test_forecasts_do_not_depend_on_how_the_messages_were_batched() -> None:
    _, whole = _run(30 * 60, 2000)
    _, pieces = _run(30 * 60, 7)
    assert whole.forecasts and whole.forecasts == pieces.forecasts
    assert whole.alarms == pieces.alarms


def test_a_verdict_reaches_the_maintenance_alarm() -> None:
    twins, out = _run(36 * 60, 500)
    (raised,) = [a for a in out.alarms if a.kind is AlarmKind.MAINTENANCE_DUE]
    verdict = Feedback(
        feedback_id="f1",
        alarm_id=raised.alarm_id,
        entity_id="pump-001",
        verdict=Verdict.REJECT,
        user="ann",
        ts_ms=0,
        note="new bearing fitted",
    )
    at = START + (36 * 60 - 1) * MINUTE_MS  # with the last reading: the merge takes it
    after = twins.step(ControlBatch((ControlMessage("twin.feedback", 0, at, verdict),), at), 0)
    assert [(a.kind, a.event) for a in after.alarms] == [
        (AlarmKind.MAINTENANCE_DUE, AlarmEvent.REJECTED)
    ]
    assert twins.entities["pump-001"].maintenance.forecasts == {}


def test_forecasts_become_rows() -> None:
    _, out = _run(36 * 60, 500)
    batches = {batch.spec.name: batch for batch in table_batches(out, tables("t_"))}
    rows = batches["t_forecasts"]
    assert len(rows.frame) == len(out.forecasts)
    assert set(rows.frame["sensor"]) == {"vibration_rms"}
    states = batches["t_twin_state"].frame
    assert states["limit_sensor"].iloc[-1] == "vibration_rms"
    assert 0 < states["time_to_limit_low_s"].iloc[-1] <= states["time_to_limit_s"].iloc[-1]
