"""Per-feature z-scores at every time scale, against one or more learned operating points.

For each feature (``"flow.mean"``) and smoothing scale the model keeps a running mean and
variance that forget slowly (:class:`ZScores`); a window's z-score per feature and scale
is ``(x - mean) / std`` and its score the largest ``|z|``: most faults move few
signals, and a fault in one of eight sensors must not be diluted by seven quiet ones (on
SKAB's valve runs the RMS of the z-scores had F1 0.77 against 0.85 for the maximum).

**Operating points (regimes).** The means exist once per regime, the variances once:
a machine has several normal levels (setpoints, loads) with the same noise. A window is
judged against the regime it is closest to (the smallest largest ``|z|``) and teaches
that regime only. A new regime is added when an alarm has lasted long enough to be a
new normal (:meth:`ZScores.add_regime`, called by re-baselining); with ``regimes`` in
use, the least recently used one is replaced. So after a setpoint change has been
accepted, going back to the old setpoint is still normal: with a single regime, SKAB's
runs raised a second alarm at every fault's end (FAR 14.6 % against 6.6 % with three).

**Robust, forgetting updates.** Update weight ``max(1/n, 1/memory)``: the exact mean
and variance of the first ``memory`` values, exponentially weighted after that. After
the warm-up a value is clipped to ``mean ± clip·std`` before it is learned (a
Huber-style update), and a feature learns only while it is within ``gate`` sigmas; a
feature is not scored before it has ``min_count`` values, and learns without gate or
clip until then.

**Floors.** The standard deviation used is never below ``rel_floor`` times the level of
the same sensor's ``mean`` feature, nor below ``abs_floor``: a perfectly quiet signal
has a variance of (almost) zero, and without a floor its next rounding error would be a
thousand sigmas. The clip uses the floored deviation too, or a signal that was flat
during the warm-up could never learn its real spread.

Plain arrays: ``count`` and ``var`` of shape (features, scales), ``means`` of shape
(regimes, features, scales); it pickles in microseconds.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from twinflow.detection.seasonal import Index, widened

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


class ZScores:
    """Running moments per feature and scale, with up to ``regimes`` sets of means.

    >>> import numpy as np
    >>> model = ZScores(scales=1, min_count=3)
    >>> model.grow(np.array([0]))  # one feature, its own level
    >>> columns = np.array([0])
    >>> for v in (9.0, 10.0, 11.0):
    ...     model.learn(columns, np.array([[v]]), regime=0)
    >>> z, std, regime = model.z(columns, np.array([[12.0]]))
    >>> round(float(z[0, 0]), 2), regime
    (2.45, 0)
    >>> _ = model.add_regime(columns, np.array([[50.0]]), at=1)
    >>> z, std, regime = model.z(columns, np.array([[49.0]]))  # near the new operating point
    >>> round(float(z[0, 0]), 2), regime
    (-1.22, 1)
    """

    __slots__ = (
        "_settled",
        "abs_floor",
        "clip",
        "count",
        "last_used",
        "level_of",
        "max_regimes",
        "means",
        "memory",
        "min_count",
        "regimes",
        "rel_floor",
        "scales",
        "var",
    )

    def __init__(
        self,
        scales: int,
        *,
        regimes: int = 3,
        memory: int = 8640,
        clip: float = 4.0,
        min_count: int = 30,
        rel_floor: float = 1e-3,
        abs_floor: float = 1e-6,
    ) -> None:
        if scales < 1 or regimes < 1 or memory < 1 or clip <= 0 or min_count < 1:
            raise ValueError("need scales, regimes, memory, min_count >= 1 and clip > 0")
        self.scales = scales
        self.max_regimes = regimes
        self.memory = memory
        self.clip = clip
        self.min_count = min_count
        self.rel_floor = rel_floor
        self.abs_floor = abs_floor
        self.count = np.zeros((0, scales), dtype=np.int64)
        self.var = np.zeros((0, scales))
        self.means = np.zeros((regimes, 0, scales))
        self.level_of = np.zeros(0, dtype=np.int64)
        """Per feature, the column whose mean sets its floor (its sensor's ``mean``)."""
        self.regimes = 1
        self.last_used = np.zeros(regimes, dtype=np.int64)
        self._settled = True
        """Whether every cell has ``min_count`` values: from then on it stays so (counts
        only grow, and :meth:`relearn` keeps them at ``min_count``) until :meth:`grow`."""

    def restore(self) -> None:
        """Derive what a snapshot of an older layout did not hold (only the state)."""
        if not hasattr(self, "_settled"):
            self._settled = bool((self.count >= self.min_count).all())

    def grow(self, level_of: Ints) -> None:
        """Make room for features up to ``len(level_of)``; ``level_of`` as the attribute."""
        extra = len(level_of) - len(self.level_of)
        if extra > 0:
            self.count = widened(self.count, extra, axis=0)
            self.var = widened(self.var, extra, axis=0)
            self.means = widened(self.means, extra, axis=1)
            self._settled = False
        self.level_of = np.asarray(level_of, dtype=np.int64)

    def std(self, columns: Index) -> Floats:
        """The floored standard deviations of ``columns`` (features by scales)."""
        level = np.abs(self.means[0, self.level_of[columns], :])
        floor = np.maximum(self.abs_floor, self.rel_floor * level)
        std: Floats = np.sqrt(self.var[columns] + floor * floor)
        return std

    def scored(self, columns: Index) -> npt.NDArray[np.bool_]:
        """Which (feature, scale) cells have enough values to be scored."""
        return self.count[columns] >= self.min_count

    def z(self, columns: Index, x: Floats, at: int = 0) -> tuple[Floats, Floats, int]:
        """The z-scores of ``x`` (features by scales), the deviations used, and the regime.

        ``x`` is judged against its closest regime. Cells not scored yet are 0. ``at`` is
        the caller's clock, for the regimes' use.
        """
        z, _, std, regime = self.judge(columns, x, at)
        return z, std, regime

    def judge(self, columns: Index, x: Floats, at: int = 0) -> tuple[Floats, Floats, Floats, int]:
        """:meth:`z`, with the ``|z|`` it took to choose the regime: z, ``|z|``, std, regime."""
        std = self.std(columns)
        if self.regimes == 1:
            z = (x - self.means[0, columns]) / std
            if not self._settled:
                z = np.where(self.count[columns] >= self.min_count, z, 0.0)
            self.last_used[0] = at
            return z, np.abs(z), std, 0
        every = (x - self.means[: self.regimes, columns]) / std
        if not self._settled:
            every = np.where(self.count[columns] >= self.min_count, every, 0.0)
        size = np.abs(every)
        best = int(size.reshape(self.regimes, -1).max(axis=1).argmin())
        self.last_used[best] = at
        return every[best], size[best], std, best

    def learn(
        self,
        columns: Index,
        x: Floats,
        regime: int,
        *,
        gate: float | None = None,
        z: Floats | None = None,
        std: Floats | None = None,
        robust: bool = False,
        size: Floats | None = None,
    ) -> None:
        """Learn ``x`` into ``regime``.

        ``gate``: cells whose ``|z|`` (as returned by :meth:`z`, or ``size`` as returned
        by :meth:`judge`) exceeds it are not learned. ``robust``: clip values to ``mean ±
        clip·std`` first (``std`` as returned by :meth:`z`, or computed). Cells not scored
        yet always learn, without clipping.
        """
        count = self.count[columns]
        mean = self.means[regime, columns]
        if gate is not None and size is None and z is not None:
            size = np.abs(z)
        if gate is None or size is None:
            count = count + 1
            weight = np.maximum(1.0 / count, 1.0 / self.memory)
        elif self._settled:
            # Every cell is scored: no cell learns ungated or unclipped.
            learn = size <= gate
            count = count + learn
            # Counts are at least min_count >= 1 here, so no floor of 1 is needed.
            weight = learn * np.maximum(1.0 / count, 1.0 / self.memory)
            if robust:
                reach = self.clip * (self.std(columns) if std is None else std)
                x = x.clip(mean - reach, mean + reach)
        else:
            settled = count >= self.min_count
            learn = ~settled | (size <= gate)
            count = count + learn
            weight = learn * np.maximum(1.0 / np.maximum(count, 1), 1.0 / self.memory)
            if robust:
                reach = self.clip * (self.std(columns) if std is None else std)
                x = np.where(settled, np.clip(x, mean - reach, mean + reach), x)
        delta = x - mean
        step = weight * delta
        var = (1.0 - weight) * (self.var[columns] + step * delta)
        if isinstance(columns, slice):
            self.means[regime] = mean + step
            self.var = var
            self.count = count
        else:
            self.means[regime, columns] = mean + step
            self.var[columns] = var
            self.count[columns] = count
        if not self._settled:
            self._settled = bool((self.count >= self.min_count).all())

    def add_regime(self, columns: Index, levels: Floats, at: int) -> int:
        """Take ``levels`` (features by scales) as the means of a new regime; its index.

        Features not in ``columns`` keep the means of the regime in use now. With every
        regime in use, the least recently used one is replaced.
        """
        current = int(np.argmax(self.last_used[: self.regimes]))
        if self.regimes < self.max_regimes:
            regime = self.regimes
            self.regimes += 1
        else:
            regime = int(np.argmin(self.last_used[: self.regimes]))
        self.means[regime] = self.means[current]
        self.means[regime, columns] = levels
        self.last_used[regime] = at
        return regime

    def set_levels(self, regime: int, columns: Index, levels: Floats) -> None:
        """Move ``regime``'s means of ``columns`` to ``levels`` (features by scales)."""
        self.means[regime, columns] = levels

    def relearn(self, columns: Index) -> None:
        """Let ``columns`` adapt quickly again (their inputs changed meaning).

        Their counts drop to ``min_count``: they stay scored (against statistics that are
        wider than the new inputs, so conservatively) and learn with weight ~1/min_count
        at first. Starting them from nothing instead left them unscored for a while and
        then stricter than the threshold calibrated before (NAB standard 56.8, against
        62.4).
        """
        self.count[columns] = np.minimum(self.count[columns], self.min_count)
