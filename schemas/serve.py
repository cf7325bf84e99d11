"""What ``twinflow serve`` answers (its OpenAPI document: schemas/openapi/serve.v1.json).

Views of the twin for programs and for the viewer page. Current state comes from the
``twin.state`` and ``twin.alarms`` topics (their structs are reused here as they are
published); history comes from QuestDB.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import msgspec

from schemas.control import Command, Feedback
from schemas.outputs import Alarm, Counts, LimitForecast, SetpointState


class ViewStatus(StrEnum):
    """A twin's status, or UNKNOWN while no state of it has been read yet."""

    OK = "OK"
    UNKNOWN = "UNKNOWN"
    STALE = "STALE"
    WARN = "WARN"
    ALARM = "ALARM"


NodeKind = Literal["plant", "site", "line", "entity"]


class PlantNode(msgspec.Struct, frozen=True):
    """One level of the plant with what its subtree adds up to.

    ``status`` is the worst in the subtree (entity included), ``health_min`` and
    ``health_mean`` are over the entities that have a state, ``active_alarms`` counts
    the subtree's active alarms.
    """

    kind: NodeKind
    id: str
    name: str
    status: ViewStatus
    health_min: float | None
    health_mean: float | None
    active_alarms: int
    entities: int
    children: list[PlantNode]
    entity_type: str | None = None
    own_status: ViewStatus | None = None
    """An entity's own status (``status`` is its subtree's worst); null for other levels."""


class WindowView(msgspec.Struct, frozen=True):
    """The features of a sensor's latest closed window (table ``sensor_windows``).

    A feature is null where QuestDB holds none (a window too short for it).
    """

    window_start_ms: int
    window_end_ms: int
    count: int
    mean: float | None
    min: float | None
    max: float | None
    std: float | None
    last: float | None
    slope: float | None
    flagged: int


class SensorView(msgspec.Struct, frozen=True):
    """A sensor: its model spec, latest clean reading and latest window."""

    name: str
    unit: str
    range: tuple[float, float]
    value: float | None
    ts_ms: int | None
    flags: int
    quality: list[str]
    window: WindowView | None


class SetpointView(msgspec.Struct, frozen=True):
    """A writable setpoint: what the model allows, and desired vs reported."""

    name: str
    type: str
    unit: str
    allowed: str
    state: SetpointState | None


class EntityView(msgspec.Struct, frozen=True):
    """The current twin of one entity."""

    entity_id: str
    entity_type: str
    site: str
    line: str
    parent: str | None
    children: list[str]
    status: ViewStatus
    health: float | None
    anomaly_score: float | None
    threshold: float | None
    ts_ms: int | None
    sensors: dict[str, SensorView]
    derived: dict[str, float | None]
    counts: Counts | None
    active_alarms: list[Alarm]
    setpoints: dict[str, SetpointView]
    forecasts: dict[str, LimitForecast]
    windows_available: bool


class SeriesPoints(msgspec.Struct, frozen=True):
    """Readings sampled into buckets of ``step_ms``: parallel columns, one per bucket."""

    ts_ms: list[int]
    mean: list[float]
    min: list[float]
    max: list[float]


class WindowBand(msgspec.Struct, frozen=True):
    """A closed window's band: mean ± std and the extremes."""

    window_start_ms: int
    window_end_ms: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    flagged: int


class AlarmSpan(msgspec.Struct, frozen=True):
    """An alarm's time span in the asked range (``end_ms`` null: still active)."""

    alarm_id: str
    kind: str
    start_ms: int
    end_ms: int | None
    peak_score: float | None
    top_sensors: str
    explanation: str
    verdict: str | None


class SeriesView(msgspec.Struct, frozen=True):
    """History of one sensor of one entity from QuestDB."""

    entity_id: str
    sensor: str
    unit: str
    from_ms: int
    to_ms: int
    step_ms: int
    points: SeriesPoints
    windows: list[WindowBand]
    alarms: list[AlarmSpan]


class StateEvent(msgspec.Struct, frozen=True):
    """SSE ``state``: an entity's status, health or active alarms changed."""

    entity_id: str
    status: ViewStatus
    health: float | None
    ts_ms: int
    active_alarms: int


class VerdictBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/alarms/{id}/ack|confirm|reject``."""

    note: str = ""
    user: str | None = None


class SetpointBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``PUT /api/v1/entities/{id}/setpoints/{name}``.

    ``value`` is checked against the twin model as ``twinflow command`` checks it.
    """

    value: float | bool | str
    expires_s: float | None = None
    """Seconds after which the machine must not apply it; default ``serve.command_expires_s``."""
    user: str | None = None


class ApiError(msgspec.Struct, frozen=True):
    """Any refusal: what is wrong and, when one field is to blame, which."""

    detail: str
    field: str | None = None


__all__ = [
    "AlarmSpan",
    "ApiError",
    "Command",
    "EntityView",
    "Feedback",
    "PlantNode",
    "SensorView",
    "SeriesPoints",
    "SeriesView",
    "SetpointBody",
    "SetpointView",
    "StateEvent",
    "VerdictBody",
    "ViewStatus",
    "WindowBand",
    "WindowView",
]
