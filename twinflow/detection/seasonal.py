"""Daily and weekly cycles, learned per feature and used only where they measurably help.

A machine that runs harder by day, or stops at weekends, is not anomalous every evening.
:class:`Seasonality` keeps, per feature, a profile of the feature's deviation from its
level for each bin of a period (by default a day in 48 half-hour bins and a week in 168
hourly bins; the bin is the window's event time, in UTC) and subtracts the profile of the
current bin before the feature is smoothed and scored.

Whether a profile is used is measured, not assumed. Every feature tracks, per period,
the squared error of two forecasts of its next value, made before the value is learned:
the period's level alone, and its level plus the profile (both over the windows where
the profile had a forecast). A profile is used when its error is under ``gain`` times
the level's (it explains at least half the variance, by default) and its current bin
has been seen on ``min_visits`` earlier periods; the period with the smaller error wins,
and a period in use stays while it beats its level at all and no other is clearly
better (``gain`` times its error), so the choice does not flap.
The choice is made when the clock enters a new bin. Profiles are learned from earlier
periods only: a bin's profile changes when the clock leaves the bin, so a slowly
wandering signal cannot pass for a cycle by predicting its recent past (which any short
memory would; with the profile learned sample by sample, NAB's machine temperature and
CPU series, which have no cycle, looked 90 % explained). A feature without a cycle, or
with too little history (the first two days, the first two weeks), is scored as it is.

State per feature: one float32 and one int16 per bin of every period (216 bins by
default), and a few floats per period.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Index = slice | Ints
"""Which features a window has: ``slice(None)`` for all of them in column order (the
usual case, and the cheap one), else their columns."""

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
_ERROR_MEMORY = 5000
"""Windows over which the forecast errors are averaged once that many were seen."""


@dataclass(frozen=True)
class Period:
    """One candidate cycle: its length and how many bins it is cut into."""

    length_ms: int
    bins: int

    def bin_of(self, ts_ms: int) -> int:
        """The bin a time falls in (bins are aligned to the epoch, UTC)."""
        return int(ts_ms % self.length_ms * self.bins // self.length_ms)


DEFAULT_PERIODS = (Period(DAY_MS, 48), Period(WEEK_MS, 168))
"""A day in half-hour bins and a week in hourly bins."""


class Seasonality:
    """The cycles of one entity's features (see the module docstring).

    Arrays are (periods, features) for the per-period state and (features, bins of all
    periods) for the profiles.

    >>> import numpy as np
    >>> from twinflow.detection.seasonal import DAY_MS, Period, Seasonality
    >>> season = Seasonality((Period(DAY_MS, 24),))
    >>> hour = DAY_MS // 24
    >>> season.grow(1)
    >>> for t in range(0, 14 * DAY_MS, hour // 4):  # busy from 08:00 to 18:00
    ...     busy = 8 <= t % DAY_MS // hour < 18
    ...     _ = season.apply(slice(None), np.array([100.0 if busy else 20.0]), t)
    >>> season.selected.tolist()  # feature 0 follows the day
    [0]
    >>> busy, _ = season.apply(slice(None), np.array([100.0]), 14 * DAY_MS + 9 * hour)
    >>> idle, _ = season.apply(slice(None), np.array([20.0]), 14 * DAY_MS + 20 * hour)
    >>> abs(float(busy[0] - idle[0])) < 5  # 80 apart raw, close once the day is removed
    True
    """

    __slots__ = (
        "acc",
        "acc_n",
        "changed",
        "current",
        "err_level",
        "err_profile",
        "errors",
        "first_ms",
        "gain",
        "in_use",
        "lengths",
        "level",
        "level_n",
        "memory",
        "min_visits",
        "offsets",
        "periods",
        "profile",
        "selected",
        "visits",
    )

    def __init__(
        self,
        periods: tuple[Period, ...] = DEFAULT_PERIODS,
        *,
        gain: float = 0.5,
        min_visits: int = 2,
        memory: float = 7.0,
    ) -> None:
        if not 0 < gain < 1 or min_visits < 1 or memory < 1:
            raise ValueError("need 0 < gain < 1, min_visits >= 1 and memory >= 1")
        self.periods = tuple(periods)
        self.gain = gain
        self.min_visits = min_visits
        self.memory = memory
        count = len(self.periods)
        self.lengths = np.asarray([p.length_ms for p in self.periods], dtype=np.float64)
        self.offsets = [sum(p.bins for p in self.periods[:k]) for k in range(count)]
        total_bins = sum(p.bins for p in self.periods)
        self.profile = np.zeros((0, total_bins), dtype=np.float32)
        self.visits = np.zeros((0, total_bins), dtype=np.int16)
        self.level = np.zeros((count, 0))
        self.level_n = np.zeros(0, dtype=np.int64)
        self.acc = np.zeros((count, 0))
        self.acc_n = np.zeros((count, 0), dtype=np.int64)
        self.errors = np.zeros((count, 0), dtype=np.int64)
        self.err_level = np.zeros((count, 0))
        """Squared error of each period's level alone, where the period could forecast."""
        self.err_profile = np.zeros((count, 0))
        self.current = [-1] * count
        """Per period, the bin (index into the profiles' columns) the clock is in."""
        self.first_ms: int | None = None
        self.selected = np.zeros(0, dtype=np.int64)
        """Per feature, the period in use (its index), or -1."""
        self.changed = np.zeros(0, dtype=np.int64)
        """Features whose period changed in the last :meth:`apply`."""
        self.in_use = False
        """Whether any feature uses a period."""

    def apply(
        self, columns: Index, values: Floats, ts_ms: int, *, learn: bool = True
    ) -> tuple[Floats, Floats]:
        """The features at ``columns`` with their cycle removed, and what was removed.

        Also learns ``values`` (after forecasting them; not when ``learn`` is false) and
        may change which period a feature uses; :attr:`changed` says which did in this
        call.
        """
        if len(self.changed):
            self.changed = self.changed[:0]
        if not self.periods:
            return values, np.zeros(len(values))
        if self.first_ms is None:
            self.first_ms = ts_ms
        bins = [
            offset + p.bin_of(ts_ms) for offset, p in zip(self.offsets, self.periods, strict=True)
        ]
        entered = False
        for k, b in enumerate(bins):
            if b != self.current[k]:
                self._fold(k)
                self.current[k] = b
                entered = True
        visits = self.visits[columns][:, bins].T  # periods x features
        forecast = self.profile[columns][:, bins].T.astype(np.float64)  # 0 where never seen
        level = self.level[:, columns]
        self._score(columns, values, level, forecast, visits > 0)
        if entered:
            self._choose(columns, visits >= self.min_visits)
        if self.in_use:
            chosen = self.selected[columns]
            removed = np.where(chosen >= 0, forecast[chosen, np.arange(len(values))], 0.0)
        else:
            removed = np.zeros(len(values))
        if learn:
            self._learn(columns, values, level, forecast, ts_ms)
        return values - removed, removed

    def grow(self, features: int) -> None:
        """Make room for ``features`` features."""
        extra = features - len(self.level_n)
        if extra <= 0:
            return
        count = len(self.periods)
        total_bins = self.profile.shape[1]
        self.profile = np.vstack([self.profile, np.zeros((extra, total_bins), np.float32)])
        self.visits = np.vstack([self.visits, np.zeros((extra, total_bins), np.int16)])
        self.level = np.hstack([self.level, np.zeros((count, extra))])
        self.acc = np.hstack([self.acc, np.zeros((count, extra))])
        self.acc_n = np.hstack([self.acc_n, np.zeros((count, extra), np.int64)])
        self.err_profile = np.hstack([self.err_profile, np.zeros((count, extra))])
        self.err_level = np.hstack([self.err_level, np.zeros((count, extra))])
        self.errors = np.hstack([self.errors, np.zeros((count, extra), np.int64)])
        self.level_n = np.append(self.level_n, np.zeros(extra, np.int64))
        self.selected = np.append(self.selected, np.full(extra, -1, np.int64))

    def _fold(self, k: int) -> None:
        """Learn period ``k``'s visit of the bin the clock just left."""
        b = self.current[k]
        if b < 0:
            return
        visited = np.flatnonzero(self.acc_n[k])
        if not len(visited):
            return
        visits = self.visits[visited, b].astype(np.int64) + 1
        self.visits[visited, b] = np.minimum(visits, np.iinfo(np.int16).max)
        weight = np.maximum(1.0 / visits, 1.0 / self.memory)
        mean = self.acc[k, visited] / self.acc_n[k, visited]
        profile = self.profile[visited, b]
        self.profile[visited, b] = profile + weight * (mean - profile)
        self.acc[k, visited] = 0.0
        self.acc_n[k, visited] = 0

    def _score(
        self,
        columns: Index,
        values: Floats,
        level: Floats,
        forecast: Floats,
        known: npt.NDArray[np.bool_],
    ) -> None:
        """Learn how well each period's level alone, and with its profile, forecast ``values``.

        Each period is judged where its profile has a forecast for the bin, both of its
        forecasts on the same windows.
        """
        scoring = known & (self.level_n[columns] >= 2)
        if not scoring.any():
            return
        errors = self.errors[:, columns] + scoring
        self.errors[:, columns] = errors
        weight = scoring * np.maximum(1.0 / np.maximum(errors, 1), 1.0 / _ERROR_MEMORY)
        level_error = values - level
        profile_error = level_error - forecast
        current = self.err_level[:, columns]
        self.err_level[:, columns] = current + weight * (level_error * level_error - current)
        current = self.err_profile[:, columns]
        self.err_profile[:, columns] = current + weight * (profile_error * profile_error - current)

    def _choose(self, columns: Index, usable: npt.NDArray[np.bool_]) -> None:
        error = np.where(usable, self.err_profile[:, columns], np.inf)
        # What each period leaves of its level's error, on the windows it could forecast.
        share = error / np.maximum(self.err_level[:, columns], 1e-300)
        best = error.argmin(axis=0)
        features = np.arange(error.shape[1])
        best_error = error[best, features]
        current = self.selected[columns]
        held = np.maximum(current, 0)
        current_error = np.where(current >= 0, error[held, features], np.inf)
        stay = (share[held, features] < 1.0) & (current_error * self.gain < best_error)
        switch = share[best, features] < self.gain
        chosen = np.where((current >= 0) & stay, current, np.where(switch, best, -1))
        self.changed = np.arange(len(self.selected))[columns][chosen != current]
        self.selected[columns] = chosen
        self.in_use = bool((self.selected >= 0).any())

    def _learn(
        self, columns: Index, values: Floats, level: Floats, forecast: Floats, ts_ms: int
    ) -> None:
        self.acc[:, columns] += values - level
        self.acc_n[:, columns] += 1
        n = self.level_n[columns] + 1
        self.level_n[columns] = n
        # The level follows what the profile does not explain, over about one period:
        # weight max(1/n, 1/samples per period), and samples per period = n / periods.
        assert self.first_ms is not None
        periods = np.maximum(1.0, (ts_ms - self.first_ms) / self.lengths)
        weight = np.minimum(1.0, periods[:, None] / n)
        self.level[:, columns] = level + weight * (values - forecast - level)
