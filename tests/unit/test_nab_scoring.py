"""NAB's scoring rules on row indices: normalization, probation, windows, profiles."""

import math

import pytest

from benchmarks.nab_scoring import (
    PROFILES,
    FileScore,
    corpus_score,
    probationary_rows,
    scaled_sigmoid,
    score_file,
)

# Three files of 1,000 rows (150 probationary), with 1, 2 and 3 windows after probation.
FILES: dict[str, list[tuple[int, int]]] = {
    "one.csv": [(400, 499)],
    "two.csv": [(200, 259), (700, 759)],
    "three.csv": [(160, 199), (500, 539), (900, 999)],
}
ROWS = 1000
STANDARD = PROFILES["standard"]


def corpus(detections: dict[str, list[int]], profile_name: str) -> float | None:
    profile = PROFILES[profile_name]
    return corpus_score(
        score_file(detections.get(name, []), ROWS, windows, profile)
        for name, windows in FILES.items()
    )


def test_the_profiles_are_nabs() -> None:
    weights = {
        name: (p.tp_weight, p.fn_weight, p.fp_weight) for name, p in sorted(PROFILES.items())
    }
    assert weights == {
        "reward_low_FN": (1.0, 2.0, 0.11),
        "reward_low_FP": (1.0, 1.0, 0.22),
        "standard": (1.0, 1.0, 0.11),
    }


def test_probation_is_15_percent_capped_at_750_rows() -> None:
    assert probationary_rows(1000) == 150
    assert probationary_rows(1882) == 282
    assert probationary_rows(5000) == 750
    assert probationary_rows(22695) == 750


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_detector_that_never_fires_scores_0(profile: str) -> None:
    assert corpus({}, profile) == 0.0


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_one_detection_at_each_windows_start_scores_100(profile: str) -> None:
    starts = {name: [left for left, _ in windows] for name, windows in FILES.items()}
    assert corpus(starts, profile) == pytest.approx(100.0, abs=1e-9)


def test_a_detection_at_a_windows_first_row_earns_exactly_the_tp_weight() -> None:
    score = score_file([400], ROWS, [(400, 499)], STANDARD)
    assert score.raw == pytest.approx(STANDARD.tp_weight, abs=1e-12)
    assert (score.windows, score.windows_detected, score.windows_missed) == (1, 1, 0)


def test_a_detection_at_a_windows_last_row_earns_about_nothing() -> None:
    score = score_file([499], ROWS, [(400, 499)], STANDARD)
    # S(-1/100) / S(-1) = tanh(0.025) / tanh(2.5)
    assert score.raw == pytest.approx(math.tanh(0.025) / math.tanh(2.5), rel=1e-9)
    assert 0 < score.raw < 0.03
    assert score.windows_detected == 1


def test_a_detection_in_the_probationary_rows_is_ignored() -> None:
    windows = [(400, 499)]
    without = score_file([], ROWS, windows, STANDARD)
    within = score_file([100], ROWS, windows, STANDARD)
    assert within.raw == without.raw == -STANDARD.fn_weight
    assert (within.false_positives, within.windows_missed, within.ignored) == (0, 1, 1)
    # The last probationary row is still ignored, the first scored one is not.
    assert score_file([149], ROWS, [], STANDARD).raw == 0.0
    assert score_file([150], ROWS, [], STANDARD).raw == -STANDARD.fp_weight


def test_only_the_first_detection_in_a_window_counts() -> None:
    first_only = score_file([410], ROWS, [(400, 499)], STANDARD)
    more = score_file([410, 411, 450, 499], ROWS, [(400, 499)], STANDARD)
    assert more.raw == first_only.raw
    assert more.first_detections == (410,)
    assert (more.windows_detected, more.detections_in_windows, more.false_positives) == (1, 4, 0)
    # Earlier is better.
    assert score_file([420], ROWS, [(400, 499)], STANDARD).raw < first_only.raw


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_false_alarm_before_any_window_costs_exactly_the_fp_weight(profile: str) -> None:
    weights = PROFILES[profile]
    windows = [(400, 499)]
    hit = score_file([400], ROWS, windows, weights)
    hit_and_early_alarm = score_file([300, 400], ROWS, windows, weights)
    assert hit.raw - hit_and_early_alarm.raw == pytest.approx(weights.fp_weight, abs=1e-12)
    assert hit_and_early_alarm.false_positives == 1


