"""Output contracts of the twin flow (JSON Schemas in schemas/json/*.v1.schema.json).

Every message carries ``version`` and a ``msg_id`` that is the same whenever the flow
emits the same fact again (a replay after a crash re-emits; consumers drop repeats).
Kafka keys are the entity id, so consumers can compact and partition by entity.
"""

from __future__ import annotations

from enum import IntFlag, StrEnum

import msgspec

VERSION = 1


class Flag(IntFlag):
    """Quality flags of a clean reading; 0 means nothing noticed."""

    RATE = 1
    """Changed faster than the sensor's max_rate."""
    STUCK = 2
    """Unchanged for at least the sensor's stuck_after_s."""
    SPIKE = 4
    """Outlier against its recent neighbours (Hampel filter); kept out of features."""
    GAP = 8
    """First reading after a gap of more than 3 typical sampling intervals."""
    CONVERTED = 16
    """Arrived in an accepted non-canonical unit and was converted."""
    SOURCE_BAD = 32
    """The source marked it uncertain or bad (e.g. an OPC UA status code)."""


class Status(StrEnum):
    """Status of a twin. Changes only with hysteresis (see twinflow.state)."""

    OK = "OK"
    WARN = "WARN"
    ALARM = "ALARM"
    STALE = "STALE"


class CleanReading(msgspec.Struct, frozen=True, array_like=True):
    """One validated reading in the sensor's canonical unit (QuestDB ``readings``)."""

    entity_id: str
    sensor: str
    ts_ms: int
    value: float
    flags: int


class SensorWindow(msgspec.Struct, frozen=True):
    """Features of one sensor over one closed event-time window (``sensor_windows``)."""

    entity_id: str
    sensor: str
    window_start_ms: int
    window_end_ms: int
    count: int
    mean: float
    min: float
    max: float
    std: float
    last: float
    slope: float
    """Least-squares slope in canonical units per second (0 for fewer than 2 readings)."""
    flagged: int
    """Readings of the window with any quality flag (spikes are not in the features)."""


WINDOW_FEATURES: tuple[str, ...] = tuple(
    name
    for name in SensorWindow.__struct_fields__
    if name not in {"entity_id", "sensor", "window_start_ms", "window_end_ms", "flagged"}
)
"""The numeric features of a window, as :class:`SensorWindow` declares them (in order):
the ``sensor_windows`` columns, the row builders and the detector's choice derive from it."""


class Contribution(msgspec.Struct, frozen=True):
    """One feature's part in an anomaly: how far it was from what the model expects."""

    sensor: str
    feature: str
    value: float
    """The feature as the model scored it: exponentially smoothed over recent windows."""
    expected_low: float
    expected_high: float
    weight: float
    """Share of the anomaly score this feature accounts for (0..1)."""


class Anomaly(msgspec.Struct, frozen=True):
    """A window the entity's model found anomalous (topic ``twin.anomalies``)."""

    msg_id: str
    entity_id: str
    window_start_ms: int
    window_end_ms: int
    score: float
    threshold: float
    model: str
    contributions: list[Contribution]
    version: int = VERSION


class AlarmKind(StrEnum):
    """What an alarm is about."""

    ANOMALY = "anomaly"
    """The entity's anomaly model flagged its windows."""
    MAINTENANCE_DUE = "maintenance_due"
    """A sensor's trend will reach its alarm limit within the maintenance horizon (the
    lower bound of its time to limit is under it)."""


