"""Linear trends of bucketed sensor means, their significance, and when they reach a limit.

One fit serves every sensor of an entity at once: the histories are rows of one array
(a missing bucket is NaN), so the hot path is a handful of numpy reductions.

The slope's standard error is corrected for autocorrelated residuals (an AR(1) factor
``(1 + rho) / (1 - rho)`` on its variance, rho the lag-1 autocorrelation of the fit's
residuals). That is what keeps cycles and steps from passing for trends: a plant's day
and night, or a setpoint change inside the history, leave long runs of residuals of
one sign, rho near 1, and a slope no more certain than a handful of independent
points would give; a wear trend in noise leaves residuals close to white.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

MAX_RHO = 0.95
"""Autocorrelation is capped here: beyond it the inflation (39x) says "no evidence"."""


@dataclass(frozen=True, slots=True)
class Trends:
    """Per sensor (one entry each): the fitted line and its uncertainty at ``at_h``."""

    count: npt.NDArray[np.int64]
    """Buckets the fit used."""
    level: Floats
    """The line's value at ``at_h``."""
    slope: Floats
    """Units per hour."""
    slope_se: Floats
    """Standard error of the slope, autocorrelation included (inf: no fit)."""
    level_se: Floats
    """Standard error of ``level``, autocorrelation included."""
    sigma: Floats
    """Residual standard deviation, autocorrelation included: a new bucket's spread."""
    centre_h: Floats
    first_h: Floats
    """Time of the first bucket the fit used (inf: none)."""
    sxx: Floats
    """Sum of squared time deviations (hours²), for prediction intervals."""
    rho: Floats
    """Lag-1 autocorrelation of the residuals, in [0, MAX_RHO]."""
    significant: Bools
    """Whether the slope is significant (set by :func:`fit_spans`; :func:`fit` says no)."""

    @property
    def dof(self) -> Floats:
        """Degrees of freedom of the fit, what the autocorrelation repeats taken away."""
        return self.count * (1.0 - self.rho) / (1.0 + self.rho) - 2.0

    def predict(self, at_h: float, level_at_h: float) -> tuple[Floats, Floats]:
        """The line's value at ``at_h`` and a new bucket's standard deviation there.

        ``level`` is the line's value at ``level_at_h``.
        """
        mean = self.level + self.slope * (at_h - level_at_h)
        with np.errstate(invalid="ignore", divide="ignore"):
            spread = self.sigma * np.sqrt(
                1.0 + 1.0 / np.maximum(self.count, 1) + (at_h - self.centre_h) ** 2 / self.sxx
            )
        return mean, spread


def fit(times_h: Floats, values: Floats, use: Bools, at_h: float) -> Trends:
    """Least-squares lines through each row of ``values`` (sensors x buckets).

    ``times_h`` are the buckets' times in hours (shared by the rows), ``use`` says
    which cells count (NaN cells never do). Rows with fewer than 3 usable buckets get
    an infinite standard error.

    >>> t = np.arange(10.0)
    >>> trends = fit(t, np.vstack([2.0 * t + 1.0, np.ones(10)]), np.ones((2, 10), bool), 9.0)
    >>> trends.slope.round(6).tolist(), trends.level.round(6).tolist()
    ([2.0, 0.0], [19.0, 1.0])
    """
    use = use & ~np.isnan(values) & np.isfinite(times_h)
    count = use.sum(axis=1).astype(np.float64)
    safe = np.maximum(count, 1.0)
    y = np.where(use, values, 0.0)
    centre = np.where(use, times_h, 0.0).sum(axis=1) / safe
    mean = y.sum(axis=1) / safe
    dt = np.where(use, times_h - centre[:, None], 0.0)
    sxx = (dt * dt).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, (dt * (y - mean[:, None])).sum(axis=1) / sxx, 0.0)
        residual = np.where(use, y - mean[:, None] - slope[:, None] * dt, 0.0)
        ss = (residual * residual).sum(axis=1)
        # Lag one between consecutive used buckets of the row (gaps are skipped).
        lagged = _lag_products(residual, use)
        rho = np.clip(np.where(ss > 0, lagged / ss, 0.0), 0.0, MAX_RHO)
        inflation = (1.0 + rho) / (1.0 - rho)
        variance = np.where(count > 2, ss / (count - 2), np.inf) * inflation
        slope_se = np.sqrt(np.where(sxx > 0, variance / sxx, np.inf))
        gap = at_h - centre
        level_se = np.sqrt(variance * (1.0 / safe + np.where(sxx > 0, gap * gap / sxx, np.inf)))
    return Trends(
        count=count.astype(np.int64),
        level=mean + slope * (at_h - centre),
        slope=slope,
        slope_se=slope_se,
        level_se=level_se,
        sigma=np.sqrt(variance),
        centre_h=centre,
        first_h=np.where(use, times_h, np.inf).min(axis=1),
        sxx=sxx,
        rho=rho,
        significant=np.zeros(len(count), dtype=bool),
    )


