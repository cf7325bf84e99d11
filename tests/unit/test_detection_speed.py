"""The per-window fast paths of detection and maintenance change nothing but the cost.

The detector keeps derived state it never pickles (the current bins' profiles, the
columns of a window's feature set, whether every feature was seen or settled, smoothing
steps shared between entities), allocates its profiles only once a bin was left, and
counts visits in a byte. A detector rebuilt from its pickle after every window has none
of that carried over, so it is the reference for one that keeps it; snapshots of the
older layout (every profile allocated, int16 visits) must still load.
"""

import copy
import math
import pickle
from typing import TypeVar

import numpy as np
import pytest

from schemas.control import Verdict as OperatorVerdict
from schemas.outputs import SensorWindow
from twinflow.detection import (
    DAY_MS,
    DetectorConfig,
    EntityDetector,
    EntityMonitor,
    Period,
    Seasonality,
    Smoother,
    ZScores,
    feature_vector,
)
from twinflow.maintenance.trend import _lengths, _segments

T = TypeVar("T", Seasonality, Smoother, ZScores)
HOUR = DAY_MS // 24
STEP = 2 * 60_000
# Short cycles, warm-up and re-baselining, so a few thousand windows take every path:
# profiles learned and used, features appearing and going missing, alarms re-baselined
# and rejected (settling), a confirmed alarm that learns nothing.
CONFIG = DetectorConfig(
    warmup_windows=60,
    min_count=10,
    periods=(Period(HOUR, 6), Period(4 * HOUR, 8)),
    rebaseline_after=1.0,
)


def _window(sensor: str, start: int, count: int, mean: float, std: float) -> SensorWindow:
    return SensorWindow("pump-001", sensor, start, start + 10_000, count, mean, 0.0, 0.0, std,
                        mean, 0.0, 0)  # fmt: skip


def plant(n: int, seed: int) -> list[tuple[int, dict[str, SensorWindow]]]:
    """Windows of three sensors with an hourly cycle, shifts, gaps and a late sensor."""
    rng = np.random.default_rng(seed)
    windows = []
    shift = 0.0
    for i in range(n):
        start = i * STEP
        if rng.random() < 0.01:
            shift = float(rng.choice([0.0, 12.0, -12.0]))
        cycle = 10.0 * math.sin(2 * math.pi * (start % HOUR) / HOUR)
        by_sensor = {}
        for k, sensor in enumerate(("flow", "pressure", "temp")):
            if sensor == "temp" and i < 333:  # appears late, mid-bin: every array grows
                continue
            if rng.random() < 0.05:  # goes missing: a window of a subset of the columns
                continue
            count = 1 if rng.random() < 0.05 else int(rng.integers(8, 12))  # 1: no std
            mean = 50.0 + (cycle if k == 0 else 0.0) + (shift if k == 1 else 0.0)
            by_sensor[sensor] = _window(
                sensor, start, count, mean + rng.normal(0, 1.0), abs(rng.normal(1.0, 0.1))
            )
        windows.append((start, by_sensor))
    return windows


def run(monitor: EntityMonitor, windows: list[tuple[int, dict[str, SensorWindow]]], *,
        rebuild: bool = False) -> list[str]:  # fmt: skip
    """Every verdict and operator transition, exactly (floats in full); ``rebuild``:
    the monitor is rebuilt from its pickle before every window."""
    produced = []
    for i, (start, by_sensor) in enumerate(windows):
        if rebuild:
            monitor = pickle.loads(pickle.dumps(monitor))
        produced.append(repr(monitor.process_window(by_sensor, start, start + 10_000)))
        active = monitor.alarms.active_ids
        if active and i % 100 == 0:
            verdict = OperatorVerdict.CONFIRM if i % 300 == 0 else OperatorVerdict.REJECT
            produced.append(repr(monitor.feedback(active[0], verdict, "ann")))
    return produced


@pytest.mark.parametrize("seed", [4, 6])
def test_derived_state_never_goes_stale(seed: int) -> None:
    windows = plant(1500, seed)
    kept = run(EntityMonitor("pump-001", CONFIG), windows)
    rebuilt = run(EntityMonitor("pump-001", CONFIG), windows, rebuild=True)
    assert kept == rebuilt
    for event in ("raised", "rejected", "rebaselined"):  # the stream takes those paths
        assert any(f"/{event}'" in line for line in kept), event


