"""The twins of one Kafka partition: raw messages in, clean readings and twin facts out.

Kafka keys raw messages by entity, so every entity lives in exactly one partition and
one :class:`PartitionTwins` holds everything about it: cleaning histories, open
windows, its anomaly model and its status. The flow calls :meth:`PartitionTwins.step`
with a whole batch of messages (per-message work is plain Python on small structs; the
per-item cost of a Bytewax operator is paid once per batch). Results never depend on
where a batch starts or ends.

Decisions that could differ on a replay are tied to the message, not the clock: the
time checks compare a reading's timestamp with the Kafka timestamp of its message.
Only idleness (closing the windows of a silent entity, STALE) uses system time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from schemas import deadletter
from schemas.outputs import (
    Anomaly,
    Counts,
    Flag,
    LateReading,
    SensorState,
    SensorWindow,
    TwinState,
)
from schemas.raw import Reason, SchemaError, decode_raw
from twinflow.cleaning import SensorHistory, quality_flags
from twinflow.detection import DetectorConfig, EntityDetector
from twinflow.settings import FlowSettings
from twinflow.state import StatusMachine
from twinflow.twin_model import TwinModel
from twinflow.windows import EntityWindows

_BAD_QUALITY = frozenset({"bad", "uncertain"})


@dataclass(frozen=True, slots=True)
class InputMessage:
    """One Kafka message of ``twin.raw``, with its coordinates."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes

    def dead_letter(
        self, reason: Reason, detail: str, entity_id: str | None = None
    ) -> deadletter.DeadLetter:
        """The message as a dead letter, with its Kafka coordinates."""
        return deadletter.dead_letter(
            self.value,
            reason,
            detail,
            deadletter.Source(
                kind="kafka", topic=self.topic, partition=self.partition, offset=self.offset
            ),
            # The message's Kafka time, not the clock: a replay rebuilds the same letter.
            datetime.fromtimestamp(self.timestamp_ms / 1000, UTC),
            entity_id=entity_id,
        )


@dataclass(slots=True)
class ReadingColumns:
    """Clean readings, column by column (cheap to turn into a DataFrame)."""

    entity: list[str] = field(default_factory=list)
    sensor: list[str] = field(default_factory=list)
    ts_ms: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ts_ms)


@dataclass(slots=True)
class StepOutput:
    """Everything one step produced."""

    readings: ReadingColumns = field(default_factory=ReadingColumns)
    windows: list[SensorWindow] = field(default_factory=list)
    states: list[TwinState] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    late: list[LateReading] = field(default_factory=list)
    dead_letters: list[deadletter.DeadLetter] = field(default_factory=list)


@dataclass
class EntityTwin:
    """Everything the flow keeps about one entity."""

    entity_id: str
    windows: EntityWindows
    detector: EntityDetector
    machine: StatusMachine = field(default_factory=StatusMachine)
    histories: dict[str, SensorHistory] = field(default_factory=dict)
    seen: set[tuple[str, int]] = field(default_factory=set)
    sensors: dict[str, SensorState] = field(default_factory=dict)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(Counts.__struct_fields__, 0)
    )
    last_score: float | None = None
    last_threshold: float | None = None
    last_window_end_ms: int | None = None
    last_seen_wall_ms: int | None = None
    """System time of its last reading; None right after a restore (then: now)."""


