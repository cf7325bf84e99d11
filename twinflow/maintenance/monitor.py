"""Per entity: when each limited sensor's trend reaches its alarm limit, and when to say so.

Window means are averaged into buckets (15 min by default): long against a plant's
process cycles (minutes), short against the wear this is for (hours to days). At the
end of every bucket each sensor with an alarm limit gets a least-squares line through
its bucket history (:mod:`twinflow.maintenance.trend`), and a forecast when its slope is
significant and heads for a limit. When the forecast's lower bound of time to limit
falls inside ``horizon_h``, the entity's ``maintenance_due`` alarm is raised, through
the alarm lifecycle anomalies use (:class:`~twinflow.detection.alarms.AlarmTracker`).

A history restarts where the series breaks from its trend: two buckets in a row
outside the line's prediction interval (``break_z``) mean the line no longer describes
the machine (a repair, a new setpoint, a new load), so only buckets from the first of
those on are fitted. That is what makes a repaired machine's forecast and alarm go
away, and what keeps a level shift from passing for a trend. An operator's ``reject``
restarts every history of the entity at once.

Pure code, plain state (a few small numpy arrays and one alarm tracker): it pickles in
about a kilobyte per sensor and costs a few dictionary lookups per window; the fit runs
once per bucket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from schemas.control import Verdict
from schemas.outputs import Alarm, AlarmEvent, AlarmKind, Contribution, LimitForecast, SensorWindow
from twinflow.detection.alarms import AlarmPolicy, AlarmTracker
from twinflow.maintenance.trend import Trends, fit_spans, student_t, time_to_limit
from twinflow.twin_model import SensorSpec

_HOUR_MS = 3_600_000


@dataclass(frozen=True)
class MaintenanceConfig:
    """How every entity's trends are fitted and judged.

    Chosen on principle, not on results (see the README's predictive maintenance
    section for what they measure): the bucket against the cycles and the wear it
    separates; one-sided 3-sigma evidence for a slope (the rate of an alarm on a
    healthy machine is then the rate of a 3-sigma event among strongly overlapping
    fits); 95 % bounds; breaks at 3 sigmas twice in a row (a chance pair is 1 in
    140 000 buckets); the maintenance horizon of the issue that asked for this (48 h).
    """

    bucket_s: float = 900.0
    """Window means are averaged over this long before they are fitted."""
    history_h: float = 48.0
    """The longest history a line is fitted on."""
    spans_h: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0, 48.0)
    """Recent spans each trend is fitted over; the one with the strongest slope
    evidence is used (see :func:`~twinflow.maintenance.trend.fit_spans`)."""

    min_buckets: int = 8
    """Buckets a history needs before it forecasts (2 h of 15-min buckets)."""
    significance: float = 3.0
    """A slope is a trend when it is this many standard errors from 0 (Student's t
    with the autocorrelation-adjusted degrees of freedom, at this normal quantile)."""
    confidence: float = 1.96
    """Bounds of time to limit: this normal quantile (95 %), t-corrected likewise."""
    break_z: float = 3.0
    break_run: int = 2
    """A history restarts after this many buckets in a row beyond ``break_z`` of its
    line's prediction."""
    horizon_h: float = 48.0
    """Maintenance is due when the lower bound of time to limit is under this."""
    clear_buckets: int = 4
    """Buckets in a row without maintenance due that clear the alarm (an hour)."""
    min_fill: float = 0.5
    """Share of a bucket's windows a sensor needs for the bucket to count."""

    def __post_init__(self) -> None:
        if self.bucket_s <= 0 or self.history_h * 3600 < self.bucket_s * self.min_buckets:
            raise ValueError(
                f"history_h={self.history_h} must hold min_buckets={self.min_buckets} buckets "
                f"of bucket_s={self.bucket_s}"
            )
        if self.min_buckets < 4:
            raise ValueError(f"min_buckets must be at least 4, got {self.min_buckets}")

    @property
    def bucket_ms(self) -> int:
        """The bucket length in milliseconds."""
        return round(self.bucket_s * 1000)

    @property
    def capacity(self) -> int:
        """Buckets a history can hold."""
        return math.ceil(self.history_h * 3600 / self.bucket_s)

    @property
    def alarm_policy(self) -> AlarmPolicy:
        """Maintenance alarms clear after ``clear_buckets`` and are never re-baselined."""
        return AlarmPolicy(self.clear_buckets, None)


@dataclass(frozen=True, slots=True)
class MaintenanceVerdict:
    """After one window: the entity's current forecasts and the alarm transitions made."""

    forecasts: Mapping[str, LimitForecast]
    """Per sensor with a significant trend heading for an alarm limit."""
    alarms: list[Alarm]
    updated: bool
    """Whether a bucket closed, so ``forecasts`` were remade."""


@dataclass
class _Limits:
    names: list[str]
    high: np.ndarray
    low: np.ndarray
    range_low: np.ndarray
    range_high: np.ndarray


