import math
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from schemas.outputs import Anomaly, Contribution, SensorWindow, encode
from twinflow.detection import (
    DAY_MS,
    WEEK_MS,
    DecisionRule,
    DetectorConfig,
    EntityDetector,
    Period,
    Persistence,
    ScoreThreshold,
    Seasonality,
    Smoother,
    ZScores,
    feature_vector,
    split_feature,
)
from twinflow.sim.faults import Category, FaultPlan
from twinflow.sim.scenario import Scenario, ScenarioConfig
from twinflow.twin_model import load_twin_model

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
SENSORS = ("flow", "discharge_pressure", "vibration_rms")
LEVELS = {"flow": 180.0, "discharge_pressure": 9.0, "vibration_rms": 2.2}
MINUTE = 60_000

# Unsmoothed and without cycles, so that each window's verdict shows the rule itself;
# smoothing and cycles have their own tests.
PLAIN = DetectorConfig(warmup_windows=60, smoothing=(1.0,), min_count=10, periods=())


def normal_windows(n: int, seed: int = 0) -> list[dict[str, float]]:
    """Windows of a machine following a slow load cycle, with noise."""
    rng = np.random.default_rng(seed)
    windows = []
    for i in range(n):
        load = 0.7 + 0.1 * math.sin(2 * math.pi * i / 90)
        x = {}
        for sensor in SENSORS:
            level = LEVELS[sensor] * (0.8 + 0.3 * load)
            x[f"{sensor}.mean"] = level + rng.normal(0, 0.01 * level)
            x[f"{sensor}.std"] = abs(0.02 * level + rng.normal(0, 0.004 * level))
        windows.append(x)
    return windows


def shifted(x: dict[str, float], feature: str, by: float) -> dict[str, float]:
    return {**x, feature: x[feature] * (1 + by)}


Outcome = tuple[float, float | None, bool, bool, list[Contribution]]


def run(detector: EntityDetector, windows: list[dict[str, float]], start: int = 0) -> list[Outcome]:
    out = []
    for i, x in enumerate(windows):
        d = detector.process(x, ts_ms=(start + i) * 10_000)
        out.append((d.score, d.threshold, d.is_anomaly, d.warming_up, d.contributions))
    return out


def window(sensor: str, count: int, mean: float, std: float = 1.0) -> SensorWindow:
    return SensorWindow(
        "pump-001", sensor, 0, 10_000, count, mean, mean - 1, mean + 1, std, mean, 0.1, 0
    )


# features ---------------------------------------------------------------------------


def test_feature_vector_keeps_the_sensor_and_leaves_absent_things_out() -> None:
    vector = feature_vector(
        {
            "flow": window("flow", 10, 180.0, 2.0),
            "bearing_temp": window("bearing_temp", 1, 51.0, 0.0),
            "vibration_rms": window("vibration_rms", 10, float("nan"), 0.1),
        }
    )
    assert vector == {
        "flow.mean": 180.0,
        "flow.std": 2.0,
        "bearing_temp.mean": 51.0,
        "vibration_rms.std": 0.1,
    }
    assert "discharge_pressure.mean" not in vector  # a missing sensor is absent, not 0
    assert split_feature("discharge_pressure.mean") == ("discharge_pressure", "mean")
    every = feature_vector({"flow": window("flow", 10, 5.0)}, features=("count", "min", "slope"))
    assert every == {"flow.count": 10.0, "flow.min": 4.0, "flow.slope": 0.1}
    with pytest.raises(ValueError, match="unknown window features"):
        feature_vector({}, features=("median",))


# determinism and pickling -----------------------------------------------------------


CONFIGS = pytest.mark.parametrize(
    "config", [PLAIN, DetectorConfig(warmup_windows=60)], ids=["plain", "default"]
)


@CONFIGS
def test_same_input_gives_the_same_scores(config: DetectorConfig) -> None:
    windows = normal_windows(200) + [shifted(x, "flow.mean", 0.3) for x in normal_windows(10, 1)]
    first, second = run(EntityDetector(config), windows), run(EntityDetector(config), windows)
    assert first == second
    assert any(flags[2] for flags in first)


