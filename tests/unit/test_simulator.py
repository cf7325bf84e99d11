import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from schemas.control import Command
from schemas.raw import SchemaError, decode_raw
from twinflow.bridges.routing import Forward, Reject, route
from twinflow.errors import ConfigError
from twinflow.sim.actuators import Actuators, Outcome
from twinflow.sim.faults import Category, FaultKind, FaultPlan
from twinflow.sim.messages import DataFaultPlan, MessageEncoder, Tally
from twinflow.sim.physics import RAMP_S
from twinflow.sim.samples import Sample
from twinflow.sim.scenario import Scenario, ScenarioConfig
from twinflow.twin_model import TwinModel, load_twin_model

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
START_MS = 1_793_000_000_000


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return load_twin_model(EXAMPLE)


def _config(**changes: object) -> ScenarioConfig:
    base: dict[str, object] = {"start_ms": START_MS, "duration_s": 300.0, "rate": 600.0, "seed": 3}
    base.update(changes)
    return ScenarioConfig(**base)  # type: ignore[arg-type]


def test_same_seed_same_samples_and_faults(model: TwinModel) -> None:
    first, second = Scenario(model, _config()), Scenario(model, _config())
    assert first.faults == second.faults
    assert list(first.samples()) == list(second.samples())
    other = Scenario(model, _config(seed=4))
    assert next(iter(other.samples())) != next(iter(first.samples()))


def test_rate_entities_and_duration_are_honoured(model: TwinModel) -> None:
    scenario = Scenario(model, _config(entities=10, rate=500.0, duration_s=120.0))
    samples = list(scenario.samples())
    readings = sum(len(s.values) + len(s.dropped) for s in samples)
    assert {s.entity_id for s in samples} == {e.id for e in model.entities[:10]}
    assert readings == pytest.approx(500 * 120, rel=0.02)
    timestamps = [s.ts_ms for s in samples]
    assert timestamps == sorted(timestamps)
    assert timestamps[0] >= START_MS and timestamps[-1] < START_MS + 120_000


def test_bad_scenario_options_are_refused(model: TwinModel) -> None:
    with pytest.raises(ConfigError, match="--entities 999: the twin model has 60"):
        Scenario(model, _config(entities=999))


def test_signals_are_plausible_and_correlated(model: TwinModel) -> None:
    # pump-001 and motor-001, the motor driving the pump.
    scenario = Scenario(
        model, _config(entities=2, rate=20.0, duration_s=1800.0, faults=FaultPlan(0.0, 0.0))
    )
    flow, current, pressure = [], [], []
    motor_current: list[float] = []
    pump_flow_at_motor_tick: list[float] = []
    last_flow = 0.0
    for sample in scenario.samples():
        specs = model.sensors_of(sample.entity_id)
        for sensor, value in sample.values.items():
            low, high = specs[sensor].range
            assert low <= value <= high, (sample.entity_id, sensor, value)
        if sample.entity_id == "pump-001":
            flow.append(sample.values["flow"])
            current.append(sample.values["motor_current"])
            pressure.append(sample.values["discharge_pressure"])
            last_flow = sample.values["flow"]
        elif sample.entity_id == "motor-001":  # drives pump-001
            motor_current.append(sample.values["current"])
            pump_flow_at_motor_tick.append(last_flow)
    # The pump curve: more flow, less head; more hydraulic work, more current.
    assert np.corrcoef(flow, pressure)[0, 1] < -0.5
    assert np.corrcoef(flow, current)[0, 1] > 0.5
    # A motor follows the load of the pump it drives.
    assert np.corrcoef(pump_flow_at_motor_tick, motor_current)[0, 1] > 0.8


def test_process_faults_move_the_physics(model: TwinModel) -> None:
    config = _config(entities=10, rate=100.0, duration_s=1800.0, faults=FaultPlan(1.0, 0.0))
    scenario = Scenario(model, config)
    wear = next(f for f in scenario.faults if f.kind is FaultKind.BEARING_WEAR)
    sensor = "vibration_rms"
    before, late = [], []
    for sample in scenario.samples():
        if sample.entity_id != wear.entity_id:
            continue
        if sample.ts_ms < wear.start_ms:
            before.append(sample.values[sensor])
        elif wear.end_ms - (wear.end_ms - wear.start_ms) // 4 < sample.ts_ms < wear.end_ms:
            late.append(sample.values[sensor])
    assert before and late
    assert np.mean(late) > np.mean(before) + 3.0