def _limits(sensors: Mapping[str, SensorSpec]) -> _Limits:
    limited = {
        name: spec
        for name, spec in sorted(sensors.items())
        if spec.limits is not None
        and (spec.limits.alarm_high is not None or spec.limits.alarm_low is not None)
    }

    def column(values: list[float | None]) -> np.ndarray:
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)

    return _Limits(
        names=list(limited),
        high=column([s.limits.alarm_high for s in limited.values() if s.limits]),
        low=column([s.limits.alarm_low for s in limited.values() if s.limits]),
        range_low=column([s.range[0] for s in limited.values()]),
        range_high=column([s.range[1] for s in limited.values()]),
    )


@dataclass
class MaintenanceMonitor:
    """One entity's trends, forecasts and ``maintenance_due`` alarm.

    >>> from twinflow.twin_model import OperatingLimits, SensorSpec
    >>> spec = SensorSpec(unit="mm/s", range=(0, 50), max_rate=20, stuck_after_s=30,
    ...                   limits=OperatingLimits(alarm_high=7.1))
    >>> monitor = MaintenanceMonitor("pump-001", {"vibration_rms": spec})
    >>> alarms = []
    >>> for i in range(4 * 360):  # 10-s windows rising 0.1 mm/s an hour
    ...     value = 2.0 + 0.1 * i / 360 + 0.01 * (i % 7)
    ...     window = SensorWindow("pump-001", "vibration_rms", i * 10_000, (i + 1) * 10_000,
    ...                           10, value, value, value, 0.0, value, 0.0, 0)
    ...     verdict = monitor.process_window({"vibration_rms": window}, i * 10_000,
    ...                                      (i + 1) * 10_000)
    ...     alarms.extend(verdict.alarms)
    >>> forecast = verdict.forecasts["vibration_rms"]
    >>> round(forecast.slope_per_h, 2), round(forecast.time_to_limit_s / 3600, 1)
    (0.1, 46.7)
    >>> first = alarms[0]
    >>> first.kind.value, first.event.value, first.alarm_id, first.forecast.sensor
    ('maintenance_due', 'raised', 'pump-001/maintenance_due@9000000', 'vibration_rms')
    """

    entity_id: str
    sensors: Mapping[str, SensorSpec]
    config: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    forecasts: dict[str, LimitForecast] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._limits = _limits(self.sensors)
        n, capacity = len(self._limits.names), self.config.capacity
        self._times_h = np.full(capacity, np.nan)
        self._values = np.full((n, capacity), np.nan)
        self._since_h = np.full(n, -np.inf)
        self._misses = np.zeros(n, dtype=np.int64)
        self._first_miss_h = np.full(n, -np.inf)
        self._trends: Trends | None = None
        self._trends_at_h = 0.0
        self._bucket = -1
        self._sums = np.zeros(n)
        self._counts = np.zeros(n, dtype=np.int64)
        self._window_ms = 0
        self.alarms = AlarmTracker(
            self.entity_id, self.config.alarm_policy, kind=AlarmKind.MAINTENANCE_DUE
        )
        del self.sensors  # the limits are all it needs; the specs need not be pickled

    @property
    def watched(self) -> list[str]:
        """The sensors with an alarm limit, whose trends are followed."""
        return list(self._limits.names)

    def process_window(
        self, windows: Mapping[str, SensorWindow], start_ms: int, end_ms: int
    ) -> MaintenanceVerdict:
        """Take one closed window of the entity (its sensors' features)."""
        if not self._limits.names:
            return MaintenanceVerdict(self.forecasts, [], False)
        bucket_ms = self.config.bucket_ms
        bucket = start_ms // bucket_ms
        alarms: list[Alarm] = []
        updated = False
        if self._bucket != bucket:
            if self._bucket >= 0:
                alarms = self._close()
                updated = True
            self._bucket = bucket
        self._window_ms = end_ms - start_ms
        for k, name in enumerate(self._limits.names):
            window = windows.get(name)
            if window is not None and window.count:
                self._sums[k] += window.mean
                self._counts[k] += 1
        if end_ms >= (bucket + 1) * bucket_ms:
            alarms.extend(self._close())
            updated = True
        return MaintenanceVerdict(self.forecasts, alarms, updated)

    def feedback(self, alarm_id: str, verdict: Verdict, operator: str, note: str) -> list[Alarm]:
        """Apply an operator's verdict on the maintenance alarm (others are not its own).

        ``reject`` ends the alarm and restarts every trend from the latest bucket, so
        only new evidence raises it again.
        """
        alarms = self.alarms.feedback(alarm_id, verdict, operator, note)
        if any(alarm.event is AlarmEvent.REJECTED for alarm in alarms):
            self._since_h[:] = self._trends_at_h
            self._misses[:] = 0
            self.forecasts = {}
        return alarms

    def adopt(self, sensors: Mapping[str, SensorSpec]) -> None:
        """Take new limits for the sensors already watched (a restart with a new model)."""
        fresh = _limits(sensors)
        for k, name in enumerate(self._limits.names):
            if name in fresh.names:
                j = fresh.names.index(name)
                for column in ("high", "low", "range_low", "range_high"):
                    getattr(self._limits, column)[k] = getattr(fresh, column)[j]

    # -- per bucket ----------------------------------------------------------------------

    def _close(self) -> list[Alarm]:
        """Close the current bucket: append its means, refit, forecast, judge."""
        config = self.config
        bucket_ms = config.bucket_ms
        start_ms = self._bucket * bucket_ms
        end_ms = start_ms + bucket_ms
        expected = bucket_ms / max(self._window_ms, 1)
        enough = self._counts >= max(1.0, config.min_fill * expected)
        means = np.where(enough, self._sums / np.maximum(self._counts, 1), np.nan)
        self._sums[:] = 0.0
        self._counts[:] = 0
        self._bucket = -1
        centre_h = (start_ms + bucket_ms / 2) / _HOUR_MS
        now_h = end_ms / _HOUR_MS
        self._note_breaks(means, centre_h)

        self._times_h[:-1] = self._times_h[1:]
        self._times_h[-1] = centre_h
        self._values[:, :-1] = self._values[:, 1:]
        self._values[:, -1] = means
        trends = fit_spans(
            self._times_h,
            self._values,
            np.maximum(self._since_h, now_h - config.history_h),
            now_h,
            config.spans_h,
            config.significance,
        )
        self._trends, self._trends_at_h = trends, now_h
        self.forecasts = self._forecasts(trends, end_ms)
        return self._judge(start_ms, end_ms)

    def _note_breaks(self, means: np.ndarray, centre_h: float) -> None:
        trends = self._trends
        if trends is None:
            return
        predicted, spread = trends.predict(centre_h, self._trends_at_h)
        seen = ~np.isnan(means)
        fitted = trends.count >= self.config.min_buckets
        with np.errstate(invalid="ignore"):
            missed = seen & fitted & (np.abs(means - predicted) > self.config.break_z * spread)
        starting = missed & (self._misses == 0)
        self._first_miss_h[starting] = centre_h
        self._misses = np.where(missed, self._misses + 1, np.where(seen, 0, self._misses))
        broken = self._misses >= self.config.break_run
        self._since_h[broken] = self._first_miss_h[broken]
        self._misses[broken] = 0

    def _forecasts(self, trends: Trends, now_ms: int) -> dict[str, LimitForecast]:
        config = self.config
        limits = self._limits
        forecasts: dict[str, LimitForecast] = {}
        for k, name in enumerate(limits.names):
            count = int(trends.count[k])
            slope, slope_se = float(trends.slope[k]), float(trends.slope_se[k])
            if count < config.min_buckets or not trends.significant[k] or slope == 0:
                continue
            limit_name, limit = (
                ("alarm_high", float(limits.high[k]))
                if slope > 0
                else ("alarm_low", float(limits.low[k]))
            )
            if math.isnan(limit):
                continue
            hours, low, high = time_to_limit(
                float(trends.level[k]),
                slope,
                slope_se,
                float(trends.level_se[k]),
                limit,
                student_t(config.confidence, float(trends.dof[k])),
            )
            forecasts[name] = LimitForecast(
                sensor=name,
                ts_ms=now_ms,
                limit=limit_name,
                limit_value=limit,
                level=float(trends.level[k]),
                slope_per_h=slope,
                time_to_limit_s=hours * 3600,
                time_to_limit_low_s=low * 3600,
                time_to_limit_high_s=None if high is None else high * 3600,
                since_ms=round(float(trends.first_h[k]) * _HOUR_MS),
            )
        return forecasts

    def _judge(self, start_ms: int, end_ms: int) -> list[Alarm]:
        horizon_s = self.config.horizon_h * 3600
        due = [f for f in self.forecasts.values() if f.time_to_limit_low_s < horizon_s]
        worst = min(due, key=lambda f: f.time_to_limit_low_s, default=None)
        if worst is None:
            return self.alarms.update(False, 0.0, 1.0, [], start_ms, end_ms)
        k = self._limits.names.index(worst.sensor)
        low_limit = self._limits.low[k]
        contribution = Contribution(
            sensor=worst.sensor,
            feature="mean",
            value=worst.level,
            expected_low=float(self._limits.range_low[k] if np.isnan(low_limit) else low_limit),
            expected_high=float(
                self._limits.range_high[k]
                if np.isnan(self._limits.high[k])
                else self._limits.high[k]
            ),
            weight=1.0,
        )
        # How far inside the horizon: 1 at its edge, 48 an hour before the limit.
        score = horizon_s / max(worst.time_to_limit_low_s, 60.0)
        return self.alarms.update(True, score, 1.0, [contribution], start_ms, end_ms, worst)