def test_a_false_alarm_just_after_a_window_costs_less_than_one_far_after_it() -> None:
    windows = [(400, 499)]
    just_after = score_file([500], ROWS, windows, STANDARD).raw + STANDARD.fn_weight
    far_after = score_file([900], ROWS, windows, STANDARD).raw + STANDARD.fn_weight
    # One row after a 100-row window: S(1/99) * 0.11; four widths after: the full cost.
    assert just_after == pytest.approx(scaled_sigmoid(1 / 99) * STANDARD.fp_weight, rel=1e-9)
    assert -0.01 < just_after < 0
    assert far_after == pytest.approx(-STANDARD.fp_weight, abs=1e-12)


def test_a_false_alarm_is_measured_from_the_closest_window_before_it() -> None:
    windows = [(200, 259), (700, 759)]
    after_second = score_file([200, 700, 765], ROWS, windows, STANDARD)
    hits = score_file([200, 700], ROWS, windows, STANDARD)
    cost = after_second.raw - hits.raw
    assert cost == pytest.approx(scaled_sigmoid(6 / 59) * STANDARD.fp_weight, rel=1e-9)


def test_reward_low_fn_charges_twice_for_a_miss() -> None:
    windows = [(400, 499), (700, 799)]
    standard = score_file([400], ROWS, windows, PROFILES["standard"])
    low_fn = score_file([400], ROWS, windows, PROFILES["reward_low_FN"])
    assert standard.raw == pytest.approx(1.0 - 1.0, abs=1e-12)
    assert low_fn.raw == pytest.approx(1.0 - 2.0, abs=1e-12)
    assert (low_fn.null, low_fn.perfect) == (-4.0, 2.0)


def test_reward_low_fp_charges_twice_for_a_false_alarm() -> None:
    standard = score_file([300], ROWS, [], PROFILES["standard"])
    low_fp = score_file([300], ROWS, [], PROFILES["reward_low_FP"])
    assert (standard.raw, low_fp.raw) == (-0.11, -0.22)


def test_false_alarms_can_push_the_corpus_score_below_0() -> None:
    alarms = {"one.csv": list(range(150, 400))}
    score = corpus(alarms, "standard")
    assert score is not None
    # 250 far false alarms at 0.11 each against a null-to-perfect span of 2 * 6 windows.
    assert score == pytest.approx(100 * -250 * 0.11 / 12, rel=1e-9)


def test_a_corpus_without_windows_has_no_score() -> None:
    assert corpus_score([score_file([300], ROWS, [], STANDARD)]) is None


def test_mixing_profiles_in_one_corpus_score_is_refused() -> None:
    scores: list[FileScore] = [
        score_file([], ROWS, [(400, 499)], PROFILES[name]) for name in ("standard", "reward_low_FN")
    ]
    with pytest.raises(ValueError, match="several profiles"):
        corpus_score(scores)


@pytest.mark.parametrize(
    ("windows", "detections", "message"),
    [
        ([(400, 1000)], [], "not within rows"),
        ([(500, 599), (400, 450)], [], "sorted and disjoint"),
        ([(400, 499), (499, 550)], [], "sorted and disjoint"),
        ([(400, 499)], [1000], "row indices"),
        ([(400, 499)], [-1], "row indices"),
    ],
)
def test_bad_windows_and_detections_are_refused(
    windows: list[tuple[int, int]], detections: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        score_file(detections, ROWS, windows, STANDARD)
