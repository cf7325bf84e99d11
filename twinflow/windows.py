"""Event-time tumbling windows, aligned to the epoch, for all series of a partition.

A series is one entity's sensor. :class:`OpenWindows` keeps the accepted readings of
every open window column by column; the caller decides when a window closes (when its
entity's watermark passes the window's end, or when the entity goes silent) and pops
the closed readings, and :func:`window_features` turns them into one
:class:`SensorWindow` per series and window. Features are computed from the readings
themselves when the window closes, never from running sums, so they are the same
whichever batches the readings arrived in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from schemas.outputs import Flag, SensorWindow

Int64s = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
_TS_BITS = 43
"""Epoch milliseconds below 2**43 reach the year 2248 (the raw contract stops at 2200)."""


def _empty_ints() -> Int64s:
    return np.empty(0, dtype=np.int64)


def series_keys(series: Int64s, ts_ms: Int64s) -> Int64s:
    """One int64 per (series, timestamp): a reading's identity within a partition."""
    return (series << _TS_BITS) | ts_ms


@dataclass
class WindowReadings:
    """Readings of windows, column by column."""

    series: Int64s = field(default_factory=_empty_ints)
    start_ms: Int64s = field(default_factory=_empty_ints)
    ts_ms: Int64s = field(default_factory=_empty_ints)
    value: Floats = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    flags: Int64s = field(default_factory=_empty_ints)

    def __len__(self) -> int:
        return len(self.ts_ms)

    def select(self, mask: npt.NDArray[np.bool_]) -> WindowReadings:
        """The readings where ``mask`` holds."""
        return WindowReadings(
            self.series[mask],
            self.start_ms[mask],
            self.ts_ms[mask],
            self.value[mask],
            self.flags[mask],
        )


@dataclass
class OpenWindows:
    """The accepted readings of every open window of a partition."""

    length_ms: int
    readings: WindowReadings = field(default_factory=WindowReadings)
    newest_ms: Int64s = field(default_factory=_empty_ints)
    """Per series code, at least the newest timestamp ever held: only a reading at or
    before it can be a repeat, so :meth:`holds` rarely searches the held readings."""

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        if "newest_ms" not in state:  # a snapshot from before the field
            self.newest_ms = _empty_ints()
            held = self.readings
            self._raise_newest(held.series, held.ts_ms)

    def _raise_newest(self, series: Int64s, ts_ms: Int64s) -> None:
        if not len(series):
            return
        size = int(series.max()) + 1
        if size > len(self.newest_ms):
            grown = np.full(size, -1, dtype=np.int64)
            grown[: len(self.newest_ms)] = self.newest_ms
            self.newest_ms = grown
        np.maximum.at(self.newest_ms, series, ts_ms)

    def start_of(self, ts_ms: Int64s) -> Int64s:
        """The start of the window each timestamp falls in."""
        return ts_ms - ts_ms % self.length_ms

    def add(self, series: Int64s, ts_ms: Int64s, value: Floats, flags: Int64s) -> None:
        """Keep accepted readings until their windows close."""
        if not len(ts_ms):
            return
        held = self.readings
        self._raise_newest(series, ts_ms)
        self.readings = WindowReadings(
            np.concatenate([held.series, series]),
            np.concatenate([held.start_ms, self.start_of(ts_ms)]),
            np.concatenate([held.ts_ms, ts_ms]),
            np.concatenate([held.value, value]),
            np.concatenate([held.flags, flags]),
        )

    def holds(self, series: Int64s, ts_ms: Int64s) -> npt.NDArray[np.bool_]:
        """Which of these readings (by series and time) an open window already holds."""
        held = self.readings
        found = np.zeros(len(ts_ms), dtype=bool)
        if not len(held) or not len(ts_ms):
            return found
        newest = np.full(len(ts_ms), -1, dtype=np.int64)
        known = series < len(self.newest_ms)
        newest[known] = self.newest_ms[series[known]]
        suspects = np.flatnonzero(ts_ms <= newest)
        if len(suspects):
            found[suspects] = np.isin(
                series_keys(series[suspects], ts_ms[suspects]),
                series_keys(held.series, held.ts_ms),
            )
        return found

    def pop_closed(self, limit_by_series: Int64s) -> WindowReadings:
        """Remove and return the readings of windows ending at or before their limit."""
        held = self.readings
        if not len(held):
            return held
        closing = held.start_ms + self.length_ms <= limit_by_series[held.series]
        if not closing.any():
            return WindowReadings()
        self.readings = held.select(~closing)
        return held.select(closing)

    def starts(self, series: Int64s) -> list[int]:
        """Starts of the open windows holding readings of these series."""
        held = self.readings
        return sorted(set(held.start_ms[np.isin(held.series, series)].tolist()))


