"""One anomaly detector per entity: deseasonalize, smooth, score, decide, learn what is normal."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.outputs import Anomaly, Contribution, SensorWindow
from twinflow.detection.alarms import AlarmPolicy
from twinflow.detection.features import split_feature, window_features
from twinflow.detection.seasonal import DEFAULT_PERIODS, Floats, Index, Ints, Period, Seasonality
from twinflow.detection.smoothing import Smoother
from twinflow.detection.thresholds import DecisionRule
from twinflow.detection.zscores import ZScores

MODEL_NAME = "zscore"
"""The model name anomalies carry."""


@dataclass(frozen=True)
class DetectorConfig:
    """How every entity's detector scores and decides; counts are in windows.

    One configuration for every dataset: the flow's defaults are ``twinflow replay``'s
    defaults, and thresholds come from the rule in :mod:`twinflow.detection.thresholds`,
    never from labels. The evaluation harnesses (``make evaluate``: NAB, SKAB, the plant
    simulator) measure it.

    Chosen by looking at development results (NAB's 18 and SKAB's 17 files in
    ``../shared``, simulator seeds 1-2), so expect less on other data: the two time
    scales (0.3 with 0.05; 0.05 alone, the previous default, scored NAB 46.3, 0.15
    simulator false alarms per entity-hour and 17 % of SKAB's anomaly-free run); ``fence``
    1 (2 before: NAB 51.4, SKAB F1 0.83); ``clear_windows`` 10 (3: NAB 60.4 with more
    re-raised alarms; 30: SKAB FAR 12 %); the weekly period beside the daily one (about
    11 points on NAB, from the taxi demand; no cycles at all: 43.1); three operating
    points (one: SKAB FAR 14 %). Chosen on principle and
    then measured: re-baselining after one warm-up (the time the model needed to learn
    a normal level in the first place), profiles judged on out-of-sample forecasts,
    a gain of 0.5, two visits per bin, the per-feature learn gate and floors.
    """

    smoothing: tuple[float, ...] = (0.3, 0.05)
    """Weights of one new reading in each scale's exponentially weighted mean
    (see :mod:`twinflow.detection.smoothing`); every scale is scored."""
    warmup_windows: int = 180
    """Windows learned from and never flagged (30 min of 10-s windows: a load cycle)."""
    quantile: float = 0.99
    """The threshold's quantile of the model's own warm-up scores."""
    fence: float = 1.0
    """Margin above the quantile, in units of ``quantile - median`` of those scores."""
    floor: float = 2.0
    """Lowest threshold, in sigmas."""
    persist_k: int = 2
    persist_n: int = 3
    """An exceedance is an anomaly when at least ``persist_k`` of the last ``persist_n``
    windows exceeded."""
    learn_gate: float = 4.0
    """After the warm-up each feature learns on its own, and only while it is within
    this many sigmas (see :class:`EntityDetector`)."""
    memory_windows: int = 8640
    """How long the running statistics remember: exact over this many windows, then
    exponentially weighted with this horizon (8640 = one day of 10-s windows)."""
    clip: float = 4.0
    """After the warm-up, learned values are clipped to mean ± clip · std."""
    min_count: int = 30
    """Windows a feature must have been learned from before it is scored."""
    regimes: int = 3
    """Operating points the model remembers (see :mod:`twinflow.detection.zscores`)."""
    periods: tuple[Period, ...] = DEFAULT_PERIODS
    """Candidate cycles (see :mod:`twinflow.detection.seasonal`); empty: none."""
    season_gain: float = 0.5
    """A cycle is used when it leaves less than this share of the level's error."""
    season_min_visits: int = 2
    """Earlier periods a bin must have seen before its profile is used."""
    season_memory: float = 7.0
    """Periods a profile remembers."""
    expected_k: float = 3.0
    """The expected range of a feature in an explanation: learned mean ± k · std."""
    top: int = 3
    """Contributions reported per anomaly."""
    clear_windows: int = 10
    """Normal windows in a row that clear an active alarm (see :mod:`.alarms`)."""
    rebaseline_after: float | None = 1.0
    """An alarm active for this many warm-ups (times ``warmup_windows``) ends as re-baselined
    and the model accepts the entity's level as a normal operating point (None: never)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "smoothing", tuple(float(w) for w in self.smoothing))
        object.__setattr__(self, "periods", tuple(self.periods))
        if self.warmup_windows - self.calibrate_from < _MIN_CALIBRATION:
            raise ValueError(
                f"warmup_windows={self.warmup_windows} leaves fewer than {_MIN_CALIBRATION} "
                f"windows to calibrate the threshold on (calibration starts at window "
                f"{self.calibrate_from}); raise it"
            )
        if (
            not 0.5 < self.quantile < 1
            or self.fence < 0
            or not 1 <= self.persist_k <= self.persist_n
        ):
            raise ValueError("need 0.5 < quantile < 1, fence >= 0 and 1 <= persist_k <= persist_n")
        if self.rebaseline_after is not None and self.rebaseline_after <= 0:
            raise ValueError(f"rebaseline_after must be positive, got {self.rebaseline_after}")
        rebaseline = self.rebaseline_windows
        if rebaseline is not None and rebaseline <= self.clear_windows:
            raise ValueError(
                f"rebaseline_after={self.rebaseline_after} warm-ups is {rebaseline} windows, "
                f"not more than clear_windows={self.clear_windows}: no alarm could clear "
                "before it is re-baselined"
            )
        self.alarm_policy  # noqa: B018 (validates the alarm settings)

    @property
    def calibrate_from(self) -> int:
        """Warm-up windows after which scores calibrate the threshold: the second half."""
        return self.warmup_windows // 2

    @property
    def rebaseline_windows(self) -> int | None:
        """Windows an alarm may stay active before it is re-baselined."""
        if self.rebaseline_after is None:
            return None
        return math.ceil(self.rebaseline_after * self.warmup_windows)

    @property
    def alarm_policy(self) -> AlarmPolicy:
        """When the entity's alarms clear or re-baseline."""
        return AlarmPolicy(self.clear_windows, self.rebaseline_windows)

    def make_rule(self) -> DecisionRule:
        """A fresh decision rule for one entity."""
        return DecisionRule(
            warmup=self.warmup_windows,
            calibrate_from=self.calibrate_from,
            quantile=self.quantile,
            fence=self.fence,
            floor=self.floor,
            k=self.persist_k,
            n=self.persist_n,
        )


_MIN_CALIBRATION = 30
"""Fewest warm-up scores the threshold is calibrated on."""
_SETTLED = 0.05
"""A re-baselined level has settled once less than this share of a feature's slowest
scale remembers the time before the re-baseline, and that scale moves less than one
standard deviation in a window."""
_GIVE_UP = 0.001
"""Settled however much it still moves: the level itself keeps changing."""
_ALL = slice(None)
_CACHED = 64
"""Feature sets a detector keeps the columns of before it starts over."""

Counts = tuple[int, ...]
"""The readings behind each feature of a window."""


@dataclass(frozen=True)
class Detection:
    """The verdict on one window."""

    score: float
    threshold: float | None
    """The threshold the score was compared with; None during the warm-up."""
    is_anomaly: bool
    warming_up: bool
    contributions: list[Contribution] = field(default_factory=list)
    """The top features of an anomalous window (empty otherwise), largest weight first."""
    model: str = MODEL_NAME
    scored: bool = True
    """False for a window without any feature: it was neither scored nor learned."""

    def to_anomaly(
        self, *, entity_id: str, window_start_ms: int, window_end_ms: int, msg_id: str
    ) -> Anomaly:
        """The ``twin.anomalies`` message of an anomalous window.

        >>> detection = Detection(7.5, 3.1, True, False, [])
        >>> detection.to_anomaly(entity_id="pump-001", window_start_ms=0,
        ...                      window_end_ms=10_000, msg_id="pump-001@0").score
        7.5
        """
        if not self.is_anomaly or self.threshold is None:
            raise ValueError("only an anomalous window becomes an Anomaly message")
        return Anomaly(
            msg_id=msg_id,
            entity_id=entity_id,
            window_start_ms=window_start_ms,
            window_end_ms=window_end_ms,
            score=self.score,
            threshold=self.threshold,
            model=self.model,
            contributions=list(self.contributions),
        )


class EntityDetector:
    """The anomaly model of one entity: picklable, deterministic, cheap until it sees data.

    Per window (:meth:`process`), for each feature (``"flow.mean"``, ``"flow.std"``):

    1. remove its daily or weekly cycle where one measurably explains it
       (:class:`~twinflow.detection.seasonal.Seasonality`);
    2. smooth it at every time scale (:class:`~twinflow.detection.smoothing.Smoother`);
    3. z-score every scale against the closest learned operating point; the window's
       score is the largest ``|z|`` (:class:`~twinflow.detection.zscores.ZScores`);
    4. decide with the :class:`~twinflow.detection.thresholds.DecisionRule`;
    5. learn: during the warm-up everything; after it each feature on its own, and only
       while it is within ``learn_gate`` sigmas. A window-level gate ("learn nothing
       from a window scoring high") locks up on slow normal drift: once one feature
       (SKAB's fluid temperature over hours) drifts past it, nothing is learned again and
       every later window is an anomaly (98 % of SKAB's anomaly-free run after its
       warm-up, against 3 % per feature). A fault stays unlearned, so it stays
       anomalous until its alarm is re-baselined (:meth:`rebaseline`). An operator's
       confirmed fault learns nothing at all (``learn=False``).

    Measured per window (10 features, two scales, both cycles): see the README's
    detection section.

    >>> detector = EntityDetector(DetectorConfig(warmup_windows=60, smoothing=(1.0,),
    ...                                          min_count=10, periods=()))
    >>> for i in range(80):
    ...     d = detector.process({"flow.mean": 100.0 + i % 3, "flow.std": 1.0 + (i % 2) / 10})
    >>> d.warming_up, d.is_anomaly, round(d.threshold, 2)
    (False, False, 2.0)
    >>> [detector.process({"flow.mean": 140.0, "flow.std": 1.0}).is_anomaly for _ in range(3)]
    [False, True, True]
    >>> top = detector.process({"flow.mean": 140.0}).contributions[0]
    >>> top.sensor, top.feature, top.value, round(top.expected_low), round(top.expected_high)
    ('flow', 'mean', 140.0, 99, 103)
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.columns: dict[str, int] = {}
        """Column of each feature seen so far."""
        self._names: list[str] = []
        self._sensors: list[str] = []
        self.windows = 0
        """Windows scored so far (empty ones do not count); the operating points' clock."""
        self._seasonality: Seasonality | None = None
        self._smoother: Smoother | None = None
        self._scores: ZScores | None = None
        self._rule: DecisionRule | None = None
        self._settling: np.ndarray | None = None
        """Per column, the share of its slowest scale that still remembers the time before
        the latest re-baseline (None: settled)."""
        self._settling_regime = 0
        self._forget()

    def _forget(self) -> None:
        """Start the cache (never pickled: it follows from the state) afresh."""
        self._subsets: dict[tuple[str, ...], Ints] = {}
        """Columns of the feature sets seen that are not all features in column order
        (a sensor missing from a window). A column never moves, so they stay valid."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_subsets", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forget()
        for part in (self._seasonality, self._smoother, self._scores):
            if part is not None:
                part.restore()

    @property
    def threshold(self) -> float | None:
        """The threshold in effect (None until the warm-up is over)."""
        return None if self._rule is None else self._rule.threshold

    def process_window(
        self, windows: Mapping[str, SensorWindow], ts_ms: int = 0, *, learn: bool = True
    ) -> Detection:
        """:meth:`process` one closed window of the entity: the flow's and replay's way in."""
        names, values, counts = window_features(windows)
        return self._process(names, np.array(values, dtype=np.float64), tuple(counts), ts_ms, learn)

    def process(
        self,
        x: Mapping[str, float],
        readings: Mapping[str, int] | None = None,
        ts_ms: int = 0,
        *,
        learn: bool = True,
    ) -> Detection:
        """Score one window's features ``x``, decide, then learn what looks normal.

        ``readings``: how many readings each sensor's features summarize (the smoothing
        weighs a window by them; default 1). ``ts_ms``: the window's event time (its
        start), which places it in the daily and weekly cycles. An empty ``x`` (no
        sensor had a reading) says nothing: it is neither scored nor learned, and does not
        count towards the warm-up or persistence. ``learn`` false: score only (a window of
        a confirmed fault).
        """
        names = list(x)
        values = np.fromiter(x.values(), dtype=np.float64, count=len(x))
        return self._process(names, values, self._counts(names, readings), ts_ms, learn)

    def _process(
        self, names: list[str], values: Floats, counts: Counts | None, ts_ms: int, learn: bool
    ) -> Detection:
        config = self.config
        rule = self._rule
        if rule is None:
            rule = self._rule = config.make_rule()
        if not names:
            return Detection(0.0, rule.threshold, False, rule.warming_up, scored=False)
        columns, smoothed, cycle = self._smoothed(names, values, counts, ts_ms, learn=learn)
        scores = self._parts()[2]
        if self._settling is not None:
            self._settle(columns, names, smoothed, counts)
        self.windows += 1
        z, size, std, regime = scores.judge(columns, smoothed, self.windows)
        score = float(size.max())
        decision = rule.decide(score)
        contributions = (
            self._explain(names, columns, smoothed, z, std, regime, cycle)
            if decision.is_anomaly
            else []
        )
        if learn and decision.warming_up:
            scores.learn(columns, smoothed, regime)
        elif learn:
            scores.learn(
                columns, smoothed, regime, gate=config.learn_gate, size=size, std=std, robust=True
            )
        return Detection(
            score=score,
            threshold=decision.threshold,
            is_anomaly=decision.is_anomaly,
            warming_up=decision.warming_up,
            contributions=contributions,
        )

    def rebaseline(self, *, settling: bool = False) -> None:
        """Accept the entity's current level as a normal operating point.

        The smoothed features as they are now become the means of a new regime (what the
        model learned of each feature's variability stays, and so do the threshold and
        the earlier regimes, so a return to the old level is still normal). Recent
        exceedances are forgotten, so the next window is judged against the new level.
        Called when an alarm has lasted long enough to be a new operating point
        (:class:`~twinflow.detection.alarms.AlarmTracker`), and by an operator's verdict
        that an alarm was normal.

        ``settling``: the level changed only recently (an operator rejected the alarm
        it raised), so the slow scale has not caught up with it yet, and judged against
        where it stood at this call it would alarm again as it moves on. The new
        operating point then follows each feature until its slowest scale has settled:
        less than ``_SETTLED`` of it remembers the time before this call, and it moves
        less than a standard deviation in a window (with 1-Hz readings in 10-s windows:
        six windows or a few more), and learns quickly from there. An alarm re-baselined
        for lasting a warm-up has long settled, so it does not (following it anyway
        moved SKAB's false-alarm rate from 9.2 % to 9.9 %).
        """
        if self._scores is None or self._smoother is None or self._rule is None:
            return
        seen = np.flatnonzero(self._smoother.seen)
        self._settling_regime = self._scores.add_regime(
            seen, self._smoother.means[seen], self.windows
        )
        self._settling = np.where(self._smoother.seen, 1.0, 0.0) if settling else None
        self._rule.persistence.clear()

    def _settle(
        self,
        columns: Index,
        names: list[str],
        smoothed: np.ndarray,
        readings: Counts | None,
    ) -> None:
        """Move the re-baselined operating point along with features still settling."""
        settling = self._settling
        scores = self._scores
        assert settling is not None and scores is not None
        positions = np.arange(len(names)) if isinstance(columns, slice) else columns
        known = positions < len(settling)
        index = positions[known]
        values = smoothed[known]
        remaining = settling[index]
        slow = int(np.argmin(self.config.smoothing))
        moved = np.abs(values[:, slow] - scores.means[self._settling_regime, index, slow])
        following = (
            (remaining > _GIVE_UP)
            & ((remaining > _SETTLED) | (moved > scores.std(index)[:, slow]))
            & (remaining > 0)
        )
        if following.any():
            scores.set_levels(self._settling_regime, index[following], values[following])
        counts = None if readings is None else np.array(readings, dtype=np.int64)
        per_window = 1.0 if counts is None else np.maximum(counts[known], 1)
        decay = (1.0 - min(self.config.smoothing)) ** per_window
        settling[index] = np.where(following, remaining * decay, 0.0)
        # Where it last stood is one noisy value of the feature: from there on, the
        # operating point learns the level as quickly as a new feature does.
        settled = index[(remaining > 0) & ~following]
        if len(settled):
            scores.relearn(settled)
        if not (settling > 0).any():
            self._settling = None

    def learn_normal(
        self, x: Mapping[str, float], readings: Mapping[str, int] | None = None, ts_ms: int = 0
    ) -> None:
        """Learn the window ``x`` as normal whatever it scores (an operator said so)."""
        if not x:
            return
        names = list(x)
        values = np.fromiter(x.values(), dtype=np.float64, count=len(x))
        columns, smoothed, _cycle = self._smoothed(
            names, values, self._counts(names, readings), ts_ms
        )
        scores = self._parts()[2]
        _, _, regime = scores.z(columns, smoothed, self.windows)
        scores.learn(columns, smoothed, regime)

    def _smoothed(
        self,
        names: list[str],
        values: Floats,
        counts: Counts | None,
        ts_ms: int,
        *,
        learn: bool = True,
    ) -> tuple[Index, Floats, Floats]:
        """The features ``names`` with their cycles removed and smoothed.

        Returns their columns, the values (features by scales) and the cycles (what was
        removed from each feature).
        """
        seasonality, smoother, scores = self._parts()
        columns = self._columns(names)
        plain, cycle = seasonality.apply(columns, values, ts_ms, learn=learn)
        if len(seasonality.changed):
            scores.relearn(seasonality.changed)
        step = smoother.steps(None) if counts is None else smoother.steps_for(counts)
        return columns, smoother.fold(columns, plain, step), cycle

    def _parts(self) -> tuple[Seasonality, Smoother, ZScores]:
        config = self.config
        if self._seasonality is None or self._smoother is None or self._scores is None:
            self._seasonality = Seasonality(
                config.periods,
                gain=config.season_gain,
                min_visits=config.season_min_visits,
                memory=config.season_memory,
            )
            self._smoother = Smoother(config.smoothing)
            self._scores = ZScores(
                len(config.smoothing),
                regimes=config.regimes,
                memory=config.memory_windows,
                clip=config.clip,
                min_count=config.min_count,
            )
        return self._seasonality, self._smoother, self._scores

    def _columns(self, names: list[str]) -> Index:
        """Where the features ``names`` live (see :data:`~.seasonal.Index`)."""
        if names == self._names:
            return _ALL
        key = tuple(names)
        cached = self._subsets.get(key)
        if cached is not None:
            return cached
        columns = self.columns
        new = [name for name in names if name not in columns]
        if new:
            for name in new:
                columns[name] = len(columns)
            self._names = list(columns)
            self._sensors = [split_feature(name)[0] for name in self._names]
            level_of = [columns.get(f"{sensor}.mean", i) for i, sensor in enumerate(self._sensors)]
            features = len(columns)
            seasonality, smoother, scores = self._parts()
            seasonality.grow(features)
            smoother.grow(features)
            scores.grow(np.asarray(level_of, dtype=np.int64))
            if names == self._names:
                return _ALL
        index = np.fromiter((columns[name] for name in names), np.int64, len(names))
        if len(self._subsets) >= _CACHED:
            self._subsets.clear()
        index.flags.writeable = False
        self._subsets[key] = index
        return index

    def _counts(self, names: list[str], readings: Mapping[str, int] | None) -> Counts | None:
        """Readings behind each feature of the window (None: one each)."""
        if not readings:
            return None
        sensors = (
            self._sensors
            if names is self._names or names == self._names
            else [split_feature(name)[0] for name in names]
        )
        counts = np.fromiter((readings.get(sensor, 1) for sensor in sensors), np.int64, len(names))
        return tuple(counts.tolist())

    def _explain(
        self,
        names: list[str],
        columns: Index,
        smoothed: np.ndarray,
        z: np.ndarray,
        std: np.ndarray,
        regime: int,
        cycle: np.ndarray,
    ) -> list[Contribution]:
        """The top features, each at the scale where it is furthest off, in sensor units."""
        assert self._scores is not None
        k = self.config.expected_k
        rows = np.arange(len(names))
        scale = np.abs(z).argmax(axis=1)
        peak = z[rows, scale]
        weights = peak * peak
        total = float(weights.sum())
        spread = std[rows, scale]
        mean = self._scores.means[regime, columns][rows, scale]
        order = sorted(rows.tolist(), key=lambda i: (-weights[i], names[i]))
        contributions = []
        for i in order[: self.config.top]:
            sensor, feature = split_feature(names[i])
            level = float(mean[i] + cycle[i])
            contributions.append(
                Contribution(
                    sensor=sensor,
                    feature=feature,
                    value=float(smoothed[i, scale[i]] + cycle[i]),
                    expected_low=level - k * float(spread[i]),
                    expected_high=level + k * float(spread[i]),
                    weight=float(weights[i]) / total if total > 0 else 1.0 / len(names),
                )
            )
        return contributions
