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

State per feature: one float32 and one byte (visits, counted as far as they matter) per
bin of every period (216 bins by default), allocated once the first bin is left, and a
few floats per period.

Per window the hot path stays small: what the current bins say (their profiles and
visits, the cycle removed) only changes when the clock enters a new bin, so it is read
once per bin (:class:`_Bins`), not per window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

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
_BYTE = int(np.iinfo(np.uint8).max)


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

ArrayT = TypeVar("ArrayT", bound=np.ndarray)


def widened(array: ArrayT, extra: int, *, axis: int, fill: int = 0) -> ArrayT:
    """``array`` with ``extra`` more entries along ``axis``, all ``fill``, of its dtype.

    >>> widened(np.zeros((2, 0)), 3, axis=1).shape
    (2, 3)
    """
    shape = list(array.shape)
    shape[axis] = extra
    more = np.zeros(shape, dtype=array.dtype) if fill == 0 else np.full(shape, fill, array.dtype)
    # A new entity's first window grows every array from nothing: no copy needed.
    grown = more if array.shape[axis] == 0 else np.concatenate([array, more], axis=axis)
    return cast(ArrayT, grown)


def _no_bins() -> None:
    """What a pickled :class:`_Bins` loads as: nothing (it is derived again when needed)."""
    return None