@CONFIGS
def test_a_pickle_round_trip_mid_stream_changes_nothing(config: DetectorConfig) -> None:
    windows = normal_windows(250, seed=2)
    windows[200:215] = [shifted(x, "vibration_rms.mean", 0.5) for x in windows[200:215]]
    untouched = EntityDetector(config)
    run(untouched, windows[:150])
    restored = pickle.loads(pickle.dumps(untouched))
    assert run(restored, windows[150:], 150) == run(untouched, windows[150:], 150)
    fresh = pickle.loads(pickle.dumps(EntityDetector(config)))  # before any window
    assert run(fresh, windows) == run(EntityDetector(config), windows)


def test_a_new_detector_is_cheap_and_a_busy_one_stays_small() -> None:
    assert len(pickle.dumps(EntityDetector())) < 1_500  # nothing built before the first window
    detector = EntityDetector()
    run(detector, normal_windows(500))
    # Six features: two time scales, three regimes, 216 cycle bins each.
    assert len(pickle.dumps(detector)) < 25_000


# warm-up, learning, missing data ----------------------------------------------------


@CONFIGS
def test_the_warm_up_never_flags(config: DetectorConfig) -> None:
    detector = EntityDetector(config)
    windows = normal_windows(config.warmup_windows)
    windows[5::7] = [shifted(x, "flow.mean", 5.0) for x in windows[5::7]]  # wild values
    for x in windows:
        detection = detector.process(x)
        assert detection.warming_up and not detection.is_anomaly
        assert detection.threshold is None and detection.contributions == []
    after = detector.process(normal_windows(1, seed=9)[0])
    assert not after.warming_up and after.threshold is not None


def test_a_long_anomaly_stays_anomalous_because_it_is_not_learned() -> None:
    detector = EntityDetector(PLAIN)
    run(detector, normal_windows(PLAIN.warmup_windows + 50))
    fault = [shifted(x, "vibration_rms.mean", 0.6) for x in normal_windows(400, seed=3)]
    flags = [detector.process(x).is_anomaly for x in fault]
    assert not flags[0]  # persistence: the first exceedance is not yet an anomaly
    assert all(flags[1:])
    back = [detector.process(x).is_anomaly for x in normal_windows(30, seed=4)]
    assert not any(back[2:])


def test_a_learned_mean_does_not_move_during_an_anomaly() -> None:
    detector = EntityDetector(PLAIN)
    run(detector, normal_windows(100))
    column = detector.columns["flow.mean"]
    scores = detector._scores
    assert scores is not None
    before = scores.means[0, column].copy()
    run(detector, [shifted(x, "flow.mean", 0.5) for x in normal_windows(100, seed=5)])
    assert (scores.means[0, column] == before).all()


@CONFIGS
def test_missing_features_are_skipped_not_zero(config: DetectorConfig) -> None:
    detector = EntityDetector(config)
    windows = normal_windows(config.warmup_windows + 100, seed=6)
    for i, x in enumerate(windows):
        if i % 3 == 0:
            del x["discharge_pressure.mean"], x["discharge_pressure.std"]
        if i % 5 == 0:
            del x["flow.std"]
    detections = [detector.process(x) for x in windows]
    assert not any(d.is_anomaly for d in detections)
    # A window with one sensor only is scored on that sensor.
    only = {"vibration_rms.mean": windows[-1]["vibration_rms.mean"]}
    assert not detector.process(only).is_anomaly
    # An empty window says nothing and does not count.
    count = detector.windows
    empty = detector.process({})
    assert (empty.score, empty.is_anomaly, empty.scored, detector.windows) == (
        0.0,
        False,
        False,
        count,
    )


def test_a_feature_first_seen_late_is_learned_before_it_is_scored() -> None:
    detector = EntityDetector(PLAIN)
    run(detector, normal_windows(PLAIN.warmup_windows + 20))
    newcomer = [{**x, "oil_temp.mean": 1000.0 + i % 2} for i, x in enumerate(normal_windows(40))]
    detections = [detector.process(x) for x in newcomer]
    assert not any(d.is_anomaly for d in detections)
    assert detector.process({**normal_windows(1)[0], "oil_temp.mean": 1100.0}).score > 50


