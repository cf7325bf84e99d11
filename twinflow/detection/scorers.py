"""Anomaly scorers over feature dicts: River detectors that can explain their scores.

Both scorers are :class:`river.base.AnomalyDetector` subclasses (``score_one`` then
``learn_one``, higher means more anomalous) and both explain a score per feature with
:meth:`explain_one`. They only ever read the features present in ``x``: a missing
feature is neither learned nor scored, never taken as zero. Neither holds global state;
both pickle (a snapshot mid-stream resumes with identical results) and the only
randomness, the trees' split points, comes from ``seed``.

- :class:`ZScoreScorer`: the largest (or the root-mean-square) of per-feature z-scores
  against running (robust, slowly forgetting) means and variances. Cheap (a detector
  with 10 features costs ~20-35 µs a window and pickles to ~1 kB) and its explanation
  is exact.
- :class:`HalfSpaceTreesScorer`: River's :class:`~river.anomaly.HalfSpaceTrees` on
  the same standardized features, squashed into the trees' unit cube. It could see
  joint structure the z-scores cannot, but on the simulator it finds far fewer faults
  (``benchmarks/detection_on_simulator.py``); ~120 µs a window, ~23 ms to build the
  trees, ~170 kB pickled per entity (~8 ms to unpickle).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from river import anomaly
from river.base import AnomalyDetector


@dataclass(frozen=True, slots=True)
class FeatureDeviation:
    """How one feature of a window compares with what the model learned."""

    feature: str
    value: float
    mean: float
    """The learned mean of the feature."""
    std: float
    """The learned standard deviation, never below the floor (see :class:`Standardizer`)."""
    z: float
    """``(value - mean) / std``."""
    share: float
    """This feature's share of the window's score (0..1; shares of a window sum to 1)."""


class Scorer(Protocol):
    """What :class:`~twinflow.detection.EntityDetector` needs of a scorer."""

    def learn_one(self, x: dict[str, float]) -> None:
        """Learn a window the detector judged normal."""

    def score_one(self, x: dict[str, float]) -> float:
        """The anomaly score of a window (higher is more anomalous)."""
        ...

    def explain_one(self, x: dict[str, float]) -> list[FeatureDeviation]:
        """Every scored feature of ``x``, largest share first."""
        ...

    def rebaseline(self, levels: Mapping[str, float]) -> None:
        """Take ``levels`` as the features' normal means from now on."""


class _Moments:
    """Running mean and variance of one feature, forgetting slowly.

    Update weight ``max(1/n, 1/memory)``: the exact mean and (population) variance of
    the first ``memory`` values, an exponentially weighted one after that. (River's
    ``stats.EWMean``/``EWVar`` start from the first value with a fixed weight, which
    biases them for as long as ``memory`` when the memory is long; ``stats.Mean``/``Var``
    never forget.)
    """

    __slots__ = ("mean", "n", "var")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.var = 0.0

    def __getstate__(self) -> tuple[int, float, float]:
        return self.n, self.mean, self.var

    def __setstate__(self, state: tuple[int, float, float]) -> None:
        self.n, self.mean, self.var = state

    def update(self, value: float, memory: int) -> None:
        self.n += 1
        weight = max(1.0 / self.n, 1.0 / memory)
        delta = value - self.mean
        self.mean += weight * delta
        self.var = (1.0 - weight) * (self.var + weight * delta * delta)


