"""The decision rule: when is a score anomalous? Separate from scoring, never from labels.

:class:`DecisionRule` turns a stream of scores into decisions, like a control chart
with a calibration phase (Phase I) and a monitoring phase (Phase II):

1. **Warm-up (Phase I).** The first ``warmup`` windows are learned from and never
   flagged; the threshold is None meanwhile. From window ``calibrate_from`` on (once
   the scorer has settled) their scores feed two running P² quantiles
   (``river.stats.Quantile``), the median and ``Q_q``.
2. **Threshold**, fixed at the end of the warm-up from those scores of the model
   itself::

       threshold = max(floor, Q_q + fence · (Q_q - median))

   A Tukey-style fence above a high quantile: ``Q_q`` says where normal scores stop,
   the fence adds a margin in units of their spread, so the false-alarm rate stays
   well under ``1 - q`` without estimating an extreme quantile from a few hundred
   scores, and the rule works on any score scale. The ``floor`` (in score units)
   keeps a perfectly quiet signal, whose scores are all ~0, from alarming on its next
   bit of noise.
3. **Persistence (Phase II)**: a window is anomalous when its score exceeds the
   threshold and at least ``k`` of the last ``n`` windows (itself included) did. A
   lone exceedance (a spike, a glitch) is not an anomaly; a sustained one is flagged
   from its ``k``-th window on. On the simulator's development seeds, 2 of 3 cost one
   window (10 s) of delay and removed all 10 false alarms and all 7 single-reading
   spikes that 1 of 1 flagged.
4. **What the model learns**: in Phase II only what looks normal. ``Decision.learn``
   says whether a window scored at most ``Q_q`` (the calibrated high quantile, below
   the threshold): the trees learn only such windows, so anomalies stay out, and so do
   elevated windows the threshold has not caught yet (the onset of a slow fault must
   not teach the model that it is normal). The z-score model goes further and gates
   each feature on its own (``DetectorConfig.learn_gate``), which also follows slow
   normal drift; see :class:`~twinflow.detection.EntityDetector`.

Why the threshold stops moving, and why learning stops at ``Q_q``: a slow fault
teaches whatever keeps learning from the windows it lets through. On the simulator's
development seeds, a running threshold (quantiles fed by every score under it) was
pulled up by the bearing-wear ramps ahead of their scores and caught at most 1 of 17
of them; fixed, but with the model learning every window under it, 16 of 17 (34 of 40
on other seeds); fixed and learning only up to ``Q_q``, 17 of 17 (40 of 40). The model
keeps learning normal windows, so its scores stay calibrated. To re-baseline an entity
(after maintenance, at a new operating point), start a new detector.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from river import stats


class ScoreThreshold:
    """``max(floor, Q_q + fence · (Q_q - median))`` over the scores it is shown.

    >>> threshold = ScoreThreshold(quantile=0.9, fence=1.0, floor=0.0)
    >>> threshold.get() is None
    True
    >>> for score in range(1, 101):
    ...     threshold.update(float(score))
    >>> round(threshold.level()), round(threshold.get())
    (90, 130)
    >>> ScoreThreshold(floor=5.0).get() is None
    True
    """

    def __init__(self, quantile: float = 0.99, fence: float = 2.0, floor: float = 0.0) -> None:
        if not 0.5 < quantile < 1 or fence < 0:
            raise ValueError("quantile must be in (0.5, 1) and fence >= 0")
        self.fence = fence
        self.floor = floor
        self.high = stats.Quantile(quantile)
        self.median = stats.Quantile(0.5)
        self.count = 0

    def update(self, score: float) -> None:
        """Learn one score."""
        self.high.update(score)
        self.median.update(score)
        self.count += 1

    def level(self) -> float | None:
        """The high quantile ``Q_q`` (None before any score)."""
        return self.high.get()

    def get(self) -> float | None:
        """The threshold (None before any score)."""
        high, median = self.high.get(), self.median.get()
        if high is None or median is None:
            return None
        return max(self.floor, high + self.fence * max(0.0, high - median))


class Persistence:
    """True when the latest observation and at least ``k`` of the last ``n`` were True.

    >>> p = Persistence(2, 3)
    >>> [p.update(e) for e in (True, False, True, False, False, True, True)]
    [False, False, True, False, False, False, True]
    """

    def __init__(self, k: int = 2, n: int = 3) -> None:
        if not 1 <= k <= n:
            raise ValueError(f"persistence needs 1 <= k <= n, got k={k}, n={n}")
        self.k = k
        self.recent: deque[bool] = deque(maxlen=n)

    def update(self, exceeded: bool) -> bool:
        """Record one window; whether it is a confirmed exceedance."""
        self.recent.append(exceeded)
        return exceeded and sum(self.recent) >= self.k


@dataclass(frozen=True, slots=True)
class Decision:
    """What the rule made of one score."""

    threshold: float | None
    """The threshold the score was compared with (None during warm-up)."""
    exceeds: bool
    """The score is above the threshold."""
    is_anomaly: bool
    """Exceeds, and persistence confirmed it."""
    warming_up: bool
    learn: bool
    """Whether the model should learn this window."""


class DecisionRule:
    """Warm-up and calibration, then a fixed threshold with persistence.

    >>> rule = DecisionRule(warmup=6, calibrate_from=2, quantile=0.9, fence=1.0, k=2, n=3)
    >>> [rule.decide(s).warming_up for s in (9.0, 1.0, 1.2, 0.8, 1.1, 0.9)]
    [True, True, True, True, True, True]
    >>> round(rule.level, 2), round(rule.threshold, 2)  # Q_0.9 + (Q_0.9 - median)
    (1.2, 1.3)
    >>> d = rule.decide(1.0)
    >>> d.warming_up, d.exceeds, d.learn
    (False, False, True)
    >>> [(d.exceeds, d.is_anomaly, d.learn) for d in map(rule.decide, (5.0, 5.0, 1.0))]
    [(True, False, False), (True, True, False), (False, False, True)]
    """

    def __init__(
        self,
        warmup: int = 180,
        calibrate_from: int | None = None,
        quantile: float = 0.99,
        fence: float = 2.0,
        floor: float = 0.0,
        k: int = 2,
        n: int = 3,
    ) -> None:
        start = warmup // 2 if calibrate_from is None else calibrate_from
        if not 0 <= start < warmup:
            raise ValueError(f"calibration must start inside the warm-up: 0 <= {start} < {warmup}")
        self.warmup = warmup
        self.calibrate_from = start
        self.windows = 0
        self.calibration: ScoreThreshold | None = ScoreThreshold(quantile, fence, floor)
        self.threshold: float | None = None
        """The fixed threshold, once the warm-up is over."""
        self.level: float | None = None
        """The calibrated ``Q_q``: windows scoring above it are not learned."""
        self.persistence = Persistence(k, n)

    @property
    def warming_up(self) -> bool:
        """Whether the next window is still in the warm-up."""
        return self.windows < self.warmup

    def decide(self, score: float) -> Decision:
        """Decide on the score of the next window."""
        self.windows += 1
        if self.calibration is not None:
            if self.windows > self.calibrate_from:
                self.calibration.update(score)
            if self.windows < self.warmup:
                return Decision(None, False, False, warming_up=True, learn=True)
            # The last warm-up window: fix the threshold, drop the quantiles.
            self.threshold = self.calibration.get()
            self.level = self.calibration.level()
            self.calibration = None
            return Decision(None, False, False, warming_up=True, learn=True)
        assert self.threshold is not None and self.level is not None
        exceeds = score > self.threshold
        is_anomaly = self.persistence.update(exceeds)
        return Decision(
            self.threshold, exceeds, is_anomaly, warming_up=False, learn=score <= self.level
        )