def test_a_quiet_signal_does_not_alarm_on_noise() -> None:
    detector = EntityDetector(PLAIN)
    quiet = {"flow.mean": 100.0, "flow.std": 0.0, "voltage.mean": 400.0, "voltage.std": 0.0}
    run(detector, [quiet] * 100)
    rng = np.random.default_rng(7)
    noisy = [{k: v + rng.normal(0, 1e-6) for k, v in quiet.items()} for _ in range(100)]
    assert not any(d.is_anomaly for d in map(detector.process, noisy))
    assert detector.threshold == PLAIN.floor


def test_a_signal_flat_in_the_warm_up_learns_its_real_spread_later() -> None:
    # The clip uses the floored deviation: a flat warm-up does not freeze the variance
    # at zero, so a signal that starts moving is followed once it is within the gate.
    detector = EntityDetector(replace(PLAIN, learn_gate=1e9))
    run(detector, [{"a.mean": 20.0}] * PLAIN.warmup_windows)
    rng = np.random.default_rng(3)
    flags = [
        detector.process({"a.mean": 20.0 + rng.normal(0, 0.01)}).is_anomaly for _ in range(3000)
    ]
    assert not any(flags[-500:])


# explanations -----------------------------------------------------------------------


def test_the_explanation_names_the_shifted_sensor_in_its_units() -> None:
    detector = EntityDetector(PLAIN)
    run(detector, normal_windows(PLAIN.warmup_windows + 50, seed=8))
    fault = [shifted(x, "discharge_pressure.mean", -0.25) for x in normal_windows(5, seed=9)]
    detection = [detector.process(x) for x in fault][-1]
    assert detection.is_anomaly
    top = detection.contributions[0]
    assert (top.sensor, top.feature) == ("discharge_pressure", "mean")
    assert top.value < top.expected_low < top.expected_high
    assert 6 < top.expected_low < top.expected_high < 12  # around the pressure's level
    assert 0.5 < top.weight <= 1.0
    assert len(detection.contributions) <= PLAIN.top
    assert sum(c.weight for c in detection.contributions) <= 1.0 + 1e-9


def test_the_explanation_adds_the_daily_cycle_back() -> None:
    detector = EntityDetector(DetectorConfig(warmup_windows=200, periods=(Period(DAY_MS, 24),)))
    hour = DAY_MS // 24
    rng = np.random.default_rng(0)
    for t in range(0, 14 * DAY_MS, hour // 4):
        level = 100.0 if 8 <= t % DAY_MS // hour < 18 else 20.0
        detector.process({"load.mean": level + rng.normal(0, 1.0)}, ts_ms=t)
    at_night = 14 * DAY_MS + 2 * hour
    detections = [detector.process({"load.mean": 80.0}, ts_ms=at_night + i) for i in range(4)]
    top = detections[-1].contributions[0]
    assert detections[-1].is_anomaly
    assert top.expected_low < 20.0 < top.expected_high < 60.0 < top.value  # the night's level


def test_a_detection_becomes_an_anomaly_message() -> None:
    detector = EntityDetector(PLAIN)
    run(detector, normal_windows(80))
    detection = [detector.process(shifted(x, "flow.mean", 0.4)) for x in normal_windows(2)][-1]
    anomaly = detection.to_anomaly(
        entity_id="pump-001", window_start_ms=10_000, window_end_ms=20_000, msg_id="pump-001@10000"
    )
    assert isinstance(anomaly, Anomaly)
    assert (anomaly.model, anomaly.score, anomaly.threshold) == (
        "zscore",
        detection.score,
        detection.threshold,
    )
    assert anomaly.contributions[0].sensor == "flow"
    assert b'"sensor":"flow"' in encode(anomaly)
    quiet = detector.process(normal_windows(1, seed=11)[0])
    with pytest.raises(ValueError, match="only an anomalous window"):
        quiet.to_anomaly(entity_id="pump-001", window_start_ms=0, window_end_ms=1, msg_id="x")


# thresholds -------------------------------------------------------------------------


def test_the_threshold_rule_and_persistence() -> None:
    threshold = ScoreThreshold(quantile=0.9, fence=2.0, floor=0.0)
    for score in np.random.default_rng(0).normal(1.0, 0.1, 2000):
        threshold.update(float(score))
    level, value = threshold.level(), threshold.get()
    assert level is not None and value is not None
    assert level == pytest.approx(1.128, abs=0.02)  # the 90th percentile of N(1, 0.1)
    assert value == pytest.approx(level + 2 * (level - 1.0), abs=0.03)
    floored = ScoreThreshold(floor=5.0)
    floored.update(0.0)
    assert floored.get() == 5.0
    persistence = Persistence(3, 4)
    assert [persistence.update(e) for e in (True, True, False, True, True)] == [
        False,
        False,
        False,
        True,
        True,
    ]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="persistence"):
        Persistence(3, 2)
    with pytest.raises(ValueError, match="calibration"):
        DecisionRule(warmup=10, calibrate_from=10)
    with pytest.raises(ValueError, match="warmup_windows=50 leaves fewer than 30"):
        DetectorConfig(warmup_windows=50)
    with pytest.raises(ValueError):
        DetectorConfig(quantile=1.5)
    with pytest.raises(ValueError, match="smoothing weights"):
        EntityDetector(DetectorConfig(smoothing=(0.0,))).process({"a.mean": 1.0})
    with pytest.raises(ValueError, match="rebaseline_after"):
        DetectorConfig(rebaseline_after=0)
    with pytest.raises(ValueError, match="gain"):
        Seasonality(gain=1.5)


