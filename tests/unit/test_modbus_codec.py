"""Planning the reads of a Modbus map and decoding what a device answers."""

from __future__ import annotations

import copy
import itertools
import json
import math
import struct
from pathlib import Path

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from schemas.raw import RawReading, Reason, decode_raw
from tests.unit.test_modbus_map import PLANT
from twinflow.bridges.modbus import run
from twinflow.bridges.modbus_codec import (
    DeviceAddress,
    ReadRange,
    Rejected,
    decode,
    plan_reads,
    polled_devices,
    raw_value,
    refused,
)
from twinflow.errors import ConfigError
from twinflow.modbus_map import WIDTH, ModbusRegister, RegisterType
from twinflow.settings import ModbusSettings, Settings
from twinflow.sim.modbus_server import encode_value
from twinflow.twin_model import load_twin_model

DEVICE = DeviceAddress("127.0.0.1", 5020, 3)


def _r(kind: str = "holding", address: int = 0, **fields: object) -> ModbusRegister:
    return ModbusRegister.model_validate({"kind": kind, "address": address, **fields})


def _labels(reads: tuple[ReadRange, ...]) -> list[str]:
    return [read.label for read in reads]


# --- planning --------------------------------------------------------------------------


def test_adjacent_registers_of_one_kind_are_one_read() -> None:
    layout = {
        "a": _r(address=10, type="float32"),
        "b": _r(address=12),
        "c": _r(address=13, type="int32"),
    }
    (read,) = plan_reads(layout, dict.fromkeys(layout, "V"))
    assert (read.kind, read.address, read.count) == ("holding", 10, 5)
    assert [item.sensor for item in read.sensors] == ["a", "b", "c"]


def test_a_gap_up_to_max_gap_is_read_through_and_a_longer_one_splits() -> None:
    layout = {"a": _r(address=0), "b": _r(address=4), "c": _r(address=9)}
    units = dict.fromkeys(layout, "V")
    assert _labels(plan_reads(layout, units, max_gap=4)) == ["holding 0-9"]
    assert _labels(plan_reads(layout, units, max_gap=3)) == ["holding 0-4", "holding 9"]
    assert _labels(plan_reads(layout, units, max_gap=2)) == ["holding 0", "holding 4", "holding 9"]
    assert _labels(plan_reads(layout, units, max_gap=0)) == ["holding 0", "holding 4", "holding 9"]


def test_holding_and_input_registers_are_never_read_together() -> None:
    layout = {"h": _r("holding", 5), "i": _r("input", 5), "j": _r("input", 6)}
    reads = plan_reads(layout, dict.fromkeys(layout, "V"))
    assert _labels(reads) == ["holding 5", "input 5-6"]


def test_a_read_never_exceeds_max_registers_nor_splits_a_32_bit_value() -> None:
    layout = {f"s{i}": _r(address=2 * i, type="float32") for i in range(70)}
    reads = plan_reads(layout, dict.fromkeys(layout, "V"))
    assert [read.count for read in reads] == [124, 16]
    assert reads[1].address == 124
    layout = {"a": _r(address=0), "b": _r(address=3, type="uint32")}
    assert _labels(plan_reads(layout, dict.fromkeys(layout, "V"), max_registers=4)) == [
        "holding 0",
        "holding 3-4",
    ]


def test_a_register_wider_than_a_read_is_refused() -> None:
    with pytest.raises(ValueError, match=r"x: a float32 takes 2 registers, more than the 1"):
        plan_reads({"x": _r(type="float32")}, {"x": "V"}, max_registers=1)
    with pytest.raises(ValueError, match=r"max_registers must lie in \[1, 125\]"):
        plan_reads({"x": _r()}, {"x": "V"}, max_registers=126)
    with pytest.raises(ValueError, match=r"max_gap must not be negative"):
        plan_reads({"x": _r()}, {"x": "V"}, max_gap=-1)


def test_a_sensor_reads_in_its_registers_unit_else_its_canonical_one() -> None:
    layout = {"t": _r(unit="degF"), "p": _r(address=1)}
    (read,) = plan_reads(layout, {"t": "degC", "p": "bar"})
    assert {item.sensor: item.unit for item in read.sensors} == {"t": "degF", "p": "bar"}


_TYPES: list[RegisterType] = ["int16", "uint16", "int32", "uint32", "float32"]


@st.composite
def _layouts(draw: st.DrawFn) -> dict[str, ModbusRegister]:
    layout: dict[str, ModbusRegister] = {}
    taken: set[tuple[str, int]] = set()
    for index in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(["holding", "input"]))
        kind_type = draw(st.sampled_from(_TYPES))
        address = draw(st.integers(0, 400))
        span = {(kind, address + offset) for offset in range(WIDTH[kind_type])}
        if span & taken or address + WIDTH[kind_type] > 65536:
            continue
        taken |= span
        layout[f"s{index}"] = _r(kind, address, type=kind_type)
    return layout