def test_sensor_faults_are_applied_and_labeled(model: TwinModel) -> None:
    scenario = Scenario(
        model, _config(rate=150.0, duration_s=900.0, faults=FaultPlan(0.0, 1.0), seed=5)
    )
    faults = {(f.entity_id, f.sensor): f for f in scenario.faults}
    assert all(f.category is Category.SENSOR for f in faults.values())
    kinds = Counter(f.kind for f in faults.values())
    assert set(kinds) == {
        FaultKind.STUCK,
        FaultKind.SPIKE,
        FaultKind.DROPOUT,
        FaultKind.DRIFT,
        FaultKind.UNIT_CHANGE,
    }
    stuck_values: dict[tuple[str, str], set[float]] = {}
    spikes_seen = 0
    for sample in scenario.samples():
        for (entity, sensor), fault in faults.items():
            if entity != sample.entity_id or not fault.active(sample.ts_ms):
                continue
            assert sensor is not None
            if fault.kind is FaultKind.STUCK:
                stuck_values.setdefault((entity, sensor), set()).add(sample.values[sensor])
            elif fault.kind is FaultKind.DROPOUT:
                assert sensor not in sample.values and sensor in sample.dropped
            elif fault.kind is FaultKind.UNIT_CHANGE:
                assert (
                    sample.reported_units[sensor] in model.sensors_of(entity)[sensor].accepted_units
                )
            elif fault.kind is FaultKind.SPIKE:
                spikes_seen += 1
    assert stuck_values and all(len(values) == 1 for values in stuck_values.values())
    assert spikes_seen == kinds[FaultKind.SPIKE]


def test_encoder_injects_labeled_data_faults_the_bridge_recognises(model: TwinModel) -> None:
    scenario = Scenario(model, _config(duration_s=100.0, rate=1500.0))
    plan = DataFaultPlan(
        duplicate=0.02, out_of_order=0.02, late=0.02, malformed=0.02, unknown_entity=0.02
    )
    encoder = MessageEncoder(model, plan, seed=3)
    tally = Tally()
    identities: Counter[tuple[str, int]] = Counter()
    for emission in encoder.emissions(scenario.samples(), scenario.tick_ms):
        tally.add(emission)
        decision = route(emission.topic, emission.payload, model)
        if emission.expected_reason is not None:
            assert isinstance(decision, Reject)
            assert decision.reason == emission.expected_reason
        else:
            assert isinstance(decision, Forward)
            message = decode_raw(emission.payload)
            assert message.seq is not None
            identities[(message.entity_id, message.seq)] += 1
    counts = tally.as_dict()
    assert set(counts["data_faults"]) == {
        "duplicate",
        "out_of_order",
        "late",
        "malformed",
        "unknown_entity",
    }
    assert sum(1 for n in identities.values() if n == 2) == counts["data_faults"]["duplicate"]
    assert len(identities) == counts["valid_messages"]
    assert len(encoder.data_faults) == sum(counts["data_faults"].values())


def test_unit_change_payloads_convert_back_to_canonical(model: TwinModel) -> None:
    scenario = Scenario(
        model, _config(rate=150.0, duration_s=900.0, faults=FaultPlan(0.0, 1.0), seed=5)
    )
    encoder = MessageEncoder(
        model,
        DataFaultPlan(duplicate=0, out_of_order=0, late=0, malformed=0, unknown_entity=0),
        seed=5,
    )
    checked = 0
    for sample in scenario.samples():
        if not sample.reported_units:
            continue
        for emission in encoder.feed(sample, scenario.tick_ms):
            message = decode_raw(emission.payload)
            for sensor, value, unit in message.readings():
                spec = model.sensors_of(sample.entity_id)[sensor]
                conversion = spec.conversion(unit)
                assert conversion is not None
                assert conversion.to_canonical(value) == pytest.approx(
                    sample.values[sensor], rel=1e-5
                )
                checked += unit is not None
    assert checked > 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"entity_id":"pump-001","sensor":"flow","ts":1,"value":1', "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b'{"entity_id":"pump-001","sensor":"flow","ts":1,"value":NaN}', "bad_json"),
        (b'{"entity_id":"pump-001","sensor":"flow","ts":1,"value":"1"}', "schema"),
        (b'{"entity_id":"pump-001","sensor":"flow","ts":1,"value":1e999}', "schema"),
        (b'{"entity_id":"pump-001","sensor":"flow","value":1}', "schema"),
        (b'{"entity_id":"pump-001","sensor":"flow","ts":1}', "bad_form"),
        (b'{"entity_id":"pump-001","ts":1,"values":{}}', "bad_form"),
        (b'{"entity_id":"pump-001","sensor":"flow","ts":1,"value":1,"values":{"a":1}}', "bad_form"),
        (
            b'{"entity_id":"pump-001","sensor":"flow","ts":"2026-01-01T00:00:00","value":1}',
            "bad_timestamp",
        ),
        (b'{"entity_id":"pump-001","sensor":"flow","ts":-5,"value":1}', "bad_timestamp"),
        (
            b'{"entity_id":"pump-001","sensor":"flow","ts":99999999999999,"value":1}',
            "bad_timestamp",
        ),
    ],
)
def test_raw_contract_rejects_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(SchemaError) as caught:
        decode_raw(payload)
    assert caught.value.reason == reason


