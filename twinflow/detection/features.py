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

from schemas.outputs import SensorWindow

FEATURES: tuple[str, ...] = ("mean", "std")
"""Window features the default model uses, in this order per sensor."""

WINDOW_FEATURES: tuple[str, ...] = ("count", "mean", "min", "max", "std", "last", "slope")
"""Every numeric feature a :class:`~schemas.outputs.SensorWindow` carries."""

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

    >>> from schemas.outputs import SensorWindow
    >>> def window(sensor: str, count: int, mean: float, std: float) -> SensorWindow:
    ...     return SensorWindow("pump-001", sensor, 0, 10_000, count, mean, mean, mean,
    ...                         std, mean, 0.0, 0)
    >>> feature_vector({"flow": window("flow", 10, 180.0, 2.5),
    ...                 "bearing_temp": window("bearing_temp", 1, 51.0, 0.0)})
    {'bearing_temp.mean': 51.0, 'flow.mean': 180.0, 'flow.std': 2.5}
    """
    wanted = tuple(features)
    unknown = set(wanted) - set(WINDOW_FEATURES)
    if unknown:
        raise ValueError(f"unknown window features {sorted(unknown)}; known: {WINDOW_FEATURES}")
    vector: dict[str, float] = {}
    for sensor in sorted(windows):
        window = windows[sensor]
        for name in wanted:
            if name in _NEEDS_TWO and window.count < 2:
                continue
            value = float(getattr(window, name))
            if math.isfinite(value):
                vector[f"{sensor}.{name}"] = value
    return vector


def split_feature(name: str) -> tuple[str, str]:
    """The sensor and the window feature of a feature name.

    >>> split_feature("discharge_pressure.std")
    ('discharge_pressure', 'std')
    >>> split_feature("load")
    ('load', '')
    """
    sensor, _, feature = name.rpartition(".")
    return (sensor, feature) if sensor else (feature, "")