# building blocks --------------------------------------------------------------------


def test_the_moments_are_robust_to_a_single_outlier() -> None:
    plain, robust = ZScores(1, clip=1e9, min_count=30), ZScores(1, min_count=30)
    column = np.array([0])
    values = list(np.random.default_rng(1).normal(10.0, 1.0, 500))
    values[300] = 1e6
    for model in (plain, robust):
        model.grow(column)
        for v in values:
            x = np.array([[v]])
            z, std, regime = model.z(column, x)
            model.learn(column, x, regime, gate=1e12, z=z, std=std, robust=True)
    assert robust.means[0, 0, 0] == pytest.approx(10.0, abs=0.2)
    assert math.sqrt(robust.var[0, 0]) == pytest.approx(1.0, abs=0.2)
    assert math.sqrt(plain.var[0, 0]) > 1_000


def test_the_smoothing_weight_is_per_reading() -> None:
    # A window of ten readings moves a feature as far as ten windows of one reading.
    window_of_ten, ten_windows = Smoother((0.05,)), Smoother((0.05,))
    column = np.array([0])
    for smoother in (window_of_ten, ten_windows):
        smoother.grow(1)
        smoother.update(column, np.array([0.0]), None)
    moved = window_of_ten.update(column, np.array([1.0]), np.array([10]))[0, 0]
    for _ in range(10):
        step = ten_windows.update(column, np.array([1.0]), None)[0, 0]
    assert moved == pytest.approx(step) == pytest.approx(1 - 0.95**10)


def noisy_windows(n: int, shift_from: int, shift: float, seed: int) -> list[dict[str, float]]:
    """Two independent N(0, 1) features; ``a.mean`` moves by ``shift`` from ``shift_from``."""
    rng = np.random.default_rng(seed)
    return [
        {"a.mean": rng.normal(shift if i >= shift_from else 0.0, 1.0), "b.mean": rng.normal()}
        for i in range(n)
    ]


def test_the_slow_scale_finds_a_shift_smaller_than_the_noise() -> None:
    windows = noisy_windows(700, shift_from=400, shift=1.0, seed=12)
    found = {}
    for smoothing in ((1.0,), (0.3, 0.05)):
        config = DetectorConfig(warmup_windows=300, smoothing=smoothing, periods=())
        detector = EntityDetector(config)
        flags = [detector.process(x).is_anomaly for x in windows]
        found[smoothing] = (sum(flags[:400]), sum(flags[400:]))
    assert found[0.3, 0.05][0] == 0  # no false alarm before the shift
    assert found[0.3, 0.05][1] > 200  # most of the shifted windows
    assert found[(1.0,)][1] < 30  # a 1-sigma shift is lost in the noise of single windows


