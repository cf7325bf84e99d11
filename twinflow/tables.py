"""The QuestDB tables the twin flow writes, created up front (never by ILP auto-create).

All are WAL tables partitioned by day, with the event time as designated timestamp and
``DEDUP UPSERT KEYS`` on the row's identity: a replay after a crash rewrites the same
rows instead of adding copies. The flow refuses to start when a table exists without
its keys or with other column types, and adds the columns that a table from an older
twinflow lacks (connectors.questdb.ensure_table).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import msgspec

from connectors.questdb import TableSpec
from schemas.outputs import COUNTS, WINDOW_FEATURES, Counts, SensorWindow

_QUESTDB_TYPES = {int: "LONG", float: "DOUBLE"}


def _columns(struct: type[msgspec.Struct], names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Columns for the numeric fields ``names`` of ``struct``, typed as it declares them."""
    types = {field.name: field.type for field in msgspec.structs.fields(struct)}
    return tuple((name, _QUESTDB_TYPES[types[name]]) for name in names)


READINGS = TableSpec(
    name="readings",
    columns=(
        ("ts", "TIMESTAMP"),
        ("entity", "SYMBOL"),
        ("sensor", "SYMBOL"),
        ("value", "DOUBLE"),
        ("flags", "INT"),
    ),
    timestamp="ts",
    dedup_keys=("ts", "entity", "sensor"),
)

SENSOR_WINDOWS = TableSpec(
    name="sensor_windows",
    columns=(
        ("ts", "TIMESTAMP"),
        ("entity", "SYMBOL"),
        ("sensor", "SYMBOL"),
        ("window_end", "TIMESTAMP"),
        *_columns(SensorWindow, WINDOW_FEATURES),
        ("flagged", "LONG"),
    ),
    timestamp="ts",
    dedup_keys=("ts", "entity", "sensor"),
)

TWIN_STATE = TableSpec(
    name="twin_state",
    columns=(
        ("ts", "TIMESTAMP"),
        ("entity", "SYMBOL"),
        ("status", "SYMBOL"),
        ("health", "DOUBLE"),
        ("anomaly_score", "DOUBLE"),
        ("threshold", "DOUBLE"),
        *_columns(Counts, COUNTS),
        ("active_alarms", "VARCHAR"),
        ("limit_sensor", "SYMBOL"),
        ("time_to_limit_s", "DOUBLE"),
        ("time_to_limit_low_s", "DOUBLE"),
    ),
    # The limit columns: the sensor whose forecast has the smallest lower bound of time
    # to limit, as of the row's time (NULL: no sensor is heading for a limit).
    timestamp="ts",
    dedup_keys=("ts", "entity"),
)

ANOMALIES = TableSpec(
    name="anomalies",
    columns=(
        ("ts", "TIMESTAMP"),
        ("entity", "SYMBOL"),
        ("window_end", "TIMESTAMP"),
        ("score", "DOUBLE"),
        ("threshold", "DOUBLE"),
        ("model", "SYMBOL"),
        ("top_sensors", "VARCHAR"),
        ("explanation", "VARCHAR"),
    ),
    timestamp="ts",
    dedup_keys=("ts", "entity"),
)

ALARMS = TableSpec(
    name="alarms",
    columns=(
        ("ts", "TIMESTAMP"),
        ("entity", "SYMBOL"),
        ("alarm_id", "VARCHAR"),
        ("kind", "SYMBOL"),
        ("event", "SYMBOL"),
        ("active", "BOOLEAN"),
        ("start", "TIMESTAMP"),
        ("end", "TIMESTAMP"),
        ("peak_score", "DOUBLE"),
        ("threshold", "DOUBLE"),
        ("anomalous_windows", "LONG"),
        ("top_sensors", "VARCHAR"),
        ("explanation", "VARCHAR"),
        ("acknowledged", "BOOLEAN"),
        ("verdict", "SYMBOL"),
        ("operator", "SYMBOL"),
        ("note", "VARCHAR"),
        ("time_to_limit_s", "DOUBLE"),
        ("time_to_limit_low_s", "DOUBLE"),
        ("time_to_limit_high_s", "DOUBLE"),
    ),
    # The transition's event time; ``end`` (an SQL keyword: write it "end") is NULL
    # while the alarm is active. The time-to-limit columns are a maintenance_due alarm's
    # latest forecast (NULL for anomalies); top_sensors names its sensor.
    timestamp="ts",
    # An event is one transition of one alarm, and an alarm is (entity, kind, start).
    dedup_keys=("ts", "entity", "kind", "start", "event"),
)

