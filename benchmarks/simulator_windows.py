"""Tumbling feature windows per entity, straight from a simulated scenario's samples.

What the flow's windowing produces (per-sensor count/mean/min/max/std/last/slope over
10-second windows aligned to the epoch), computed with numpy over a whole scenario at
once, so the detection harness runs the monitors without Kafka or Bytewax. Nothing is
cleaned or excluded: sensor faults such as spikes reach the features.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np

from schemas.outputs import SensorWindow
from twinflow.sim.scenario import Scenario

START_MS = 1_793_000_000_000
"""A Monday 2026-10-26 00:53:20 UTC; a multiple of the window length."""
WINDOW_MS = 10_000

EntityWindowsList = list[tuple[int, dict[str, SensorWindow]]]
"""Closed windows of one entity: ``(window start, features by sensor)``, in time order."""


def build_windows(scenario: Scenario, window_ms: int = WINDOW_MS) -> dict[str, EntityWindowsList]:
    """Tumbling windows per entity, aligned to the epoch, from the scenario's samples."""
    ts: dict[tuple[str, str], list[int]] = defaultdict(list)
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for sample in scenario.samples():
        for sensor, value in sample.values.items():
            key = (sample.entity_id, sensor)
            ts[key].append(sample.ts_ms)
            values[key].append(value)
    per_entity: dict[str, dict[int, dict[str, SensorWindow]]] = defaultdict(dict)
    for (entity_id, sensor), stamps in ts.items():
        for start, window in _sensor_windows(
            entity_id, sensor, stamps, values[entity_id, sensor], window_ms
        ):
            per_entity[entity_id].setdefault(start, {})[sensor] = window
    return {
        entity.id: sorted(per_entity.get(entity.id, {}).items()) for entity in scenario.entities
    }


def _sensor_windows(
    entity_id: str, sensor: str, stamps: list[int], readings: list[float], window_ms: int
) -> Iterator[tuple[int, SensorWindow]]:
    t = np.asarray(stamps, dtype=np.int64)
    v = np.asarray(readings, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    starts_of = t - t % window_ms
    starts, first, counts = np.unique(starts_of, return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(starts)), counts)
    mean = np.bincount(group, weights=v) / counts
    std = np.sqrt(np.bincount(group, weights=(v - mean[group]) ** 2) / counts)
    low = np.minimum.reduceat(v, first)
    high = np.maximum.reduceat(v, first)
    last = v[first + counts - 1]
    seconds = (t - starts_of) / 1000.0
    centred = seconds - (np.bincount(group, weights=seconds) / counts)[group]
    sxx = np.bincount(group, weights=centred**2)
    sxy = np.bincount(group, weights=centred * (v - mean[group]))
    slope = np.divide(sxy, sxx, out=np.zeros_like(sxy), where=(counts >= 2) & (sxx > 0))
    for i, start in enumerate(starts.tolist()):
        yield (
            start,
            SensorWindow(
                entity_id=entity_id,
                sensor=sensor,
                window_start_ms=start,
                window_end_ms=start + window_ms,
                count=int(counts[i]),
                mean=float(mean[i]),
                min=float(low[i]),
                max=float(high[i]),
                std=float(std[i]),
                last=float(last[i]),
                slope=float(slope[i]),
                flagged=0,
            ),
        )