class PartitionTwins:
    """The state of one partition's step: picklable, so recovery can snapshot it."""

    def __init__(self, model: TwinModel, flow: FlowSettings, detector: DetectorConfig) -> None:
        self.model = model
        self.flow = flow
        self.detector_config = detector
        self.entities: dict[str, EntityTwin] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # After a restore the silence clock restarts: a restart is not the entities'
        # silence, and closing their windows now would turn the replay into late data.
        self.__dict__.update(state)
        for twin in self.entities.values():
            twin.last_seen_wall_ms = None

    def step(self, messages: Sequence[InputMessage], now_ms: int) -> StepOutput:
        """Process a batch of one partition's messages, in offset order."""
        out = StepOutput()
        for message in messages:
            entity_id = self._message(message, now_ms, out)
            if entity_id is not None:
                # Close after every message, not once per batch: what is late then
                # depends on the entity's message order only, which Kafka fixes, and
                # not on where batches happen to start and end.
                twin = self.entities[entity_id]
                self._emit_closed(twin, twin.windows.close_due(), out)
        self._idle(now_ms, out)
        return out

    def _twin(self, entity_id: str) -> EntityTwin:
        twin = self.entities.get(entity_id)
        if twin is None:
            twin = EntityTwin(
                entity_id=entity_id,
                windows=EntityWindows(
                    entity_id=entity_id,
                    length_ms=int(self.flow.window_s * 1000),
                    lateness_ms=int(self.flow.allowed_lateness_s * 1000),
                ),
                detector=EntityDetector(self.detector_config),
            )
            self.entities[entity_id] = twin
        return twin

    def _message(self, message: InputMessage, now_ms: int, out: StepOutput) -> str | None:
        try:
            raw = decode_raw(message.value)
        except SchemaError as exc:
            self._reject(message, exc.reason, exc.detail, None, out)
            return None
        entity = self.model.by_id.get(raw.entity_id)
        if entity is None:
            self._reject(message, Reason.UNKNOWN_ENTITY, f"no entity {raw.entity_id!r}", None, out)
            return None
        twin = self._twin(entity.id)
        twin.last_seen_wall_ms = now_ms
        ts_ms = raw.ts_ms
        reference = message.timestamp_ms
        if ts_ms > reference + self.flow.max_future_s * 1000:
            self._reject(message, Reason.TS_IN_FUTURE, f"ts {ts_ms} ms", twin, out)
            return entity.id
        if ts_ms < reference - self.flow.max_age_s * 1000:
            self._reject(message, Reason.TS_TOO_OLD, f"ts {ts_ms} ms", twin, out)
            return entity.id
        specs = self.model.asset_types[entity.type].sensors
        source_bad = Flag.SOURCE_BAD if raw.quality in _BAD_QUALITY else 0
        for sensor, value, unit in raw.readings():
            spec = specs.get(sensor)
            if spec is None:
                self._reject(message, Reason.UNKNOWN_SENSOR, f"sensor {sensor!r}", twin, out)
                continue
            conversion = spec.conversion(unit)
            if conversion is None:
                self._reject(
                    message, Reason.BAD_UNIT, f"{sensor}: unit {unit!r} not accepted", twin, out
                )
                continue
            canonical = conversion.to_canonical(value)
            low, high = spec.range
            if not low <= canonical <= high:
                self._reject(
                    message,
                    Reason.OUT_OF_RANGE,
                    f"{sensor}={canonical:g} {spec.unit} outside [{low:g}, {high:g}]",
                    twin,
                    out,
                )
                continue
            # A repeated message repeats its timestamps; a restarted publisher may repeat
            # its message numbers (seq) but not its timestamps.
            key = (sensor, ts_ms)
            if key in twin.seen:
                twin.counts["duplicates"] += 1
                continue
            history = twin.histories.setdefault(sensor, SensorHistory())
            flags = quality_flags(spec, history, ts_ms, canonical) | source_bad
            if unit is not None and unit != spec.unit:
                flags |= Flag.CONVERTED
            out.readings.entity.append(entity.id)
            out.readings.sensor.append(sensor)
            out.readings.ts_ms.append(ts_ms)
            out.readings.value.append(canonical)
            out.readings.flags.append(flags)
            twin.counts["readings"] += 1
            twin.counts["flagged"] += flags != 0
            if not twin.windows.add(sensor, ts_ms, canonical, flags):
                twin.counts["late"] += 1
                out.late.append(
                    LateReading(
                        msg_id=f"{entity.id}/{sensor}@{ts_ms}",
                        entity_id=entity.id,
                        sensor=sensor,
                        ts_ms=ts_ms,
                        value=canonical,
                        watermark_ms=twin.windows.watermark_ms,
                        topic=message.topic,
                        partition=message.partition,
                        offset=message.offset,
                    )
                )
                continue
            twin.seen.add(key)
            latest = twin.sensors.get(sensor)
            if latest is None or ts_ms >= latest.ts_ms:
                twin.sensors[sensor] = SensorState(canonical, ts_ms, flags, spec.unit)
        return entity.id

    def _reject(
        self,
        message: InputMessage,
        reason: Reason,
        detail: str,
        twin: EntityTwin | None,
        out: StepOutput,
    ) -> None:
        if twin is not None:
            twin.counts["dead_letters"] += 1
        out.dead_letters.append(
            message.dead_letter(reason, detail, twin.entity_id if twin is not None else None)
        )

    def _emit_closed(
        self,
        twin: EntityTwin,
        closed: list[tuple[int, dict[str, SensorWindow]]],
        out: StepOutput,
    ) -> None:
        for start, windows in closed:
            end = start + twin.windows.length_ms
            twin.seen = {key for key in twin.seen if key[1] >= end}
            if not windows:
                continue
            out.windows.extend(windows.values())
            twin.counts["windows"] += 1
            detection = twin.detector.process_window(windows)
            twin.last_score, twin.last_threshold = detection.score, detection.threshold
            if detection.is_anomaly:
                twin.counts["anomalies"] += 1
                out.anomalies.append(
                    detection.to_anomaly(
                        entity_id=twin.entity_id,
                        window_start_ms=start,
                        window_end_ms=end,
                        msg_id=f"{twin.entity_id}@{start}",
                    )
                )
            count = sum(window.count for window in windows.values())
            flagged = sum(window.flagged for window in windows.values())
            ratio = (
                detection.score / detection.threshold
                if detection.threshold and not detection.warming_up
                else None
            )
            twin.machine.window(detection.is_anomaly, ratio, flagged / max(count, 1))
            twin.last_window_end_ms = end
            out.states.append(self._state(twin, end, f"{twin.entity_id}@{end}"))

    def _idle(self, now_ms: int, out: StepOutput) -> None:
        idle_ms = self.flow.idle_close_s * 1000
        stale_ms = self.flow.stale_after_s * 1000
        for twin in self.entities.values():
            if twin.last_seen_wall_ms is None:
                twin.last_seen_wall_ms = now_ms
                continue
            silent_ms = now_ms - twin.last_seen_wall_ms
            if silent_ms >= idle_ms and twin.windows.open:
                self._emit_closed(twin, twin.windows.close_due(idle=True), out)
            if silent_ms >= stale_ms and twin.machine.stale():
                # Its own event time (newest reading + the silence that made it stale),
                # so the STALE row never replaces the last real state in twin_state.
                at = int(twin.windows.newest_ms + stale_ms)
                out.states.append(self._state(twin, at, f"{twin.entity_id}@{at}/stale"))

    def _state(self, twin: EntityTwin, ts_ms: int, msg_id: str) -> TwinState:
        latest = {sensor: state.value for sensor, state in twin.sensors.items()}
        derived = self.model.asset_types[self.model.by_id[twin.entity_id].type].derived
        return TwinState(
            msg_id=msg_id,
            entity_id=twin.entity_id,
            ts_ms=ts_ms,
            status=twin.machine.status,
            health=twin.machine.health,
            anomaly_score=twin.last_score,
            threshold=twin.last_threshold,
            sensors=dict(sorted(twin.sensors.items())),
            derived={name: metric.evaluate(latest) for name, metric in derived.items()},
            counts=msgspec.convert(twin.counts, Counts),
        )
