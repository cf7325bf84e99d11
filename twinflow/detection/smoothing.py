"""Exponential smoothing of window features before they are scored, per reading.

A fault that shifts a signal by a fraction of its noise (on SKAB's valve runs the flow
rate drops by 0.5-3 sigma of its 1-Hz noise) is invisible in any single window and
plain in an average over a few dozen readings. An exponentially weighted mean per
feature is that average online: constant memory, no window to hold, and the scorer
learns the variability of the smoothed feature itself, so its z-scores stay calibrated
however autocorrelated the raw signal is.

The weight is stated per reading, so the smoothing spans the same number of readings
whatever the window length: a window summarizing ``n`` readings of a sensor moves that
sensor's features by ``1 - (1 - w)^n``. With the default ``w = 0.05`` a 1-reading row of
a replay moves them by 5 %, a 10-s window of a 1-Hz sensor in the flow by 40 %; either
way a step is half-way through after ~14 readings. The price is that delay, and that a
fault lingers as long after it ends.
"""

from __future__ import annotations

from collections.abc import Mapping

from twinflow.detection.features import split_feature


class FeatureSmoother:
    """An exponentially weighted mean per feature, created on first sight.

    Only the features present in a window are updated and returned: a missing sensor
    stays missing, it does not repeat its last smoothed value. ``weight`` is the share
    of one new reading (1 turns smoothing off).

    >>> smoother = FeatureSmoother(weight=0.5)
    >>> smoother.update({"flow.mean": 10.0})
    {'flow.mean': 10.0}
    >>> smoother.update({"flow.mean": 20.0, "flow.std": 1.0})
    {'flow.mean': 15.0, 'flow.std': 1.0}
    >>> smoother.update({"flow.mean": 25.0}, readings={"flow": 2})  # weight 1 - 0.5²
    {'flow.mean': 22.5}
    """

    __slots__ = ("means", "weight")

    def __init__(self, weight: float) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"smoothing weight must be in (0, 1], got {weight}")
        self.weight = weight
        self.means: dict[str, float] = {}

    def __getstate__(self) -> tuple[float, dict[str, float]]:
        return self.weight, self.means

    def __setstate__(self, state: tuple[float, dict[str, float]]) -> None:
        self.weight, self.means = state

    def update(
        self, x: Mapping[str, float], readings: Mapping[str, int] | None = None
    ) -> dict[str, float]:
        """Fold one window into the running means; the smoothed values of its features.

        ``readings``: how many readings each sensor's window summarizes (default 1).
        """
        if self.weight == 1:
            return dict(x)
        smoothed = {}
        for feature, value in x.items():
            mean = self.means.get(feature)
            if mean is None:
                mean = value
            else:
                count = readings.get(split_feature(feature)[0], 1) if readings else 1
                mean += (1.0 - (1.0 - self.weight) ** max(count, 1)) * (value - mean)
            self.means[feature] = smoothed[feature] = mean
        return smoothed