SETPOINTS = TableSpec(
    name="setpoints",
    columns=(
        ("ts", "TIMESTAMP"),
        ("entity", "SYMBOL"),
        ("setpoint", "SYMBOL"),
        ("status", "SYMBOL"),
        ("desired", "DOUBLE"),
        ("reported", "DOUBLE"),
        ("command_id", "VARCHAR"),
        ("expires", "TIMESTAMP"),
        ("detail", "VARCHAR"),
    ),
    # Kafka time of the command, result or report that changed the setpoint; a bool
    # setpoint is 1.0 / 0.0. Status is empty while no command was sent.
    timestamp="ts",
    dedup_keys=("ts", "entity", "setpoint", "status"),
)
FORECASTS = TableSpec(
    name="forecasts",
    columns=(
        ("ts", "TIMESTAMP"),
        ("entity", "SYMBOL"),
        ("sensor", "SYMBOL"),
        ("limit", "SYMBOL"),
        ("limit_value", "DOUBLE"),
        ("level", "DOUBLE"),
        ("slope_per_h", "DOUBLE"),
        ("time_to_limit_s", "DOUBLE"),
        ("time_to_limit_low_s", "DOUBLE"),
        ("time_to_limit_high_s", "DOUBLE"),
        ("crossing", "TIMESTAMP"),
        ("since", "TIMESTAMP"),
    ),
    # One row per forecast made: per sensor whose trend heads for an alarm limit, at the
    # end of a bucket (15 min). ``limit`` is an SQL keyword: write it "limit". A NULL
    # high bound means the slowest slope the data allow never gets there.
    timestamp="ts",
    dedup_keys=("ts", "entity", "sensor"),
)

DEADLETTERS = TableSpec(
    name="deadletters",
    columns=(
        ("ts", "TIMESTAMP"),
        ("reason", "SYMBOL"),
        ("source_kind", "SYMBOL"),
        ("source", "VARCHAR"),
        ("kafka_partition", "INT"),
        ("kafka_offset", "LONG"),
        ("entity", "SYMBOL"),
        ("detail", "VARCHAR"),
        ("payload_size", "INT"),
        ("payload_sha256", "VARCHAR"),
        ("payload_excerpt", "VARCHAR"),
    ),
    timestamp="ts",
    # A Kafka message is (topic, partition, offset); one message can have several bad
    # readings, each its own letter: detail tells them apart.
    dedup_keys=("ts", "source", "kafka_partition", "kafka_offset", "payload_sha256", "detail"),
)


@dataclass(frozen=True)
class Tables:
    """The flow's tables under one name prefix (``questdb.table_prefix``)."""

    readings: TableSpec
    sensor_windows: TableSpec
    twin_state: TableSpec
    anomalies: TableSpec
    alarms: TableSpec
    deadletters: TableSpec
    setpoints: TableSpec
    forecasts: TableSpec

    def all(self) -> tuple[TableSpec, ...]:
        """Every table, in creation order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def tables(prefix: str = "") -> Tables:
    """The tables, their names prefixed (isolated test runs, several plants per server).

    >>> tables("t1_").readings.name
    't1_readings'
    """
    specs = (
        READINGS,
        SENSOR_WINDOWS,
        TWIN_STATE,
        ANOMALIES,
        ALARMS,
        DEADLETTERS,
        SETPOINTS,
        FORECASTS,
    )
    return Tables(*(dataclasses.replace(spec, name=prefix + spec.name) for spec in specs))
