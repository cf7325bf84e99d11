import hashlib
import math
import struct
from dataclasses import replace
from pathlib import Path

import msgspec
import numpy as np
import pytest

from twinflow.sim.degradation import WindowMeans, crossing, with_crossings
from twinflow.sim.faults import (
    Category,
    DegradationPlan,
    Fault,
    FaultKind,
    FaultPlan,
    FaultTarget,
    schedule_degradations,
)
from twinflow.sim.scenario import Scenario, ScenarioConfig
from twinflow.twin_model import OperatingLimits, TwinModel, load_twin_model

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
START_MS = 1_793_000_000_000
HOUR_MS = 3_600_000
WINDOW_MS = 10_000
DEFAULT_DIGEST = "b2a0e03218953f778109b3b032ab81b4f28fb91b4e66c513977f9dd4aaf16178"
"""Samples and faults of seed 3, 600 s, all entities, as before degradations and daily
load existed: the detection benchmarks' published figures depend on them."""


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return load_twin_model(EXAMPLE)


def _digest(scenario: Scenario) -> str:
    digest = hashlib.sha256()
    for s in scenario.samples():
        digest.update(s.entity_id.encode())
        digest.update(struct.pack("<q", s.ts_ms))
        for name, value in s.values.items():
            digest.update(name.encode())
            digest.update(struct.pack("<d", value))
        digest.update(repr(s.dropped).encode())
        digest.update(repr(sorted(s.reported_units.items())).encode())
        digest.update(repr(sorted(s.setpoints.items())).encode())
    for fault in scenario.faults:
        digest.update(msgspec.json.encode(fault))
    return digest.hexdigest()


def _ticking(model: TwinModel, entities: int, **changes: object) -> ScenarioConfig:
    """Every entity ticks once per 10-s window."""
    sensors = sum(len(model.sensors_of(e.id)) for e in model.entities[:entities])
    base: dict[str, object] = {
        "start_ms": START_MS,
        "rate": sensors * 1000 / WINDOW_MS,
        "entities": entities,
        "seed": 5,
        "faults": FaultPlan(0.0, 0.0),
    }
    base.update(changes)
    return ScenarioConfig(**base)  # type: ignore[arg-type]


def _series(scenario: Scenario, entity_id: str) -> WindowMeans:
    """One entity's window means when it ticks once per window."""
    starts: list[int] = []
    columns: dict[str, list[float]] = {}
    for sample in scenario.samples():
        if sample.entity_id != entity_id:
            continue
        starts.append(sample.ts_ms - sample.ts_ms % WINDOW_MS)
        for name, value in sample.values.items():
            columns.setdefault(name, []).append(value)
    return WindowMeans(
        np.asarray(starts, dtype=np.int64),
        WINDOW_MS,
        {name: np.asarray(values) for name, values in columns.items()},
    )


def test_default_scenarios_are_unchanged(model: TwinModel) -> None:
    config = ScenarioConfig(start_ms=START_MS, duration_s=600, rate=290, seed=3)
    assert config.daily_load == 0.0 and config.degradation is None
    scenario = Scenario(model, config)
    assert not any(f.kind is FaultKind.DEGRADATION for f in scenario.faults)
    assert _digest(scenario) == DEFAULT_DIGEST


def test_optional_features_move_no_other_draw(model: TwinModel) -> None:
    base = ScenarioConfig(
        start_ms=START_MS, duration_s=600, rate=290, seed=3, faults=FaultPlan(1.0, 1.0)
    )
    plain = Scenario(model, base)
    # A plan that degrades nobody changes nothing at all.
    idle = Scenario(model, replace(base, degradation=DegradationPlan(0.0)))
    assert idle.faults == plain.faults
    assert _digest(idle) == _digest(plain)
    # Degraded entities lose their other faults; everyone else keeps theirs.
    degrading = Scenario(
        model,
        replace(
            base,
            degradation=DegradationPlan(
                0.5, 120, 300, warmup_s=60, min_repair_s=10, max_repair_s=30
            ),
        ),
    )
    degraded = {f.entity_id for f in degrading.faults if f.kind is FaultKind.DEGRADATION}
    assert degraded
    assert [f for f in degrading.faults if f.entity_id not in degraded] == [
        f for f in plain.faults if f.entity_id not in degraded
    ]
    assert all(f.kind is FaultKind.DEGRADATION for f in degrading.faults if f.entity_id in degraded)
    # Machines wear alone: the samples of the others are exactly as without, but for
    # those driving a degraded machine (they follow its load, whose draws a cavitation
    # it no longer has took part in).
    parents = {e.id: e.parent for e in model.entities}
    apart = {e for e in parents if e not in degraded and parents[e] not in degraded}
    others = [s for s in plain.samples() if s.entity_id in apart]
    assert [s for s in degrading.samples() if s.entity_id in apart] == others
    # A daily load changes loads, not faults.
    daily = Scenario(model, replace(base, daily_load=0.15))
    assert daily.faults == plain.faults


