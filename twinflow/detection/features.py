"""The feature vector the anomaly model sees: one closed window, flattened.

Which window features go in, and why (``FEATURES``):

- ``mean``: the level of the signal over the window. Process faults move levels
  (overload raises current and temperatures, bearing wear raises vibration, cavitation
  lowers flow and pressure).
- ``std``: the variability inside the window. Faults that make a signal rough
  (cavitation: pressure dips and vibration bursts) show here even when the mean
  hardly moves.

Left out on purpose:

- ``count`` describes transport and sampling (a dropout, a slower publisher), not the
  machine; missing data already shows as missing features.
- ``min``, ``max`` and ``last`` are ``mean`` again: over the simulator's windows their
  correlation with it is 0.97-1.0 for most sensors. In a distance over features every
  copy adds weight to the same evidence (load swings) and dilutes the rest; on the
  simulator (development seeds, 262 clean entity-hours) adding min and max took false
  alarms from 0 to 19 at the same recall. Extremes of single readings are the
  cleaning step's business.
- ``slope`` over ~10 readings is mostly noise (correlation with the mean ~0); adding it
  made bearing wear show about a minute later and caught nothing new.

The other way round, ``mean`` alone raised 22 false alarms there: ``std`` is what
tells a rough window from a merely busy one.

Every name keeps its sensor as a prefix (``"flow.mean"``), so an explanation can name
the sensor (:func:`split_feature`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import lru_cache

from schemas.outputs import WINDOW_FEATURES, SensorWindow

FEATURES: tuple[str, ...] = ("mean", "std")
"""Window features the default model uses, in this order per sensor."""

_NEEDS_TWO = frozenset({"std", "slope"})
"""Features that are 0 by convention, not by measurement, for a single reading."""


def feature_vector(
    windows: Mapping[str, SensorWindow], features: Iterable[str] = FEATURES
) -> dict[str, float]:
    """The flat feature dict of one window: ``{"<sensor>.<feature>": value}``.

    A sensor without readings in the window has no :class:`SensorWindow` and so no
    features: absence stays absence, never zero. ``std`` and ``slope`` of a window
    with a single reading are 0 by convention, not measured, and are left out too, as
    is any value that is not finite.

    >>> from schemas.outputs import WINDOW_FEATURES, SensorWindow
    >>> def window(sensor: str, count: int, mean: float, std: float) -> SensorWindow:
    ...     return SensorWindow("pump-001", sensor, 0, 10_000, count, mean, mean, mean,
    ...                         std, mean, 0.0, 0)
    >>> feature_vector({"flow": window("flow", 10, 180.0, 2.5),
    ...                 "bearing_temp": window("bearing_temp", 1, 51.0, 0.0)})
    {'bearing_temp.mean': 51.0, 'flow.mean': 180.0, 'flow.std': 2.5}
    """
    names, values, _ = window_features(windows, features)
    return dict(zip(names, values, strict=True))


def window_features(
    windows: Mapping[str, SensorWindow], features: Iterable[str] = FEATURES
) -> tuple[list[str], list[float], list[int]]:
    """:func:`feature_vector` as its names and values, with the readings behind each.

    The readings of a feature are its sensor's window count (1 when its name's sensor,
    as :func:`split_feature` reads it, has no window).

    >>> from schemas.outputs import WINDOW_FEATURES, SensorWindow
    >>> window_features({"flow": SensorWindow("pump-001", "flow", 0, 10_000, 10, 180.0,
    ...                                       178.0, 182.0, 2.5, 180.0, 0.0, 0)})
    (['flow.mean', 'flow.std'], [180.0, 2.5], [10, 10])
    """
    if features is FEATURES:
        wanted = FEATURES
        columns = _DEFAULT_COLUMNS
    else:
        wanted = _checked(tuple(features))
        columns = {}
    names: list[str] = []
    values: list[float] = []
    counts: list[int] = []
    for sensor in sorted(windows):
        window = windows[sensor]
        count = window.count
        of_sensor = columns.get(sensor)
        if of_sensor is None:
            of_sensor = _columns(sensor, wanted)
            if wanted is FEATURES and len(_DEFAULT_COLUMNS) < _KEPT:
                _DEFAULT_COLUMNS[sensor] = of_sensor
        for attribute, name, owner, needs_two in of_sensor:
            if needs_two and count < 2:
                continue
            value = float(getattr(window, attribute))
            if math.isfinite(value):
                names.append(name)
                values.append(value)
                if owner == sensor:
                    counts.append(count)
                else:
                    counts.append(windows[owner].count if owner in windows else 1)
    return names, values, counts


def _checked(wanted: tuple[str, ...]) -> tuple[str, ...]:
    unknown = set(wanted) - set(WINDOW_FEATURES)
    if unknown:
        raise ValueError(f"unknown window features {sorted(unknown)}; known: {WINDOW_FEATURES}")
    return tuple(dict.fromkeys(wanted))


Column = tuple[str, str, str, bool]
_KEPT = 4096
_DEFAULT_COLUMNS: dict[str, tuple[Column, ...]] = {}
""":func:`_columns` of each sensor seen, for the default features."""


@lru_cache(maxsize=_KEPT)
def _columns(sensor: str, wanted: tuple[str, ...]) -> tuple[Column, ...]:
    """Per wanted feature of a sensor: attribute, name, sensor by name, needs two readings.

    Cached: the names are built once, and the same strings every window make comparing
    a window's names with the last one's cheap.
    """
    return tuple(
        (name, f"{sensor}.{name}", split_feature(f"{sensor}.{name}")[0], name in _NEEDS_TWO)
        for name in wanted
    )


def split_feature(name: str) -> tuple[str, str]:
    """The sensor and the window feature of a feature name.

    >>> split_feature("discharge_pressure.std")
    ('discharge_pressure', 'std')
    >>> split_feature("load")
    ('load', '')
    """
    sensor, _, feature = name.rpartition(".")
    return (sensor, feature) if sensor else (feature, "")