class Standardizer:
    """Per-feature running means and variances, with robust updates and a noise floor.

    - Forgetting: see ``memory`` (``_Moments``).
    - Robust: once a feature has ``min_count`` values, a value is clipped to
      ``mean ± clip·std`` before it is learned (a Huber-style update), so a single odd
      feature in an otherwise normal window cannot drag the statistics far.
    - Floor: the standard deviation used for z-scores is never below
      ``rel_floor · |level|`` (``level``: the running mean of the same sensor's
      ``mean`` feature, or of the feature itself), nor below ``abs_floor``. A perfectly
      quiet signal has a variance of (almost) zero; without a floor its next rounding
      error would be a thousand sigmas.

    >>> s = Standardizer()
    >>> for v in (9.0, 10.0, 11.0):
    ...     s.learn_one({"p.mean": v})
    >>> s.moments("p.mean")
    (10.0, 0.816...)
    >>> s.moments("q.mean") is None
    True
    """

    def __init__(
        self,
        memory: int = 8640,
        clip: float = 4.0,
        min_count: int = 30,
        rel_floor: float = 1e-3,
        abs_floor: float = 1e-6,
    ) -> None:
        if memory < 1 or clip <= 0 or rel_floor < 0 or abs_floor <= 0:
            raise ValueError("memory >= 1, clip > 0, rel_floor >= 0 and abs_floor > 0 please")
        self.memory = memory
        self.clip = clip
        self.min_count = min_count
        self.rel_floor = rel_floor
        self.abs_floor = abs_floor
        self.stats: dict[str, _Moments] = {}

    def learn_one(self, x: Mapping[str, float]) -> None:
        """Learn the features present in ``x``."""
        for feature, value in x.items():
            moments = self.stats.get(feature)
            if moments is None:
                moments = self.stats[feature] = _Moments()
            elif moments.n >= self.min_count:
                reach = self.clip * math.sqrt(moments.var)
                value = min(max(value, moments.mean - reach), moments.mean + reach)
            moments.update(value, self.memory)

    def moments(self, feature: str) -> tuple[float, float] | None:
        """Learned mean and floored standard deviation, or None if never seen."""
        moments = self.stats.get(feature)
        if moments is None:
            return None
        sensor, _, _ = feature.rpartition(".")
        level_stats = self.stats.get(f"{sensor}.mean") if sensor else None
        level = (level_stats or moments).mean
        floor = max(self.abs_floor, self.rel_floor * abs(level))
        return moments.mean, math.sqrt(moments.var + floor * floor)

    def move_means(self, levels: Mapping[str, float]) -> None:
        """Move the learned means of the features in ``levels`` there; variances stay."""
        for feature, level in levels.items():
            moments = self.stats.get(feature)
            if moments is not None:
                moments.mean = level

    def z_scores(self, x: Mapping[str, float]) -> dict[str, tuple[float, float, float]]:
        """``feature -> (z, mean, std)`` for the features of ``x`` that were learned."""
        result = {}
        for feature, value in x.items():
            learned = self.moments(feature)
            if learned is not None:
                mean, std = learned
                result[feature] = ((value - mean) / std, mean, std)
        return result


def _shares(
    x: Mapping[str, float],
    z_scores: Mapping[str, tuple[float, float, float]],
    weights: Mapping[str, float],
) -> list[FeatureDeviation]:
    total = sum(weights.values())
    deviations = [
        FeatureDeviation(
            feature,
            x[feature],
            mean,
            std,
            z,
            weights[feature] / total if total > 0 else 1.0 / len(z_scores),
        )
        for feature, (z, mean, std) in z_scores.items()
    ]
    deviations.sort(key=lambda d: (-d.share, -abs(d.z), d.feature))
    return deviations


class Aggregate(StrEnum):
    """How :class:`ZScoreScorer` turns per-feature z-scores into one score."""

    MAX = "max"
    """``max_i |z_i|``: one feature far off is enough (the default)."""
    RMS = "rms"
    """``sqrt(mean_i z_i²)``: evidence spread over many features adds up."""