def _line_beats_step(
    times_h: Floats, values: Floats, use: Bools, trends: Trends, at_h: float
) -> Bools:
    """Per row: whether the line leaves less squared error than the best single step."""
    beats = np.zeros(values.shape[0], dtype=bool)
    for row in range(values.shape[0]):
        y = values[row][use[row]]
        n = len(y)
        if n < 4:
            continue
        t = times_h[use[row]]
        line = trends.level[row] + trends.slope[row] * (t - at_h)
        line_ss = float(np.sum((y - line) ** 2))
        # Every split into a left and right mean, from cumulative sums.
        left = np.arange(1, n)
        sums, squares = np.cumsum(y)[:-1], np.cumsum(y * y)[:-1]
        total, total_sq = float(y.sum()), float(np.dot(y, y))
        left_ss = squares - sums * sums / left
        right_sums = total - sums
        right_ss = (total_sq - squares) - right_sums * right_sums / (n - left)
        beats[row] = line_ss < float(np.min(left_ss + right_ss))
    return beats


def _lag_products(residual: Floats, use: Bools) -> Floats:
    """Per row, the sum of products of each used residual with the previous used one."""
    sums = np.zeros(residual.shape[0])
    for row in range(residual.shape[0]):
        r = residual[row][use[row]]
        if len(r) > 1:
            sums[row] = float(np.dot(r[1:], r[:-1]))
    return sums


def time_to_limit(
    level: float, slope: float, slope_se: float, level_se: float, limit: float, z: float
) -> tuple[float, float, float | None]:
    """Hours until a line at ``level`` with ``slope`` reaches ``limit``, with bounds.

    The lower bound takes the steepest slope and the nearest level the ``z`` intervals
    allow; the upper one the flattest and farthest (None when that slope never gets
    there). A level at or past the limit is 0 hours away. The caller has checked that
    the slope heads for the limit.

    >>> time_to_limit(5.0, 1.0, 0.1, 0.0, 7.0, 2.0)
    (2.0, 1.6666666666666667, 2.5)
    >>> time_to_limit(5.0, -1.0, 0.6, 0.0, 3.0, 2.0)
    (2.0, 0.9090909090909091, None)
    >>> time_to_limit(7.5, 1.0, 0.1, 0.0, 7.0, 2.0)
    (0.0, 0.0, 0.0)
    """
    direction = 1.0 if slope > 0 else -1.0
    gap = direction * (limit - level)
    if gap <= 0:
        return 0.0, 0.0, 0.0
    rate = direction * slope
    low = max(gap - z * level_se, 0.0) / (rate + z * slope_se)
    slowest = rate - z * slope_se
    high = (gap + z * level_se) / slowest if slowest > 0 else None
    return gap / rate, low, high


def fit_spans(
    times_h: Floats,
    values: Floats,
    since_h: Floats,
    at_h: float,
    spans_h: Sequence[float],
    significance: float,
) -> Trends:
    """Per row, the line of the shortest recent span with significant evidence of a slope.

    A wear trend starts somewhere, and it may speed up: a line through a flat stretch
    and the ramp after it fits neither, and underestimates the slope now. So each row
    is fitted over each of ``spans_h`` (ascending: the last so many hours, never before
    its ``since_h``) and keeps the shortest span whose slope is at least the
    ``significance`` quantile (shared among the spans) of its own degrees of freedom in
    standard errors from 0
    (the most recent evidence that suffices); a row with none keeps its strongest.

    A span where one step explains the values at least as well as the line has no
    evidence of a slope: wear is gradual, a new setpoint or a repair is a step.
    """
    # Several spans are several tests: each is held to its share of the error rate
    # (Bonferroni), so trying more spans does not find more trends in noise.
    normal = NormalDist()
    per_span = normal.inv_cdf(1.0 - normal.cdf(-significance) / len(spans_h))
    candidates = []
    ratios = []
    for span in spans_h:
        use = times_h[None, :] >= np.maximum(since_h, at_h - span)[:, None]
        use &= ~np.isnan(values)
        trends = fit(times_h, values, use, at_h)
        quantile = np.asarray([student_t(per_span, dof) for dof in trends.dof.tolist()])
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.abs(trends.slope) / (trends.slope_se * quantile)
        ratio[~_line_beats_step(times_h, values, use, trends, at_h)] = 0.0
        candidates.append(trends)
        ratios.append(np.nan_to_num(ratio, nan=-1.0, posinf=-1.0))
    stacked = np.vstack(ratios)
    significant = stacked >= 1.0
    found: Bools = np.asarray(significant.any(axis=0), dtype=bool)
    best = np.where(found, np.argmax(significant, axis=0), np.argmax(stacked, axis=0))
    chosen = {
        f.name: np.choose(best, [getattr(c, f.name) for c in candidates])
        for f in fields(Trends)
        if f.name != "significant"
    }
    return Trends(**chosen, significant=found)


def student_t(z: float, dof: float) -> float:
    """Student's t quantile with ``dof`` degrees of freedom at the normal quantile ``z``.

    The Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5), within 1 % of the exact
    value from 3 degrees of freedom on.

    >>> round(student_t(1.959964, 10), 3), round(student_t(3.0, 6), 2)
    (2.228, 4.9)
    """
    if dof <= 0:
        return math.inf
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4
