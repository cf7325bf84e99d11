from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from twinflow.coap_map import CoapResource
from twinflow.errors import ConfigError
from twinflow.twin_model import load_twin_model

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
Document = dict[str, Any]


def _example() -> Document:
    document = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(document, dict)
    return document


def _load(tmp_path: Path, document: Document) -> Any:
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_twin_model(path)


def _pump(document: Document) -> Document:
    pump: Document = document["entities"][0]
    assert pump["id"] == "pump-001"
    return pump


def _pump_type(document: Document) -> Document:
    asset: Document = document["asset_types"]["pump"]
    return asset


def test_an_entity_takes_its_asset_types_resources_or_its_own(tmp_path: Path) -> None:
    document = _example()
    _pump_type(document)["coap"] = {
        "flow": {"path": "flow"},
        "bearing_temp": {"path": "temp", "unit": "degF"},
    }
    _pump(document)["coap"] = {"host": "127.0.0.1"}
    document["entities"][2]["coap"] = {
        "host": "127.0.0.1",
        "port": 5700,
        "resources": {"flow": {"path": "p2/flow", "unit": "l/s"}},
    }
    document["entities"][4]["coap"] = {"host": "127.0.0.1", "telemetry": "p3/telemetry"}
    model = _load(tmp_path, document)
    pump = model.by_id["pump-001"]
    assert pump.coap.port == 5683
    assert model.coap_resources(pump) == {
        "flow": CoapResource(path="flow"),
        "bearing_temp": CoapResource(path="temp", unit="degF"),
    }
    assert model.coap_resources(model.by_id["pump-002"]) == {
        "flow": CoapResource(path="p2/flow", unit="l/s")
    }
    assert model.coap_resources(model.by_id["pump-003"]) == {}
    assert model.coap_resources(model.by_id["motor-001"]) == {}


Mutation = Callable[[Document], None]


def _entity_resources(resources: Document) -> Mutation:
    def mutate(document: Document) -> None:
        _pump(document)["coap"] = {"host": "127.0.0.1", "resources": resources}

    return mutate


def _type_resources(resources: Document) -> Mutation:
    def mutate(document: Document) -> None:
        _pump_type(document)["coap"] = resources

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            _entity_resources({"rpm": {"path": "rpm"}}),
            r"entities\[0\] \(pump-001\)\.coap\.resources\.rpm: not a sensor of the asset type",
        ),
        (
            _type_resources({"rpm": {"path": "rpm"}}),
            r"asset_types\.pump: .*coap\.rpm: not a sensor of the asset type",
        ),
        (
            _entity_resources({"bearing_temp": {"path": "t", "unit": "furlongs"}}),
            r"coap\.resources\.bearing_temp\.unit 'furlongs' is not a unit of the sensor "
            r"\(known: degC, degF, K\)",
        ),
        (
            _type_resources({"flow": {"path": "f", "unit": "bar"}}),
            r"asset_types\.pump: .*coap\.flow\.unit 'bar' is not a unit of the sensor",
        ),
        (
            lambda d: _pump(d).update(
                coap={
                    "host": "127.0.0.1",
                    "telemetry": "all",
                    "resources": {"flow": {"path": "flow"}},
                }
            ),
            r"entities\.0\.coap: .*either telemetry \(one JSON resource\) or resources, not both",
        ),
        (
            _entity_resources({"flow": {"path": "same"}, "bearing_temp": {"path": "same"}}),
            r"coap\.resources\.bearing_temp: path 'same' is also flow's",
        ),
        (
            _type_resources({"flow": {"path": "same"}, "bearing_temp": {"path": "same"}}),
            r"asset_types\.pump: .*coap\.bearing_temp: path 'same' is also flow's",
        ),
        (
            lambda d: _pump(d).update(coap={"host": "127.0.0.1"}),
            r"entities\[0\] \(pump-001\)\.coap: neither telemetry nor resources, and asset "
            r"type 'pump' gives no coap resources either",
        ),
        (_entity_resources({}), r"entities\[0\] \(pump-001\)\.coap\.resources maps no sensor"),
        (_type_resources({}), r"asset_types\.pump: .*coap maps no sensor"),
        (
            _entity_resources({"flow": {"path": "/flow"}}),
            r"entities\.0\.coap\.resources\.flow\.path: String should match pattern",
        ),
        (
            lambda d: _pump(d).update(coap={"host": "127.0.0.1", "telemetry": "a//b"}),
            r"entities\.0\.coap\.telemetry: String should match pattern",
        ),
        (
            lambda d: _pump(d).update(coap={"host": "127.0.0.1", "port": 0, "telemetry": "t"}),
            r"entities\.0\.coap\.port: Input should be greater than or equal to 1",
        ),
        (
            lambda d: _pump(d).update(coap={"host": "", "telemetry": "t"}),
            r"entities\.0\.coap\.host: String should have at least 1 character",
        ),
        (
            _entity_resources({"flow": {"path": "flow", "colour": "red"}}),
            r"entities\.0\.coap\.resources\.flow\.colour: Extra inputs are not permitted",
        ),
    ],
)
def test_an_invalid_coap_map_names_the_field_and_the_reason(
    tmp_path: Path, mutate: Mutation, message: str
) -> None:
    document = _example()
    mutate(document)
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, document)