class ZScoreScorer(AnomalyDetector):
    """The features' z-scores against running statistics, aggregated into one score.

    ``z_i = (x_i - mean_i) / std_i`` over the features present in both ``x`` and the
    model (see :class:`Standardizer`); the score is ``max_i |z_i|`` or
    ``sqrt(mean_i z_i²)`` (:class:`Aggregate`). Both stay on the scale of one z-score
    whatever the number of sensors, so a floor can be stated in sigmas. The maximum is
    the default because most faults move few signals: on SKAB's valve runs the flow
    rate carries the fault and the RMS over eight sensors dilutes it (pooled F1 0.77
    against 0.85, ``benchmarks/skab_evaluation.py``). A feature's share of the score is
    ``z_i² / sum_j z_j²`` either way. 0 until a feature has been learned.

    >>> scorer = ZScoreScorer(aggregate=Aggregate.RMS)
    >>> for i in range(200):
    ...     scorer.learn_one({"flow.mean": 100.0 + i % 5, "vibration_rms.mean": 2.0 + i % 3 / 10})
    >>> round(scorer.score_one({"flow.mean": 102.0, "vibration_rms.mean": 2.1}), 2)
    0.0
    >>> round(scorer.score_one({"flow.mean": 102.0, "vibration_rms.mean": 3.0}), 1)
    7.8
    >>> scorer.aggregate = Aggregate.MAX
    >>> round(scorer.score_one({"flow.mean": 102.0, "vibration_rms.mean": 3.0}), 1)
    11.0
    >>> top = scorer.explain_one({"flow.mean": 102.0, "vibration_rms.mean": 3.0})[0]
    >>> top.feature, round(top.share, 2), round(top.mean, 2)
    ('vibration_rms.mean', 1.0, 2.1)
    """

    def __init__(
        self,
        memory: int = 8640,
        clip: float = 4.0,
        rel_floor: float = 1e-3,
        abs_floor: float = 1e-6,
        aggregate: Aggregate = Aggregate.MAX,
    ) -> None:
        self.memory = memory
        self.clip = clip
        self.aggregate = Aggregate(aggregate)
        self.rel_floor = rel_floor
        self.abs_floor = abs_floor
        self.standardizer = Standardizer(memory, clip, rel_floor=rel_floor, abs_floor=abs_floor)

    def learn_one(self, x: dict[Any, float]) -> None:
        """Learn a normal window."""
        self.standardizer.learn_one(x)

    def learn_within(self, x: Mapping[str, float], gate: float) -> None:
        """Learn the features of ``x`` within ``gate`` sigmas, each on its own; the rest not.

        >>> scorer = ZScoreScorer()
        >>> for i in range(100):
        ...     scorer.learn_one({"a.mean": float(i % 2), "b.mean": float(i % 2)})
        >>> scorer.learn_within({"a.mean": 0.6, "b.mean": 9.0}, gate=4.0)
        >>> scorer.standardizer.stats["a.mean"].n, scorer.standardizer.stats["b.mean"].n
        (101, 100)
        """
        z_scores = self.standardizer.z_scores(x)
        self.standardizer.learn_one(
            {f: v for f, v in x.items() if f not in z_scores or abs(z_scores[f][0]) <= gate}
        )

    def rebaseline(self, levels: Mapping[str, float]) -> None:
        """Take ``levels`` as the features' normal means from now on."""
        self.standardizer.move_means(levels)

    def score_one(self, x: dict[Any, float]) -> float:
        """The aggregated z-score of ``x`` (0 when nothing in it was learned yet)."""
        z_scores = self.standardizer.z_scores(x)
        if not z_scores:
            return 0.0
        if self.aggregate is Aggregate.MAX:
            return max(abs(z) for z, _, _ in z_scores.values())
        return math.sqrt(sum(z * z for z, _, _ in z_scores.values()) / len(z_scores))

    def explain_one(self, x: dict[str, float]) -> list[FeatureDeviation]:
        """Every scored feature, largest share ``z_i² / sum z²`` first."""
        z_scores = self.standardizer.z_scores(x)
        return _shares(x, z_scores, {f: z * z for f, (z, _, _) in z_scores.items()})


