"""What people do through the back channel: list and judge alarms, command machines.

- Alarms are read from QuestDB's ``alarms`` table (one row per transition) and folded
  into one line per alarm. A verdict is checked there first (the alarm exists and is
  still active), then sent to ``twin.feedback``; the flow applies it.
- A command is checked against the twin model (entity, setpoint, type, range) before
  anything is sent to ``twin.commands``; waiting for it follows ``twin.state`` until the
  twin reports the setpoint in sync, failed or expired.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from connectors.kafka import client_config, ensure_topics, reliable_producer
from connectors.questdb import QuestDBHttp
from schemas import control
from schemas.outputs import AlarmEvent, SetpointState, SetpointStatus, TwinState
from twinflow.errors import ConfigError, TwinflowError
from twinflow.settings import Settings
from twinflow.tables import tables
from twinflow.topics import control_topics
from twinflow.twin_model import TwinModel

_ALARM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/maintenance_due)?@\d+$")
_ENTITY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENDINGS = frozenset({AlarmEvent.CLEARED, AlarmEvent.REBASELINED, AlarmEvent.REJECTED})
# Transitions of one alarm can share an event time (a verdict takes the time of the
# alarm's latest window): folded in the order they can happen.
_ORDER = {
    AlarmEvent.RAISED: 0,
    AlarmEvent.ACKNOWLEDGED: 1,
    AlarmEvent.CONFIRMED: 2,
    AlarmEvent.CLEARED: 3,
    AlarmEvent.REBASELINED: 3,
    AlarmEvent.REJECTED: 3,
}
_DELIVERY_TIMEOUT_S = 30.0
_ALARM_COLUMNS = (
    'alarm_id, entity, event, ts, start, "end", peak_score, top_sensors, '
    "acknowledged, verdict, operator, note, kind"
)


class RefusedError(TwinflowError):
    """The request was checked and refused; nothing was sent."""


@dataclass(frozen=True, slots=True)
class AlarmRow:
    """One transition as the ``alarms`` table holds it."""

    alarm_id: str
    entity_id: str
    event: AlarmEvent
    ts: str
    start: str
    end: str | None
    peak_score: float
    top_sensors: str
    acknowledged: bool
    verdict: str | None
    operator: str | None
    note: str | None
    kind: str = "anomaly"


@dataclass(frozen=True, slots=True)
class AlarmSummary:
    """One alarm: its transitions folded."""

    alarm_id: str
    entity_id: str
    start: str
    last_event: str
    last_ts: str
    active: bool
    end: str | None
    peak_score: float
    top_sensors: str
    acknowledged: bool
    verdict: str | None
    operator: str | None
    note: str | None
    kind: str = "anomaly"
    """``anomaly`` or ``maintenance_due``."""


def fold_alarms(rows: Iterable[AlarmRow]) -> list[AlarmSummary]:
    """One summary per alarm, oldest first.

    >>> raised = AlarmRow("p@1", "p", AlarmEvent.RAISED, "t1", "t0", None, 5.0, "flow",
    ...                   False, None, None, None)
    >>> ack = AlarmRow("p@1", "p", AlarmEvent.ACKNOWLEDGED, "t1", "t0", None, 5.0, "flow",
    ...                True, None, "ann", "on it")
    >>> [(a.last_event, a.active, a.acknowledged, a.operator) for a in fold_alarms([ack, raised])]
    [('acknowledged', True, True, 'ann')]
    """
    folded: dict[str, AlarmSummary] = {}
    for row in sorted(rows, key=lambda r: (r.ts, _ORDER[r.event])):
        before = folded.get(row.alarm_id)
        folded[row.alarm_id] = AlarmSummary(
            alarm_id=row.alarm_id,
            entity_id=row.entity_id,
            start=row.start,
            last_event=row.event.value,
            last_ts=row.ts,
            active=row.event not in _ENDINGS,
            end=row.end,
            peak_score=max(row.peak_score, before.peak_score if before else row.peak_score),
            top_sensors=row.top_sensors,
            acknowledged=row.acknowledged or bool(before and before.acknowledged),
            verdict=row.verdict or (before.verdict if before else None),
            operator=row.operator or (before.operator if before else None),
            note=row.note or (before.note if before else None),
            kind=row.kind,
        )
    return sorted(folded.values(), key=lambda a: (a.start, a.alarm_id))


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def alarm_rows(
    settings: Settings, *, entity_id: str | None = None, alarm_id: str | None = None
) -> list[AlarmRow]:
    """The transitions in QuestDB, of one entity or one alarm if given."""
    where = []
    if entity_id is not None:
        if not _ENTITY_ID.match(entity_id):
            raise ConfigError(f"--entity {entity_id!r} is not an entity id")
        where.append(f"entity = {_quoted(entity_id)}")
    if alarm_id is not None:
        where.append(f"alarm_id = {_quoted(alarm_id)}")
    table = tables(settings.questdb.table_prefix).alarms.name
    # Values are checked against the id patterns and quoted; the names come from code.
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    result = QuestDBHttp(settings.questdb).exec(
        f"SELECT {_ALARM_COLUMNS} FROM '{table}'{condition}"  # noqa: S608
    )
    return [
        AlarmRow(
            alarm_id=row[0],
            entity_id=row[1],
            event=AlarmEvent(row[2]),
            ts=row[3],
            start=row[4],
            end=row[5],
            peak_score=float(row[6]),
            top_sensors=row[7] or "",
            acknowledged=bool(row[8]),
            verdict=row[9],
            operator=row[10],
            note=row[11],
            kind=row[12] or "anomaly",
        )
        for row in result.rows
    ]


def list_alarms(
    settings: Settings, *, active_only: bool = False, entity_id: str | None = None
) -> list[AlarmSummary]:
    """The alarms QuestDB knows, folded; only the active ones if asked."""
    alarms = fold_alarms(alarm_rows(settings, entity_id=entity_id))
    return [alarm for alarm in alarms if alarm.active or not active_only]


def send_verdict(
    settings: Settings, alarm_id: str, verdict: control.Verdict, user: str, note: str = ""
) -> control.Feedback:
    """Check that ``alarm_id`` is an active alarm, then send the verdict on it."""
    if not _ALARM_ID.match(alarm_id):
        raise RefusedError(
            f"{alarm_id!r} is not an alarm id (<entity>@<start ms>, or "
            "<entity>/maintenance_due@<start ms>)"
        )
    alarms = fold_alarms(alarm_rows(settings, alarm_id=alarm_id))
    if not alarms:
        raise RefusedError(
            f"unknown alarm {alarm_id}: no such alarm in QuestDB (`twinflow alarms` lists them)"
        )
    alarm = alarms[0]
    if not alarm.active:
        raise RefusedError(
            f"alarm {alarm_id} has ended ({alarm.last_event} at {alarm.last_ts}); "
            "a verdict applies to an active alarm only"
        )
    feedback = control.Feedback(
        feedback_id=str(uuid.uuid4()),
        alarm_id=alarm_id,
        entity_id=alarm.entity_id,
        verdict=verdict,
        user=user,
        ts_ms=time.time_ns() // 1_000_000,
        note=note,
    )
    send(settings, settings.topics.feedback, feedback.entity_id, control.encode(feedback))
    return feedback


def make_command(
    model: TwinModel, entity_id: str, setpoint: str, text: str, user: str, expires_s: float
) -> control.Command:
    """A command for ``entity_id``, checked against the twin model (else RefusedError)."""
    entity = model.by_id.get(entity_id)
    if entity is None:
        raise RefusedError(f"no entity {entity_id!r} in the twin model")
    specs = model.setpoints_of(entity_id)
    spec = specs.get(setpoint)
    if spec is None:
        known = ", ".join(sorted(specs)) or "none"
        raise RefusedError(
            f"{entity_id} ({entity.type}) has no setpoint {setpoint!r}; its setpoints: {known}"
        )
    try:
        value = spec.parse(text)
    except ValueError as exc:
        raise RefusedError(f"{entity_id} {setpoint}: {exc}") from None
    if expires_s <= 0:
        raise RefusedError(f"--expires must be positive, got {expires_s:g}")
    now_ms = time.time_ns() // 1_000_000
    return control.Command(
        command_id=str(uuid.uuid4()),
        entity_id=entity_id,
        setpoint=setpoint,
        value=value,
        issued_ms=now_ms,
        expires_ms=now_ms + int(expires_s * 1000),
        user=user,
    )


def send_command(settings: Settings, command: control.Command) -> None:
    """Write ``command`` to ``twin.commands``."""
    send(settings, settings.topics.commands, command.entity_id, control.encode(command))


def state_follower(settings: Settings) -> Consumer:
    """A consumer at the end of ``twin.state``: what the flow emits from now on.

    Opened before a command is sent, so no state emitted after it is missed.
    """
    consumer = Consumer(
        client_config(
            settings.kafka,
            **{"group.id": f"twinflow-command-{uuid.uuid4()}", "enable.auto.commit": False},
        )
    )
    topic = settings.topics.state
    metadata = consumer.list_topics(topic, timeout=30).topics.get(topic)
    if metadata is None or metadata.error is not None:
        consumer.close()
        raise TwinflowError(f"topic {topic} does not exist: is `twinflow run` running?")
    partitions = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
    ends = []
    for partition in partitions:
        _low, high = consumer.get_watermark_offsets(partition, timeout=10)
        ends.append(TopicPartition(topic, partition.partition, high))
    consumer.assign(ends or [TopicPartition(topic, 0, OFFSET_END)])
    return consumer


def wait_for_command(
    consumer: Consumer, command: control.Command, timeout_s: float
) -> SetpointState | None:
    """The setpoint's state once the twin shows the command settled.

    Settled: in sync, failed or expired. When ``timeout_s`` runs out first: the latest
    state of it seen (None if none).
    """
    decoder = msgspec.json.Decoder(TwinState)
    deadline = time.monotonic() + timeout_s
    latest: SetpointState | None = None
    while time.monotonic() < deadline:
        message = consumer.poll(min(0.5, max(0.0, deadline - time.monotonic())))
        if message is None:
            continue
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                continue
            raise TwinflowError(f"reading twin.state failed: {error}")
        if message.key() != command.entity_id.encode():
            continue
        state = decoder.decode(message.value() or b"{}")
        setpoint = state.setpoints.get(command.setpoint)
        if setpoint is None or setpoint.command_id != command.command_id:
            continue
        latest = setpoint
        if setpoint.status is not SetpointStatus.PENDING:
            return setpoint
    return latest


def send(settings: Settings, topic: str, key: str, value: bytes) -> None:
    """Write one back-channel message, acknowledged by all in-sync replicas, or raise."""
    ensure_topics(settings.kafka, control_topics(settings.topics))
    producer = reliable_producer(settings.kafka)
    failures: list[str] = []

    def delivered(error: KafkaError | None, _message: object) -> None:
        if error is not None:
            failures.append(str(error))

    try:
        producer.produce(topic, value=value, key=key.encode(), on_delivery=delivered)
    except KafkaException as exc:
        raise TwinflowError(f"could not send to {topic}: {exc}") from None
    if producer.flush(_DELIVERY_TIMEOUT_S) or failures:
        reason = failures[0] if failures else f"not acknowledged in {_DELIVERY_TIMEOUT_S:g} s"
        raise TwinflowError(f"{topic} did not take the message: {reason}")


def table_rows(alarms: Sequence[AlarmSummary]) -> list[dict[str, object]]:
    """The alarms as plain dicts (``--json``)."""
    return [
        {field: getattr(alarm, field) for field in AlarmSummary.__dataclass_fields__}
        for alarm in alarms
    ]


def short_time(text: str | None) -> str:
    """A QuestDB timestamp as ``YYYY-MM-DD HH:MM:SS`` (UTC), for tables."""
    if not text:
        return "-"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")
