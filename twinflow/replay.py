r"""Offline replay: the flow's per-entity detection over a CSV, one output row per input row.

Each CSV row is one sampling instant of one entity; every column except the time column
and the excluded ones is a sensor. Rows go, in file order, through the same code the twin
flow runs for an entity once its readings are clean: the window features of
:func:`~twinflow.windows.window_features` (tumbling windows of ``window_rows`` rows) and
:meth:`~twinflow.detection.EntityDetector.process_window` of one detector with the flow's
defaults. A window's score goes to each of its rows; ``is_anomaly`` says whether the entity has
an active alarm once the window is judged (the alarm lifecycle of
:class:`~twinflow.detection.EntityMonitor`, as in the flow), and ``alarm_raised`` marks
the last row of a window that raised a new alarm: the row at which the flow would have
raised it, one per incident. Windows are made of rows: window ``k`` holds rows
``k·w .. k·w + w - 1``, so gaps or repeated timestamps change no window. The time column
is copied verbatim; when its first value is a date and time (ISO 8601, e.g.
``2014-04-01 00:05:00``; UTC unless it says otherwise) every window also carries the
time of its first row, which places it in the daily and weekly cycles the detector may
learn (:mod:`twinflow.detection.seasonal`). A time column of anything else (row numbers,
epoch counters) is only copied: no cycle is learned then.

What the flow does and replay does not: validation against a twin model (ranges, units)
and the cleaning flags, which need the model's sensor specs; a CSV has none. A missing
reading (an empty or NaN cell) is what it is in the flow: the sensor has no reading at
that instant, a window without any reading of a sensor has no features for it, and a
window without any reading at all is not scored (its rows get an empty score).

>>> import io
>>> rows = "t;a;label\n" + "".join(f"{i};{10 + i % 3};0\n" for i in range(70))
>>> out = io.StringIO()
>>> summary = replay_csv(io.StringIO(rows), out, ReplayOptions(
...     exclude_columns=("label",), warmup_rows=60, window_rows=1))
>>> summary.rows, summary.sensors, summary.anomalies
(70, ('a',), 0)
>>> out.getvalue().splitlines()[0]
'timestamp,score,is_anomaly,alarm_raised'
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import numpy as np

from twinflow.detection import DetectorConfig, EntityMonitor
from twinflow.errors import TwinflowError
from twinflow.windows import WindowReadings, window_features

OUTPUT_COLUMNS = ("timestamp", "score", "is_anomaly", "alarm_raised")
MISSING = frozenset({"", "nan", "na", "null", "none"})
"""Cells (lower-cased, stripped) that mean "no reading", as NaN does."""
_ROW_MS = 1000
"""Each row is one step of 1 s on the windows' clock (the unit does not matter)."""


class ReplayError(TwinflowError):
    """The input cannot be replayed; the message names the file, row and column."""


@dataclass(frozen=True)
class ReplayOptions:
    """How a CSV is read and windowed; the detector itself is ``detector``."""

    time_column: str | None = None
    """Copied to the output as ``timestamp``; None: the first column."""
    delimiter: str | None = None
    """None: ``;`` or ``,``, whichever the header line has more of."""
    exclude_columns: tuple[str, ...] = ()
    """Columns that never reach the model (labels, ids)."""
    warmup_rows: int | None = None
    """Rows learned from and never flagged; None: the detector's warm-up in windows."""
    window_rows: int = 1
    """Rows per feature window; 1 scores every row on its own."""
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def detector_config(self) -> DetectorConfig:
        """The detector's configuration with the warm-up converted from rows to windows."""
        if self.window_rows < 1:
            raise ReplayError(f"--window must be at least 1 row, got {self.window_rows}")
        if self.warmup_rows is None:
            return self.detector
        if self.warmup_rows < 0:
            raise ReplayError(f"--warmup must not be negative, got {self.warmup_rows}")
        windows = math.ceil(self.warmup_rows / self.window_rows)
        try:
            return replace(self.detector, warmup_windows=windows)
        except ValueError as exc:
            raise ReplayError(
                f"--warmup {self.warmup_rows} rows is {windows} window(s) of "
                f"{self.window_rows} row(s), too short: {exc}"
            ) from None


@dataclass(frozen=True)
class ReplayRow:
    """The verdict on one input row."""

    timestamp: str
    score: float
    """NaN when the row's window had no reading at all."""
    threshold: float | None
    is_anomaly: bool
    """The row lies inside an active alarm."""
    alarm_raised: bool
    """The row is the last of a window that raised a new alarm."""


@dataclass(frozen=True)
class ReplaySummary:
    """What a replay did."""

    rows: int
    windows: int
    anomalies: int
    """Rows inside an active alarm."""
    alarms: int
    """Alarms raised."""
    sensors: tuple[str, ...]
    threshold: float | None
    """The threshold fixed at the end of the warm-up (None if the file ended first)."""
    warmup_windows: int


@dataclass(frozen=True)
class _Layout:
    time_index: int
    time_name: str
    sensors: tuple[tuple[int, str], ...]
    width: int


def _layout(header: list[str], options: ReplayOptions, source: str) -> _Layout:
    names = [name.strip() for name in header]
    if names and names[0].startswith("\ufeff"):
        names[0] = names[0][1:]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ReplayError(f"{source}: header repeats column(s) {repeated}")
    time_column = options.time_column or names[0]
    wanted = [time_column, *options.exclude_columns]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise ReplayError(
            f"{source}: no column(s) {missing} in the header (columns: {names}); "
            "check --time-column and --exclude-columns"
        )
    skip = set(wanted)
    sensors = tuple((i, name) for i, name in enumerate(names) if name not in skip)
    if not sensors:
        raise ReplayError(f"{source}: no sensor columns left after the time and excluded columns")
    return _Layout(names.index(time_column), time_column, sensors, len(names))