def test_degradations_are_scheduled_within_the_run() -> None:
    targets = [FaultTarget(f"pump-{i:03d}", "pump", ["vibration_rms"], []) for i in range(200)] + [
        FaultTarget("sensor-box", "custom", ["x"], [])
    ]
    day_ms = 24 * HOUR_MS
    plan = DegradationPlan(share=0.3)
    rng = np.random.default_rng(1)
    faults = schedule_degradations(targets, START_MS, 5 * day_ms, WINDOW_MS, plan, rng)
    assert 30 < len(faults) < 90
    assert "sensor-box" not in {f.entity_id for f in faults}
    for fault in faults:
        assert fault.kind is FaultKind.DEGRADATION and fault.category is Category.PROCESS
        assert fault.ramp_ms is not None and fault.shape is not None
        assert 12 * HOUR_MS <= fault.ramp_ms <= 96 * HOUR_MS
        assert 1.0 <= fault.shape <= 1.5
        assert fault.start_ms >= START_MS + 6 * HOUR_MS
        assert fault.end_ms <= START_MS + 5 * day_ms
        after_ramp = fault.end_ms - fault.start_ms - fault.ramp_ms
        assert 2 * HOUR_MS <= after_ramp <= 6 * HOUR_MS  # fits: the ramp shrinks if need be
    # A run too short for the minimum ramp: it keeps its minimum, the repair is capped.
    short = schedule_degradations(
        targets[:50], START_MS, 10 * HOUR_MS, WINDOW_MS, plan, np.random.default_rng(2)
    )
    assert short
    assert all(f.ramp_ms == 12 * HOUR_MS and f.end_ms == START_MS + 10 * HOUR_MS for f in short)
    chosen = schedule_degradations(
        targets,
        START_MS,
        5 * day_ms,
        WINDOW_MS,
        DegradationPlan(entity_ids=("pump-007",)),
        np.random.default_rng(1),
    )
    assert [f.entity_id for f in chosen] == ["pump-007"]
    with pytest.raises(ValueError, match="share"):
        DegradationPlan(share=1.5)
    with pytest.raises(ValueError, match="min_ramp_s"):
        DegradationPlan(min_ramp_s=10.0, max_ramp_s=5.0)


def test_a_degradation_drives_vibration_over_its_limit_and_a_repair_ends_it(
    model: TwinModel,
) -> None:
    plan = DegradationPlan(entity_ids=("pump-001",), min_ramp_s=12 * 3600, max_ramp_s=12 * 3600)
    config = _ticking(model, 2, duration_s=36 * 3600.0, degradation=plan)
    scenario = Scenario(model, config)
    (fault,) = scenario.faults
    assert fault.entity_id == "pump-001" and fault.ramp_ms == 12 * HOUR_MS
    series = _series(scenario, "pump-001")
    vibration = series.means["vibration_rms"]
    hours = (series.starts_ms - START_MS) // HOUR_MS
    hourly = np.asarray([vibration[hours == h].mean() for h in range(36)])
    start_h, ramp_end_h = (
        (fault.start_ms - START_MS) / HOUR_MS,
        12 + (fault.start_ms - START_MS) / HOUR_MS,
    )
    end_h = (fault.end_ms - START_MS) / HOUR_MS
    healthy = hourly[: math.floor(start_h)]
    rising = hourly[math.ceil(start_h) + 1 : math.floor(ramp_end_h)]
    # Monotonic-ish: every hour above the one two hours earlier, and far above healthy.
    assert np.all(rising[2:] > rising[:-2])
    assert rising[-1] > healthy.max() + 4.0
    limits = {n: s.limits for n, s in model.sensors_of("pump-001").items() if s.limits}
    found = crossing(fault, series, limits)
    assert found is not None
    crossing_ms, sensor = found
    assert sensor == "vibration_rms"
    # Vibration reaches 7.1 mm/s before severity 1, after the fault's start.
    assert fault.start_ms < crossing_ms < fault.start_ms + fault.ramp_ms
    (filled,) = with_crossings(
        scenario.faults, {"pump-001": series}, {"pump-001": model.sensors_of("pump-001")}
    )
    assert (filled.crossing_ms, filled.crossing_sensor) == (crossing_ms, "vibration_rms")
    # The repair: healthy levels again within minutes (temperature lags 90 s).
    repaired = hourly[math.ceil(end_h) + 1 :]
    assert len(repaired) >= 2
    assert abs(repaired.mean() - healthy.mean()) < 0.3
    temperature = series.means["bearing_temp"]
    before = temperature[series.starts_ms < fault.start_ms].mean()
    after = temperature[series.starts_ms >= fault.end_ms + HOUR_MS].mean()
    assert abs(after - before) < 3.0