@given(_layouts(), st.integers(2, 125), st.integers(0, 20))
def test_every_register_is_read_once_within_the_limits(
    layout: dict[str, ModbusRegister], max_registers: int, max_gap: int
) -> None:
    reads = plan_reads(
        layout, dict.fromkeys(layout, "V"), max_registers=max_registers, max_gap=max_gap
    )
    seen = [item.sensor for read in reads for item in read.sensors]
    assert sorted(seen) == sorted(layout)
    for read in reads:
        assert 1 <= read.count <= max_registers
        ends = []
        for item in read.sensors:
            register = item.register
            assert register.kind == read.kind
            assert read.address <= register.address
            assert register.address + register.width <= read.address + read.count
            ends.append((register.address, register.address + register.width))
        # Inside a read, no stretch of unmapped registers is longer than max_gap.
        for (_, end), (start, _) in itertools.pairwise(ends):
            assert start - end <= max_gap
        assert ends[0][0] == read.address and ends[-1][1] == read.address + read.count
    # Two reads of a kind are not joinable: too far apart, or too long together.
    for before, after in itertools.pairwise(reads):
        if before.kind == after.kind:
            gap = after.address - (before.address + before.count)
            first = after.sensors[0].register
            assert gap > max_gap or first.address + first.width - before.address > max_registers


# --- decoding --------------------------------------------------------------------------


def _decode_one(register: ModbusRegister, words: list[int], unit: str = "V") -> RawReading:
    (read,) = plan_reads({"s": register}, {"s": unit})
    (outcome,) = decode(read, words, "pump-1", DEVICE, 1_767_225_600_000)
    assert isinstance(outcome, RawReading)
    return outcome


@pytest.mark.parametrize(
    ("fields", "words", "value"),
    [
        ({"type": "uint16"}, [0xFFFF], 65535.0),
        ({"type": "int16"}, [0xFFFF], -1.0),
        ({"type": "int16"}, [0x7FFF], 32767.0),
        ({"type": "int16"}, [0x8000], -32768.0),
        ({"type": "uint32"}, [0x0001, 0x0002], 65538.0),
        ({"type": "uint32", "word_order": "little"}, [0x0002, 0x0001], 65538.0),
        ({"type": "int32"}, [0xFFFF, 0xFFFE], -2.0),
        ({"type": "int32", "word_order": "little"}, [0xFFFE, 0xFFFF], -2.0),
        ({"type": "int32"}, [0x8000, 0x0000], -(2.0**31)),
        ({"type": "float32"}, [0x4049, 0x0FDB], struct.unpack(">f", b"\x40\x49\x0f\xdb")[0]),
        ({"type": "float32", "word_order": "little"}, [0x0000, 0xC2C8], -100.0),
        ({"type": "int16", "scale": 0.1, "offset": -40}, [500], 10.0),
        ({"type": "uint16", "scale": 0.01}, [1234], 12.34),
        ({"type": "float32", "scale": 2, "offset": 1}, [0x3FC0, 0], 4.0),
    ],
)
def test_each_type_and_word_order_decodes_to_raw_times_scale_plus_offset(
    fields: dict[str, object], words: list[int], value: float
) -> None:
    register = _r(**fields)
    reading = _decode_one(register, words)
    expected = raw_value(register, words) * register.scale + register.offset
    assert reading.value == expected
    assert reading.value == pytest.approx(value, rel=1e-12)


def test_a_reading_is_a_valid_single_form_raw_message() -> None:
    reading = _decode_one(_r(address=40, type="int16", unit="degF"), [0xFFF6], unit="degC")
    message = decode_raw(msgspec.json.encode(reading))
    assert (message.entity_id, message.sensor, message.ts_ms) == ("pump-1", "s", 1_767_225_600_000)
    assert (message.value, message.unit, message.quality) == (-10.0, "degF", "good")
    assert message.source == "modbus:127.0.0.1:5020/3:holding:40"


def test_every_value_of_a_read_takes_the_polls_ts_and_its_own_words() -> None:
    layout = {
        "a": _r(address=10),
        "b": _r(address=13, type="float32", word_order="little"),
        "c": _r(address=16, type="int16"),
    }
    (read,) = plan_reads(layout, dict.fromkeys(layout, "V"))
    words = [7, 0xDEAD, 0xBEEF, 0x0000, 0x4120, 0xBEEF, 0xFFFF]
    outcomes = decode(read, words, "e", DEVICE, 42)
    assert [(o.sensor, o.value, o.ts) for o in outcomes if isinstance(o, RawReading)] == [
        ("a", 7.0, 42),
        ("b", 10.0, 42),
        ("c", -1.0, 42),
    ]


