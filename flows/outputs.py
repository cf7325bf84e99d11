"""What one step's output becomes: QuestDB rows per table and Kafka records per topic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from connectors.kafka import KafkaRecord
from connectors.questdb import TableBatch
from connectors.questdb_sink import table_frame
from schemas import deadletter, outputs
from schemas.outputs import COUNTS, WINDOW_FEATURES
from schemas.raw import Reason
from schemas.transport import InputMessage
from twinflow.settings import TopicSettings
from twinflow.tables import Tables
from twinflow.twin import StepOutput


def table_batches(out: StepOutput, tables: Tables) -> list[TableBatch]:
    """Rows for every table the flow writes but deadletters (see :func:`deadletter_batches`)."""
    batches = []
    if len(out.readings):
        readings = out.readings
        batches.append(
            table_frame(
                tables.readings,
                {
                    "ts": readings.ts_ms,
                    "entity": readings.entity,
                    "sensor": readings.sensor,
                    "value": readings.value,
                    "flags": readings.flags,
                },
            )
        )
    if out.windows:
        windows = out.windows
        batches.append(
            table_frame(
                tables.sensor_windows,
                {
                    "ts": [w.window_start_ms for w in windows],
                    "entity": [w.entity_id for w in windows],
                    "sensor": [w.sensor for w in windows],
                    "window_end": [w.window_end_ms for w in windows],
                    **{name: [getattr(w, name) for w in windows] for name in WINDOW_FEATURES},
                    "flagged": [w.flagged for w in windows],
                },
            )
        )
    if out.states:
        states = out.states
        batches.append(
            table_frame(
                tables.twin_state,
                {
                    "ts": [s.ts_ms for s in states],
                    "entity": [s.entity_id for s in states],
                    "status": [s.status.value for s in states],
                    "health": [s.health for s in states],
                    "anomaly_score": [s.anomaly_score for s in states],
                    "threshold": [s.threshold for s in states],
                    **{name: [getattr(s.counts, name) for s in states] for name in COUNTS},
                    "active_alarms": [",".join(s.active_alarms) for s in states],
                    **_nearest_limits(states),
                },
            )
        )
    if out.anomalies:
        anomalies = out.anomalies
        batches.append(
            table_frame(
                tables.anomalies,
                {
                    "ts": [a.window_start_ms for a in anomalies],
                    "entity": [a.entity_id for a in anomalies],
                    "window_end": [a.window_end_ms for a in anomalies],
                    "score": [a.score for a in anomalies],
                    "threshold": [a.threshold for a in anomalies],
                    "model": [a.model for a in anomalies],
                    "top_sensors": [_top_sensors(a.contributions) for a in anomalies],
                    "explanation": [_explanation(a.contributions) for a in anomalies],
                },
            )
        )
    if out.alarms:
        alarms = out.alarms
        batches.append(
            table_frame(
                tables.alarms,
                {
                    "ts": [a.ts_ms for a in alarms],
                    "entity": [a.entity_id for a in alarms],
                    "alarm_id": [a.alarm_id for a in alarms],
                    "kind": [a.kind.value for a in alarms],
                    "event": [a.event.value for a in alarms],
                    "active": [a.active for a in alarms],
                    "start": [a.start_ms for a in alarms],
                    "end": [a.end_ms for a in alarms],
                    "peak_score": [a.peak_score for a in alarms],
                    "threshold": [a.threshold for a in alarms],
                    "anomalous_windows": [a.anomalous_windows for a in alarms],
                    "top_sensors": [_top_sensors(a.contributions) for a in alarms],
                    "explanation": [_explanation(a.contributions) for a in alarms],
                    "acknowledged": [a.acknowledged for a in alarms],
                    "verdict": [a.verdict.value if a.verdict else None for a in alarms],
                    "operator": [a.operator for a in alarms],
                    "note": [a.note for a in alarms],
                    "time_to_limit_s": [a.forecast and a.forecast.time_to_limit_s for a in alarms],
                    "time_to_limit_low_s": [
                        a.forecast and a.forecast.time_to_limit_low_s for a in alarms
                    ],
                    "time_to_limit_high_s": [
                        a.forecast and a.forecast.time_to_limit_high_s for a in alarms
                    ],
                },
            )
        )
    if out.setpoints:
        changes = out.setpoints
        batches.append(
            table_frame(
                tables.setpoints,
                {
                    "ts": [c.ts_ms for c in changes],
                    "entity": [c.entity_id for c in changes],
                    "setpoint": [c.setpoint for c in changes],
                    "status": [c.state.status.value if c.state.status else None for c in changes],
                    "desired": [_number(c.state.desired) for c in changes],
                    "reported": [_number(c.state.reported) for c in changes],
                    "command_id": [c.state.command_id for c in changes],
                    "expires": [c.state.expires_ms for c in changes],
                    "detail": [c.state.detail for c in changes],
                },
            )
        )
    if out.forecasts:
        made = [forecast for _, forecast in out.forecasts]
        batches.append(
            table_frame(
                tables.forecasts,
                {
                    "ts": [f.ts_ms for f in made],
                    "entity": [entity for entity, _ in out.forecasts],
                    "sensor": [f.sensor for f in made],
                    "limit": [f.limit for f in made],
                    "limit_value": [f.limit_value for f in made],
                    "level": [f.level for f in made],
                    "slope_per_h": [f.slope_per_h for f in made],
                    "time_to_limit_s": [f.time_to_limit_s for f in made],
                    "time_to_limit_low_s": [f.time_to_limit_low_s for f in made],
                    "time_to_limit_high_s": [f.time_to_limit_high_s for f in made],
                    "crossing": [f.crossing_ms() for f in made],
                    "since": [f.since_ms for f in made],
                },
            )
        )
    return batches


def _nearest_limits(states: Sequence[outputs.TwinState]) -> dict[str, list[Any]]:
    """Per state, the forecast with the smallest lower bound of time to limit, if any."""
    nearest = [
        min(s.forecasts.values(), key=lambda f: f.time_to_limit_low_s, default=None) for s in states
    ]
    return {
        "limit_sensor": [f and f.sensor for f in nearest],
        "time_to_limit_s": [f and f.time_to_limit_s for f in nearest],
        "time_to_limit_low_s": [f and f.time_to_limit_low_s for f in nearest],
    }


def _number(value: float | bool | None) -> float | None:
    return None if value is None else float(value)


def _top_sensors(contributions: list[outputs.Contribution]) -> str:
    """The sensors that explain a score, largest weight first, each once."""
    return ",".join(dict.fromkeys(c.sensor for c in contributions))


def _explanation(contributions: list[outputs.Contribution]) -> str:
    return msgspec.json.encode(contributions).decode()


def kafka_records(out: StepOutput, topics: TopicSettings) -> list[KafkaRecord]:
    """Messages for twin.state, twin.anomalies, twin.alarms, twin.late and twin.deadletter."""
    records = [
        KafkaRecord(topics.state, state.entity_id.encode(), outputs.encode(state))
        for state in out.states
    ]
    records.extend(
        KafkaRecord(topics.anomalies, anomaly.entity_id.encode(), outputs.encode(anomaly))
        for anomaly in out.anomalies
    )
    records.extend(
        KafkaRecord(topics.alarms, alarm.entity_id.encode(), outputs.encode(alarm))
        for alarm in out.alarms
    )
    records.extend(
        KafkaRecord(topics.late, late.entity_id.encode(), outputs.encode(late)) for late in out.late
    )
    records.extend(
        KafkaRecord(
            topics.deadletter,
            (letter.entity_id or letter.source.topic or "").encode(),
            deadletter.encode(letter),
        )
        for letter in out.dead_letters
    )
    return records


_letters = msgspec.json.Decoder(deadletter.DeadLetter)


def deadletter_batches(messages: Sequence[InputMessage], tables: Tables) -> list[TableBatch]:
    """Rows for the deadletters table from messages of twin.deadletter.

    Dead letters come from every bridge and from the flow itself; the table mirrors
    the topic. A message that is not a dead letter is kept as one, never dropped.
    """
    letters = []
    for message in messages:
        try:
            letters.append(_letters.decode(message.value))
        except msgspec.DecodeError as exc:
            letters.append(message.dead_letter(Reason.SCHEMA, f"not a dead letter: {exc}"))
    if not letters:
        return []
    return [
        table_frame(
            tables.deadletters,
            {
                "ts": [int(letter.received_at.timestamp() * 1000) for letter in letters],
                "reason": [letter.reason.value for letter in letters],
                "source_kind": [letter.source.kind for letter in letters],
                "source": [letter.source.topic or letter.source.node or "" for letter in letters],
                "kafka_partition": [_minus_one(letter.source.partition) for letter in letters],
                "kafka_offset": [_minus_one(letter.source.offset) for letter in letters],
                "entity": [letter.entity_id for letter in letters],
                "detail": [letter.detail for letter in letters],
                "payload_size": [letter.payload_size for letter in letters],
                "payload_sha256": [letter.payload_sha256 for letter in letters],
                "payload_excerpt": [letter.payload_excerpt for letter in letters],
            },
        )
    ]


def _minus_one(value: int | None) -> int:
    return -1 if value is None else value