def test_raw_timestamps_normalise_to_utc() -> None:
    message = decode_raw(
        b'{"entity_id":"e","sensor":"s","ts":"2026-01-01T02:00:00.250+02:00","value":1}'
    )
    assert message.ts_ms == 1_767_225_600_250
    batched = decode_raw(
        b'{"entity_id":"e","ts":1767225600250,"values":{"a":1,"b":2.5},"units":{"b":"kPa"}}'
    )
    assert batched.ts_ms == 1_767_225_600_250
    assert batched.readings() == [("a", 1.0, None), ("b", 2.5, "kPa")]


# --- setpoints -------------------------------------------------------------------------

COMMAND_AT_MS = START_MS + 300_000


def _digest(samples: list[Sample]) -> str:
    return hashlib.sha256(
        repr(
            [(s.entity_id, s.ts_ms, s.values, s.dropped, s.reported_units) for s in samples]
        ).encode()
    ).hexdigest()


def test_default_setpoints_leave_every_signal_exactly_as_before(model: TwinModel) -> None:
    # Pinned from the simulator before machines took setpoints: seeded benchmarks and
    # golden runs rely on the defaults giving the very same bits. (A NumPy release that
    # changed its Gaussian stream would move these too.)
    scenario = Scenario(model, _config())
    samples = list(scenario.samples())
    assert samples[0].entity_id == "pump-001"
    assert samples[0].values == {
        "flow": 110.06039747498092,
        "discharge_pressure": 11.370160339913774,
        "motor_current": 87.75947994906076,
        "vibration_rms": 2.0197178494088512,
        "bearing_temp": 48.13196002254461,
    }
    assert samples[1].values["speed"] == 2939.648488783762
    assert _digest(samples) == "f5c0d04b3787e6aa91f4bece55e4184acccb7fcc3788d39358ba30db3867793e"
    defaults = Actuators(model, [entity.id for entity in scenario.entities])
    assert list(scenario.samples(defaults)) == samples
    assert defaults.counts()["applied"] == 0


def _command(entity_id: str, setpoint: str, value: float | bool) -> Command:
    return Command(
        command_id=f"{entity_id}-{setpoint}",
        entity_id=entity_id,
        setpoint=setpoint,
        value=value,
        issued_ms=COMMAND_AT_MS,
        expires_ms=COMMAND_AT_MS + 60_000,
        user="test",
    )


def _with_command(model: TwinModel, command: Command) -> tuple[list[Sample], list[Sample]]:
    """Samples of pump-001 and its motor-001 without and with ``command``, applied once the
    sample at :data:`COMMAND_AT_MS` was taken (as the simulator applies one between two)."""
    config = _config(entities=2, rate=20.0, duration_s=600.0, faults=FaultPlan(0.0, 0.0))
    baseline = list(Scenario(model, config).samples())
    actuators = Actuators(model, ["pump-001", "motor-001"])
    commanded = []
    for sample in Scenario(model, config).samples(actuators):
        commanded.append(sample)
        if sample.ts_ms == COMMAND_AT_MS:
            assert actuators.apply(command, COMMAND_AT_MS) is Outcome.APPLIED
    return baseline, commanded


def _values(samples: list[Sample], entity_id: str, sensor: str, since_ms: int) -> np.ndarray:
    return np.array(
        [s.values[sensor] for s in samples if s.entity_id == entity_id and s.ts_ms >= since_ms]
    )


