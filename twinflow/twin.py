"""The twins of one Kafka partition: raw messages in, clean readings and twin facts out.

Kafka keys raw messages by entity, so every entity lives in exactly one partition and
one :class:`PartitionTwins` holds everything about it: cleaning histories, open
windows, its anomaly model and alarms, and its status. The flow calls
:meth:`PartitionTwins.step` with a whole batch of messages. Only decoding is per
message; validation, duplicates, cleaning, lateness and windowing run on the batch's
readings as numpy columns, which is what lets one worker keep up with hundreds of
thousands of readings a second.

Results never depend on where a batch starts or ends: every decision is defined by the
order of an entity's messages, which Kafka fixes.

- An entity's watermark is its newest accepted reading time minus the allowed
  lateness. A reading is late when its window ends at or before the watermark as it
  stood before the reading's message (or before an idle close).
- A window closes at the first message whose watermark passes its end; the twin state
  emitted then carries the entity's counts as of that message and, per sensor, its
  newest reading before the window's end.

Decisions that could differ on a replay are tied to the message, not the clock: the
time checks compare a reading's timestamp with the Kafka timestamp of its message.
Only idleness (closing the windows of a silent entity, STALE) uses system time, and
only the time the flow was live: a gap between steps longer than
``MAX_STEP_GAP_MS`` (a restart, a broker or sink outage) is the pipeline's silence,
not the entity's, so an outage never closes windows whose readings are still coming.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas import control, deadletter
from schemas.outputs import (
    COUNTS,
    Alarm,
    Anomaly,
    Counts,
    Flag,
    LateReading,
    LimitForecast,
    SensorState,
    SensorWindow,
    SetpointChange,
    TwinState,
)
from schemas.raw import RawMessage, Reason, SchemaError, decode_raw
from schemas.transport import (
    CodedStrings,
    ControlBatch,
    ControlMessage,
    InputMessage,
    MessageBatch,
)
from twinflow.cleaning import SeriesCleaning, batch_parameters
from twinflow.detection import DetectorConfig, EntityMonitor
from twinflow.errors import TwinflowError
from twinflow.maintenance import MaintenanceConfig, MaintenanceMonitor
from twinflow.merge import Merge, RawRun
from twinflow.setpoints import Setpoint
from twinflow.settings import FlowSettings
from twinflow.state import StatusMachine
from twinflow.twin_model import SensorSpec, SetpointSpec, SetpointValue, TwinModel
from twinflow.windows import (
    ClosedSeriesWindow,
    Floats,
    Int64s,
    OpenWindows,
    WindowReadings,
    series_keys,
    window_features,
)

_BAD_QUALITY = frozenset({"bad", "uncertain"})
_MESSAGE_COUNTS = ("readings", "flagged", "duplicates", "late", "dead_letters")
_NEVER = np.iinfo(np.int64).min // 4
_ALWAYS = np.iinfo(np.int64).max // 4
MAX_STEP_GAP_MS = 5_000
"""The most one gap between steps adds to live time; sources tick every second."""


@dataclass(slots=True)
class ReadingColumns:
    """Clean readings, column by column (cheap to turn into a DataFrame)."""

    entity: CodedStrings = field(default_factory=lambda: CodedStrings.of([]))
    sensor: CodedStrings = field(default_factory=lambda: CodedStrings.of([]))
    ts_ms: Int64s = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    value: Floats = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    flags: Int64s = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ts_ms)


@dataclass(slots=True)
class StepOutput:
    """Everything one step produced."""

    readings: ReadingColumns = field(default_factory=ReadingColumns)
    windows: list[SensorWindow] = field(default_factory=list)
    states: list[TwinState] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    """Every window scored above its entity's threshold."""
    alarms: list[Alarm] = field(default_factory=list)
    """Every alarm transition (windows closing, operators judging), in the order made."""
    late: list[LateReading] = field(default_factory=list)
    dead_letters: list[deadletter.DeadLetter] = field(default_factory=list)
    setpoints: list[SetpointChange] = field(default_factory=list)
    """Every change of a setpoint's desired or reported value or status."""
    verdicts: dict[str, int] = field(default_factory=dict)
    """Operator verdicts taken here, by outcome (``applied``: it changed the alarm)."""
    forecasts: list[tuple[str, LimitForecast]] = field(default_factory=list)
    """Every time-to-limit forecast made (entity, forecast): one per sensor with a
    significant trend towards a limit, at the end of each bucket."""


