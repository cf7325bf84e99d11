"""The Numenta Anomaly Benchmark's scoring rules, on row indices: pure, no I/O.

Written from NAB's published description (Lavin & Ahmad 2015, "Evaluating Real-time
Anomaly Detection Algorithms - the Numenta Anomaly Benchmark"; NAB's README) with the
semantics of its sweeper (``nab/sweeper.py``). NAB scores *alarms*, not states: a
detection is the row at which a detector raised an alarm, and a file's labels are
anomaly windows, inclusive row ranges ``(left, right)`` of width ``w = right - left + 1``.

- The first :func:`probationary_rows` rows of a file (15 %, at most 750) are the
  detector's to learn from: a detection there is ignored, neither rewarded nor charged.
- Inside a window, the earliest detection scores
  ``S(-(right - i + 1) / w) * tp_weight / S(-1)`` with the :func:`scaled_sigmoid` ``S``:
  ``tp_weight`` at the window's first row, about 0 at its last. Later detections in the
  same window add nothing and cost nothing.
- Outside every window, a detection costs ``fp_weight`` if no window ended before it;
  otherwise, with ``(l, r)`` the closest window that ended before it, it scores
  ``S(|r - i| / (w - 1)) * fp_weight``: almost free just after the window (a late
  detection of the same anomaly), the full ``-fp_weight`` from three widths on.
- A window without a detection costs ``fn_weight``.

A file's score is compared with what a detector that never fires (``null =
-fn_weight * windows``) and a perfect one (``perfect = tp_weight * windows``) would get;
the corpus score is ``100 * (Σ raw - Σ null) / (Σ perfect - Σ null)``, so 0 is the
never-firing detector and 100 the perfect one; false alarms can push it below 0.

>>> labels = [(20, 29), (60, 69)]
>>> standard = PROFILES["standard"]
>>> score_file([20, 60], 100, labels, standard).raw
2.0
>>> score_file([], 100, labels, standard).raw
-2.0
>>> corpus_score([score_file([20, 60], 100, labels, standard)])
100.0
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PROBATION_SHARE = 0.15
"""Share of a file's rows, from its start, that is never scored."""
PROBATION_MAX_ROWS = 750
"""NAB caps the probationary period at 15 % of 5,000 rows."""
FAR_AFTER = 3.0
"""Relative distance from which :func:`scaled_sigmoid` is exactly -1."""

Window = tuple[int, int]
"""An anomaly window: its first and last row index, both included."""


@dataclass(frozen=True)
class Profile:
    """An application profile: how much a detection, a miss and a false alarm weigh."""

    name: str
    tp_weight: float
    """Reward for a window detected at its first row (less later in the window)."""
    fn_weight: float
    """Cost of a window without any detection."""
    fp_weight: float
    """Cost of a detection far from any window (less just after one)."""


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile("standard", tp_weight=1.0, fn_weight=1.0, fp_weight=0.11),
        Profile("reward_low_FP", tp_weight=1.0, fn_weight=1.0, fp_weight=0.22),
        Profile("reward_low_FN", tp_weight=1.0, fn_weight=2.0, fp_weight=0.11),
    )
}
"""NAB's three published profiles, by name."""


def probationary_rows(n_rows: int) -> int:
    """Rows at the start of a file whose detections are ignored: 15 %, at most 750.

    >>> probationary_rows(1000), probationary_rows(4032), probationary_rows(22695)
    (150, 604, 750)
    """
    if n_rows < 0:
        raise ValueError(f"a file cannot have {n_rows} rows")
    return min(math.floor(PROBATION_SHARE * n_rows), PROBATION_MAX_ROWS)


def scaled_sigmoid(y: float) -> float:
    """NAB's ``S(y) = 2 / (1 + exp(5 y)) - 1``, and exactly -1 from ``y = 3`` on.

    Negative ``y`` (a position inside a window, -1 its first row) gives a reward up to
    ~0.987; positive ``y`` (distance after a window, in window widths) a cost.

    >>> round(scaled_sigmoid(-1.0), 5), scaled_sigmoid(0.0), round(scaled_sigmoid(1.0), 5)
    (0.98661, 0.0, -0.98661)
    >>> scaled_sigmoid(3.0)
    -1.0
    """
    if y >= FAR_AFTER:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


@dataclass(frozen=True)
class FileScore:
    """One file's NAB score under one profile, with what it is made of."""

    profile: str
    raw: float
    """Sum of the rewards of detected windows and the costs of misses and false alarms."""
    null: float
    """What a detector that never fires scores: ``-fn_weight`` per window."""
    perfect: float
    """What one detection at each window's first row scores: ``tp_weight`` per window."""
    windows: int
    """Windows scored: those that end after the probationary rows."""
    windows_detected: int
    false_positives: int
    """Detections outside every window, after the probationary rows."""
    detections_in_windows: int
    """Detections inside windows, after the probationary rows; only each window's
    first one counts, so this is at least ``windows_detected``."""
    ignored: int
    """Detections in the probationary rows."""
    first_detections: tuple[int | None, ...]
    """Per scored window, the row of its first detection (None: missed)."""

    @property
    def windows_missed(self) -> int:
        """Windows without any detection after the probationary rows."""
        return self.windows - self.windows_detected