def test_the_fast_scale_sees_a_spike_the_slow_one_smooths_away() -> None:
    rng = np.random.default_rng(5)
    windows = [{"a.mean": rng.normal()} for _ in range(600)]
    windows[500] = {"a.mean": 12.0}  # one reading at 12 sigma
    margin = {}
    for smoothing in ((0.05,), (0.3, 0.05)):
        config = DetectorConfig(warmup_windows=300, smoothing=smoothing, periods=())
        detector = EntityDetector(config)
        detections = [detector.process(x) for x in windows]
        assert not any(d.is_anomaly for d in detections[300:500])
        assert detector.threshold is not None
        margin[smoothing] = detections[500].score / detector.threshold
    assert margin[0.3, 0.05] > 2.0  # plain on the fast scale
    assert margin[(0.05,)] < 1.3  # barely over the threshold on the slow one


def test_slow_drift_of_one_feature_is_followed_not_alarmed_for_ever() -> None:
    # Each feature learns on its own while it is within the learn gate: a slowly drifting
    # signal keeps being learned. (A gate on the whole window stops all learning once the
    # drift first crosses it, and every later window is an anomaly.)
    rng = np.random.default_rng(13)
    detector = EntityDetector(DetectorConfig(warmup_windows=300, periods=()))
    flags = []
    for i in range(4000):
        x = {"a.mean": rng.normal(0.005 * i, 1.0), "b.mean": rng.normal()}
        flags.append(detector.process(x).is_anomaly)
    assert sum(flags[300:]) < 0.05 * len(flags[300:])
    assert not any(flags[-500:])


# operating points -------------------------------------------------------------------


def test_a_rebaselined_level_is_normal_and_so_is_the_old_one() -> None:
    detector = EntityDetector(PLAIN)
    run(detector, normal_windows(PLAIN.warmup_windows + 50))
    new_level = [shifted(x, "flow.mean", 0.4) for x in normal_windows(20, seed=1)]
    assert [detector.process(x).is_anomaly for x in new_level][-1]
    detector.rebaseline()
    accepted = [shifted(x, "flow.mean", 0.4) for x in normal_windows(50, seed=3)]
    assert not any(detector.process(x).is_anomaly for x in accepted)
    assert not any(detector.process(x).is_anomaly for x in normal_windows(50, seed=4))
    elsewhere = [shifted(x, "flow.mean", -0.4) for x in normal_windows(5, seed=5)]
    assert [detector.process(x).is_anomaly for x in elsewhere][-1]


def test_a_window_learned_as_normal_moves_the_model_towards_it() -> None:
    detector = EntityDetector(PLAIN)
    run(detector, normal_windows(PLAIN.warmup_windows + 50))
    scores = detector._scores
    assert scores is not None
    column = detector.columns["flow.mean"]
    before = float(scores.means[0, column, 0])
    far = shifted(normal_windows(1, seed=7)[0], "flow.mean", 0.4)
    detector.process(far)  # far outside the gate: not learned
    assert float(scores.means[0, column, 0]) == before
    detector.learn_normal(far)  # an operator said it was normal
    assert float(scores.means[0, column, 0]) > before
    assert detector.windows == PLAIN.warmup_windows + 51  # learning is not a scored window


def test_the_least_recently_used_operating_point_makes_room() -> None:
    model = ZScores(1, regimes=2, min_count=1)
    column = np.array([0])
    model.grow(column)
    for v in (0.0, 1.0, 0.0, 1.0):
        model.learn(column, np.array([[v]]), 0)
    assert model.add_regime(column, np.array([[10.0]]), at=5) == 1
    model.z(column, np.array([[0.2]]), at=6)  # regime 0 used last
    assert model.add_regime(column, np.array([[20.0]]), at=7) == 1  # replaces regime 1
    assert sorted(model.means[:, 0, 0].tolist()) == pytest.approx([0.5, 20.0])


# cycles -----------------------------------------------------------------------------


def shifts(
    days: int, step_ms: int, seed: int, skip_day: int | None = None
) -> list[tuple[int, float]]:
    """A day shift from 06:00 to 22:00 at 80, else 20, with noise; optionally one day off."""
    rng = np.random.default_rng(seed)
    hour = DAY_MS // 24
    series = []
    for t in range(0, days * DAY_MS, step_ms):
        working = 6 <= t % DAY_MS // hour < 22 and t // DAY_MS != skip_day
        series.append((t, (80.0 if working else 20.0) + rng.normal(0, 2.0)))
    return series