@pytest.mark.parametrize(
    ("fields", "words", "shown"),
    [
        ({"type": "float32"}, [0x7FC0, 0x0000], "nan"),
        ({"type": "float32"}, [0xFF80, 0x0000], "-inf"),
        ({"type": "float32", "word_order": "little"}, [0x0000, 0x7F80], "inf"),
        ({"type": "float32", "scale": 1e300}, [0x7F7F, 0xFFFF], "inf"),
    ],
)
def test_a_value_that_is_not_finite_is_a_dead_letter_not_a_reading(
    fields: dict[str, object], words: list[int], shown: str
) -> None:
    register = _r("input", 7, **fields)
    (read,) = plan_reads({"a": _r("input", 5), "t": register}, {"a": "V", "t": "K"})
    outcomes = decode(read, [1, 0, *words], "oven-1", DEVICE, 99)
    assert isinstance(outcomes[0], RawReading) and outcomes[0].value == 1.0
    letter = outcomes[1]
    assert isinstance(letter, Rejected)
    assert letter.reason is Reason.NON_FINITE
    assert letter.address == "input 7-8"
    assert letter.detail.startswith(f"t is {shown} (float32 words ")
    assert json.loads(letter.payload) == {
        "entity_id": "oven-1",
        "ts": 99,
        "device": "127.0.0.1:5020/3",
        "kind": "input",
        "address": 7,
        "count": 2,
        "sensor": "t",
        "registers": words,
    }


def test_too_few_words_are_refused() -> None:
    (read,) = plan_reads({"a": _r(type="uint32")}, {"a": "V"})
    with pytest.raises(ValueError, match=r"holding 0-1 needs 2 words, got 1"):
        decode(read, [1], "e", DEVICE, 1)


def test_an_exception_response_is_one_dead_letter_naming_the_code_and_registers() -> None:
    layout = {"a": _r("input", 500), "b": _r("input", 502, type="float32")}
    (read,) = plan_reads(layout, dict.fromkeys(layout, "V"))
    letter = refused(read, 2, "pump-1", DEVICE, 7)
    assert letter.reason is Reason.DEVICE_EXCEPTION
    assert letter.address == "input 500-503"
    assert letter.detail == (
        "127.0.0.1:5020/3 answered reading input 500-503 (a, b) with exception 2 "
        "(IllegalDataAddress)"
    )
    assert json.loads(letter.payload)["exception_code"] == 2
    assert "unknown" in refused(read, 99, "pump-1", DEVICE, 7).detail


# --- the simulator's encoding is the inverse ------------------------------------------


@given(
    st.sampled_from(_TYPES),
    st.sampled_from(["big", "little"]),
    st.sampled_from([1.0, 0.1, 0.01, 2.5, -0.5]),
    st.sampled_from([0.0, -40.0, 273.15]),
    st.floats(-1000, 1000),
)
def test_what_the_simulator_encodes_decodes_within_half_a_step(
    kind_type: RegisterType, order: str, scale: float, offset: float, value: float
) -> None:
    register = _r(type=kind_type, word_order=order, scale=scale, offset=offset)
    words = encode_value(register, value)
    assert len(words) == register.width and all(0 <= word <= 0xFFFF for word in words)
    decoded = _decode_one(register, words).value
    low, high = {
        "int16": (-(2**15), 2**15 - 1),
        "uint16": (0, 2**16 - 1),
        "int32": (-(2**31), 2**31 - 1),
        "uint32": (0, 2**32 - 1),
    }.get(kind_type, (-math.inf, math.inf))
    raw = (value - offset) / scale
    if kind_type == "float32":
        assert decoded == pytest.approx(value, rel=1e-6, abs=1e-4)
    elif low <= round(raw) <= high:
        assert abs(decoded - value) <= abs(scale) / 2 + 1e-9
    else:
        clipped = low if raw < low else high
        assert decoded == pytest.approx(clipped * scale + offset)


def test_a_dropped_float32_is_encoded_as_nan_in_its_word_order() -> None:
    for order in ("big", "little"):
        register = _r(type="float32", word_order=order)
        (read,) = plan_reads({"s": register}, {"s": "V"})
        (outcome,) = decode(read, encode_value(register, math.nan), "e", DEVICE, 1)
        assert isinstance(outcome, Rejected) and outcome.reason is Reason.NON_FINITE


# --- the bridge's plan of a twin model -------------------------------------------------


def test_the_bridge_polls_every_entity_with_a_device_with_its_own_reads(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(PLANT))
    model = load_twin_model(path)
    devices = polled_devices(model, ModbusSettings())
    assert [(d.entity_id, d.address.name) for d in devices] == [
        ("pump-1", "127.0.0.1:5020/1"),
        ("pump-2", "127.0.0.1:5020/2"),
    ]
    assert [read.label for read in devices[0].reads] == ["holding 0-2", "input 0"]
    assert [read.label for read in devices[1].reads] == ["input 9-10"]
    assert devices[0].interval_s == 1.0


def test_a_map_the_read_size_cannot_hold_fails_naming_entity_and_setting(tmp_path: Path) -> None:
    document = copy.deepcopy(PLANT)
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(document))
    model = load_twin_model(path)
    with pytest.raises(
        ConfigError,
        match=r"entity pump-1: .*TWINFLOW_MODBUS__MAX_REGISTERS_PER_READ=1: flow: a float32",
    ):
        polled_devices(model, ModbusSettings(max_registers_per_read=1))


def test_the_bridge_refuses_a_model_without_modbus_devices(tmp_path: Path) -> None:
    document = copy.deepcopy(PLANT)
    for entity in document["entities"]:
        entity.pop("modbus", None)
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=r"the twin model maps no entity to a Modbus device"):
        run(Settings(), load_twin_model(path))