@dataclass
class EntityTwin:
    """Everything the flow keeps about one entity (its readings live in the partition)."""

    entity_id: str
    index: int
    """Its row in the partition's entity columns."""
    monitor: EntityMonitor
    """Its anomaly model and alarm lifecycle."""
    maintenance: MaintenanceMonitor
    """Its sensors' trends, times to limit and maintenance alarm."""
    series: dict[str, int]
    """Series code of each sensor of its asset type."""
    machine: StatusMachine = field(default_factory=StatusMachine)
    sensors: dict[str, SensorState] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    newest_ms: int = -1
    """Newest accepted reading time."""
    closed_until_ms: int = _NEVER
    """Every window ending at or before this has closed."""
    last_score: float | None = None
    last_threshold: float | None = None
    last_seen_live_ms: int = 0
    """Live time (see :class:`PartitionTwins`) of its last message."""


@dataclass
class _Series:
    """Per-series constants as columns, indexed by series code."""

    entity: list[int] = field(default_factory=list)
    entity_id: list[str] = field(default_factory=list)
    sensor: list[str] = field(default_factory=list)
    specs: list[SensorSpec] = field(default_factory=list)
    columns: dict[str, npt.NDArray[Any]] | None = None

    def add(self, entity: int, entity_id: str, sensor: str, spec: SensorSpec) -> int:
        self.entity.append(entity)
        self.entity_id.append(entity_id)
        self.sensor.append(sensor)
        self.specs.append(spec)
        self.columns = None
        return len(self.entity) - 1

    def column(self, name: str) -> npt.NDArray[Any]:
        if self.columns is None:
            self.columns = {
                "entity": np.asarray(self.entity, dtype=np.int64),
                "entity_id": np.asarray(self.entity_id, dtype=object),
                "sensor": np.asarray(self.sensor, dtype=object),
                "low": np.asarray([s.range[0] for s in self.specs], dtype=np.float64),
                "high": np.asarray([s.range[1] for s in self.specs], dtype=np.float64),
            }
            for strings in ("entity_id", "sensor"):  # dictionary-encoded for the readings
                names, codes = np.unique(self.columns[strings], return_inverse=True)
                self.columns[f"{strings}_names"] = names
                self.columns[f"{strings}_code"] = codes.astype(np.int64)
            parameters = [batch_parameters(spec) for spec in self.specs]
            for k, parameter in enumerate(("max_rate", "stuck_after_ms", "spike_floor")):
                dtype = np.int64 if parameter == "stuck_after_ms" else np.float64
                self.columns[parameter] = np.asarray([p[k] for p in parameters], dtype=dtype)
        return self.columns[name]


@dataclass
class _Decoded:
    """The readings of a batch that passed decoding, per reading and per message."""

    messages: int
    msg_entity: Int64s
    """Entity index per message; -1 when it names no known entity."""
    msg_ts: Int64s
    dead_letters: Int64s
    """Dead letters per message that count against its entity."""
    msg_readings: Int64s
    """Readings per message that passed decoding."""
    msg_flags: Int64s
    """Flags every reading of the message gets (SOURCE_BAD)."""
    series: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    converted: list[int] = field(default_factory=list)
    """Readings (by position) given in another unit than the canonical one."""
    reports: dict[int, list[_Report]] = field(default_factory=dict)
    """Valid setpoint reports per entity index, in message order, not yet applied."""


@dataclass(frozen=True, slots=True)
class _Report:
    message: int
    name: str
    spec: SetpointSpec
    value: SetpointValue
    at_ms: int


STATE_VERSION = 4
"""The layout of a :class:`PartitionTwins` snapshot. 4: with predictive maintenance; 3:
with the back channel's merge and setpoints; 2: the detector with time scales, cycles,
operating points and alarms; 1 (no version recorded): the single-scale one."""


class IncompatibleSnapshotError(TwinflowError):
    """A recovery snapshot holds state of another layout than this twinflow's."""


START_OVER = (
    "Move the recovery store away to start over from the beginning of the topics "
    "(outputs are idempotent, so reprocessing rewrites the same rows)."
)