class LimitForecast(msgspec.Struct, frozen=True):
    """When one sensor's trend reaches its alarm limit (predictive maintenance).

    Made from the sensor's window means, bucketed, by a linear trend whose slope is
    significant; a sensor without a significant trend towards a limit has none. Times
    to limit count from ``ts_ms``, the end of the window the forecast was made at.
    """

    sensor: str
    ts_ms: int
    limit: str
    """Which limit: ``alarm_high`` or ``alarm_low``."""
    limit_value: float
    level: float
    """The trend's value at ``ts_ms``, in the sensor's canonical unit."""
    slope_per_h: float
    """Canonical units per hour."""
    time_to_limit_s: float
    """0 when the trend is already past the limit."""
    time_to_limit_low_s: float
    """Lower bound (the steepest slope the data allow, at 95 %)."""
    time_to_limit_high_s: float | None
    """Upper bound; None when the data allow a slope that never gets there."""
    since_ms: int
    """Start of the history the trend was fitted on."""

    def crossing_ms(self) -> int:
        """Event time the trend reaches the limit."""
        return self.ts_ms + round(self.time_to_limit_s * 1000)

    def at(self, ts_ms: int) -> LimitForecast:
        """The same forecast told from a later ``ts_ms``.

        The level moves along the trend; the times to limit shorten (never below 0).

        >>> f = LimitForecast("t", 0, "alarm_high", 90.0, 80.0, 1.0, 36000.0, 18000.0, None, 0)
        >>> g = f.at(3_600_000)
        >>> g.level, g.time_to_limit_s, g.time_to_limit_low_s, g.time_to_limit_high_s
        (81.0, 32400.0, 14400.0, None)
        """
        elapsed_s = (ts_ms - self.ts_ms) / 1000

        def left(seconds: float) -> float:
            return max(seconds - elapsed_s, 0.0)

        return msgspec.structs.replace(
            self,
            ts_ms=ts_ms,
            level=self.level + self.slope_per_h * elapsed_s / 3600,
            time_to_limit_s=left(self.time_to_limit_s),
            time_to_limit_low_s=left(self.time_to_limit_low_s),
            time_to_limit_high_s=None
            if self.time_to_limit_high_s is None
            else left(self.time_to_limit_high_s),
        )


class AlarmEvent(StrEnum):
    """A transition in an alarm's life; each is emitted once."""

    RAISED = "raised"
    """The first anomalous window of an incident."""
    CLEARED = "cleared"
    """Enough normal windows in a row after the last anomalous one."""
    REBASELINED = "rebaselined"
    """Active for so long that the model accepted the entity's level as its new normal."""
    ACKNOWLEDGED = "acknowledged"
    """An operator has seen it (verdict ``ack``); it stays active."""
    CONFIRMED = "confirmed"
    """An operator called it a true fault (``confirm``): its windows are never learned and
    it is never re-baselined; it stays active until the entity is normal again."""
    REJECTED = "rejected"
    """An operator called it a false alarm (``reject``): it ends, and the model accepts
    the entity's level as normal."""


class AlarmVerdict(StrEnum):
    """An operator's judgement of an alarm."""

    CONFIRMED = "confirmed"
    REJECTED = "rejected"


class Alarm(msgspec.Struct, frozen=True):
    """One transition of one alarm (topic ``twin.alarms``, table ``alarms``).

    An alarm is one incident: raised at its first anomalous window, active while the
    model keeps flagging, ended once (cleared or re-baselined). ``alarm_id`` is stable
    (entity and start), so a consumer can fold the events of one alarm into its state.
    """

    msg_id: str
    """``<alarm_id>/<event>``: the same whenever the flow emits this transition again."""
    alarm_id: str
    """``<entity_id>@<start_ms>`` for anomalies, ``<entity_id>/maintenance_due@<start_ms>``
    for maintenance."""
    entity_id: str
    kind: AlarmKind
    event: AlarmEvent
    active: bool
    """Whether the alarm is active after this transition."""
    ts_ms: int
    """Event time of the transition: the end of the window that caused it."""
    start_ms: int
    """Start of the window that raised the alarm."""
    end_ms: int | None
    """When it ended (None while active): the end of its last anomalous window if it
    cleared, the transition's time if it was re-baselined."""
    peak_score: float
    """Highest window score so far."""
    threshold: float
    anomalous_windows: int
    """Anomalous windows in the incident so far."""
    contributions: list[Contribution]
    """The features that explained the peak window, largest weight first, with the
    range the model expected."""
    version: int = VERSION
    acknowledged: bool = False
    """Whether an operator has acknowledged (or confirmed) it."""
    verdict: AlarmVerdict | None = None
    """An operator's judgement, once given."""
    operator: str | None = None
    """Who gave the latest acknowledgement or verdict."""
    note: str | None = None
    """What they wrote with it."""
    forecast: LimitForecast | None = None
    """``maintenance_due`` only: the latest forecast that found maintenance due (its
    sensor, time to limit and bounds)."""