def test_crossing_on_a_synthetic_series() -> None:
    starts = np.arange(0, 100 * WINDOW_MS, WINDOW_MS, dtype=np.int64)
    ramp = np.linspace(0.0, 10.0, 100)
    pressure = np.full(100, 5.0)
    pressure[60] = 0.5  # falls to its low limit in window 60, before vib's crossing
    pressure[40] = np.nan  # a window without readings
    series = WindowMeans(starts, WINDOW_MS, {"vib": ramp, "pressure": pressure, "free": ramp})
    limits = {
        "vib": OperatingLimits(warn_high=3.0, alarm_high=7.0),
        "pressure": OperatingLimits(alarm_low=1.0),
        "free": OperatingLimits(warn_high=1.0),  # no alarm limit: never a crossing
    }
    fault = Fault(FaultKind.DEGRADATION, Category.PROCESS, "e", 0, 100 * WINDOW_MS)
    first_vib = int(np.argmax(ramp >= 7.0))
    assert first_vib == 70
    assert crossing(fault, series, limits) == (61 * WINDOW_MS, "pressure")
    assert crossing(fault, series, {"vib": limits["vib"]}) == (
        (first_vib + 1) * WINDOW_MS,
        "vib",
    )
    # Only windows that start in [start, end) count.
    late = msgspec.structs.replace(fault, start_ms=65 * WINDOW_MS)
    assert crossing(late, series, {"pressure": limits["pressure"]}) is None
    early = msgspec.structs.replace(fault, end_ms=60 * WINDOW_MS)
    assert crossing(early, series, {"pressure": limits["pressure"]}) is None
    # Two sensors in the same window: the first by name.
    twin = WindowMeans(starts, WINDOW_MS, {"b": ramp, "a": ramp})
    high = OperatingLimits(alarm_high=7.0)
    assert crossing(fault, twin, {"b": high, "a": high}) == ((first_vib + 1) * WINDOW_MS, "a")
    # Other faults pass through; an entity without series gets no crossing.
    other = Fault(FaultKind.BEARING_WEAR, Category.PROCESS, "e", 0, 10)
    missing = msgspec.structs.replace(fault, entity_id="ghost")
    result = with_crossings([other, missing], {"e": series}, {})
    assert result[0] is other
    assert result[1].crossing_ms is None and result[1].crossing_sensor is None


def test_daily_load_is_a_24_hour_cycle(model: TwinModel) -> None:
    # pump-001 alone: its flow follows its own load, with the same draws either way.
    base = _ticking(model, 1, duration_s=48 * 3600.0, rate=0.1)
    flows = []
    for daily in (0.0, 0.2):
        config = replace(base, daily_load=daily)
        scenario = Scenario(model, config)
        assert scenario.tick_ms == 50_000
        flows.append(np.asarray([s.values["flow"] for s in scenario.samples()]))
    t_h = np.arange(len(flows[0])) * 50_000 / HOUR_MS
    difference = flows[1] - flows[0]
    # The difference is (up to the load's clipping) a 24-h sinusoid of 0.2 x nominal flow.
    design = np.column_stack([np.sin(2 * np.pi * t_h / 24), np.cos(2 * np.pi * t_h / 24)])
    coefficients, *_ = np.linalg.lstsq(design, difference, rcond=None)
    fitted = design @ coefficients
    assert np.corrcoef(fitted, difference)[0, 1] > 0.95
    amplitude = float(np.hypot(*coefficients))
    assert 0.2 * 180 * 0.8 < amplitude < 0.2 * 220 * 1.1 * 1.05
    # No trend: both days carry the same load.
    day = len(t_h) // 2
    assert abs(difference[:day].mean() - difference[day:].mean()) < 0.02 * amplitude
    with pytest.raises(Exception, match="daily_load"):
        Scenario(model, replace(base, daily_load=-0.1))