def test_a_lower_pump_speed_lowers_flow_pressure_and_current(model: TwinModel) -> None:
    baseline, slower = _with_command(model, _command("pump-001", "speed", 1000.0))
    s = 1000.0 / 1480.0
    before = [x for x in slower if x.ts_ms <= COMMAND_AT_MS]
    assert before == baseline[: len(before)]  # the past is untouched
    assert all(x.setpoints == {"speed": 1480.0} for x in before if x.entity_id == "pump-001")
    after = [x for x in slower if x.ts_ms > COMMAND_AT_MS]
    assert all(x.setpoints == {"speed": 1000.0} for x in after if x.entity_id == "pump-001")
    assert all(x.setpoints == {"enable": True} for x in after if x.entity_id == "motor-001")

    settled = COMMAND_AT_MS + 10_000

    def ratio(entity_id: str, sensor: str) -> float:
        new = _values(slower, entity_id, sensor, settled)
        old = _values(baseline, entity_id, sensor, settled)
        return float(new.mean() / old.mean())

    # Affinity laws: flow ~ s, head ~ s², power ~ s³ over the no-load current.
    assert ratio("pump-001", "flow") == pytest.approx(s, rel=0.03)
    assert ratio("pump-001", "discharge_pressure") == pytest.approx(s**2, rel=0.05)
    assert s**3 < ratio("pump-001", "motor_current") < 0.7
    # The motor driving the pump turns slower and carries less load.
    assert ratio("motor-001", "speed") == pytest.approx(s, rel=0.01)
    assert ratio("motor-001", "current") < 0.7
    assert ratio("motor-001", "voltage") == pytest.approx(1.0, abs=0.01)


def test_a_new_setpoint_is_a_level_shift_within_seconds(model: TwinModel) -> None:
    baseline, slower = _with_command(model, _command("pump-001", "speed", 1000.0))
    s = 1000.0 / 1480.0

    def speed_ratio(ts_ms: int) -> float:
        (new,) = _values([x for x in slower if x.ts_ms == ts_ms], "motor-001", "speed", 0)
        (old,) = _values([x for x in baseline if x.ts_ms == ts_ms], "motor-001", "speed", 0)
        return float(new / old)

    motor_ticks = sorted(
        x.ts_ms for x in slower if x.entity_id == "motor-001" and x.ts_ms > COMMAND_AT_MS
    )
    # The first tick after the command is on the way, ramping; within RAMP_S it is there.
    assert s + 0.02 < speed_ratio(motor_ticks[0]) < 0.99
    ramped = [ts for ts in motor_ticks if ts >= COMMAND_AT_MS + RAMP_S * 1000]
    assert all(speed_ratio(ts) == pytest.approx(s, abs=0.005) for ts in ramped[:100])


def test_a_disabled_motor_stops_and_cools_down(model: TwinModel) -> None:
    baseline, stopped = _with_command(model, _command("motor-001", "enable", False))
    settled = COMMAND_AT_MS + int(RAMP_S * 1000) + 1_000
    assert _values(stopped, "motor-001", "current", settled).max() < 2.5
    assert _values(stopped, "motor-001", "speed", settled).max() < 6.0
    assert _values(stopped, "motor-001", "vibration_rms", settled).max() < 0.25
    voltage = _values(stopped, "motor-001", "voltage", settled).mean()
    assert voltage == pytest.approx(400.0, abs=1.0)  # the mains stay on
    # Temperatures fall with their lags, towards ambient and not below it.
    winding = _values(stopped, "motor-001", "winding_temp", COMMAND_AT_MS)
    assert winding[0] > 60.0 and 25.0 < winding[-1] < 35.0
    assert winding[-1] < _values(baseline, "motor-001", "winding_temp", COMMAND_AT_MS)[-1] - 25
    # The pump turns with its motor: it stops too (its flow meter reads noise, ~2 m3/h).
    assert _values(stopped, "pump-001", "flow", settled).mean() < 2.0
    assert _values(stopped, "pump-001", "motor_current", settled).max() < 2.5
    assert all(
        x.setpoints == {"enable": False}
        for x in stopped
        if x.entity_id == "motor-001" and x.ts_ms > COMMAND_AT_MS
    )


def test_telemetry_reports_the_setpoints_in_every_message(model: TwinModel) -> None:
    scenario = Scenario(model, _config(duration_s=30.0, rate=1500.0))
    encoder = MessageEncoder(
        model,
        DataFaultPlan(duplicate=0, out_of_order=0, late=0, malformed=0, unknown_entity=0),
        seed=3,
    )
    forms: Counter[tuple[str, bool]] = Counter()
    for emission in encoder.emissions(scenario.samples(), scenario.tick_ms):
        message = decode_raw(emission.payload)
        kind = model.by_id[message.entity_id].type
        expected = {"pump": {"speed": 1480.0}, "motor": {"enable": True}}.get(kind)
        assert message.reported == expected
        forms[(kind, message.values is not None)] += 1
    assert {kind for kind, _batched in forms} == {"pump", "motor", "compressor"}
    assert {batched for _kind, batched in forms} == {True, False}
