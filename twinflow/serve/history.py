"""What ``twinflow serve`` reads from QuestDB: latest windows, and a sensor's history.

Entity and sensor names reach SQL only after the server found them in the twin model;
they are quoted here all the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime

from connectors.questdb import QueryResult, QuestDBHttp
from schemas.serve import AlarmSpan, SeriesPoints, SeriesView, WindowBand, WindowView
from twinflow.tables import Tables


def epoch_ms(text: object) -> int | None:
    """A QuestDB timestamp (ISO 8601, UTC) as epoch milliseconds; None for NULL.

    >>> epoch_ms("2026-12-01T10:00:00.250000Z")
    1796119200250
    """
    if not isinstance(text, str):
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return round(moment.timestamp() * 1000)


def quoted(text: str) -> str:
    """An SQL string literal.

    >>> quoted("it's")
    "'it''s'"
    """
    return "'" + text.replace("'", "''") + "'"


def step_ms(from_ms: int, to_ms: int, points: int) -> int:
    """The bucket length that puts at most ``points`` buckets in ``[from_ms, to_ms]``.

    >>> step_ms(0, 3_600_000, 360)
    10000
    >>> step_ms(0, 1000, 5000)
    1
    """
    return max(1, math.ceil((to_ms - from_ms) / points))


def _micros(ms: int) -> str:
    return f"CAST({ms * 1000} AS TIMESTAMP)"


def _rows(result: QueryResult) -> list[dict[str, object]]:
    names = result.column_names
    return [dict(zip(names, row, strict=True)) for row in result.rows]


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def latest_windows(sql: QuestDBHttp, tables: Tables) -> dict[tuple[str, str], WindowView]:
    """The latest closed window of every entity and sensor."""
    result = sql.exec(
        f"SELECT * FROM {tables.sensor_windows.name} LATEST ON ts PARTITION BY entity, sensor"  # noqa: S608 - a table name
    )
    found = {}
    for row in _rows(result):
        start_ms, end_ms = epoch_ms(row["ts"]), epoch_ms(row["window_end"])
        if start_ms is None or end_ms is None:
            continue
        found[(str(row["entity"]), str(row["sensor"]))] = WindowView(
            window_start_ms=start_ms,
            window_end_ms=end_ms,
            count=int(row["count"] or 0),  # type: ignore[call-overload]
            mean=_float(row["mean"]),
            min=_float(row["min"]),
            max=_float(row["max"]),
            std=_float(row["std"]),
            last=_float(row["last"]),
            slope=_float(row["slope"]),
            flagged=int(row["flagged"] or 0),  # type: ignore[call-overload]
        )
    return found


def series(
    sql: QuestDBHttp,
    tables: Tables,
    *,
    entity: str,
    sensor: str,
    unit: str,
    from_ms: int,
    to_ms: int,
    points: int,
) -> SeriesView:
    """A sensor's readings in at most ``points`` buckets, its windows and alarm spans."""
    step = step_ms(from_ms, to_ms, points)
    where = (
        f"entity = {quoted(entity)} AND sensor = {quoted(sensor)} "
        f"AND ts BETWEEN {_micros(from_ms)} AND {_micros(to_ms)}"
    )
    readings = _rows(
        sql.exec(
            f"SELECT ts, avg(value) mean, min(value) min, max(value) max "  # noqa: S608 - quoted
            f"FROM {tables.readings.name} WHERE {where} SAMPLE BY {step}T ALIGN TO CALENDAR"
        )
    )
    points_kept = [
        row for row in readings if epoch_ms(row["ts"]) is not None and row["mean"] is not None
    ]
    windows = _rows(
        sql.exec(
            f"SELECT ts, window_end, mean, std, min, max, flagged "  # noqa: S608 - quoted
            f"FROM {tables.sensor_windows.name} WHERE {where} LIMIT -{points}"
        )
    )
    return SeriesView(
        entity_id=entity,
        sensor=sensor,
        unit=unit,
        from_ms=from_ms,
        to_ms=to_ms,
        step_ms=step,
        points=SeriesPoints(
            ts_ms=[epoch_ms(row["ts"]) or 0 for row in points_kept],
            mean=[float(row["mean"]) for row in points_kept],  # type: ignore[arg-type]
            min=[float(row["min"]) for row in points_kept],  # type: ignore[arg-type]
            max=[float(row["max"]) for row in points_kept],  # type: ignore[arg-type]
        ),
        windows=[
            WindowBand(
                window_start_ms=epoch_ms(row["ts"]) or 0,
                window_end_ms=epoch_ms(row["window_end"]) or 0,
                mean=_float(row["mean"]),
                std=_float(row["std"]),
                min=_float(row["min"]),
                max=_float(row["max"]),
                flagged=int(row["flagged"] or 0),  # type: ignore[call-overload]
            )
            for row in windows
        ],
        alarms=alarm_spans(sql, tables, entity, from_ms, to_ms),
    )


def alarm_spans(
    sql: QuestDBHttp, tables: Tables, entity: str, from_ms: int, to_ms: int
) -> list[AlarmSpan]:
    """The entity's alarms that overlap ``[from_ms, to_ms]``, each as its latest event says."""
    rows = _rows(
        sql.exec(
            f'SELECT ts, alarm_id, kind, start, "end", peak_score, top_sensors, explanation, '  # noqa: S608
            f"verdict FROM {tables.alarms.name} "
            f"WHERE entity = {quoted(entity)} AND start <= {_micros(to_ms)} ORDER BY ts"
        )
    )
    latest: dict[str, dict[str, object]] = {}
    for row in rows:
        latest[str(row["alarm_id"])] = row
    return _spans(latest.values(), from_ms)


def _spans(rows: Iterable[dict[str, object]], from_ms: int) -> list[AlarmSpan]:
    spans = []
    for row in rows:
        start_ms, end_ms = epoch_ms(row["start"]), epoch_ms(row["end"])
        if start_ms is None or (end_ms is not None and end_ms < from_ms):
            continue
        spans.append(
            AlarmSpan(
                alarm_id=str(row["alarm_id"]),
                kind=str(row["kind"]),
                start_ms=start_ms,
                end_ms=end_ms,
                peak_score=_float(row["peak_score"]),
                top_sensors=str(row["top_sensors"] or ""),
                explanation=str(row["explanation"] or ""),
                verdict=None if row["verdict"] is None else str(row["verdict"]),
            )
        )
    return sorted(spans, key=lambda span: span.start_ms)
