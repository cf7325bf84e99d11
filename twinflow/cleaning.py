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

from collections import deque
from dataclasses import dataclass, field
from statistics import median

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