def test_the_stream_uses_its_cycles() -> None:
    monitor = EntityMonitor("pump-001", CONFIG)
    run(monitor, plant(1500, 4))
    seasonality = monitor.detector._seasonality
    assert seasonality is not None and seasonality.in_use


def test_a_window_and_its_feature_dict_give_the_same_verdicts() -> None:
    by_window, by_dict = EntityDetector(CONFIG), EntityDetector(CONFIG)
    for start, by_sensor in plant(800, 3):
        readings = {sensor: window.count for sensor, window in by_sensor.items()}
        one = by_window.process_window(by_sensor, start)
        other = by_dict.process(feature_vector(by_sensor), readings, start)
        assert repr(one) == repr(other)


def test_a_copy_continues_like_the_original() -> None:
    windows = plant(1200, 6)
    original = EntityMonitor("pump-001", CONFIG)
    run(original, windows[:700])
    copied = copy.deepcopy(pickle.loads(pickle.dumps(original)))
    assert run(copied, windows[700:]) == run(original, windows[700:])


_DERIVED = {"_bins", "_shortest", "_everything_seen", "_settled"}


def _older_layout(part: T) -> T:
    """``part`` as a snapshot of the layout before lazy profiles and byte visits held it:
    its state slots only, every profile allocated, int16 visits."""
    older = type(part).__new__(type(part))
    for name in type(part).__slots__:
        if name not in _DERIVED:
            setattr(older, name, copy.deepcopy(getattr(part, name)))
    if isinstance(older, Seasonality):
        shape = (len(older.level_n), older.visits.shape[1])
        if not older.visited:
            older.profile = np.zeros(shape, dtype=np.float32)
            older.visits = np.zeros(shape, dtype=np.int16)
        older.visits = older.visits.astype(np.int16)
    return older


@pytest.mark.parametrize("cut", [1, 20, 700])
def test_a_snapshot_of_the_older_layout_loads(cut: int) -> None:
    windows = plant(1200, 4)
    original = EntityMonitor("pump-001", CONFIG)
    run(original, windows[:cut])
    older = copy.deepcopy(original)
    detector = older.detector
    assert detector._seasonality and detector._smoother and detector._scores
    detector._seasonality = _older_layout(detector._seasonality)
    detector._smoother = _older_layout(detector._smoother)
    detector._scores = _older_layout(detector._scores)
    del detector.__dict__["_subsets"]
    loaded = pickle.loads(pickle.dumps(older))
    assert run(loaded, windows[cut:]) == run(original, windows[cut:])


def test_profiles_are_allocated_once_a_bin_is_left() -> None:
    detector = EntityDetector(DetectorConfig())
    x = {f"s{k}.{feature}": 1.0 + k for k in range(6) for feature in ("mean", "std")}
    for i in range(10):
        detector.process(x, None, i * 10_000)
    season = detector._seasonality
    assert season is not None and not season.visited
    fresh = len(pickle.dumps(detector))
    detector.process(x, None, DAY_MS // 48)  # the next half-hour
    assert season.visited and season.visits.shape == (12, 48 + 168)
    assert fresh < len(pickle.dumps(detector)) - 12 * (48 + 168) * 4


def test_smoothing_steps_are_shared_by_weights_not_mixed_up() -> None:
    fast, slow = Smoother((0.3, 0.05)), Smoother((0.5,))
    readings = (10, 9, 1, 0)
    for smoother in (fast, slow, fast):
        cached = smoother.steps_for(readings)
        assert np.array_equal(cached, smoother.steps(np.array(readings)))
        assert not cached.flags.writeable


def test_segments_and_their_lengths_match_the_plain_computation() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        t = np.sort(rng.uniform(0, 48, int(rng.integers(1, 40))))
        if rng.random() < 0.3:
            rng.shuffle(t)  # buckets closed out of order
        cuts = np.sort(rng.uniform(0, 48, int(rng.integers(0, 5))))
        expected = np.unique(np.searchsorted(cuts, t, side="right"), return_inverse=True)[1]
        segment = _segments(cuts, t)
        assert segment.dtype == expected.dtype and np.array_equal(segment, expected)
        segments = int(segment.max()) + 1
        spans = [float(np.ptp(t[segment == k])) for k in range(segments)]
        assert _lengths(segment, t, segments) == spans
