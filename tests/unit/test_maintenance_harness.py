import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.maintenance_on_simulator import (
    MODEL,
    Operations,
    Plan,
    evaluate,
    main,
    operations_schedule,
    report,
    scenario_config,
    simulate,
    window_features,
)
from benchmarks.simulator_windows import START_MS, build_windows
from twinflow.sim.faults import DegradationPlan, FaultPlan
from twinflow.sim.scenario import Scenario, ScenarioConfig
from twinflow.twin_model import TwinModel, load_twin_model

HOUR_S = 3600.0


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return load_twin_model(MODEL)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    png = tmp_path_factory.mktemp("png")
    plan = Plan(
        entities=2,
        days=1.5,
        degradation=DegradationPlan(
            entity_ids=("pump-001",), min_ramp_s=12 * HOUR_S, max_ramp_s=16 * HOUR_S
        ),
        png=png,
    )
    out = evaluate(plan, [11], jobs=1)
    out["png_files"] = sorted(p.name for p in png.iterdir())
    return out


def test_the_harness_scores_a_forced_degradation(results: dict[str, Any]) -> None:
    for key in (
        "faults",
        "alerted_before_limit",
        "median_lead_s",
        "median_lead_s_ramps_24h",
        "median_ape_at_half",
        "missing_at_half",
        "false_alerts_per_entity_day",
        "us_per_window",
        "monitor_pickle_bytes",
        "per_seed",
        "per_fault",
        "met",
    ):
        assert key in results, key
    assert results["degradations"] == 1
    assert results["faults"] == 1  # vibration reaches its limit before the repair
    (row,) = results["per_fault"]
    assert row["entity"] == "pump-001" and row["sensor"] == "vibration_rms"
    assert 12 <= row["ramp_h"] <= 16 and 1.0 <= row["shape"] <= 1.5
    assert row["start_h"] < row["crossing_h"] < row["start_h"] + row["ramp_h"] < row["repair_h"]
    assert 0 <= results["alerted_before_limit"] <= 1
    if row["alert_h"] is not None:
        assert row["start_h"] <= row["alert_h"] < row["crossing_h"]
        assert row["lead_h"] == pytest.approx(row["crossing_h"] - row["alert_h"], abs=0.02)
    assert row["ape_at_half"] >= 0.0
    assert results["median_lead_s_ramps_24h"] is None  # no ramp that long here
    # pump-001 for 1.5 days minus [start, repair + 6 h], motor-001 for all of it.
    clean = results["clean_entity_days"]
    assert 1.5 < clean < 3.0
    rate = results["false_alerts_per_entity_day"]
    assert rate is not None and rate >= 0
    assert results["windows"] == 2 * 1.5 * 8640
    assert 0 < results["us_per_window"] < 1000
    sizes = results["monitor_pickle_bytes"]
    assert 0 < sizes["median"] <= sizes["max"] < 100_000
    assert results["png_files"] == ["11-pump-001.png"]
    text = report(results)
    assert "| faults alerted before the limit |" in text and "pump-001" in text
    json.dumps(results)  # plain JSON


def test_the_command_line_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    main(
        ["--seeds", "3", "--entities", "1", "--days", "0.5", "--jobs", "1", "--out", str(tmp_path)]
    )
    data = json.loads((tmp_path / "maintenance.json").read_text())
    assert data["seeds"] == [3] and data["entities"] == 1
    assert (tmp_path / "maintenance.md").read_text().startswith("# Predictive maintenance")


def test_operations_move_setpoints_and_the_machines_follow(model: TwinModel) -> None:
    plan = Plan(entities=2, days=1.0, degradation=DegradationPlan(share=0.0))
    scenario = Scenario(model, scenario_config(plan, 4, model))
    commands = operations_schedule(
        scenario, Operations(speed_gap_h=3.0, stop_gap_h=6.0), np.random.default_rng(0)
    )
    speeds = [c for _, c in commands if c.setpoint == "speed"]
    stops = [c for _, c in commands if c.setpoint == "enable"]
    assert speeds and all(c.entity_id == "pump-001" for c in speeds)
    assert all(1200 <= float(c.value) <= 1800 for c in speeds)
    assert stops and [c.value for c in stops[:2]] == [False, True]
    assert [t for t, _ in commands] == sorted(t for t, _ in commands)
    readings = simulate(scenario, commands)
    motor = readings["motor-001"]
    vibration = motor.values[:, motor.sensors.index("vibration_rms")]
    off_at = next(t for t, c in commands if c.setpoint == "enable" and c.value is False)
    during = (motor.ts > off_at + 60_000) & (motor.ts < off_at + 300_000)
    assert during.any() and vibration[during].max() < 0.3  # stopped
    assert np.median(vibration) > 1.0


def test_window_features_match_the_simulator_windows(model: TwinModel) -> None:
    # Several readings per window and sensor faults (dropouts, spikes): the generic case.
    config = ScenarioConfig(
        start_ms=START_MS,
        duration_s=120.0,
        rate=40.0,
        entities=4,
        seed=5,
        faults=FaultPlan(0.0, 1.0, earliest=0.0),
    )
    scenario = Scenario(model, config)
    expected = build_windows(scenario)
    readings = simulate(scenario, [])
    for entity_id, record in readings.items():
        features = window_features(record)
        windows = dict(expected[entity_id])
        assert features.starts.tolist() == sorted(windows)
        for i, start in enumerate(features.starts.tolist()):
            for k, sensor in enumerate(record.sensors):
                window = windows[start].get(sensor)
                if window is None:
                    assert features.count[k, i] == 0
                    continue
                assert features.count[k, i] == window.count
                for name, column in (
                    ("mean", features.mean),
                    ("min", features.low),
                    ("max", features.high),
                    ("std", features.std),
                    ("last", features.last),
                    ("slope", features.slope),
                ):
                    assert math.isclose(
                        float(column[k, i]), getattr(window, name), rel_tol=1e-9, abs_tol=1e-9
                    ), (entity_id, sensor, start, name)
