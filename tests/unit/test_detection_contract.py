"""One contract for every stateful piece of detection, as River checks every estimator.

Each piece is driven through the same stream (features appear late and go missing,
a level shift, a daily cycle), and must be deterministic, survive a pickle round trip at
any point with identical results, and never produce a non-finite number.
"""

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from twinflow.detection import (
    DAY_MS,
    DetectorConfig,
    EntityDetector,
    EntityMonitor,
    Period,
    Seasonality,
)

HOUR = DAY_MS // 24
STEP = HOUR // 6


def stream(n: int = 1500, seed: int = 0) -> list[tuple[int, dict[str, float]]]:
    """Windows of 10 minutes: a daily cycle, a feature that appears late, gaps, a shift."""
    rng = np.random.default_rng(seed)
    windows = []
    for i in range(n):
        ts = i * STEP
        busy = 8 <= ts % DAY_MS // HOUR < 18
        x = {"load.mean": (80.0 if busy else 20.0) + rng.normal(0, 2.0)}
        x["load.std"] = abs(rng.normal(1.0, 0.1))
        if i > 300:  # appears late
            x["temp.mean"] = 50.0 + (15.0 if i > 1200 else 0.0) + rng.normal(0, 0.5)
        if i % 11 == 0:  # goes missing now and then
            x.pop("load.std")
        windows.append((ts, x))
    return windows


@dataclass
class Piece:
    """How to make a piece and feed it one window; ``feed`` returns what it produced."""

    make: Callable[[], Any]
    feed: Callable[[Any, int, dict[str, float]], Any]


def _detector(config: DetectorConfig) -> Piece:
    def feed(detector: EntityDetector, ts: int, x: dict[str, float]) -> Any:
        d = detector.process(x, None, ts)
        return (d.score, d.threshold, d.is_anomaly, [c.value for c in d.contributions])

    return Piece(lambda: EntityDetector(config), feed)


def _monitor(config: DetectorConfig) -> Piece:
    def feed(monitor: EntityMonitor, ts: int, x: dict[str, float]) -> Any:
        verdict = monitor.process(x, ts, ts + STEP)
        return (verdict.detection.score, [a.msg_id for a in verdict.alarms], monitor.in_alarm)

    return Piece(lambda: EntityMonitor("pump-001", config), feed)


def _seasonality() -> Piece:
    names = ["load.mean", "load.std", "temp.mean"]

    def make() -> Seasonality:
        season = Seasonality((Period(DAY_MS, 24),))
        season.grow(len(names))
        return season

    def feed(season: Seasonality, ts: int, x: dict[str, float]) -> Any:
        columns = np.asarray([names.index(name) for name in x], dtype=np.int64)
        values = np.asarray(list(x.values()))
        plain, removed = season.apply(columns, values, ts)
        return (plain.tolist(), removed.tolist(), season.selected.tolist())

    return Piece(make, feed)


SHORT = DetectorConfig(warmup_windows=144, rebaseline_after=0.5)
PIECES = {
    "detector, defaults": _detector(DetectorConfig()),
    "detector, short warm-up": _detector(SHORT),
    "detector, one scale, no cycles": _detector(
        DetectorConfig(warmup_windows=144, smoothing=(0.05,), periods=(), regimes=1)
    ),
    "monitor, short warm-up": _monitor(SHORT),
    "seasonality": _seasonality(),
}
EVERY = pytest.mark.parametrize("piece", PIECES.values(), ids=list(PIECES))


def outputs(piece: Piece, instance: Any, windows: list[tuple[int, dict[str, float]]]) -> list[Any]:
    return [piece.feed(instance, ts, dict(x)) for ts, x in windows]


@EVERY
def test_it_is_deterministic(piece: Piece) -> None:
    windows = stream()
    assert outputs(piece, piece.make(), windows) == outputs(piece, piece.make(), windows)


@EVERY
@pytest.mark.parametrize("cut", [0, 1, 150, 301, 1201])
def test_a_pickle_round_trip_at_any_point_changes_nothing(piece: Piece, cut: int) -> None:
    windows = stream()
    straight = piece.make()
    outputs(piece, straight, windows[:cut])
    copied = pickle.loads(pickle.dumps(straight))
    assert outputs(piece, copied, windows[cut:]) == outputs(piece, straight, windows[cut:])


@EVERY
def test_every_number_it_produces_is_finite(piece: Piece) -> None:
    def numbers(value: Any) -> list[float]:
        if isinstance(value, (list, tuple)):
            return [n for item in value for n in numbers(item)]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [float(value)]
        return []

    produced = outputs(piece, piece.make(), stream(seed=3))
    assert all(math.isfinite(n) for n in numbers(produced))


def test_the_monitor_sees_the_shift_and_not_the_day() -> None:
    piece = PIECES["monitor, short warm-up"]
    produced = outputs(piece, piece.make(), stream())
    raised = [
        i for i, (_, ids, _) in enumerate(produced) if any(m.endswith("/raised") for m in ids)
    ]
    assert raised and all(i > 1200 for i in raised)  # the temperature step, not the cycle
