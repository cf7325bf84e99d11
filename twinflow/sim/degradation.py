"""Ground truth of degradations: when the wear brought a sensor to its alarm limit.

A degradation's limit crossing is not planned; it emerges from the physics (vibration
reaches its limit first, at a severity below 1, earlier when the machine runs faster).
It is found where an operator would see it: in the 10-second window means, the end of
the first window during the fault (``start_ms <= window start < end_ms``) whose mean
of a sensor with an alarm limit reaches ``alarm_high`` or falls to ``alarm_low``.

Pure code over numpy arrays: the caller supplies each entity's window means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import numpy.typing as npt

from twinflow.sim.faults import Fault, FaultKind
from twinflow.twin_model import OperatingLimits, SensorSpec


@dataclass(frozen=True)
class WindowMeans:
    """One entity's window means: a column per sensor, NaN where a window had none."""

    starts_ms: npt.NDArray[np.int64]
    """Window starts, ascending."""
    window_ms: int
    means: Mapping[str, npt.NDArray[np.float64]]
    """Per sensor, one mean per window (aligned with ``starts_ms``)."""


def crossing(
    fault: Fault, series: WindowMeans, limits: Mapping[str, OperatingLimits]
) -> tuple[int, str] | None:
    """Where ``fault`` first brought a limited sensor's window mean to its alarm limit.

    The end of that window and the sensor; None if no sensor got there. Of sensors
    crossing in the same window, the first in name order.

    >>> series = WindowMeans(
    ...     np.arange(0, 60_000, 10_000), 10_000,
    ...     {"vib": np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])},
    ... )
    >>> from twinflow.sim.faults import Category
    >>> wear = Fault(FaultKind.DEGRADATION, Category.PROCESS, "pump-001", 10_000, 60_000)
    >>> crossing(wear, series, {"vib": OperatingLimits(alarm_high=4.0)})
    (40000, 'vib')
    >>> crossing(wear, series, {"vib": OperatingLimits(alarm_high=7.0)}) is None
    True
    """
    starts = series.starts_ms
    first = int(np.searchsorted(starts, fault.start_ms, side="left"))
    stop = int(np.searchsorted(starts, fault.end_ms, side="left"))
    if first >= stop:
        return None
    best: tuple[int, str] | None = None
    for sensor in sorted(limits):
        means = series.means.get(sensor)
        limit = limits[sensor]
        if means is None or (limit.alarm_high is None and limit.alarm_low is None):
            continue
        span = means[first:stop]
        reached = np.zeros(len(span), dtype=bool)
        with np.errstate(invalid="ignore"):
            if limit.alarm_high is not None:
                reached |= span >= limit.alarm_high
            if limit.alarm_low is not None:
                reached |= span <= limit.alarm_low
        hits = np.flatnonzero(reached)
        if len(hits):
            at = int(starts[first + int(hits[0])]) + series.window_ms
            if best is None or at < best[0]:
                best = (at, sensor)
    return best


def with_crossings(
    faults: Sequence[Fault],
    series: Mapping[str, WindowMeans],
    sensors: Mapping[str, Mapping[str, SensorSpec]],
) -> list[Fault]:
    """``faults`` with every degradation's ground-truth crossing filled in.

    ``crossing_ms`` and ``crossing_sensor`` are both None when no limit was reached
    before the repair; the other faults are returned unchanged. ``series`` and
    ``sensors`` are per entity (the twin model's sensor specs, whose
    ``limits`` are read); a degradation of an entity without series gets None.
    """
    result: list[Fault] = []
    for fault in faults:
        if fault.kind is not FaultKind.DEGRADATION:
            result.append(fault)
            continue
        entity_series = series.get(fault.entity_id)
        limits = {
            name: spec.limits
            for name, spec in sensors.get(fault.entity_id, {}).items()
            if spec.limits is not None
        }
        found = None if entity_series is None else crossing(fault, entity_series, limits)
        result.append(
            msgspec.structs.replace(
                fault,
                crossing_ms=None if found is None else found[0],
                crossing_sensor=None if found is None else found[1],
            )
        )
    return result