class PartitionTwins:
    """The state of one partition's step: picklable, so recovery can snapshot it.

    With ``back_channel`` the step also takes :class:`~twinflow.merge.ControlBatch` items
    (operator verdicts, commands and their results) and merges them with the raw
    messages by Kafka time (:mod:`twinflow.merge`); raw messages then wait until the back
    channel's progress covers them.
    """

    def __init__(
        self,
        model: TwinModel,
        flow: FlowSettings,
        detector: DetectorConfig,
        *,
        back_channel: bool = False,
    ) -> None:
        self.state_version = STATE_VERSION
        self.model = model
        self.flow = flow
        self.detector_config = detector
        self.maintenance_config = MaintenanceConfig(horizon_h=flow.maintenance_horizon_h)
        self.entities: dict[str, EntityTwin] = {}
        self._twins: list[EntityTwin] = []
        self._series = _Series()
        self._cleaning = SeriesCleaning()
        self._windows = OpenWindows(int(flow.window_s * 1000))
        self._lateness_ms = int(flow.allowed_lateness_s * 1000)
        self._live_ms = 0
        """System time this partition's step has been live, stalls capped."""
        self._last_step_wall_ms: int | None = None
        self._merge = Merge(gated=back_channel, margin_ms=int(flow.back_channel_margin_s * 1000))
        self._setpoints: dict[str, dict[str, Setpoint]] = {}
        """Per entity of the model (held here or not: a command may come before its
        machine's first reading), per setpoint."""
        self._reports = False
        """Whether this partition reports refused commands (one of them does)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        version = state.get("state_version", 1)
        if version != STATE_VERSION:
            # Older models cannot be carried over field by field; resuming them would
            # fail later, in the middle of a window, with nothing to say why.
            raise IncompatibleSnapshotError(
                f"the recovery snapshot holds twin state of layout {version}, this twinflow "
                f"keeps layout {STATE_VERSION} (its models changed). {START_OVER}"
            )
        # The time the flow was down after this snapshot is nobody's silence.
        self.__dict__.update(state)
        self.__dict__.setdefault("_live_ms", 0)
        self._last_step_wall_ms = None

    def adopt(self, model: TwinModel, flow: FlowSettings) -> None:
        """Run on with the entrypoint's twin model and flow settings (after a restart).

        A snapshot holds the model and settings it was taken with; a restart after a
        fix (an entity added so its dead letters can be replayed, a sensor's range
        widened) must use the new ones. Sensors an asset type gained are added to the
        entities already known; a removed sensor or entity stays known to the twins
        that have seen it, and window length and lateness stay as they were (open
        windows depend on them), until a fresh recovery store.
        """
        self.model, self.flow = model, flow
        series = self._series
        for twin in self._twins:
            entity = model.by_id.get(twin.entity_id)
            if entity is None:
                continue
            for sensor, spec in model.asset_types[entity.type].sensors.items():
                code = twin.series.get(sensor)
                if code is None:
                    twin.series[sensor] = series.add(twin.index, twin.entity_id, sensor, spec)
                else:
                    series.specs[code] = spec
            twin.maintenance.adopt(model.asset_types[entity.type].sensors)
        series.columns = None

    def _advance(self, now_ms: int) -> int:
        # Raw messages held longer than the back channel's usual wait are waiting for
        # it (a stalled source, a broker outage): that time is the pipeline's silence
        # too, as the entities whose messages wait have not been heard yet.
        held = self._merge.held
        waiting = held is not None and now_ms - held.timestamps_ms[0] > MAX_STEP_GAP_MS
        if self._last_step_wall_ms is not None and not waiting:
            self._live_ms += min(max(now_ms - self._last_step_wall_ms, 0), MAX_STEP_GAP_MS)
        self._last_step_wall_ms = now_ms
        return self._live_ms

    def open_window_starts(self, entity_id: str) -> list[int]:
        """Starts of the entity's open windows."""
        twin = self.entities.get(entity_id)
        if twin is None:
            return []
        return self._windows.starts(np.asarray(list(twin.series.values()), dtype=np.int64))

    def step(self, messages: Sequence[InputMessage] | ControlBatch, now_ms: int) -> StepOutput:
        """Process a batch of the partition's messages (offset order) or of the back channel.

        What is processed is what the merge lets through (see :mod:`twinflow.merge`).
        """
        out = StepOutput()
        merge = self._merge
        if isinstance(messages, ControlBatch):
            merge.add_control(messages)
            out.dead_letters.extend(messages.dead_letters)
            self._reports = self._reports or messages.reports
        else:
            batch = MessageBatch.of(messages)
            merge.add_raw(
                batch.topic,
                batch.partition,
                batch.offsets,
                batch.timestamps_ms,
                batch.values,
                now_ms,
            )
        live_ms = self._advance(now_ms)
        for part in merge.ready():
            if isinstance(part, RawRun):
                run = MessageBatch(
                    part.topic, part.partition, part.offsets, part.timestamps_ms, part.values
                )
                self._readings(run, self._decode(run, live_ms, out), out)
            else:
                self._control(part, out)
        self._expire(merge.clock_ms, out)
        self._idle(live_ms, out)
        return out

    # -- the back channel ----------------------------------------------------------------

    def _control(self, item: ControlMessage, out: StepOutput) -> None:
        message = item.message
        if isinstance(message, control.Feedback):
            twin = self.entities.get(message.entity_id)
            if twin is None:
                return
            # Each lifecycle takes only its own alarms' verdicts.
            alarms = [
                *twin.monitor.feedback(
                    message.alarm_id, message.verdict, message.user, message.note
                ),
                *twin.maintenance.feedback(
                    message.alarm_id, message.verdict, message.user, message.note
                ),
            ]
            outcome = "applied" if alarms else "ignored"
            out.verdicts[outcome] = out.verdicts.get(outcome, 0) + 1
            out.alarms.extend(alarms)
            return
        entity = self.model.by_id.get(message.entity_id)
        specs = {} if entity is None else self.model.setpoints_of(entity.id)
        spec = specs.get(message.setpoint)
        if isinstance(message, control.Command):
            problem = (
                f"no entity {message.entity_id!r}"
                if entity is None
                else f"{entity.type} has no setpoint {message.setpoint!r}"
                if spec is None
                else spec.check(message.value)
            )
            if problem is not None:
                if self._reports:
                    reason = (
                        Reason.UNKNOWN_ENTITY
                        if entity is None
                        else Reason.UNKNOWN_SETPOINT
                        if spec is None
                        else Reason.OUT_OF_RANGE
                    )
                    out.dead_letters.append(_control_dead_letter(item, reason, problem))
                return
        if entity is None or spec is None:
            return
        setpoint = self._setpoints.setdefault(entity.id, {}).setdefault(
            message.setpoint, Setpoint()
        )
        changed = (
            setpoint.command(spec, message, item.timestamp_ms)
            if isinstance(message, control.Command)
            else setpoint.result(message)
        )
        if changed:
            self._setpoint_changed(entity.id, message.setpoint, setpoint, item.timestamp_ms, out)

    def _reported(
        self,
        twin: EntityTwin,
        raw: RawMessage,
        message: InputMessage,
        i: int,
        decoded: _Decoded,
        out: StepOutput,
    ) -> int:
        """Check the setpoint values message ``i`` reports; the dead letters it caused.

        The valid ones wait in ``decoded`` until the twin state reaches that message
        (:meth:`_take_reports`), so a state shows what was reported before it only.
        """
        assert raw.reported is not None
        specs = self.model.setpoints_of(twin.entity_id)
        refused = 0
        for name, value in raw.reported.items():
            spec = specs.get(name)
            if spec is None:
                problem = (Reason.UNKNOWN_SETPOINT, f"reported setpoint {name!r}")
            elif isinstance(value, bool) != (spec.type == "bool"):
                problem = (Reason.SCHEMA, f"reported {name}: expected {spec.allowed()}")
            else:
                decoded.reports.setdefault(twin.index, []).append(
                    _Report(i, name, spec, value, message.timestamp_ms)
                )
                continue
            refused += 1
            out.dead_letters.append(message.dead_letter(*problem, twin.entity_id))
        return refused

    def _take_reports(
        self, decoded: _Decoded, entity: int, until: int | None, out: StepOutput
    ) -> None:
        """Apply the entity's reports of messages up to ``until`` (None: all)."""
        reports = decoded.reports.get(entity)
        if not reports:
            return
        entity_id = self._twins[entity].entity_id
        setpoints = self._setpoints.setdefault(entity_id, {})
        taken = 0
        for report in reports:
            if until is not None and report.message > until:
                break
            taken += 1
            setpoint = setpoints.setdefault(report.name, Setpoint())
            self._expire_one(entity_id, report.name, setpoint, report.at_ms, out)
            if setpoint.report(report.spec, report.value, report.at_ms):
                self._setpoint_changed(entity_id, report.name, setpoint, report.at_ms, out)
        del reports[:taken]

    def _expire(self, clock_ms: int, out: StepOutput) -> None:
        """Expire the pending commands of this partition's machines the merge has passed."""
        for entity_id in self.entities:
            for name, setpoint in self._setpoints.get(entity_id, {}).items():
                self._expire_one(entity_id, name, setpoint, clock_ms, out)

    def _expire_one(
        self, entity_id: str, name: str, setpoint: Setpoint, now_ms: int, out: StepOutput
    ) -> None:
        """Expire a pending command whose expiry ``now_ms`` has passed.

        Checked before each report and each window's state, and by the merge's clock, so
        the state it leaves (reports up to the expiry) is the same on every run.
        """
        if setpoint.expire(now_ms):
            assert setpoint.expires_ms is not None
            # At its expiry, not at the time noticed: the same on every run.
            self._setpoint_changed(entity_id, name, setpoint, setpoint.expires_ms, out)

    def _setpoint_changed(
        self, entity_id: str, name: str, setpoint: Setpoint, at_ms: int, out: StepOutput
    ) -> None:
        # Every partition keeps every machine's commands; the one holding the machine tells.
        if entity_id in self.entities:
            out.setpoints.append(SetpointChange(entity_id, name, at_ms, setpoint.state()))

    # -- per message -------------------------------------------------------------------

    def _twin(self, entity_id: str, asset_type: str) -> EntityTwin:
        twin = self.entities.get(entity_id)
        if twin is None:
            index = len(self._twins)
            specs = self.model.asset_types[asset_type].sensors
            twin = EntityTwin(
                entity_id=entity_id,
                index=index,
                monitor=EntityMonitor(entity_id, self.detector_config),
                maintenance=MaintenanceMonitor(entity_id, specs, self.maintenance_config),
                series={
                    sensor: self._series.add(index, entity_id, sensor, spec)
                    for sensor, spec in specs.items()
                },
            )
            self.entities[entity_id] = twin
            self._twins.append(twin)
        return twin

    def _decode(self, messages: Sequence[InputMessage], live_ms: int, out: StepOutput) -> _Decoded:
        n = len(messages)
        decoded = _Decoded(
            n,
            np.full(n, -1, dtype=np.int64),
            np.zeros(n, dtype=np.int64),
            np.zeros(n, dtype=np.int64),
            np.zeros(n, dtype=np.int64),
            np.zeros(n, dtype=np.int64),
        )
        max_future_ms = self.flow.max_future_s * 1000
        max_age_ms = self.flow.max_age_s * 1000
        by_id = self.model.by_id
        batch = MessageBatch.of(messages)
        for i, (payload, kafka_ms) in enumerate(
            zip(batch.values, batch.timestamps_ms, strict=True)
        ):
            try:
                raw = decode_raw(payload)
            except SchemaError as exc:
                out.dead_letters.append(batch[i].dead_letter(exc.reason, exc.detail))
                continue
            entity = by_id.get(raw.entity_id)
            if entity is None:
                out.dead_letters.append(
                    batch[i].dead_letter(Reason.UNKNOWN_ENTITY, f"no entity {raw.entity_id!r}")
                )
                continue
            twin = self._twin(entity.id, entity.type)
            twin.last_seen_live_ms = live_ms
            # Set before the time checks: a rejected message still counts for its entity.
            decoded.msg_entity[i] = twin.index
            ts_ms = raw.ts_ms
            reason = None
            if ts_ms > kafka_ms + max_future_ms:
                reason = Reason.TS_IN_FUTURE
            elif ts_ms < kafka_ms - max_age_ms:
                reason = Reason.TS_TOO_OLD
            if reason is not None:
                decoded.dead_letters[i] += 1
                out.dead_letters.append(batch[i].dead_letter(reason, f"ts {ts_ms} ms", entity.id))
                continue
            decoded.msg_ts[i] = ts_ms
            if raw.reported:
                decoded.dead_letters[i] += self._reported(twin, raw, batch[i], i, decoded, out)
            if raw.values is None and raw.sensor is None:
                continue
            if raw.quality in _BAD_QUALITY:
                decoded.msg_flags[i] = Flag.SOURCE_BAD
            values = raw.values if raw.values is not None else {raw.sensor: raw.value}
            codes = [twin.series.get(sensor, -1) for sensor in values]  # type: ignore[arg-type]
            if raw.unit is None and raw.units is None and -1 not in codes:
                decoded.msg_readings[i] = len(codes)
                decoded.series.extend(codes)
                decoded.value.extend(values.values())  # type: ignore[arg-type]
                continue
            for sensor, value, unit in raw.readings():
                code = twin.series.get(sensor)
                if code is None:
                    decoded.dead_letters[i] += 1
                    out.dead_letters.append(
                        batch[i].dead_letter(Reason.UNKNOWN_SENSOR, f"sensor {sensor!r}", entity.id)
                    )
                    continue
                spec = self._series.specs[code]
                conversion = spec.conversion(unit)
                if conversion is None:
                    decoded.dead_letters[i] += 1
                    out.dead_letters.append(
                        batch[i].dead_letter(
                            Reason.BAD_UNIT, f"{sensor}: unit {unit!r} not accepted", entity.id
                        )
                    )
                    continue
                if unit is not None and unit != spec.unit:
                    decoded.converted.append(len(decoded.series))
                decoded.msg_readings[i] += 1
                decoded.series.append(code)
                decoded.value.append(conversion.to_canonical(value))
        return decoded

    # -- per batch ---------------------------------------------------------------------

    def _readings(
        self, messages: Sequence[InputMessage], decoded: _Decoded, out: StepOutput
    ) -> None:
        series_cols = self._series
        msg = np.repeat(np.arange(decoded.messages, dtype=np.int64), decoded.msg_readings)
        series = np.asarray(decoded.series, dtype=np.int64)
        value = np.asarray(decoded.value, dtype=np.float64)
        extra = decoded.msg_flags[msg]
        extra[decoded.converted] |= Flag.CONVERTED
        ts = decoded.msg_ts[msg]

        low, high = series_cols.column("low")[series], series_cols.column("high")[series]
        valid = (low <= value) & (value <= high)
        for r in np.flatnonzero(~valid).tolist():
            code = int(series[r])
            spec = series_cols.specs[code]
            decoded.dead_letters[msg[r]] += 1
            out.dead_letters.append(
                messages[msg[r]].dead_letter(
                    Reason.OUT_OF_RANGE,
                    f"{series_cols.sensor[code]}={value[r]:g} {spec.unit} "
                    f"outside [{spec.range[0]:g}, {spec.range[1]:g}]",
                    series_cols.entity_id[code],
                )
            )

        # The watermark before each message. A message moves its entity's newest time
        # when one of its readings is valid: late and repeated readings cannot, as
        # they are never newer than what the entity already has.
        entity_rank = decoded.msg_entity
        twins = self._twins
        initial_newest = np.asarray([t.newest_ms for t in twins], dtype=np.int64)
        closed_until = np.asarray([t.closed_until_ms for t in twins], dtype=np.int64)
        advancing = np.full(decoded.messages, -1, dtype=np.int64)
        valid_msgs = np.unique(msg[valid])
        advancing[valid_msgs] = decoded.msg_ts[valid_msgs]
        by_entity = _EntityMessages(entity_rank)
        newest_before, newest_after = by_entity.running_newest(advancing, initial_newest)

        start = self._windows.start_of(ts)
        limit = np.maximum(newest_before[msg] - self._lateness_ms, closed_until[entity_rank[msg]])
        late = valid & (start + self._windows.length_ms <= limit)
        candidate = valid & ~late
        keys = series_keys(series, ts)
        duplicate = np.zeros(len(ts), dtype=bool)
        if candidate.any():
            candidates = np.flatnonzero(candidate)
            _, first = np.unique(keys[candidates], return_index=True)
            repeated = np.ones(len(candidates), dtype=bool)
            repeated[first] = False
            duplicate[candidates] = repeated | self._windows.holds(
                series[candidates], ts[candidates]
            )
        clean = valid & ~duplicate

        flags = (
            self._cleaning.flags(
                series[clean],
                ts[clean],
                value[clean],
                series_cols.column("max_rate")[series[clean]],
                series_cols.column("stuck_after_ms")[series[clean]],
                series_cols.column("spike_floor")[series[clean]],
            )
            | extra[clean]
        )
        out.readings = ReadingColumns(
            entity=CodedStrings(
                series_cols.column("entity_id_code")[series[clean]],
                series_cols.column("entity_id_names"),
            ),
            sensor=CodedStrings(
                series_cols.column("sensor_code")[series[clean]],
                series_cols.column("sensor_names"),
            ),
            ts_ms=ts[clean],
            value=value[clean],
            flags=flags,
        )
        is_late = late[clean]
        clean_index = np.flatnonzero(clean)
        for r in clean_index[is_late].tolist():
            self._late(messages[msg[r]], decoded, int(msg[r]), r, newest_before, out)
        accepted = ~is_late
        self._windows.add(
            series[clean][accepted], ts[clean][accepted], value[clean][accepted], flags[accepted]
        )

        per_message = np.zeros((decoded.messages, len(_MESSAGE_COUNTS)), dtype=np.int64)
        clean_msg = msg[clean]
        per_message[:, 0] = np.bincount(clean_msg, minlength=decoded.messages)
        per_message[:, 1] = np.bincount(clean_msg[flags != 0], minlength=decoded.messages)
        per_message[:, 2] = np.bincount(msg[duplicate], minlength=decoded.messages)
        per_message[:, 3] = np.bincount(clean_msg[is_late], minlength=decoded.messages)
        per_message[:, 4] = decoded.dead_letters
        counted = by_entity.running_sums(per_message)

        # Close what the watermarks passed, in message order, each window at the
        # message that closed it.
        final = initial_newest.copy()
        np.maximum.at(final, entity_rank[by_entity.order], newest_after[by_entity.order])
        limits = np.maximum(final - self._lateness_ms, closed_until)
        base = [dict(twin.counts) for twin in twins]
        closing = self._windows.pop_closed(limits[series_cols.column("entity")])
        for twin in twins:
            twin.newest_ms = int(final[twin.index])
            twin.closed_until_ms = int(limits[twin.index])

        def counts_at(entity: int, at: int) -> dict[str, int]:
            return {
                name: base[entity][name] + int(counted[at, k])
                for k, name in enumerate(_MESSAGE_COUNTS)
            }

        watermarks = newest_after - self._lateness_ms

        def reach(entity: int, at: int) -> None:
            """Bring the entity's setpoints to where they stood at message ``at``."""
            self._take_reports(decoded, entity, at, out)
            twin_id = twins[entity].entity_id
            for name, setpoint in self._setpoints.get(twin_id, {}).items():
                self._expire_one(twin_id, name, setpoint, messages[at].timestamp_ms, out)

        self._emit(
            closing,
            lambda entity, end: by_entity.first_reaching(entity, watermarks, end),
            counts_at,
            out,
            reach,
        )
        for entity in list(decoded.reports):
            self._take_reports(decoded, entity, None, out)
        for entity, at in by_entity.last_messages().items():
            twins[entity].counts.update(counts_at(entity, at))

    def _late(
        self,
        message: InputMessage,
        decoded: _Decoded,
        i: int,
        index: int,
        newest_before: Int64s,
        out: StepOutput,
    ) -> None:
        code = decoded.series[index]
        entity_id = self._series.entity_id[code]
        sensor = self._series.sensor[code]
        ts_ms = int(decoded.msg_ts[i])
        out.late.append(
            LateReading(
                msg_id=f"{entity_id}/{sensor}@{ts_ms}",
                entity_id=entity_id,
                sensor=sensor,
                ts_ms=ts_ms,
                value=decoded.value[index],
                watermark_ms=int(newest_before[i]) - self._lateness_ms,
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
            )
        )

    def _emit(
        self,
        closing: WindowReadings,
        closed_at: Callable[[int, int], int],
        counts_at: Callable[[int, int], dict[str, int]],
        out: StepOutput,
        reach: Callable[[int, int], None] | None = None,
    ) -> None:
        """Turn closed readings into windows, detections and states, in closing order.

        ``reach(entity, at)`` runs before a window closes at message ``at``.
        """
        if not len(closing):
            return
        cols = self._series
        parts = window_features(closing, self._windows.length_ms, cols.entity_id, cols.sensor)
        grouped: dict[tuple[int, int], list[ClosedSeriesWindow]] = {}
        for part in parts:
            grouped.setdefault((cols.entity[part.series], part.start_ms), []).append(part)
        events = sorted(
            (closed_at(entity, start + self._windows.length_ms), entity, start)
            for entity, start in grouped
        )
        for at, entity, start in events:
            if reach is not None:
                reach(entity, at)
            self._close_window(
                self._twins[entity], start, grouped[entity, start], counts_at(entity, at), out
            )

    def _close_window(
        self,
        twin: EntityTwin,
        start: int,
        parts: list[ClosedSeriesWindow],
        counts: dict[str, int],
        out: StepOutput,
    ) -> None:
        end = start + self._windows.length_ms
        cols = self._series
        windows: dict[str, SensorWindow] = {}
        for part in sorted(parts, key=lambda p: cols.sensor[p.series]):
            sensor = cols.sensor[part.series]
            latest = twin.sensors.get(sensor)
            if latest is None or part.newest_ts_ms >= latest.ts_ms:
                twin.sensors[sensor] = SensorState(
                    part.newest_value,
                    part.newest_ts_ms,
                    part.newest_flags,
                    cols.specs[part.series].unit,
                )
            if part.features is not None:
                windows[sensor] = part.features
        twin.counts.update({k: counts[k] for k in _MESSAGE_COUNTS})
        if not windows:
            return
        out.windows.extend(windows.values())
        twin.counts["windows"] += 1
        verdict = twin.monitor.process_window(windows, start, end)
        detection = verdict.detection
        twin.last_score, twin.last_threshold = detection.score, detection.threshold
        out.alarms.extend(verdict.alarms)
        due = twin.maintenance.process_window(windows, start, end)
        out.alarms.extend(due.alarms)
        out.forecasts.extend((twin.entity_id, forecast) for forecast in due.made())
        twin.counts["alarms"] = twin.monitor.alarms.raised + twin.maintenance.alarms.raised
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
        # Maintenance due is a forecast, not a fault: the status follows anomalies only.
        twin.machine.window(bool(twin.monitor.alarms.active_ids), ratio, flagged / max(count, 1))
        out.states.append(self._state(twin, end, f"{twin.entity_id}@{end}"))

    def _idle(self, live_ms: int, out: StepOutput) -> None:
        idle_ms = self.flow.idle_close_s * 1000
        stale_ms = self.flow.stale_after_s * 1000
        limits = np.full(len(self._twins), _NEVER, dtype=np.int64)
        silent: list[EntityTwin] = []
        for twin in self._twins:
            silent_ms = live_ms - twin.last_seen_live_ms
            if silent_ms >= idle_ms:
                limits[twin.index] = _ALWAYS
            if silent_ms >= stale_ms:
                silent.append(twin)
        if (limits == _ALWAYS).any():
            closing = self._windows.pop_closed(limits[self._series.column("entity")])
            for twin in self._twins:
                if limits[twin.index] == _ALWAYS and len(closing):
                    ends = closing.start_ms[np.isin(closing.series, list(twin.series.values()))]
                    if len(ends):
                        twin.closed_until_ms = max(
                            twin.closed_until_ms, int(ends.max()) + self._windows.length_ms
                        )
            self._emit(
                closing,
                lambda entity, end: end,
                lambda entity, at: dict(self._twins[entity].counts),
                out,
            )
        for twin in silent:
            if twin.machine.stale():
                # Its own event time (newest reading + the silence that made it stale),
                # so the STALE row never replaces the last real state in twin_state.
                at = int(twin.newest_ms + stale_ms)
                out.states.append(self._state(twin, at, f"{twin.entity_id}@{at}/stale"))

    def _state(self, twin: EntityTwin, ts_ms: int, msg_id: str) -> TwinState:
        latest = {sensor: state.value for sensor, state in twin.sensors.items()}
        entity = self.model.by_id.get(twin.entity_id)
        derived = {} if entity is None else self.model.asset_types[entity.type].derived
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
            counts=Counts(**twin.counts),
            active_alarms=twin.monitor.alarms.active_ids + twin.maintenance.alarms.active_ids,
            setpoints={
                name: setpoint.state()
                for name, setpoint in sorted(self._setpoints.get(twin.entity_id, {}).items())
            },
            forecasts={
                name: forecast.at(ts_ms) if ts_ms > forecast.ts_ms else forecast
                for name, forecast in sorted(twin.maintenance.forecasts.items())
            },
        )


