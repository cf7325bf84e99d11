"""One anomaly detector per entity: score, then decide, then learn only what is normal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from schemas.outputs import Anomaly, Contribution, SensorWindow
from twinflow.detection.alarms import AlarmPolicy
from twinflow.detection.features import feature_vector, split_feature
from twinflow.detection.scorers import (
    Aggregate,
    FeatureDeviation,
    HalfSpaceTreesScorer,
    Scorer,
    ZScoreScorer,
)
from twinflow.detection.smoothing import FeatureSmoother
from twinflow.detection.thresholds import DecisionRule


class Kind(StrEnum):
    """Which scorer a detector runs."""

    ZSCORE = "zscore"
    """:class:`~twinflow.detection.scorers.ZScoreScorer` (the default)."""
    HST = "hst"
    """:class:`~twinflow.detection.scorers.HalfSpaceTreesScorer`."""


DEFAULT_FLOORS: dict[Kind, float] = {Kind.ZSCORE: 2.0, Kind.HST: 0.1}
"""Threshold floors in each scorer's units: guards for signals too quiet to calibrate on.

A z-score of 2 (with ``Aggregate.MAX``, one feature 2 sigma off); for the
trees a log-mass of 0.1 (a window whose path keeps 90 % of the most mass a path can
hold is never anomalous).
"""

_MIN_CALIBRATION = 30
"""Fewest warm-up scores the threshold is calibrated on."""


@dataclass(frozen=True)
class DetectorConfig:
    """How every entity's detector scores and decides; counts are in windows.

    The defaults are the configuration that did best on real labeled data (SKAB's
    valve runs and its anomaly-free run, ``python -m benchmarks.skab_evaluation``) while
    still meeting the plant simulator's targets (``python -m
    benchmarks.detection_on_simulator``). ``twinflow replay`` uses them too. Thresholds
    come from the rule in :mod:`twinflow.detection.thresholds`, never from labels.
    """

    kind: Kind = Kind.ZSCORE
    aggregate: Aggregate = Aggregate.MAX
    """How the z-score model combines its features (``Kind.ZSCORE`` only)."""
    smoothing: float = 0.05
    """Weight of one new reading in each feature's exponentially weighted mean; the
    model scores and learns the smoothed features (1: no smoothing). See
    :mod:`twinflow.detection.smoothing`."""
    warmup_windows: int = 180
    """Windows learned from and never flagged (30 min of 10-s windows: a load cycle)."""
    quantile: float = 0.99
    """The threshold's quantile of the model's own warm-up scores."""
    fence: float = 2.0
    """Margin above the quantile, in units of ``quantile - median`` of those scores."""
    floor: float | None = None
    """Lowest threshold, in score units; None: the kind's default (``DEFAULT_FLOORS``)."""
    persist_k: int = 2
    persist_n: int = 3
    """An exceedance is an anomaly when at least ``persist_k`` of the last ``persist_n``
    windows exceeded."""
    learn_gate: float = 4.0
    """After the warm-up, the z-score model learns each feature on its own, and only
    while that feature is within this many sigmas (see :class:`EntityDetector`)."""
    memory_windows: int = 8640
    """How long the running statistics remember: exact over this many windows, then
    exponentially weighted with this horizon (8640 = one day of 10-s windows)."""
    clip: float = 4.0
    """Learned values are clipped to mean ± clip · std (a robust, Huber-style update)."""
    expected_k: float = 3.0
    """The expected range of a feature in an explanation: learned mean ± k · std."""
    top: int = 3
    """Contributions reported per anomaly."""
    seed: int = 42
    """Seed of the trees (``Kind.HST``); the z-score model has no randomness."""
    hst_trees: int = 10
    hst_height: int = 8
    hst_window: int = 100
    """Reference window of the trees; their scores are 0 until it is full."""
    hst_z_range: float = 8.0
    """Standardized values in ±this span the trees' unit interval."""
    clear_windows: int = 3
    """Normal windows in a row that clear an active alarm (see :mod:`~.alarms`)."""
    rebaseline_windows: int | None = 360
    """An alarm active this many windows ends as re-baselined and the model accepts the
    entity's level as normal (None: never)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "aggregate", Aggregate(self.aggregate))
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.warmup_windows - self.calibrate_from < _MIN_CALIBRATION:
            raise ValueError(
                f"warmup_windows={self.warmup_windows} leaves fewer than {_MIN_CALIBRATION} "
                f"windows to calibrate the threshold on (calibration starts at window "
                f"{self.calibrate_from}); raise it"
            )
        self.alarm_policy  # noqa: B018 (validates the alarm settings)
        if (
            not 0.5 < self.quantile < 1
            or self.fence < 0
            or not 1 <= self.persist_k <= self.persist_n
        ):
            raise ValueError("need 0.5 < quantile < 1, fence >= 0 and 1 <= persist_k <= persist_n")

    @property
    def alarm_policy(self) -> AlarmPolicy:
        """When the entity's alarms clear or re-baseline."""
        return AlarmPolicy(self.clear_windows, self.rebaseline_windows)

    @property
    def calibrate_from(self) -> int:
        """Warm-up windows after which scores calibrate the threshold.

        The second half of the warm-up, once the running statistics have settled; for
        the trees not before their first reference window is full.
        """
        if self.kind is Kind.HST:
            return max(self.warmup_windows // 2, _HST_SCALER_WARMUP + self.hst_window)
        return self.warmup_windows // 2

    @property
    def threshold_floor(self) -> float:
        """The floor in effect."""
        return DEFAULT_FLOORS[self.kind] if self.floor is None else self.floor

    @property
    def model_name(self) -> str:
        """The model name anomalies carry."""
        return str(self.kind)

    def make_scorer(self) -> Scorer:
        """A fresh scorer for one entity (cheap: the trees are built on first learning)."""
        if self.kind is Kind.HST:
            return HalfSpaceTreesScorer(
                n_trees=self.hst_trees,
                height=self.hst_height,
                window_size=self.hst_window,
                z_range=self.hst_z_range,
                scaler_warmup=_HST_SCALER_WARMUP,
                memory=self.memory_windows,
                clip=self.clip,
                seed=self.seed,
            )
        return ZScoreScorer(memory=self.memory_windows, clip=self.clip, aggregate=self.aggregate)

    def make_rule(self) -> DecisionRule:
        """A fresh decision rule for one entity."""
        return DecisionRule(
            warmup=self.warmup_windows,
            calibrate_from=self.calibrate_from,
            quantile=self.quantile,
            fence=self.fence,
            floor=self.threshold_floor,
            k=self.persist_k,
            n=self.persist_n,
        )


_HST_SCALER_WARMUP = 20
"""Windows the trees' scaler learns alone before the trees are built."""


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
    model: str = str(Kind.ZSCORE)

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
    """The anomaly model of one entity: picklable, seeded, cheap until it sees data.

    :meth:`process` smooths a window's features, scores them, decides with the
    :class:`~twinflow.detection.thresholds.DecisionRule`, then lets the model learn
    what looks normal, so a long fault stays anomalous:

    - the z-score model learns each feature on its own, while that feature is within
      ``learn_gate`` sigmas. A window-level gate ("learn nothing from a window scoring
      high") locks up on slow normal drift: once one feature (SKAB's fluid temperature
      over hours) drifts past it, nothing is learned again and every later window is an
      anomaly (98 % of SKAB's anomaly-free run after its warm-up, against 3 % per
      feature). 4 sigmas: 3.5 still locked up there (93 %); 5 missed more of SKAB's
      valve faults (F1 0.78 against 0.85, ``benchmarks/skab_evaluation.py``);
    - the trees learn whole windows, only those the rule marks as normal.

    The scorer is created on the first window (HST trees on the first one learned).

    >>> detector = EntityDetector(DetectorConfig(warmup_windows=60, smoothing=1.0))
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
        self._scorer: Scorer | None = None
        self._rule: DecisionRule | None = None
        self._smoother: FeatureSmoother | None = None

    @property
    def windows(self) -> int:
        """Windows processed so far (empty ones do not count)."""
        return 0 if self._rule is None else self._rule.windows

    @property
    def threshold(self) -> float | None:
        """The threshold in effect (None until the warm-up is over)."""
        return None if self._rule is None else self._rule.threshold

    def process_window(self, windows: Mapping[str, SensorWindow]) -> Detection:
        """:meth:`process` one closed window of the entity: the flow's and replay's way in."""
        return self.process(
            feature_vector(windows), {sensor: w.count for sensor, w in windows.items()}
        )

    def process(
        self, x: Mapping[str, float], readings: Mapping[str, int] | None = None
    ) -> Detection:
        """Smooth ``x``, score it, decide, then learn it if the rule says it is normal.

        ``readings``: how many readings each sensor's features summarize (the smoothing
        weighs a window by them; default 1). An empty ``x`` (no sensor had a reading)
        says nothing: it is neither scored nor learned, and does not count towards the
        warm-up or persistence.
        """
        if self._scorer is None or self._rule is None or self._smoother is None:
            self._scorer = self.config.make_scorer()
            self._rule = self.config.make_rule()
            self._smoother = FeatureSmoother(self.config.smoothing)
        features = self._smoother.update(x, readings)
        if not features:
            return Detection(
                0.0,
                self._rule.threshold,
                is_anomaly=False,
                warming_up=self._rule.warming_up,
                model=self.config.model_name,
            )
        score = self._scorer.score_one(features)
        decision = self._rule.decide(score)
        contributions = self._explain(features) if decision.is_anomaly else []
        if isinstance(self._scorer, ZScoreScorer) and not decision.warming_up:
            self._scorer.learn_within(features, self.config.learn_gate)
        elif decision.learn:
            self._scorer.learn_one(features)
        return Detection(
            score=score,
            threshold=decision.threshold,
            is_anomaly=decision.is_anomaly,
            warming_up=decision.warming_up,
            contributions=contributions,
            model=self.config.model_name,
        )

    def rebaseline(self) -> None:
        """Accept the entity's current level as its normal.

        Every feature's learned mean moves to its current smoothed value; what the model
        learned of each feature's variability stays, and so does the threshold. Recent
        exceedances are forgotten, so the next window is judged against the new level
        only. Called when an alarm has lasted long enough to be a new operating point
        (:class:`~twinflow.detection.alarms.AlarmTracker`), and by an operator's verdict
        that an alarm was normal.
        """
        if self._scorer is None or self._rule is None or self._smoother is None:
            return
        self._scorer.rebaseline(self._smoother.means)
        self._rule.persistence.recent.clear()

    def explain(self, x: Mapping[str, float]) -> list[FeatureDeviation]:
        """Every scored feature of ``x`` against the current model, largest share first."""
        if self._scorer is None:
            return []
        return self._scorer.explain_one(dict(x))

    def _explain(self, features: dict[str, float]) -> list[Contribution]:
        assert self._scorer is not None
        k = self.config.expected_k
        contributions = []
        for deviation in self._scorer.explain_one(features)[: self.config.top]:
            sensor, feature = split_feature(deviation.feature)
            contributions.append(
                Contribution(
                    sensor=sensor,
                    feature=feature,
                    value=deviation.value,
                    expected_low=deviation.mean - k * deviation.std,
                    expected_high=deviation.mean + k * deviation.std,
                    weight=deviation.share,
                )
            )
        return contributions
