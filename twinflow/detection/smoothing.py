"""Exponential smoothing of window features at several time scales, per reading.

A fault that shifts a signal by a fraction of its noise (on SKAB's valve runs the flow
rate drops by 0.5-3 sigma of its 1-Hz noise) is invisible in any single window and
plain in an average over a few dozen readings; a spike or a burst is plain in a few
readings and gone in an average over dozens. So each feature is smoothed at several
scales at once, and the scorer standardizes each scale on its own: by default a fast one
(``w = 0.3``: about three readings) and a slow one (``w = 0.05``: about twenty). An
exponentially weighted mean needs constant memory and no window to hold, and the scorer
learns the variability of each smoothed series itself, so its z-scores stay calibrated
however autocorrelated the raw signal is.

Weights are stated per reading, so a scale spans the same number of readings whatever
the window length: a window summarizing ``n`` readings of a sensor moves that sensor's
features by ``1 - (1 - w)^n``. With ``w = 0.05`` a 1-reading row of a replay moves them
by 5 %, a 10-s window of a 1-Hz sensor in the flow by 40 %; either way a step is
half-way through after ~14 readings. The price of the slow scale is that delay, and that
a fault lingers as long after it ends.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from twinflow.detection.seasonal import Index, widened

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

_STEPS: dict[tuple[bytes, tuple[int, ...]], Floats] = {}
"""Steps by smoothing weights and readings per feature, shared by every smoother: the
same few combinations of counts (10 readings a sensor, now and then 9 or 11) recur in
every entity, and each costs a power to compute."""
_STEPS_KEPT = 4096


class Smoother:
    """An exponentially weighted mean per feature and scale, started at first sight.

    Only the features present in a window are updated and returned: a missing sensor
    stays missing, it does not repeat its last smoothed value.

    >>> import numpy as np
    >>> smoother = Smoother((1.0, 0.5))
    >>> smoother.grow(2)
    >>> smoother.update(np.array([0]), np.array([10.0]), np.array([1])).tolist()
    [[10.0, 10.0]]
    >>> smoother.update(np.array([0, 1]), np.array([20.0, 1.0]), np.array([1, 1])).tolist()
    [[20.0, 15.0], [1.0, 1.0]]
    >>> smoother.update(np.array([0]), np.array([25.0]), np.array([2])).tolist()  # 1 - 0.5²
    [[25.0, 22.5]]
    """

    __slots__ = ("_everything_seen", "means", "seen", "weights")

    def __init__(self, weights: tuple[float, ...]) -> None:
        if not weights or not all(0 < w <= 1 for w in weights):
            raise ValueError(f"smoothing weights must be in (0, 1], got {weights}")
        self.weights = np.asarray(weights, dtype=np.float64)
        self.means = np.zeros((0, len(weights)))
        self.seen = np.zeros(0, dtype=bool)
        self._everything_seen = True
        """Whether every feature has been seen (then no feature starts at this window)."""

    def restore(self) -> None:
        """Derive what a snapshot of an older layout did not hold (only the state)."""
        if not hasattr(self, "_everything_seen"):
            self._everything_seen = bool(self.seen.all())

    def grow(self, features: int) -> None:
        """Make room for ``features`` features."""
        extra = features - len(self.seen)
        if extra > 0:
            self.means = widened(self.means, extra, axis=0)
            self.seen = widened(self.seen, extra, axis=0)
            self._everything_seen = False

    def update(self, columns: Index, values: Floats, readings: Ints | None) -> Floats:
        """Fold one window in; the smoothed values of its features, one row per feature.

        ``readings``: how many readings each feature summarizes (at least 1 counts;
        None: one each).
        """
        return self.fold(columns, values, self.steps(readings))

    def steps(self, readings: Ints | None) -> Floats:
        """How far a window moves each feature's scales towards it (see :meth:`update`).

        Rows follow ``readings``; a single row for all features when it is None.
        """
        if readings is None:
            return self.weights[None, :]
        step: Floats = 1.0 - (1.0 - self.weights[None, :]) ** np.maximum(readings, 1)[:, None]
        return step

    def steps_for(self, readings: tuple[int, ...]) -> Floats:
        """:meth:`steps` of these readings, computed once for every smoother (read-only)."""
        key = (self.weights.tobytes(), readings)
        step = _STEPS.get(key)
        if step is None:
            if len(_STEPS) >= _STEPS_KEPT:
                _STEPS.clear()
            step = self.steps(np.array(readings, dtype=np.int64))
            step.flags.writeable = False
            _STEPS[key] = step
        return step

    def fold(self, columns: Index, values: Floats, step: Floats) -> Floats:
        """:meth:`update` with the :meth:`steps` of the window's readings.

        With every feature in the window, the array returned is the smoother's own
        state from then on: read it, do not write to it.
        """
        current = self.means[columns]
        moved: Floats = current + step * (values[:, None] - current)
        if not self._everything_seen:
            moved = np.where(self.seen[columns, None], moved, values[:, None])
            self.seen[columns] = True
            self._everything_seen = bool(self.seen.all())
        if isinstance(columns, slice):
            self.means = moved
        else:
            self.means[columns] = moved
        return moved