class HalfSpaceTreesScorer(AnomalyDetector):
    """River Half-Space Trees on per-feature standardized features.

    Each feature is standardized by a :class:`Standardizer` and mapped from
    ``[-z_range, z_range]`` onto the trees' unit interval (clipped; a tree cannot split
    beyond its limits anyway). The trees are built, seeded, at the first learned window
    after ``scaler_warmup`` windows, over every feature seen so far (a feature absent
    from a window goes down the heavier branch; one first seen later is not in the
    trees). Until the trees hold one full reference window (``window_size``) the score
    is 0, so a detector's warm-up must be longer than ``scaler_warmup + window_size``.

    The range is wide on purpose: split points fall uniformly inside it and only a
    split between the normal bulk and a deviation isolates it, so a narrow range
    (clipping every fault onto the same edge) hides large deviations. On the
    simulator's development seeds (10 trees, height 8), ``z_range`` 2, 3, 4, 8, 12 and
    16 found 0, 0, 6, 47, 47 and 65 % of the bearing-wear faults with 89, 161, 113,
    165, 104 and 504 false alarms in 262 entity-hours; 8 is the default.

    The score is the trees' log-mass ``-ln(1 - s)``, ``s`` being River's score in
    [0, 1] (``1 - s``: the mass-weighted path score relative to the largest possible): the
    same order, but unbounded, so a threshold rule with a margin above a quantile
    cannot land beyond the largest possible score.

    Explanation by occlusion: a feature's weight is how much the score drops when that
    feature is set to its learned mean; if no single feature lowers it, the squared
    z-scores stand in.

    >>> scorer = HalfSpaceTreesScorer(window_size=20, scaler_warmup=5, seed=1)
    >>> for i in range(60):
    ...     scorer.learn_one({"flow.mean": 100.0 + i % 7, "vibration_rms.mean": 2.0 + i % 3 / 10})
    >>> normal = scorer.score_one({"flow.mean": 103.0, "vibration_rms.mean": 2.1})
    >>> odd = scorer.score_one({"flow.mean": 103.0, "vibration_rms.mean": 4.0})
    >>> odd > normal
    True
    """

    def __init__(
        self,
        n_trees: int = 10,
        height: int = 8,
        window_size: int = 100,
        z_range: float = 8.0,
        scaler_warmup: int = 20,
        memory: int = 8640,
        clip: float = 4.0,
        seed: int = 42,
    ) -> None:
        self.n_trees = n_trees
        self.height = height
        self.window_size = window_size
        self.z_range = z_range
        self.scaler_warmup = scaler_warmup
        self.memory = memory
        self.clip = clip
        self.seed = seed
        self.standardizer = Standardizer(memory, clip)
        self.trees: anomaly.HalfSpaceTrees | None = None
        self._learned = 0

    def _unit(self, x: Mapping[str, float], fill: bool = False) -> dict[str, float]:
        unit = {}
        for feature, (z, _, _) in self.standardizer.z_scores(x).items():
            unit[feature] = min(1.0, max(0.0, 0.5 + z / (2 * self.z_range)))
        if fill:
            for feature in self.standardizer.stats:
                unit.setdefault(feature, 0.5)
        return unit

    def _tree_score(self, unit: dict[str, float]) -> float:
        assert self.trees is not None
        score = float(self.trees.score_one(unit))  # type: ignore[no-untyped-call]
        return -math.log(max(1e-12, 1.0 - score))

    def learn_one(self, x: dict[Any, float]) -> None:
        """Learn a normal window: first the trees (on the current scaling), then the scaler."""
        self._learned += 1
        if self._learned > self.scaler_warmup:
            first = self.trees is None
            if self.trees is None:
                self.trees = anomaly.HalfSpaceTrees(
                    n_trees=self.n_trees,
                    height=self.height,
                    window_size=self.window_size,
                    seed=self.seed,
                )
            self.trees.learn_one(self._unit(x, fill=first))  # type: ignore[no-untyped-call]
        self.standardizer.learn_one(x)

    def rebaseline(self, levels: Mapping[str, float]) -> None:
        """Take ``levels`` as the features' normal means; the trees see them as the centre."""
        self.standardizer.move_means(levels)

    def score_one(self, x: dict[Any, float]) -> float:
        """The trees' log-mass score (0 while they hold no reference window)."""
        if self.trees is None:
            return 0.0
        return self._tree_score(self._unit(x))

    def explain_one(self, x: dict[str, float]) -> list[FeatureDeviation]:
        """Every scored feature, by the score drop when it is set to its learned mean."""
        z_scores = self.standardizer.z_scores(x)
        squares = {f: z * z for f, (z, _, _) in z_scores.items()}
        if self.trees is None or not z_scores:
            return _shares(x, z_scores, squares)
        unit = self._unit(x)
        score = self._tree_score(unit)
        drops = {f: max(0.0, score - self._tree_score({**unit, f: 0.5})) for f in z_scores}
        return _shares(x, z_scores, drops if sum(drops.values()) > 0 else squares)


__all__ = [
    "Aggregate",
    "FeatureDeviation",
    "HalfSpaceTreesScorer",
    "Scorer",
    "Standardizer",
    "ZScoreScorer",
]