def _delimiter(first_line: str, given: str | None) -> str:
    if given is not None:
        if len(given) != 1:
            raise ReplayError(f"--delimiter must be one character, got {given!r}")
        return given
    return ";" if first_line.count(";") > first_line.count(",") else ","


def _value(cell: str, line: int, column: str, source: str) -> float | None:
    text = cell.strip()
    if text.lower() in MISSING:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ReplayError(
            f"{source}: line {line}, column {column!r}: {cell!r} is not a number "
            "(exclude the column with --exclude-columns if it is not a sensor)"
        ) from None
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise ReplayError(f"{source}: line {line}, column {column!r}: {cell!r} is not finite")
    return value


def _event_ms(text: str) -> int | None:
    """Epoch milliseconds of an ISO 8601 date and time (naive means UTC), else None."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def replay_rows(
    lines: Iterable[str], options: ReplayOptions, source: str = "input"
) -> Iterator[ReplayRow | ReplaySummary]:
    """Every row's verdict, in input order, then one :class:`ReplaySummary`.

    A window's rows are yielded when it closes, so memory holds one window, whatever
    the length of the input.
    """
    config = options.detector_config()
    iterator = iter(lines)
    first = next(iterator, None)
    if first is None or not first.strip():
        raise ReplayError(f"{source}: empty file (expected a header line, then rows)")
    delimiter = _delimiter(first, options.delimiter)
    reader = csv.reader(_chain(first, iterator), delimiter=delimiter)
    layout = _layout(next(reader), options, source)
    monitor = EntityMonitor("replay", config)
    sensors = [name for _, name in layout.sensors]
    length_ms = options.window_rows * _ROW_MS
    window: tuple[list[int], list[int], list[float]] = ([], [], [])
    pending: list[str] = []
    rows = window_count = anomalies = 0
    timed: bool | None = None
    """Whether the time column holds dates and times (decided on the first row)."""
    window_ms = 0

    def close() -> Iterator[ReplayRow]:
        nonlocal window_count, anomalies
        series, ts, values = (np.asarray(column) for column in window)
        closed = WindowReadings(
            series.astype(np.int64),
            ts.astype(np.int64) - ts.astype(np.int64) % length_ms,
            ts.astype(np.int64),
            values.astype(np.float64),
            np.zeros(len(ts), dtype=np.int64),
        )
        parts = window_features(closed, length_ms, ["replay"] * len(sensors), sensors)
        by_sensor = {sensors[p.series]: p.features for p in parts if p.features is not None}
        score, threshold, raised = math.nan, monitor.detector.threshold, False
        if by_sensor:
            start_ms = window_ms if timed else window_count * length_ms
            verdict = monitor.process_window(by_sensor, start_ms, start_ms + length_ms)
            score, threshold, raised = (
                verdict.detection.score,
                verdict.detection.threshold,
                verdict.raised,
            )
        in_alarm = monitor.in_alarm
        window_count += 1
        anomalies += in_alarm * len(pending)
        for i, timestamp in enumerate(pending, start=1):
            yield ReplayRow(timestamp, score, threshold, in_alarm, raised and i == len(pending))
        pending.clear()
        for column in window:
            column.clear()

    for cells in reader:
        line = reader.line_num
        if not cells:
            continue  # a blank line is not a row
        if len(cells) != layout.width:
            raise ReplayError(
                f"{source}: line {line} has {len(cells)} fields, the header has {layout.width}"
            )
        ts_ms = rows * _ROW_MS
        for series, (index, name) in enumerate(layout.sensors):
            value = _value(cells[index], line, name, source)
            if value is not None:
                window[0].append(series)
                window[1].append(ts_ms)
                window[2].append(value)
        time_text = cells[layout.time_index]
        if timed is None:
            timed = _event_ms(time_text) is not None
        if timed and not pending:
            event_ms = _event_ms(time_text)
            if event_ms is None:
                raise ReplayError(
                    f"{source}: line {line}, column {layout.time_name!r}: {time_text!r} is not "
                    "a date and time like the rows before it"
                )
            window_ms = event_ms
        pending.append(time_text)
        rows += 1
        if rows % options.window_rows == 0:
            yield from close()
    if rows == 0:
        raise ReplayError(f"{source}: no rows after the header")
    if pending:
        yield from close()
    yield ReplaySummary(
        rows=rows,
        windows=window_count,
        anomalies=anomalies,
        alarms=monitor.alarms.raised,
        sensors=tuple(name for _, name in layout.sensors),
        threshold=monitor.detector.threshold,
        warmup_windows=config.warmup_windows,
    )


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def replay_csv(source: TextIO, out: TextIO, options: ReplayOptions) -> ReplaySummary:
    """Replay ``source`` into ``out`` (``OUTPUT_COLUMNS``); the summary."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(OUTPUT_COLUMNS)
    name = getattr(source, "name", "input")
    for item in replay_rows(source, options, source=str(name)):
        if isinstance(item, ReplaySummary):
            return item
        score = "" if math.isnan(item.score) else repr(item.score)
        writer.writerow((item.timestamp, score, int(item.is_anomaly), int(item.alarm_raised)))
    raise AssertionError("replay_rows always ends with a summary")


def replay_file(input_path: Path, output_path: Path, options: ReplayOptions) -> ReplaySummary:
    """Replay a CSV file into another; the output is replaced only when the replay succeeds."""
    if not input_path.is_file():
        raise ReplayError(f"{input_path}: no such file")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial")
    try:
        with (
            input_path.open(newline="", encoding="utf-8") as source,
            partial.open("w", newline="", encoding="utf-8") as out,
        ):
            summary = replay_csv(source, out, options)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(output_path)
    return summary