@dataclass(frozen=True)
class ClosedSeriesWindow:
    """One series' part of a closed window: its features and its newest reading."""

    series: int
    start_ms: int
    features: SensorWindow | None
    """None when every reading of the window was a spike."""
    newest_ts_ms: int
    newest_value: float
    newest_flags: int


def window_features(
    closed: WindowReadings,
    length_ms: int,
    entity_of_series: list[str],
    sensor_of_series: list[str],
) -> list[ClosedSeriesWindow]:
    """Features of every (series, window) in ``closed``, ordered by series then start.

    Spikes are left out of the features and counted among the flagged readings.
    """
    if not len(closed):
        return []
    order = np.lexsort((closed.ts_ms, closed.start_ms, closed.series))
    series, start = closed.series[order], closed.start_ms[order]
    ts, value, flags = closed.ts_ms[order], closed.value[order], closed.flags[order]
    new_group = np.ones(len(ts), dtype=bool)
    new_group[1:] = (series[1:] != series[:-1]) | (start[1:] != start[:-1])
    firsts = np.flatnonzero(new_group)
    lasts = np.append(firsts[1:], len(ts)) - 1
    flagged = np.add.reduceat((flags != 0).astype(np.int64), firsts)
    group_of = np.cumsum(new_group) - 1

    keep = (flags & Flag.SPIKE) == 0
    kept_group = group_of[keep]
    k_ts, k_value = ts[keep], value[keep]
    stats = _group_stats(kept_group, k_ts, k_value, len(firsts))

    # Plain Python values in bulk: reading numpy scalars one by one costs more than
    # everything above.
    columns = zip(
        series[firsts].tolist(),
        start[firsts].tolist(),
        stats.count.tolist(),
        stats.mean.tolist(),
        stats.min.tolist(),
        stats.max.tolist(),
        stats.std.tolist(),
        stats.last.tolist(),
        stats.slope.tolist(),
        flagged.tolist(),
        ts[lasts].tolist(),
        value[lasts].tolist(),
        flags[lasts].tolist(),
        strict=True,
    )
    result = []
    for code, window_start, count, *features_and_flagged, ts_ms, value_, flags_ in columns:
        features = None
        if count:
            features = SensorWindow(
                entity_of_series[code],
                sensor_of_series[code],
                window_start,
                window_start + length_ms,
                count,
                *features_and_flagged,
            )
        result.append(ClosedSeriesWindow(code, window_start, features, ts_ms, value_, flags_))
    return result


@dataclass
class _Stats:
    count: Int64s
    mean: Floats
    min: Floats
    max: Floats
    std: Floats
    last: Floats
    slope: Floats


def _group_stats(group: Int64s, ts: Int64s, value: Floats, groups: int) -> _Stats:
    """Per-group statistics of values sorted by (group, ts); empty groups get count 0."""
    count = np.bincount(group, minlength=groups).astype(np.int64)
    nan = np.full(groups, np.nan)
    stats = _Stats(
        count, nan.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy(), np.zeros(groups)
    )
    if not len(value):
        return stats
    present = np.flatnonzero(count)
    firsts = np.searchsorted(group, present)
    lasts = np.append(firsts[1:], len(group)) - 1
    n = count[present].astype(np.float64)
    mean = np.add.reduceat(value, firsts) / n
    centred = value - np.repeat(mean, count[present])
    seconds = (ts - np.repeat(ts[firsts], count[present])) / 1000.0
    mean_s = np.add.reduceat(seconds, firsts) / n
    centred_s = seconds - np.repeat(mean_s, count[present])
    sxx = np.add.reduceat(centred_s * centred_s, firsts)
    sxy = np.add.reduceat(centred_s * centred, firsts)
    sloped = (count[present] >= 2) & (ts[lasts] > ts[firsts])
    stats.mean[present] = mean
    stats.min[present] = np.minimum.reduceat(value, firsts)
    stats.max[present] = np.maximum.reduceat(value, firsts)
    stats.std[present] = np.sqrt(np.add.reduceat(centred * centred, firsts) / n)
    stats.last[present] = value[lasts]
    stats.slope[present] = np.where(sloped, sxy / np.where(sloped, sxx, 1.0), 0.0)
    return stats
