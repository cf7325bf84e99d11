"""The twin model's Modbus maps: what loads, and what is refused naming the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from twinflow.errors import ConfigError
from twinflow.twin_model import load_twin_model

_SENSOR = {"max_rate": 100, "stuck_after_s": 30}
PLANT: dict[str, Any] = {
    "version": 1,
    "asset_types": {
        "pump": {
            "sensors": {
                "flow": {"unit": "m3/h", "range": [0, 400], **_SENSOR},
                "pressure": {
                    "unit": "bar",
                    "accepted_units": {"kPa": {"factor": 0.01}},
                    "range": [0, 25],
                    **_SENSOR,
                },
                "temp": {
                    "unit": "degC",
                    "accepted_units": {"degF": {"factor": 0.5555556, "offset": -17.7777778}},
                    "range": [-20, 150],
                    **_SENSOR,
                },
            },
            "modbus": {
                "flow": {"kind": "holding", "address": 0, "type": "float32"},
                "pressure": {"kind": "holding", "address": 2, "scale": 0.01},
                "temp": {"kind": "input", "address": 0, "type": "int16", "unit": "degF"},
            },
        },
    },
    "entities": [
        {
            "id": "pump-1",
            "type": "pump",
            "site": "s",
            "line": "l",
            "modbus": {"host": "127.0.0.1", "port": 5020, "unit_id": 1},
        },
        {
            "id": "pump-2",
            "type": "pump",
            "site": "s",
            "line": "l",
            "modbus": {
                "host": "127.0.0.1",
                "port": 5020,
                "unit_id": 2,
                "registers": {"flow": {"kind": "input", "address": 9, "type": "uint32"}},
            },
        },
        {"id": "pump-3", "type": "pump", "site": "s", "line": "l"},
    ],
}


def _load(tmp_path: Path, document: dict[str, Any]) -> Any:
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_twin_model(path)


def test_an_entity_reads_its_asset_types_layout_unless_it_gives_its_own(tmp_path: Path) -> None:
    model = _load(tmp_path, PLANT)
    shared = model.modbus_layout(model.by_id["pump-1"])
    assert set(shared) == {"flow", "pressure", "temp"}
    assert shared["temp"].unit == "degF" and shared["pressure"].scale == 0.01
    own = model.modbus_layout(model.by_id["pump-2"])
    assert set(own) == {"flow"} and own["flow"].type == "uint32"
    assert model.modbus_layout(model.by_id["pump-3"]) == {}


def _pump(document: dict[str, Any]) -> dict[str, Any]:
    pump: dict[str, Any] = document["asset_types"]["pump"]
    return pump


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(
            lambda d: _pump(d)["modbus"]["pressure"].update(address=1),
            r"asset_types\.pump: .*modbus\.pressure: holding register 1 is also flow's",
            id="overlapping registers of the asset type",
        ),
        pytest.param(
            lambda d: d["entities"][1]["modbus"]["registers"].update(
                temp={"kind": "input", "address": 10, "type": "int16"}
            ),
            r"entities\[1\] \(pump-2\)\.modbus\.registers\.temp: input register 10 is also "
            r"flow's",
            id="overlapping registers of an entity",
        ),
        pytest.param(
            lambda d: _pump(d)["modbus"].update(rpm={"kind": "holding", "address": 50}),
            r"modbus\.rpm: not a sensor of the asset type",
            id="unknown sensor",
        ),
        pytest.param(
            lambda d: _pump(d)["modbus"]["pressure"].update(unit="psi"),
            r"modbus\.pressure\.unit 'psi' is not a unit of the sensor \(known: bar, kPa\)",
            id="a unit the sensor does not accept",
        ),
        pytest.param(
            lambda d: _pump(d).pop("modbus"),
            r"entities\[0\] \(pump-1\)\.modbus: no registers, and asset type 'pump' gives no "
            r"modbus layout either",
            id="no layout",
        ),
        pytest.param(
            lambda d: d["entities"][1]["modbus"].update(unit_id=1),
            r"entities\[1\] \(pump-2\)\.modbus: unit 1 at 127\.0\.0\.1:5020 is already pump-1's",
            id="duplicate unit on one host:port",
        ),
        pytest.param(
            lambda d: _pump(d).update(modbus={}),
            r"asset_types\.pump: .*modbus maps no sensor",
            id="an empty layout",
        ),
        pytest.param(
            lambda d: _pump(d)["modbus"]["flow"].update(address=65535),
            r"a float32 at address 65535 runs past the last register",
            id="a register past the end",
        ),
        pytest.param(
            lambda d: _pump(d)["modbus"]["flow"].update(scale=0),
            r"modbus\.flow\.scale: .*scale must not be 0",
            id="a zero scale",
        ),
        pytest.param(
            lambda d: _pump(d)["modbus"]["flow"].update(type="float64"),
            r"modbus\.flow\.type: Input should be 'int16', 'uint16', 'int32', 'uint32' or "
            r"'float32'",
            id="an unknown type",
        ),
    ],
)
def test_an_invalid_map_is_refused_naming_the_field(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], object], message: str
) -> None:
    document = copy.deepcopy(PLANT)
    mutate(document)
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, document)


def test_the_same_unit_id_on_another_port_is_another_device(tmp_path: Path) -> None:
    document = copy.deepcopy(PLANT)
    document["entities"][1]["modbus"].update(unit_id=1, port=5021)
    model = _load(tmp_path, document)
    assert model.by_id["pump-2"].modbus.port == 5021