def _control_dead_letter(
    item: ControlMessage, reason: Reason, detail: str
) -> deadletter.DeadLetter:
    return deadletter.dead_letter(
        control.encode(item.message),
        reason,
        detail,
        deadletter.Source(kind="kafka", topic=item.topic, partition=0, offset=item.offset),
        datetime.fromtimestamp(item.timestamp_ms / 1000, UTC),
        entity_id=item.message.entity_id,
    )


class _EntityMessages:
    """A batch's messages grouped by entity, each group in offset order."""

    _SHIFT = 1 << 44
    """Above any epoch millisecond, so a per-group offset keeps groups apart."""

    def __init__(self, entity: Int64s) -> None:
        known = np.flatnonzero(entity >= 0)
        self.order = known[np.argsort(entity[known], kind="stable")]
        self.entity = entity
        grouped = entity[self.order]
        self.first = np.ones(len(grouped), dtype=bool)
        self.first[1:] = grouped[1:] != grouped[:-1]
        starts = np.flatnonzero(self.first)
        # A batch of nothing but dead letters has no group at all.
        ends = np.append(starts[1:], len(grouped)) if len(starts) else starts
        self.bounds = {int(grouped[s]): (int(s), int(e)) for s, e in zip(starts, ends, strict=True)}

    def running_newest(self, times: Int64s, initial: Int64s) -> tuple[Int64s, Int64s]:
        """Per message, its entity's newest time before and after it (``times`` -1: none)."""
        before = np.full(len(self.entity), -1, dtype=np.int64)
        after = before.copy()
        if not len(self.order):
            return before, after
        grouped = self.entity[self.order]
        shift = (np.cumsum(self.first) - 1) * self._SHIFT
        times = np.maximum(times[self.order], initial[grouped]) + 1
        running = np.maximum.accumulate(times + shift) - shift - 1
        previous = np.empty_like(running)
        previous[1:] = running[:-1]
        previous[self.first] = initial[grouped[self.first]]
        after[self.order] = running
        before[self.order] = previous
        return before, after

    def running_sums(self, per_message: Int64s) -> Int64s:
        """Per message, its entity's sums over the batch up to and including it."""
        sums = np.zeros_like(per_message)
        if not len(self.order):
            return sums
        running = np.cumsum(per_message[self.order], axis=0)
        before_group = np.zeros_like(running)
        starts = np.flatnonzero(self.first)
        before_group[starts[1:]] = running[starts[1:] - 1]
        group = np.cumsum(self.first) - 1
        sums[self.order] = running - before_group[starts][group]
        return sums

    def first_reaching(self, entity: int, values: Int64s, threshold: int) -> int:
        """The entity's first message whose value (non-decreasing) reaches ``threshold``."""
        low, high = self.bounds[entity]
        messages = self.order[low:high]
        position = int(np.searchsorted(values[messages], threshold, side="left"))
        return int(messages[min(position, len(messages) - 1)])

    def last_messages(self) -> dict[int, int]:
        """Each entity's last message in the batch."""
        return {entity: int(self.order[high - 1]) for entity, (_low, high) in self.bounds.items()}
