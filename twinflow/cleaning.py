"""Cleaning rules for one sensor's readings: flags for every reading, no silent drop.

Pure functions over small picklable per-sensor histories.

Rules (thresholds come from the twin model's sensor spec):

- rate of change: ``|dv/dt|`` above ``max_rate`` -> RATE;
- stuck: the same value for at least ``stuck_after_s`` -> STUCK;
- spike: Hampel filter, ``|x - median| > 3 * 1.4826 * MAD`` of the previous
  ``HAMPEL_WINDOW`` values (and more than 1 % of the sensor's range) -> SPIKE. Every
  value enters that window, spikes too: the median shrugs off a lone outlier, and a
  real level shift must become the new normal after half a window, not be flagged
  forever;
- gap: more than ``GAP_FACTOR`` typical (median of the last few) sampling intervals
  since the previous reading -> GAP on the first reading after it.

Readings older than the sensor's newest (out of order, within the allowed lateness)
are flagged only by the spike rule: the other rules compare against the newest reading.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.outputs import Flag
from twinflow.twin_model import SensorSpec

HAMPEL_WINDOW = 10
HAMPEL_SIGMAS = 3.0
MAD_TO_SIGMA = 1.4826
SPIKE_MIN_RANGE_FRACTION = 0.01
GAP_FACTOR = 3.0
_INTERVALS_KEPT = 9


@dataclass
class SensorHistory:
    """What the rules remember of one sensor."""

    last_ts_ms: int | None = None
    last_value: float | None = None
    unchanged_since_ms: int | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=HAMPEL_WINDOW))
    intervals: deque[int] = field(default_factory=lambda: deque(maxlen=_INTERVALS_KEPT))


def quality_flags(spec: SensorSpec, history: SensorHistory, ts_ms: int, value: float) -> int:
    """The flags of one reading (canonical unit); updates ``history``.

    >>> from twinflow.twin_model import SensorSpec
    >>> spec = SensorSpec(unit="bar", range=(0, 10), max_rate=1, stuck_after_s=3)
    >>> history = SensorHistory()
    >>> values = [5, 5.1, 5, 5.1, 5.2, 5.1]
    >>> [quality_flags(spec, history, t * 1000, v) for t, v in enumerate(values)]
    [0, 0, 0, 0, 0, 0]
    >>> Flag(quality_flags(spec, history, 6000, 9.0))  # +3.9 bar in 1 s
    <Flag.RATE|SPIKE: 5>
    """
    flags = 0
    low, high = spec.range
    if len(history.recent) >= HAMPEL_WINDOW // 2:
        centre = median(history.recent)
        mad = median(abs(v - centre) for v in history.recent)
        deviation = abs(value - centre)
        if (
            deviation > HAMPEL_SIGMAS * MAD_TO_SIGMA * mad
            and deviation > SPIKE_MIN_RANGE_FRACTION * (high - low)
        ):
            flags |= Flag.SPIKE
    if history.last_ts_ms is not None and ts_ms <= history.last_ts_ms:
        return flags  # out of order: only the spike rule applies, history stays in order
    if history.last_ts_ms is not None and history.last_value is not None:
        dt_ms = ts_ms - history.last_ts_ms
        if abs(value - history.last_value) * 1000 > spec.max_rate * dt_ms:
            flags |= Flag.RATE
        if len(history.intervals) >= 3 and dt_ms > GAP_FACTOR * median(history.intervals):
            flags |= Flag.GAP
        # Gaps count as intervals too: a lone gap barely moves the median, and a new
        # sampling rate must become the typical interval, not be a gap forever.
        history.intervals.append(dt_ms)
        if value == history.last_value:
            since = history.unchanged_since_ms or history.last_ts_ms
            history.unchanged_since_ms = since
            if ts_ms - since >= spec.stuck_after_s * 1000:
                flags |= Flag.STUCK
        else:
            history.unchanged_since_ms = None
    history.last_ts_ms = ts_ms
    history.last_value = value
    history.recent.append(value)
    return flags


def batch_parameters(spec: SensorSpec) -> tuple[float, int, float]:
    """``(max_rate, stuck_after_ms, spike_floor)`` of ``spec`` for :meth:`SeriesCleaning.flags`.

    ``stuck_after_ms`` is rounded up: an integer number of milliseconds reaches
    ``stuck_after_s * 1000`` exactly when it reaches its ceiling, so the integer
    comparison agrees with :func:`quality_flags` even for fractional seconds.

    >>> from twinflow.twin_model import SensorSpec
    >>> batch_parameters(SensorSpec(unit="bar", range=(0, 10), max_rate=1, stuck_after_s=2.5))
    (1.0, 2500, 0.1)
    """
    low, high = spec.range
    return (
        float(spec.max_rate),
        math.ceil(spec.stuck_after_s * 1000),
        SPIKE_MIN_RANGE_FRACTION * (high - low),
    )


_Ints = npt.NDArray[np.int64]
_Floats = npt.NDArray[np.float64]
_Bools = npt.NDArray[np.bool_]

_INT64_MIN = np.iinfo(np.int64).min
_ABSENT = np.inf
"""Pads windows: sorts after every finite value, and min/max keep it (NaN would spread)."""

# An optimal sorting network for 10 inputs (29 comparators, Knuth TAOCP 5.3.4): sorting
# thousands of 10-value windows column by column beats np.sort's per-row overhead ~3x.
_NETWORK_10 = (
    *((0, 8), (1, 9), (2, 7), (3, 5), (4, 6)),
    *((0, 2), (1, 4), (5, 8), (7, 9)),
    *((0, 3), (2, 4), (5, 7), (6, 9)),
    *((0, 1), (3, 6), (8, 9)),
    *((1, 5), (2, 3), (4, 8), (6, 7)),
    *((1, 2), (3, 5), (4, 6), (7, 8)),
    *((2, 3), (4, 5), (6, 7)),
    *((3, 4), (5, 6)),
)
_SORTED_WIDTH = 10
"""Windows are sorted at this width (shorter ones padded): at least both window sizes."""


class SeriesCleaning:
    """Cleaning histories of many series (one series = one entity's sensor), as arrays. Picklable.

    The batch twin of :func:`quality_flags`: :meth:`flags` gives exactly the flags the
    scalar rules give reading by reading, in numpy over whole batches. Values must be
    finite (the raw schema rejects the others): infinity pads the windows, and
    ``statistics.median`` has no defined order for NaN to reproduce.

    >>> cleaning = SeriesCleaning()
    >>> n = 7
    >>> cleaning.flags(
    ...     np.zeros(n, np.int64),
    ...     np.arange(n, dtype=np.int64) * 1000,
    ...     np.array([5, 5.1, 5, 5.1, 5.2, 5.1, 9.0]),
    ...     np.full(n, 1.0),
    ...     np.full(n, 3000, np.int64),
    ...     np.full(n, 0.1),
    ... ).tolist()
    [0, 0, 0, 0, 0, 0, 5]
    """

    def __init__(self) -> None:
        """No series yet; codes are added as they appear."""
        # Per series code: what SensorHistory holds, with "None" as has_last False.
        self._has_last: _Bools = np.zeros(0, np.bool_)
        self._last_ts: _Ints = np.zeros(0, np.int64)
        self._last_value: _Floats = np.zeros(0, np.float64)
        # Not SensorHistory.unchanged_since_ms but what the next equal reading compares
        # against, ``unchanged_since_ms or last_ts_ms``: one number, `or` quirk included.
        self._since: _Ints = np.zeros(0, np.int64)
        # Oldest to newest, right-aligned, _ABSENT where the history is shorter.
        self._recent: _Floats = np.full((0, HAMPEL_WINDOW), _ABSENT)
        self._n_recent: _Ints = np.zeros(0, np.int64)
        # Float to share the window code; intervals are far below 2**53 ms, so exact.
        self._intervals: _Floats = np.full((0, _INTERVALS_KEPT), _ABSENT)
        self._n_intervals: _Ints = np.zeros(0, np.int64)

    @property
    def size(self) -> int:
        """How many series codes have state (seen or not)."""
        return len(self._has_last)

    def _grow(self, size: int) -> None:
        old = self.size
        if size <= old:
            return
        extra = max(size, 2 * old) - old  # doubling: codes usually arrive a few at a time

        def more(array: npt.NDArray[Any], fill: float) -> npt.NDArray[Any]:
            return np.concatenate([array, np.full((extra, *array.shape[1:]), fill, array.dtype)])

        self._has_last = more(self._has_last, False)
        self._last_ts = more(self._last_ts, 0)
        self._last_value = more(self._last_value, 0.0)
        self._since = more(self._since, 0)
        self._recent = more(self._recent, _ABSENT)
        self._n_recent = more(self._n_recent, 0)
        self._intervals = more(self._intervals, _ABSENT)
        self._n_intervals = more(self._n_intervals, 0)

    def flags(
        self,
        series: _Ints,
        ts_ms: _Ints,
        values: _Floats,
        max_rate: _Floats,
        stuck_after_ms: _Ints,
        spike_floor: _Floats,
    ) -> _Ints:
        """Flags of each reading, as quality_flags gives them one by one; updates the histories.

        Readings are applied in array order within each series; series may interleave.
        ``series`` are dense codes ``0..S-1`` chosen by the caller (new ones may appear in
        any call); the per-reading parameters are those of :func:`batch_parameters`.
        """
        series = np.asarray(series, np.int64)
        ts_ms = np.asarray(ts_ms, np.int64)
        values = np.asarray(values, np.float64)
        n = len(series)
        out: _Ints = np.zeros(n, np.int64)
        if n == 0:
            return out
        if int(series.min()) < 0:
            raise ValueError("series codes must be >= 0")
        self._grow(int(series.max()) + 1)

        # Series by series, each in array order (stable), which is processing order.
        order = _stable_order(series)
        s = series[order]
        t = ts_ms[order]
        v = values[order]
        first = np.empty(n, np.bool_)
        first[0] = True
        np.not_equal(s[1:], s[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        codes = s[starts]
        n_groups = len(starts)
        g = np.cumsum(first) - 1
        has_last_g = self._has_last[codes]
        last_ts_g = self._last_ts[codes]

        # In order = newer than every earlier reading of its series (the history's
        # last_ts is the newest of all before, as out-of-order ones never move it).
        before_max = np.empty(n, np.int64)
        before_max[1:] = _grouped_cummax(t, g, n_groups)[:-1]
        before_max[first] = _INT64_MIN
        np.maximum(before_max, np.where(has_last_g, last_ts_g, _INT64_MIN)[g], out=before_max)
        in_order = (t > before_max) | (first & ~has_last_g[g])

        idx = np.flatnonzero(in_order)
        gi = g[idx]
        n_items = np.bincount(gi, minlength=n_groups)
        item_offset = np.cumsum(n_items) - n_items
        # Each reading's Hampel window: the 10 in-order values before it in its series.
        items_before = np.cumsum(in_order) - in_order - item_offset[g]
        windows, count, self._recent[codes], self._n_recent[codes] = _windows(
            self._recent[codes], self._n_recent[codes], v[idx], gi, n_items, g, items_before
        )
        spike = _spikes(windows, count, v, np.asarray(spike_floor, np.float64)[order])
        fl = spike * np.int64(Flag.SPIKE)

        # Rate, gap and stuck: in-order readings against the previous in-order one.
        ti = t[idx]
        vi = v[idx]
        first_item = items_before[idx] == 0
        prev_ts = np.empty_like(ti)
        prev_ts[1:] = ti[:-1]
        prev_ts[first_item] = last_ts_g[gi[first_item]]
        prev_v = np.empty_like(vi)
        prev_v[1:] = vi[:-1]
        prev_v[first_item] = self._last_value[codes][gi[first_item]]
        has_prev = ~first_item | has_last_g[gi]
        dt = ti - prev_ts
        item_flags = np.zeros(len(idx), np.int64)

        rate_i = np.asarray(max_rate, np.float64)[order][idx]
        rate = has_prev & (np.abs(vi - prev_v) * 1000 > rate_i * dt)
        item_flags[rate] |= int(Flag.RATE)

        # Every in-order reading with a predecessor adds its interval after the check.
        iv = np.flatnonzero(has_prev)
        iv_g = gi[iv]
        n_iv = np.bincount(iv_g, minlength=n_groups)
        iv_before = np.arange(len(iv)) - (np.cumsum(n_iv) - n_iv)[iv_g]
        iv_dt = dt[iv]
        iv_windows, iv_count, self._intervals[codes], self._n_intervals[codes] = _windows(
            self._intervals[codes],
            self._n_intervals[codes],
            iv_dt.astype(np.float64),
            iv_g,
            n_iv,
            iv_g,
            iv_before,
        )
        gap = (iv_count >= 3) & (iv_dt > GAP_FACTOR * _median(iv_windows, iv_count))
        item_flags[iv[gap]] |= int(Flag.GAP)

        # Stuck. ``since`` is what the scalar rule compares with, ``unchanged_since or
        # last_ts``: the start of the run of equal values, except that `or` takes a 0 ms
        # start for "none", so the run then restarts at its next reading.
        since_g = self._since[codes]
        equal = has_prev & (vi == prev_v)
        starts_run = ~equal
        zero_before = np.empty(len(idx), np.bool_)
        zero_before[1:] = starts_run[:-1] & (ti[:-1] == 0)
        zero_before[first_item] = has_last_g[gi[first_item]] & (since_g[gi[first_item]] == 0)
        # (A 0 ms reading that does not start a run inherits a non-zero since: every
        # earlier reading of the run is older, so negative, so not 0.)
        starts_run |= zero_before
        anchor = starts_run | first_item
        after = np.where(starts_run, ti, since_g[gi])
        since_after = after[np.maximum.accumulate(np.where(anchor, np.arange(len(idx)), 0))]
        since_before = np.empty_like(since_after)
        since_before[1:] = since_after[:-1]
        since_before[first_item] = since_g[gi[first_item]]
        stuck_i = np.asarray(stuck_after_ms, np.int64)[order][idx]
        stuck = equal & (ti - since_before >= stuck_i)
        item_flags[stuck] |= int(Flag.STUCK)

        fl[idx] |= item_flags
        out[order] = fl

        # The newest in-order reading of each series becomes its last.
        touched = n_items > 0
        last_item = (item_offset + n_items - 1)[touched]
        touched_codes = codes[touched]
        self._has_last[touched_codes] = True
        self._last_ts[touched_codes] = ti[last_item]
        self._last_value[touched_codes] = vi[last_item]
        self._since[touched_codes] = since_after[last_item]
        return out


def _stable_order(codes: _Ints) -> _Ints:
    """``np.argsort(codes, kind="stable")``, with numpy's radix sort where codes allow it.

    Radix sort only serves 16-bit keys, and is several times faster than the merge sort
    used for int64; wider codes go 16 bits at a time, least significant first.
    """
    high = int(codes.max())
    if high >= 2**32:
        wide: _Ints = np.argsort(codes, kind="stable")
        return wide
    order: _Ints = np.argsort((codes & 0xFFFF).astype(np.uint16), kind="stable")
    if high >= 2**16:
        order = order[np.argsort((codes[order] >> 16).astype(np.uint16), kind="stable")]
    return order


def _grouped_cummax(t: _Ints, g: _Ints, n_groups: int) -> _Ints:
    """Running max of ``t`` restarting at each group (``g`` sorted, 0..n_groups-1)."""
    low = int(t.min())
    span = int(t.max()) - low + 1
    if span * n_groups < 2**62:
        # Lift each group above all earlier ones, so one running max serves them all.
        lift = g * span
        return np.maximum.accumulate(t - low + lift) - lift + low
    # Timestamps too spread for the lift: the same on their ranks.
    distinct, rank = np.unique(t, return_inverse=True)
    lift = g * len(distinct)
    result: _Ints = distinct[np.maximum.accumulate(rank.reshape(-1) + lift) - lift]
    return result


def _windows(
    history: _Floats,
    n_history: _Ints,
    items: _Floats,
    item_group: _Ints,
    n_items: _Ints,
    query_group: _Ints,
    query_before: _Ints,
) -> tuple[list[_Floats], _Ints, _Floats, _Ints]:
    """Sliding windows over each group's history followed by its new items.

    ``history`` holds one right-aligned row per group (``n_history`` values), ``items``
    the new values sorted by group. Returns, for each query, the ``K`` values before the
    group's ``query_before``-th new item as columns (padded to ``_SORTED_WIDTH`` with
    ``_ABSENT``), how many of them are values, then the new history rows (the last
    ``K`` values) and their counts.
    """
    n_groups, k = history.shape
    # Group g's block is its history row then its items, blocks end to end.
    block_start = k * np.arange(n_groups) + np.cumsum(n_items) - n_items
    extended = np.empty(n_groups * k + len(items), np.float64)
    extended[block_start[:, None] + np.arange(k)] = history
    extended[k * (item_group + 1) + np.arange(len(items))] = items
    at = block_start[query_group] + query_before
    # Column by column with take: far faster than fancy indexing a (queries, K) block.
    columns = np.full((_SORTED_WIDTH, len(at)), _ABSENT)
    for j in range(k):
        extended.take(at, out=columns[j])
        at += 1
    count = np.minimum(n_history[query_group] + query_before, k)
    new_history = extended.take((block_start + n_items)[:, None] + np.arange(k))
    return list(columns), count, new_history, np.minimum(n_history + n_items, k)


def _median(columns: list[_Floats], count: _Ints) -> _Floats:
    """Median of each row's first ``count`` values, as ``statistics.median`` computes it.

    ``columns`` are ``_SORTED_WIDTH`` arrays, padded with ``_ABSENT``, which sorting
    leaves last: the values are each sorted row's first ``count``. The even case is the
    mean of the two middle ones, ``(a + b) / 2`` like ``statistics.median``. Rows
    without values give infinity. Sorts ``columns`` (the list, not the arrays' content).
    """
    spare = np.empty_like(columns[0])
    for i, j in _NETWORK_10:
        # min into the spare array, max in place, then the spare takes i's place.
        np.minimum(columns[i], columns[j], out=spare)
        np.maximum(columns[i], columns[j], out=columns[j])
        columns[i], spare = spare, columns[i]
    n = len(count)
    middle = np.stack(columns[: int(count.max(initial=0)) // 2 + 1]).reshape(-1)
    rows = np.arange(n)
    a = middle.take(np.maximum(count - 1, 0) // 2 * n + rows)
    b = middle.take(count // 2 * n + rows)
    median: _Floats = np.where(count % 2 == 1, a, (a + b) / 2)
    return median


def _spikes(windows: list[_Floats], count: _Ints, values: _Floats, floor: _Floats) -> _Bools:
    """The Hampel rule of :func:`quality_flags` for each value against its window."""
    centre = _median(windows, count)
    # Short windows take no part; keep their centre finite so that inf - inf stays out.
    usable = count >= HAMPEL_WINDOW // 2
    centre[~usable] = 0.0
    for window in windows:  # the windows are not needed after: deviations in place
        np.abs(np.subtract(window, centre, out=window), out=window)
    mad = _median(windows, count)
    deviation = np.abs(values - centre)
    spikes: _Bools = usable & (deviation > HAMPEL_SIGMAS * MAD_TO_SIGMA * mad) & (deviation > floor)
    return spikes
