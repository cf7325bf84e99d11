from pathlib import Path

import pytest
import yaml

from twinflow.errors import ConfigError
from twinflow.twin_model import DerivedMetric, load_twin_model

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"


def _write(tmp_path: Path, document: dict[str, object]) -> Path:
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _example() -> dict[str, object]:
    document = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(document, dict)
    return document


def test_example_plant_is_valid_and_large_enough() -> None:
    model = load_twin_model(EXAMPLE)
    assert len(model.entities) >= 50
    assert {"pump", "motor", "compressor"} <= set(model.asset_types)
    pump = model.by_id["pump-001"]
    assert model.mqtt_topic(pump) == "plant/site-a/line-1/pump-001/telemetry"
    assert model.by_mqtt_topic[model.mqtt_topic(pump)] is pump
    motor = model.by_id["motor-001"]
    assert motor.parent == "pump-001"
    flow = model.sensors_of("pump-001")["flow"]
    assert flow.conversion("l/s") is not None
    assert flow.conversion("l/s").to_canonical(1.0) == pytest.approx(3.6)  # type: ignore[union-attr]
    assert flow.conversion("furlongs") is None
    temp = model.sensors_of("pump-001")["bearing_temp"].conversion("degF")
    assert temp is not None and temp.to_canonical(212.0) == pytest.approx(100.0, abs=1e-4)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["asset_types"]["pump"]["sensors"]["flow"].update(range=[10, 5]),
            r"asset_types\.pump\.sensors\.flow\.range: .*min < max",
        ),
        (
            lambda d: d["asset_types"]["pump"]["sensors"]["vibration_rms"].update(
                limits={"warn_high": 8.0, "alarm_high": 7.1}
            ),
            r"asset_types\.pump\.sensors\.vibration_rms\.limits: warn_high \(8\) must be below "
            r"alarm_high \(7\.1\)",
        ),
        (
            lambda d: d["asset_types"]["pump"]["sensors"]["flow"].update(
                limits={"alarm_low": 20.0, "warn_low": 10.0}
            ),
            r"sensors\.flow\.limits: warn_low \(10\) must be above alarm_low \(20\)",
        ),
        (
            lambda d: d["asset_types"]["pump"]["sensors"]["flow"].update(
                limits={"alarm_low": 300.0, "alarm_high": 200.0}
            ),
            r"sensors\.flow\.limits: the low limits \(300\) must lie below the high limits",
        ),
        (
            lambda d: d["asset_types"]["pump"]["sensors"]["flow"].update(
                limits={"alarm_high": 500.0}
            ),
            r"sensors\.flow: limits\.alarm_high \(500\) must lie inside the range \[0, 400\]",
        ),
        (
            lambda d: d["entities"][3].update(type="pmp"),
            r"entities\[3\] \(motor-002\): unknown asset type 'pmp' "
            r"\(known: compressor, motor, pump\)",
        ),
        (
            lambda d: d["entities"][1].update(id="pump-001"),
            r"entities\[1\] \(pump-001\): duplicate entity id",
        ),
        (
            lambda d: d["entities"][1].update(parent="nobody"),
            r"parent 'nobody' is not an entity",
        ),
        (
            lambda d: d["asset_types"]["pump"]["derived"].update(x={"expression": "flow * rpm"}),
            r"derived\.x: expression uses unknown sensor 'rpm'",
        ),
        (
            lambda d: d["asset_types"]["pump"]["derived"].update(
                x={"expression": "__import__('os')"}
            ),
            r"derived\.x: expression .* may only use",
        ),
        (
            lambda d: d["asset_types"]["pump"]["sensors"]["flow"].update(max_rate=-1),
            r"asset_types\.pump\.sensors\.flow\.max_rate: .*greater than 0",
        ),
        (
            lambda d: d["asset_types"]["pump"]["sensors"]["flow"]["accepted_units"].update(
                {"x": {"factor": 0}}
            ),
            r"accepted_units\.x\.factor: factor must be a finite, non-zero number",
        ),
        (lambda d: d.update(entities=[]), r"entities: .*at least 1"),
        (lambda d: d["entities"][0].update(colour="red"), r"entities\.0\.colour: Extra inputs"),
    ],
)
def test_invalid_model_names_the_field_and_the_reason(
    tmp_path: Path, mutate: object, message: str
) -> None:
    document = _example()
    mutate(document)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        load_twin_model(_write(tmp_path, document))


def test_unreadable_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_twin_model(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("asset_types: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_twin_model(bad)


def test_derived_metric_is_none_when_an_input_is_missing() -> None:
    metric = DerivedMetric(expression="a / b")
    assert metric.evaluate({"a": 1.0, "b": 4.0}) == 0.25
    assert metric.evaluate({"a": 1.0}) is None
    assert metric.evaluate({"a": 1.0, "b": 0.0}) is None
    assert metric.sensors() == {"a", "b"}
