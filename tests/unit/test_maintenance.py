"""Predictive maintenance's pure parts: trend fits, forecasts, the maintenance alarm."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.control import Verdict
from schemas.outputs import AlarmEvent, AlarmKind, SensorWindow
from twinflow.maintenance import MaintenanceMonitor, MaintenanceVerdict, fit, time_to_limit
from twinflow.twin_model import OperatingLimits, SensorSpec

WINDOW_MS = 10_000
PER_HOUR = 360
SPEC = SensorSpec(
    unit="mm/s",
    range=(0, 50),
    max_rate=20,
    stuck_after_s=30,
    limits=OperatingLimits(warn_high=4.5, alarm_high=7.1),
)


def _feed(
    monitor: MaintenanceMonitor, values: np.ndarray, first: int = 0
) -> list[MaintenanceVerdict]:
    """Windows of one sensor, one value each; every verdict in order."""
    verdicts = []
    for i, value in enumerate(values.tolist(), start=first):
        start = i * WINDOW_MS
        window = SensorWindow(
            "pump-001",
            "vibration_rms",
            start,
            start + WINDOW_MS,
            10,
            value,
            value,
            value,
            0.0,
            value,
            0.0,
            0,
        )
        verdicts.append(monitor.process_window({"vibration_rms": window}, start, start + WINDOW_MS))
    return verdicts


def _noise(seed: int, hours: float, sd: float) -> np.ndarray:
    return 2.5 + np.random.default_rng(seed).normal(0.0, sd, int(hours * PER_HOUR))


@pytest.mark.parametrize("seed", range(5))
def test_noise_alone_raises_nothing(seed: int) -> None:
    monitor = MaintenanceMonitor("pump-001", {"vibration_rms": SPEC})
    verdicts = _feed(monitor, _noise(seed, 72, 0.3))
    judged = [v for v in verdicts if v.updated]
    assert len(judged) >= 280  # every 15-min bucket was judged
    assert not any(v.alarms for v in verdicts)
    # A trend significant at 3 sigmas turns up in noise now and then, never for long.
    assert sum(bool(v.forecasts) for v in judged) <= 0.02 * len(judged)


def test_a_ramp_is_forecast_and_the_truth_lies_within_its_bounds() -> None:
    rate = 0.05  # mm/s an hour: from 2.5 to the limit 7.1 in 92 h
    hours = 36  # the first day is learned before anything is forecast
    values = _noise(1, hours, 0.05) + rate * np.arange(hours * PER_HOUR) / PER_HOUR
    verdicts = _feed(MaintenanceMonitor("pump-001", {"vibration_rms": SPEC}), values)
    forecast = verdicts[-1].forecasts["vibration_rms"]
    true_s = (7.1 - 2.5 - rate * hours) / rate * 3600
    assert forecast.limit == "alarm_high" and forecast.limit_value == 7.1
    assert forecast.slope_per_h == pytest.approx(rate, rel=0.15)
    assert forecast.time_to_limit_low_s <= true_s
    assert forecast.time_to_limit_high_s is not None and true_s <= forecast.time_to_limit_high_s


def test_bounds_widen_with_noise() -> None:
    t = np.arange(40.0)
    widths = []
    for sd in (0.05, 0.2, 0.8):
        y = 2.0 + 0.1 * t + np.random.default_rng(3).normal(0.0, sd, len(t))
        trends = fit(t, y[None, :], np.ones((1, len(t)), bool), float(t[-1]))
        _, low, high = time_to_limit(
            float(trends.level[0]),
            float(trends.slope[0]),
            float(trends.slope_se[0]),
            float(trends.level_se[0]),
            9.0,
            1.96,
        )
        widths.append(np.inf if high is None else high - low)
    assert widths[0] < widths[1] < widths[2]


def test_a_step_is_not_a_trend() -> None:
    t = np.arange(32.0) * 0.25
    noise = np.random.default_rng(4).normal(0.0, 0.02, len(t))
    step = np.where(t < 4.0, 2.0, 2.5) + noise
    ramp = 2.0 + 0.0625 * t + noise  # the same rise, spread over the 8 hours
    everything = np.ones((2, len(t)), bool)
    trends = fit(t, np.vstack([step, ramp]), everything, float(t[-1]))
    assert trends.slope[0] > 0  # a line through the step does slope...
    assert trends.line_beats_step.tolist() == [False, True]  # ...but a step fits better
    # Cut at the jump, the step is two levels and no slope at all.
    cut = fit(t, step[None, :], everything[:1], float(t[-1]), np.array([[3.9]]))
    assert int(cut.segments[0]) == 2 and abs(float(cut.slope[0])) < 3 * float(cut.slope_se[0])


def test_a_daily_cycle_is_not_a_trend() -> None:
    monitor = MaintenanceMonitor("pump-001", {"vibration_rms": SPEC})
    hours = np.arange(72 * PER_HOUR) / PER_HOUR
    day = 2.5 + 0.8 * np.sin(2 * np.pi * hours / 24)  # mornings rise 0.2 mm/s an hour
    noisy = day + np.random.default_rng(9).normal(0.0, 0.05, len(hours))
    verdicts = _feed(monitor, noisy)
    assert not any(v.alarms for v in verdicts)
    assert sum(bool(v.forecasts) for v in verdicts if v.updated) <= 3


def test_the_maintenance_alarm_is_raised_on_a_ramp_and_clears_after_the_repair() -> None:
    monitor = MaintenanceMonitor("pump-001", {"vibration_rms": SPEC})
    day = _noise(5, 24, 0.05)
    ramp = _noise(6, 20, 0.05) + 0.2 * np.arange(20 * PER_HOUR) / PER_HOUR
    repaired = _noise(7, 12, 0.05)
    verdicts = _feed(monitor, np.concatenate([day, ramp, repaired]))
    alarms = [a for v in verdicts for a in v.alarms]
    assert alarms and alarms[0].event is AlarmEvent.RAISED
    assert alarms[0].kind is AlarmKind.MAINTENANCE_DUE
    assert alarms[0].alarm_id.startswith("pump-001/maintenance_due@")
    raised_ms = alarms[0].ts_ms
    assert 24 * 3_600_000 < raised_ms < 44 * 3_600_000
    assert alarms[0].forecast is not None and alarms[0].forecast.sensor == "vibration_rms"
    assert alarms[-1].event is AlarmEvent.CLEARED and not alarms[-1].active
    assert alarms[-1].ts_ms > 44 * 3_600_000  # after the repair
    assert not verdicts[-1].forecasts


def test_a_rejected_maintenance_alarm_ends_and_its_trend_restarts() -> None:
    monitor = MaintenanceMonitor("pump-001", {"vibration_rms": SPEC})
    values = np.concatenate(
        [_noise(5, 24, 0.05), _noise(6, 12, 0.05) + 0.2 * np.arange(12 * PER_HOUR) / PER_HOUR]
    )
    verdicts = _feed(monitor, values)
    active = monitor.alarms.active_ids
    assert len(active) == 1 and verdicts[-1].forecasts
    assert monitor.feedback("pump-001@0", Verdict.REJECT, "ann", "") == []  # not its alarm
    ended = monitor.feedback(active[0], Verdict.REJECT, "ann", "seasonal warm-up")
    assert [a.event for a in ended] == [AlarmEvent.REJECTED]
    assert monitor.forecasts == {} and monitor.alarms.active_ids == []
    # The next bucket starts a fresh history: too short for a forecast.
    more = _feed(monitor, values[-PER_HOUR:] + 2.4, first=len(values))
    assert not more[-1].forecasts


def test_a_monitor_pickles_small() -> None:
    import pickle

    monitor = MaintenanceMonitor("pump-001", {"vibration_rms": SPEC, "flow": SPEC})
    _feed(monitor, _noise(8, 50, 0.1))
    assert len(pickle.dumps(monitor)) < 20_000
    assert pickle.loads(pickle.dumps(monitor)).watched == ["flow", "vibration_rms"]