class SensorState(msgspec.Struct, frozen=True):
    """The latest clean reading of one sensor."""

    value: float
    ts_ms: int
    flags: int
    unit: str


class SetpointStatus(StrEnum):
    """Where a setpoint's last command stands (desired vs reported)."""

    PENDING = "pending"
    """Sent; the machine does not report the desired value yet."""
    IN_SYNC = "in_sync"
    """The machine reports the desired value."""
    OUT_OF_SYNC = "out_of_sync"
    """It was in sync, and the machine now reports another value."""
    FAILED = "failed"
    """A bridge could not deliver it (the reason is in ``detail``)."""
    EXPIRED = "expired"
    """Its expiry passed before the machine reported the desired value."""


class SetpointState(msgspec.Struct, frozen=True):
    """One writable setpoint of an entity: what was asked for and what the machine says."""

    desired: float | bool | None
    """The last command's value (None: never commanded)."""
    reported: float | bool | None
    """What the machine last reported running at (None: never reported)."""
    status: SetpointStatus | None
    """Of the last command (None: never commanded)."""
    command_id: str | None = None
    issued_ms: int | None = None
    expires_ms: int | None = None
    reported_ms: int | None = None
    """Event time of the latest report."""
    detail: str = ""


class Counts(msgspec.Struct, frozen=True):
    """What happened to an entity's input so far."""

    readings: int = 0
    flagged: int = 0
    duplicates: int = 0
    late: int = 0
    dead_letters: int = 0
    windows: int = 0
    anomalies: int = 0
    alarms: int = 0
    """Alarms raised."""


COUNTS: tuple[str, ...] = Counts.__struct_fields__
"""The per-entity counts, as :class:`Counts` declares them: the ``twin_state`` columns and
the twins' running counts derive from it."""


class TwinState(msgspec.Struct, frozen=True):
    """The live state of one entity (compacted topic ``twin.state``, table ``twin_state``)."""

    msg_id: str
    entity_id: str
    ts_ms: int
    """Event time the state describes (the end of the last closed window)."""
    status: Status
    health: float
    anomaly_score: float | None
    threshold: float | None
    sensors: dict[str, SensorState]
    derived: dict[str, float | None]
    counts: Counts
    active_alarms: list[str] = msgspec.field(default_factory=list)
    """Ids of the entity's active alarms (see :class:`Alarm`)."""
    version: int = VERSION
    setpoints: dict[str, SetpointState] = msgspec.field(default_factory=dict)
    """Desired vs reported per writable setpoint of its asset type."""
    forecasts: dict[str, LimitForecast] = msgspec.field(default_factory=dict)
    """Per sensor whose trend is heading for an alarm limit: when it gets there. Times to
    limit count from this state's ``ts_ms``."""


class SetpointChange(msgspec.Struct, frozen=True):
    """One change of an entity's setpoint state (table ``setpoints``)."""

    entity_id: str
    setpoint: str
    ts_ms: int
    """Kafka time of the message that changed it (a command, a result, a report)."""
    state: SetpointState


class LateReading(msgspec.Struct, frozen=True):
    """A reading whose window had already closed (topic ``twin.late``)."""

    msg_id: str
    entity_id: str
    sensor: str
    ts_ms: int
    value: float
    watermark_ms: int
    topic: str
    partition: int
    offset: int
    version: int = VERSION


_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of an output message."""
    return _encoder.encode(message)
