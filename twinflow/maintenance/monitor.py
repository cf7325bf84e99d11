"""Per entity: when each limited sensor's trend reaches its alarm limit, and when to say so.

Window means are averaged into buckets (15 min by default): long against a plant's
process cycles (minutes), short against the wear this is for (hours to days). At the
end of every bucket each sensor with an alarm limit gets a least-squares trend (a line
and a daily cycle) through its bucket history (:mod:`twinflow.maintenance.trend`), and
a forecast when its slope is significant and heads for a limit. When the forecast's
lower bound of time to limit falls inside ``horizon_h``, the entity's
``maintenance_due`` alarm is raised, through the alarm lifecycle anomalies use
(:class:`~twinflow.detection.alarms.AlarmTracker`).

Where the series jumps (:func:`~twinflow.maintenance.trend.jumps`: a new setpoint, a
stop, a repair) a new segment starts: the fit gives each segment its own level and
shares one slope, so a level shift never passes for a trend and a trend runs on across
setpoint changes. After a repair, the shortest span that settles the question holds
only the new, flat segment, which rules maintenance out: the alarm clears. An
operator's ``reject`` restarts every history of the entity.

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
from twinflow.maintenance.trend import (
    Rule,
    Trends,
    daily_cycle,
    fit_spans,
    jumps,
    student_t,
    time_to_limit,
)
from twinflow.twin_model import SensorSpec

_HOUR_MS = 3_600_000
_BREAKS = 16
"""Recent jumps remembered per sensor, for measuring its daily cycle across them."""
_FILLS = 16
"""Recent buckets whose window counts say how full a bucket of the sensor usually is."""


@dataclass(frozen=True)
class MaintenanceConfig:
    """How every entity's trends are fitted and judged.

    The numbers are chosen on principle, not fitted (the README's predictive
    maintenance section says what they measure): the bucket against the load cycles
    and the wear it separates; 3-sigma evidence for a slope, shared among the spans;
    95 % bounds; jumps at 5 robust sigmas; an hour of evidence to raise and to clear
    against a 48-hour horizon. The rules were shaped by looking at the simulator's
    development seeds: taking the daily cycle out, segments at jumps, the shortest span
    that decides, and raising only after an hour.
    """

    bucket_s: float = 900.0
    """Window means are averaged over this long before they are fitted."""
    history_h: float = 48.0
    """The longest history a line is fitted on."""
    spans_h: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0, 48.0)
    """Recent spans each trend is fitted over; the shortest that decides is used (see
    :func:`~twinflow.maintenance.trend.fit_spans`)."""

    min_buckets: int = 8
    """Buckets a history needs before it forecasts (2 h of 15-min buckets)."""
    significance: float = 3.0
    """A slope is a trend when it is this many standard errors from 0 (Student's t
    with the autocorrelation-adjusted degrees of freedom, at this normal quantile)."""
    confidence: float = 1.96
    """Bounds of time to limit: this normal quantile (95 %), t-corrected likewise."""
    jump_z: float = 5.0
    """A new segment (its own level) starts where the mean of two buckets changed from
    the two before by more than this many robust standard deviations of such changes."""
    horizon_h: float = 48.0
    """Maintenance is due when the lower bound of time to limit is under this."""
    raise_buckets: int = 4
    """Buckets in a row with maintenance due that raise the alarm (an hour): a 48-hour
    warning loses nothing by waiting an hour for the evidence to hold."""
    clear_buckets: int = 4
    """Buckets in a row whose data rule maintenance out (within the horizon even at the
    steepest slope they allow) that clear the alarm (an hour)."""
    min_fill: float = 0.5
    """A bucket counts for a sensor when it holds this share of the sensor's usual
    windows per bucket (the median of its recent buckets): a partial bucket (a start, a
    gap) would weigh a part of the day like all of it."""

    def __post_init__(self) -> None:
        if self.bucket_s <= 0 or self.history_h * 3600 < self.bucket_s * self.min_buckets:
            raise ValueError(
                f"history_h={self.history_h} must hold min_buckets={self.min_buckets} buckets "
                f"of bucket_s={self.bucket_s}"
            )
        if self.min_buckets < 4:
            raise ValueError(f"min_buckets must be at least 4, got {self.min_buckets}")

    @property
    def rule(self) -> Rule:
        """How the trends weigh their evidence."""
        return Rule(self.spans_h, self.significance, self.confidence, self.horizon_h)

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
    made_ms: int | None
    """End of the bucket whose close remade ``forecasts`` in this window (None: none
    closed); the forecasts made then carry it as their ``ts_ms``."""

    @property
    def updated(self) -> bool:
        """Whether a bucket closed, so ``forecasts`` were remade."""
        return self.made_ms is not None

    def made(self) -> list[LimitForecast]:
        """The forecasts made in this window (one kept from an earlier bucket is not)."""
        return [f for f in self.forecasts.values() if f.ts_ms == self.made_ms]


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
    >>> for i in range(30 * 360):  # 10-s windows rising 0.1 mm/s an hour; a day to learn
    ...     value = 2.0 + 0.1 * i / 360 + 0.01 * (i % 7)
    ...     window = SensorWindow("pump-001", "vibration_rms", i * 10_000, (i + 1) * 10_000,
    ...                           10, value, value, value, 0.0, value, 0.0, 0)
    ...     verdict = monitor.process_window({"vibration_rms": window}, i * 10_000,
    ...                                      (i + 1) * 10_000)
    ...     alarms.extend(verdict.alarms)
    >>> forecast = verdict.forecasts["vibration_rms"]
    >>> round(forecast.slope_per_h, 2), round(forecast.time_to_limit_s / 3600, 1)
    (0.1, 20.7)
    >>> first = alarms[0]
    >>> first.kind.value, first.event.value, first.alarm_id, first.forecast.sensor
    ('maintenance_due', 'raised', 'pump-001/maintenance_due@89100000', 'vibration_rms')
    """

    entity_id: str
    sensors: Mapping[str, SensorSpec]
    config: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    forecasts: dict[str, LimitForecast] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._limits = _limits(self.sensors)
        n, capacity = len(self._limits.names), self.config.capacity
        # Without a limited sensor no bucket is ever closed, so the times are not kept.
        self._times_h = np.full(capacity if n else 0, np.nan)
        self._values = np.full((n, capacity), np.nan)
        self._since_h = np.full(n, -np.inf)
        self._breaks_h = np.full((n, _BREAKS), np.nan)
        self._closed_h = 0.0
        self._bucket = -1
        self._due_run = 0
        self._sums = np.zeros(n)
        self._counts = np.zeros(n, dtype=np.int64)
        self._fills = np.zeros((n, _FILLS), dtype=np.int64)
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
            return MaintenanceVerdict(self.forecasts, [], None)
        bucket_ms = self.config.bucket_ms
        bucket = start_ms // bucket_ms
        alarms: list[Alarm] = []
        made_ms = None
        if self._bucket != bucket:
            if self._bucket >= 0:
                made_ms = (self._bucket + 1) * bucket_ms
                alarms = self._close()
            self._bucket = bucket
        for k, name in enumerate(self._limits.names):
            window = windows.get(name)
            if window is not None and window.count:
                self._sums[k] += window.mean
                self._counts[k] += 1
        if end_ms >= (bucket + 1) * bucket_ms:
            made_ms = (bucket + 1) * bucket_ms
            alarms.extend(self._close())
        return MaintenanceVerdict(self.forecasts, alarms, made_ms)

    def feedback(self, alarm_id: str, verdict: Verdict, operator: str, note: str) -> list[Alarm]:
        """Apply an operator's verdict on the maintenance alarm (others are not its own).

        ``reject`` ends the alarm and restarts every trend from the latest bucket, so
        only new evidence raises it again.
        """
        alarms = self.alarms.feedback(alarm_id, verdict, operator, note)
        if any(alarm.event is AlarmEvent.REJECTED for alarm in alarms):
            self._since_h[:] = self._closed_h
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
        # Against the sensor's usual count, not the windows a bucket could hold: a
        # sensor read once a minute fills a sixth of the 10-s windows, and always has.
        self._fills[:, :-1] = self._fills[:, 1:]
        self._fills[:, -1] = self._counts
        usual = np.median(np.where(self._fills > 0, self._fills, np.nan), axis=1)
        enough = self._counts >= np.maximum(1.0, config.min_fill * np.nan_to_num(usual))
        means = np.where(enough, self._sums / np.maximum(self._counts, 1), np.nan)
        self._sums[:] = 0.0
        self._counts[:] = 0
        self._bucket = -1
        centre_h = (start_ms + bucket_ms / 2) / _HOUR_MS
        now_h = end_ms / _HOUR_MS

        self._times_h[:-1] = self._times_h[1:]
        self._times_h[-1] = centre_h
        self._values[:, :-1] = self._values[:, 1:]
        self._values[:, -1] = means
        jumped = jumps(self._values, config.jump_z)
        self._breaks_h[jumped, :-1] = self._breaks_h[jumped, 1:]
        self._breaks_h[jumped, -1] = self._times_h[-4]
        cycle = daily_cycle(self._times_h, self._values, self._breaks_h, now_h)
        trends = fit_spans(
            self._times_h,
            self._values - cycle.at(self._times_h),
            np.maximum(self._since_h, now_h - config.history_h),
            self._breaks_h,
            now_h,
            cycle.error,
            (self._limits.high, self._limits.low),
            config.rule,
        )
        self._closed_h = now_h
        self.forecasts, ruled_out = self._forecasts(trends, end_ms)
        return self._judge(ruled_out, start_ms, end_ms)

    def _forecasts(self, trends: Trends, now_ms: int) -> tuple[dict[str, LimitForecast], bool]:
        """The forecasts after a fit, and whether the data rule maintenance out.

        A sensor's forecast stands until a later fit decides (a new trend replaces it,
        a ruled-out one drops it): not knowing, after a restart or in a noisy stretch,
        is not healthy. Maintenance is ruled out when it is for every sensor.
        """
        config = self.config
        limits = self._limits
        forecasts: dict[str, LimitForecast] = {}
        for k, name in enumerate(limits.names):
            slope = float(trends.slope[k])
            decided = int(trends.count[k]) >= config.min_buckets and (
                trends.significant[k] or trends.ruled_out[k]
            )
            if not decided:
                if name in self.forecasts:
                    forecasts[name] = self.forecasts[name]
                continue
            if not trends.significant[k] or slope == 0:
                continue
            limit_name, limit = (
                ("alarm_high", float(limits.high[k]))
                if slope > 0
                else ("alarm_low", float(limits.low[k]))
            )
            if math.isnan(limit):
                continue
            level = float(trends.level[k])
            hours, low, high = time_to_limit(
                level,
                slope,
                float(trends.slope_se[k]),
                float(trends.level_se[k]),
                limit,
                student_t(config.confidence, float(trends.dof[k])),
                float(trends.tilt[k]),
            )
            forecasts[name] = LimitForecast(
                sensor=name,
                ts_ms=now_ms,
                limit=limit_name,
                limit_value=limit,
                level=level,
                slope_per_h=slope,
                time_to_limit_s=hours * 3600,
                time_to_limit_low_s=low * 3600,
                time_to_limit_high_s=None if high is None else high * 3600,
                since_ms=round(float(trends.first_h[k]) * _HOUR_MS),
            )
        enough = trends.count >= config.min_buckets
        return forecasts, bool(np.all(trends.ruled_out & enough))

    def _judge(self, ruled_out: bool, start_ms: int, end_ms: int) -> list[Alarm]:
        """Feed the bucket's verdict to the alarm: due, ruled out, or (neither) unknown.

        An unknown bucket neither raises nor counts towards clearing, so an alarm does
        not end because a restart left too little history to say anything.
        """
        horizon_s = self.config.horizon_h * 3600
        due = [f for f in self.forecasts.values() if f.time_to_limit_low_s < horizon_s]
        worst = min(due, key=lambda f: f.time_to_limit_low_s, default=None)
        self._due_run = self._due_run + 1 if worst is not None else 0
        if worst is None:
            if not ruled_out:
                return []
            return self.alarms.update(False, 0.0, 1.0, [], start_ms, end_ms)
        if not self.alarms.active_ids and self._due_run < self.config.raise_buckets:
            return []
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