def _check_windows(windows: Sequence[Window], n_rows: int) -> None:
    previous_right = -1
    for left, right in windows:
        if not 0 <= left <= right < n_rows:
            raise ValueError(f"window ({left}, {right}) is not within rows 0..{n_rows - 1}")
        if left <= previous_right:
            raise ValueError(
                f"window ({left}, {right}) starts before the previous one ends "
                f"(row {previous_right}); windows must be sorted and disjoint"
            )
        previous_right = right


def score_file(
    detections: Iterable[int], n_rows: int, windows: Sequence[Window], profile: Profile
) -> FileScore:
    """Score the alarm rows ``detections`` of a file of ``n_rows`` rows against ``windows``.

    ``windows`` are inclusive ``(left, right)`` row ranges, sorted and disjoint.
    Detections in the probationary rows (:func:`probationary_rows`) are ignored; a
    window that ends inside them is not scored at all (it counts in neither ``null``
    nor ``perfect``), as in NAB, but it still is the preceding window of a later
    false alarm. A repeated row counts once. See the module's docstring for the rules.

    >>> standard = PROFILES["standard"]
    >>> score = score_file([205, 230, 239, 300], 1000, [(200, 239)], standard)
    >>> round(score.raw, 4), score.windows_detected, score.false_positives
    (0.8785, 1, 1)
    >>> score.detections_in_windows, score.first_detections
    (3, (205,))
    """
    if n_rows < 0:
        raise ValueError(f"a file cannot have {n_rows} rows")
    _check_windows(windows, n_rows)
    rows = sorted(set(detections))
    if rows and not 0 <= rows[0] <= rows[-1] < n_rows:
        raise ValueError(f"detections must be row indices 0..{n_rows - 1}")
    probation = probationary_rows(n_rows)
    lefts = [left for left, _ in windows]
    max_tp = scaled_sigmoid(-1.0)
    first: list[int | None] = [None] * len(windows)
    fp_score = 0.0
    false_positives = in_windows = ignored = 0
    for row in rows:
        if row < probation:
            ignored += 1
            continue
        # Windows are disjoint and sorted, so the last one starting at or before the row
        # either holds it or is the closest one that ended before it.
        k = bisect.bisect_right(lefts, row) - 1
        if k >= 0 and row <= windows[k][1]:
            in_windows += 1
            if first[k] is None:
                first[k] = row
            continue
        false_positives += 1
        if k < 0:
            fp_score -= profile.fp_weight
            continue
        left, right = windows[k]
        width = right - left + 1
        # A one-row window has no scale to measure distance by: NAB would divide by
        # zero; any distance after it counts as far.
        after = abs(right - row) / (width - 1) if width > 1 else math.inf
        fp_score += scaled_sigmoid(after) * profile.fp_weight
    tp_score = fn_score = 0.0
    scored = detected = 0
    for (left, right), hit in zip(windows, first, strict=True):
        if right < probation:
            continue
        scored += 1
        if hit is None:
            fn_score -= profile.fn_weight
        else:
            detected += 1
            position = -(right - hit + 1) / (right - left + 1)
            tp_score += scaled_sigmoid(position) * profile.tp_weight / max_tp
    return FileScore(
        profile=profile.name,
        raw=tp_score + fn_score + fp_score,
        null=-profile.fn_weight * scored,
        perfect=profile.tp_weight * scored,
        windows=scored,
        windows_detected=detected,
        false_positives=false_positives,
        detections_in_windows=in_windows,
        ignored=ignored,
        first_detections=tuple(
            hit for hit, (_, right) in zip(first, windows, strict=True) if right >= probation
        ),
    )


def normalized(raw: float, null: float, perfect: float) -> float | None:
    """``100 * (raw - null) / (perfect - null)``; None when there is nothing to detect.

    >>> normalized(-2.0, -4.0, 4.0), normalized(-0.5, 0.0, 0.0)
    (25.0, None)
    """
    if perfect == null:
        return None
    return 100.0 * (raw - null) / (perfect - null)


def corpus_score(file_scores: Iterable[FileScore]) -> float | None:
    """NAB's normalized score over files scored with one profile (None: no windows at all).

    The files' raw, null and perfect scores are summed before normalizing, so a file
    with many windows weighs more, and a file without windows still counts by its false
    alarms.

    >>> standard = PROFILES["standard"]
    >>> hit = score_file([20], 100, [(20, 29)], standard)
    >>> quiet = score_file([], 100, [(20, 29)], standard)
    >>> corpus_score([hit, quiet])
    50.0
    >>> corpus_score([score_file([50], 100, [], standard)]) is None
    True
    """
    scores = list(file_scores)
    profiles = {score.profile for score in scores}
    if len(profiles) > 1:
        raise ValueError(f"file scores from several profiles: {sorted(profiles)}")
    return normalized(
        sum(score.raw for score in scores),
        sum(score.null for score in scores),
        sum(score.perfect for score in scores),
    )