def test_a_daily_cycle_is_not_an_anomaly_but_a_missing_shift_is() -> None:
    step = 5 * MINUTE
    config = DetectorConfig(warmup_windows=600)
    normal = EntityDetector(config)
    flags = [normal.process({"load.mean": v}, ts_ms=t).is_anomaly for t, v in shifts(14, step, 1)]
    assert not any(flags[config.warmup_windows :])
    skipped = EntityDetector(config)
    series = shifts(14, step, 1, skip_day=10)
    flags = [skipped.process({"load.mean": v}, ts_ms=t).is_anomaly for t, v in series]
    day = [f for (t, _), f in zip(series, flags, strict=True) if t // DAY_MS == 10]
    assert any(day)
    without_cycles = EntityDetector(replace(config, periods=()))
    flags = [without_cycles.process({"load.mean": v}, ts_ms=t).is_anomaly for t, v in series]
    assert not any(f for (t, _), f in zip(series, flags, strict=True) if t // DAY_MS == 10)


def test_the_cycle_is_chosen_by_what_it_explains() -> None:
    hour = DAY_MS // 24
    rng = np.random.default_rng(3)
    season = Seasonality((Period(DAY_MS, 24), Period(WEEK_MS, 168)))
    season.grow(3)
    walk = 0.0
    for t in range(0, 28 * DAY_MS, hour // 2):
        weekend = t // DAY_MS % 7 >= 5
        daily = 50.0 if 8 <= t % DAY_MS // hour < 18 else 0.0
        walk += rng.normal(0, 1.0)
        values = np.array(
            [
                daily + rng.normal(0, 1.0),  # the same every day
                (0.0 if weekend else daily) + rng.normal(0, 1.0),  # idle at weekends
                walk,  # wanders, no cycle
            ]
        )
        season.apply(slice(None), values, t)
    assert season.selected.tolist() == [0, 1, -1]


def test_cycles_need_two_visits_of_a_bin_before_they_are_used() -> None:
    season = Seasonality((Period(DAY_MS, 24),))
    season.grow(1)
    hour = DAY_MS // 24
    used = []
    for t in range(0, 3 * DAY_MS, hour // 2):
        value = 50.0 if t % DAY_MS // hour < 12 else 0.0
        _, removed = season.apply(slice(None), np.array([value]), t)
        used.append((t // DAY_MS, bool(removed[0] != 0)))
    assert not any(flag for day, flag in used if day < 2)
    assert any(flag for day, flag in used if day == 2)


# on the simulator -------------------------------------------------------------------


def test_process_faults_of_the_simulator_are_found_and_explained() -> None:
    from benchmarks.detection_on_simulator import START_MS, WINDOW_MS, build_windows

    model = load_twin_model(EXAMPLE)
    scenario = Scenario(
        model,
        ScenarioConfig(
            start_ms=START_MS,
            duration_s=5400.0,
            rate=10.0,  # 2 entities x 5 sensors: one reading per sensor per second
            entities=2,
            seed=11,
            faults=FaultPlan(process_fault_share=1.0, sensor_fault_share=0.0, earliest=0.5),
        ),
    )
    faults = {f.entity_id: f for f in scenario.faults if f.category is Category.PROCESS}
    assert set(faults) == {"pump-001", "motor-001"}
    plausible = {
        "vibration_rms",
        "bearing_temp",
        "winding_temp",
        "motor_current",
        "current",
        "flow",
        "discharge_pressure",
    }
    for entity_id, windows in build_windows(scenario).items():
        fault = faults[entity_id]
        detector = EntityDetector()
        flagged = []
        for start, by_sensor in windows:
            detection = detector.process_window(by_sensor, start)
            if detection.is_anomaly:
                flagged.append((start, detection.contributions[0].sensor))
        inside = [
            s
            for s in flagged
            if fault.start_ms <= s[0] + WINDOW_MS and s[0] < fault.end_ms + WINDOW_MS
        ]
        assert inside, f"{fault.kind} of {entity_id} not found"
        assert len(inside) >= 0.5 * len(flagged)
        assert inside[0][1] in plausible
        assert all(start >= fault.start_ms - 10 * WINDOW_MS for start, _ in flagged)