class _Bins:
    """What the bins the clock is in say about every feature (periods by features).

    Profiles and visits change only when the clock leaves a bin (:meth:`Seasonality._fold`)
    and which period a feature uses only when it enters one, so this holds from one
    bin change (or :meth:`Seasonality.grow`) to the next. Its arrays are read-only: the
    removed cycle is handed out as it is. The flags are facts that, once true, stay true
    until the next bin: levels and error counts only grow.
    """

    __slots__ = (
        "all_known",
        "any_known",
        "any_usable",
        "forecast",
        "full",
        "known",
        "removed",
        "steady",
        "usable",
    )

    def __init__(self, season: Seasonality) -> None:
        if season.visited:
            visits = season.visits[:, season.current].T
            self.forecast: Floats = season.profile[:, season.current].T.astype(np.float64)
            """Each period's profile; exactly 0 where it never had a visit."""
            self.known = visits > 0
            self.usable = visits >= season.min_visits
            self.any_known = bool(self.known.any())
            self.all_known = bool(self.known.all())
            self.any_usable = bool(self.usable.any())
        else:  # no bin was ever left: nothing is known anywhere
            self.forecast = np.zeros((len(season.periods), len(season.level_n)))
            self.known = self.usable = np.zeros(self.forecast.shape, dtype=bool)
            self.any_known = self.any_usable = False
            self.all_known = not self.known.size
        self.steady = bool((season.level_n >= 2).all())
        """Every feature's levels can forecast (then only ``known`` says where to score)."""
        self.full = self.steady and self.all_known and bool((season.errors >= _ERROR_MEMORY).all())
        """Every forecast error is averaged with the weight of ``_ERROR_MEMORY`` windows."""
        self.removed: Floats = np.zeros(0)
        self.choose(season.selected, season.in_use)
        self.forecast.flags.writeable = False
        self.known.flags.writeable = False

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _no_bins, ()

    def __deepcopy__(self, memo: dict[int, object]) -> None:
        return None

    def choose(self, selected: Ints, in_use: bool) -> None:
        """Take the periods the features use now: what is removed from each."""
        if in_use:
            removed = np.where(
                selected >= 0, self.forecast[selected, np.arange(len(selected))], 0.0
            )
        else:
            removed = np.zeros(len(selected))
        removed.flags.writeable = False
        self.removed = removed


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
        "_bins",
        "_shortest",
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
        self.visits = np.zeros((0, total_bins), dtype=self._visits_dtype())
        """Visits per feature and bin; no rows (and no profiles) until a bin was left."""
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
        self._bins: _Bins | None = None
        """What the current bins say (pickles as None, and is derived again)."""
        self._derive()

    def _derive(self) -> None:
        """Set what follows from the state (and pickles cheaply, or not at all)."""
        self._bins = None
        self._shortest = min((p.length_ms for p in self.periods), default=0)

    def restore(self) -> None:
        """Derive what a snapshot of an older layout did not hold (only the state).

        Its profiles were allocated from the start, which works as it is; its int16
        visits become bytes where those count far enough.
        """
        if not hasattr(self, "_shortest"):
            self._derive()
            dtype = self._visits_dtype()
            if self.visits.dtype != dtype:
                self.visits = np.minimum(self.visits, np.iinfo(dtype).max).astype(dtype)

    def _visits_dtype(self) -> type[np.integer[Any]]:
        """The dtype of the visits: a byte where it is enough.

        Visits past both ``min_visits`` and the memory change nothing (the bin is usable
        and learns with weight 1/memory), so they are counted up to the dtype's largest.
        """
        small = self.min_visits <= _BYTE and self.memory <= _BYTE + 1
        return np.uint8 if small else np.int16

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
        current = self.current
        entered = False
        for k, (offset, period) in enumerate(zip(self.offsets, self.periods, strict=True)):
            length = period.length_ms  # Period.bin_of, inlined
            b = offset + int(ts_ms % length * period.bins // length)
            if b != current[k]:
                self._fold(k)
                current[k] = b
                entered = True
        bins = self._bins
        if bins is None or entered:
            bins = self._bins = _Bins(self)
        everything = isinstance(columns, slice)
        if everything:
            forecast, removed = bins.forecast, bins.removed
        else:
            forecast, removed = bins.forecast[:, columns], bins.removed[columns]
        level = self.level[:, columns]
        deviation = values - level
        if bins.any_known:
            known = bins.known if everything else bins.known[:, columns]
            self._score(columns, deviation, forecast, known, bins)
        # Without a usable bin no feature can take a period up (and none has one to drop).
        if entered and (self.in_use or bins.any_usable):
            self._choose(columns, bins.usable[:, columns])
            bins.choose(self.selected, self.in_use)
            removed = bins.removed if everything else bins.removed[columns]
        if learn:
            self._learn(
                columns, values, level, deviation, forecast if bins.any_known else None, ts_ms
            )
        # Nothing removed: the values as they came (the common case until a cycle is used).
        return (values - removed if self.in_use else values), removed

    @property
    def visited(self) -> bool:
        """Whether any bin was left with a feature's values (the profiles exist)."""
        return len(self.visits) > 0

    def grow(self, features: int) -> None:
        """Make room for ``features`` features."""
        extra = features - len(self.level_n)
        if extra <= 0:
            return
        if self.visited:
            self.profile = widened(self.profile, extra, axis=0)
            self.visits = widened(self.visits, extra, axis=0)
        self.level = widened(self.level, extra, axis=1)
        self.acc = widened(self.acc, extra, axis=1)
        self.acc_n = widened(self.acc_n, extra, axis=1)
        self.err_profile = widened(self.err_profile, extra, axis=1)
        self.err_level = widened(self.err_level, extra, axis=1)
        self.errors = widened(self.errors, extra, axis=1)
        self.level_n = widened(self.level_n, extra, axis=0)
        self.selected = widened(self.selected, extra, axis=0, fill=-1)
        self._bins = None

    def _fold(self, k: int) -> None:
        """Learn period ``k``'s visit of the bin the clock just left."""
        b = self.current[k]
        if b < 0:
            return
        visited = np.flatnonzero(self.acc_n[k])
        if not len(visited):
            return
        if not self.visited:
            shape = (len(self.level_n), self.profile.shape[1])
            self.profile = np.zeros(shape, dtype=self.profile.dtype)
            self.visits = np.zeros(shape, dtype=self.visits.dtype)
        visits = self.visits[visited, b].astype(np.int64) + 1
        self.visits[visited, b] = np.minimum(visits, np.iinfo(self.visits.dtype).max)
        weight = np.maximum(1.0 / visits, 1.0 / self.memory)
        mean = self.acc[k, visited] / self.acc_n[k, visited]
        profile = self.profile[visited, b]
        self.profile[visited, b] = profile + weight * (mean - profile)
        self.acc[k, visited] = 0.0
        self.acc_n[k, visited] = 0

    def _score(
        self,
        columns: Index,
        deviation: Floats,
        forecast: Floats,
        known: npt.NDArray[np.bool_],
        bins: _Bins,
    ) -> None:
        """Learn how well each period's level alone, and with its profile, forecast the values.

        ``deviation``: the values less each period's level. Each period is judged where
        its profile has a forecast for the bin (``known``), both of its forecasts on the
        same windows.
        """
        everything = isinstance(columns, slice)
        scoring = known if bins.steady else known & (self.level_n[columns] >= 2)
        if not (bins.all_known and bins.steady) and not scoring.any():
            return
        if everything:
            errors = self.errors
            errors += scoring
        else:
            errors = self.errors[:, columns] + scoring
            self.errors[:, columns] = errors
        # The weight is scoring · max(1 / max(errors, 1), 1 / _ERROR_MEMORY); the bin's
        # flags say where parts of it are known to be 1 or the memory's weight.
        weight: Floats | float
        if bins.full:
            weight = 1.0 / _ERROR_MEMORY
        elif bins.all_known and bins.steady:
            weight = np.maximum(1.0 / errors, 1.0 / _ERROR_MEMORY)
        else:
            weight = cast(
                Floats, scoring * np.maximum(1.0 / np.maximum(errors, 1), 1.0 / _ERROR_MEMORY)
            )
        profile_error = deviation - forecast
        for averages, error in ((self.err_level, deviation), (self.err_profile, profile_error)):
            current = averages[:, columns]
            # current + weight * (error² - current), one operation at a time in place.
            change = error * error
            change -= current
            change *= weight
            if everything:
                current += change
            else:
                averages[:, columns] = current + change

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
        self,
        columns: Index,
        values: Floats,
        level: Floats,
        deviation: Floats,
        forecast: Floats | None,
        ts_ms: int,
    ) -> None:
        """Learn the values.

        ``deviation``: the values less the levels (used up); ``forecast``: the profiles,
        None where all are 0.
        """
        everything = isinstance(columns, slice)
        if everything:
            self.acc += deviation
            self.acc_n += 1
            n = self.level_n
            n += 1
        else:
            self.acc[:, columns] += deviation
            self.acc_n[:, columns] += 1
            n = self.level_n[columns] + 1
            self.level_n[columns] = n
        # The level follows what the profile does not explain, over about one period:
        # weight max(1/n, 1/samples per period), and samples per period = n / periods.
        assert self.first_ms is not None
        elapsed = ts_ms - self.first_ms
        weight: Floats
        if elapsed <= self._shortest:
            # Within the shortest period every period counts 1: the weight is 1/n (<= 1).
            weight = 1.0 / n
        else:
            periods = np.maximum(1.0, elapsed / self.lengths)
            weight = np.minimum(1.0, periods[:, None] / n)
        # level + weight * (values - forecast - level); values - 0 - level is the deviation.
        change = deviation if forecast is None else values - forecast - level
        change *= weight
        if everything:
            level += change
        else:
            self.level[:, columns] = level + change
