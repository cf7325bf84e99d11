import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from schemas.raw import Reason, decode_raw
from twinflow.bridges.coap import _check_distinct, resources_of
from twinflow.bridges.coap_codec import (
    MAX_PAYLOAD_BYTES,
    Reading,
    Rejected,
    SensorResource,
    TelemetryResource,
    dead_letter,
    decode,
)
from twinflow.errors import ConfigError
from twinflow.twin_model import TwinModel

ROOT = Path(__file__).resolve().parents[2]
RAW_SCHEMA = json.loads((ROOT / "schemas" / "json" / "raw_reading.v1.schema.json").read_text())
LETTER_SCHEMA = json.loads((ROOT / "schemas" / "json" / "deadletter.v1.schema.json").read_text())
ARRIVED_MS = 1_767_225_600_123
TEMP = SensorResource("pump-1", "127.0.0.1", 5683, "pump-1/temp", "bearing_temp", "degF")
TELEMETRY = TelemetryResource("pump-1", "127.0.0.1", 5684, "pump-1/telemetry")


def _reading(decoded: Reading | Rejected) -> Reading:
    assert isinstance(decoded, Reading), decoded
    return decoded


def _rejected(decoded: Reading | Rejected) -> Rejected:
    assert isinstance(decoded, Rejected), decoded
    return decoded


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"161.6", 161.6),
        (b" -3\n", -3.0),
        (b"+.5", 0.5),
        (b"1e3", 1000.0),
        (b"2.", 2.0),
        (b"0", 0.0),
    ],
)
def test_a_number_becomes_a_single_form_reading_stamped_with_its_arrival(
    text: bytes, value: float
) -> None:
    reading = _reading(decode(TEMP, text, ARRIVED_MS))
    body = json.loads(reading.payload)
    jsonschema.validate(body, RAW_SCHEMA)
    assert body == {
        "entity_id": "pump-1",
        "sensor": "bearing_temp",
        "ts": ARRIVED_MS,
        "value": value,
        "unit": "degF",
        "quality": "good",
        "source": "coap://127.0.0.1:5683/pump-1/temp",
    }
    assert reading.ts_ms == ARRIVED_MS
    assert decode_raw(reading.payload).readings() == [("bearing_temp", value, "degF")]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"abc", Reason.BAD_PAYLOAD),
        (b"", Reason.BAD_PAYLOAD),
        (b"  ", Reason.BAD_PAYLOAD),
        (b"1_000", Reason.BAD_PAYLOAD),
        (b"12 degC", Reason.BAD_PAYLOAD),
        (b"0x1f", Reason.BAD_PAYLOAD),
        (b'{"value": 3}', Reason.BAD_PAYLOAD),
        (b"\xff\xfe", Reason.BAD_PAYLOAD),
        (b"nan", Reason.NON_FINITE),
        (b"NaN", Reason.NON_FINITE),
        (b"-inf", Reason.NON_FINITE),
        (b"Infinity", Reason.NON_FINITE),
        (b"1e999", Reason.NON_FINITE),
    ],
)
def test_text_that_is_no_finite_number_is_rejected_with_its_reason(
    text: bytes, reason: Reason
) -> None:
    assert _rejected(decode(TEMP, text, ARRIVED_MS)).reason == reason


def test_a_telemetry_body_is_forwarded_as_it_is_with_its_own_timestamp() -> None:
    body = (
        b'{"entity_id":"pump-1","ts":1767225600000,"values":{"flow":12.5,"bearing_temp":61},'
        b'"units":{"flow":"m3/h"}}'
    )
    reading = _reading(decode(TELEMETRY, body, ARRIVED_MS))
    assert reading.payload is body
    assert reading.ts_ms == 1_767_225_600_000


def test_telemetry_readings_are_the_same_when_values_and_ts_are_whatever_the_format() -> None:
    one = decode(TELEMETRY, b'{"entity_id":"pump-1","ts":5,"values":{"a":1,"b":2}}', 0)
    same = decode(TELEMETRY, b'{"ts": 5, "values": {"b": 2.0, "a": 1.0}, "entity_id": "pump-1"}', 0)
    later = decode(TELEMETRY, b'{"entity_id":"pump-1","ts":6,"values":{"a":1,"b":2}}', 0)
    other = decode(TELEMETRY, b'{"entity_id":"pump-1","ts":5,"values":{"a":1,"b":3}}', 0)
    assert _reading(one).identity == _reading(same).identity
    assert _reading(one).identity != _reading(later).identity
    assert _reading(one).identity != _reading(other).identity


def test_numbers_are_the_same_reading_when_their_values_are() -> None:
    assert _reading(decode(TEMP, b"2.50", 1)).identity == _reading(decode(TEMP, b"2.5", 2)).identity
    assert _reading(decode(TEMP, b"2.5", 1)).identity != _reading(decode(TEMP, b"2.6", 1)).identity


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", Reason.BAD_JSON),
        (b'{"entity_id":"pump-1","ts":1,"values":{"flow":"high"}}', Reason.SCHEMA),
        (b'{"entity_id":"pump-1","ts":1}', Reason.BAD_FORM),
        (b'{"entity_id":"pump-1","ts":1,"sensor":"flow","value":NaN}', Reason.BAD_JSON),
        (b'{"entity_id":"pump-1","ts":1,"sensor":"flow","value":1e999}', Reason.SCHEMA),
        (b'{"entity_id":"pump-1","ts":-1,"sensor":"flow","value":1}', Reason.BAD_TIMESTAMP),
        (b'{"entity_id":"pump-2","ts":1,"sensor":"flow","value":1}', Reason.ENTITY_MISMATCH),
    ],
)
def test_a_telemetry_body_breaking_the_raw_contract_is_rejected_with_its_reason(
    body: bytes, reason: Reason
) -> None:
    assert _rejected(decode(TELEMETRY, body, ARRIVED_MS)).reason == reason


def test_a_body_too_large_for_kafka_is_rejected() -> None:
    huge = b"1" * (MAX_PAYLOAD_BYTES + 1)
    assert _rejected(decode(TELEMETRY, huge, 0)).reason == Reason.TOO_LARGE
    assert _rejected(decode(TEMP, huge, 0)).reason == Reason.TOO_LARGE


def test_a_dead_letter_names_the_device_and_the_resource_path() -> None:
    rejected = _rejected(decode(TEMP, b"abc", ARRIVED_MS))
    letter = json.loads(dead_letter(TEMP, b"abc", rejected, datetime(2026, 1, 1, tzinfo=UTC)))
    jsonschema.validate(letter, LETTER_SCHEMA)
    assert letter["reason"] == "bad_payload"
    assert letter["source"] == {
        "kind": "coap",
        "device": "127.0.0.1:5683",
        "address": "pump-1/temp",
    }
    assert letter["entity_id"] == "pump-1"
    assert letter["payload_excerpt"] == "abc"


def test_an_ipv6_host_is_bracketed_in_uris_and_devices() -> None:
    resource = SensorResource("m", "::1", 5683, "m/speed", "speed", "rpm")
    assert resource.uri == "coap://[::1]:5683/m/speed"
    assert resource.device == "[::1]:5683"


def test_the_bridge_observes_per_sensor_resources_in_their_units_or_one_telemetry() -> None:
    model = TwinModel.model_validate(
        {
            "version": 1,
            "asset_types": {
                "pump": {
                    "sensors": {
                        name: {
                            "unit": unit,
                            "accepted_units": {"degF": {"factor": 0.5556, "offset": -17.78}},
                            "range": [0, 100],
                            "max_rate": 10,
                            "stuck_after_s": 30,
                        }
                        for name, unit in (("temp", "degC"), ("flow", "m3/h"))
                    },
                    "coap": {"temp": {"path": "t", "unit": "degF"}, "flow": {"path": "f"}},
                }
            },
            "entities": [
                {"id": "p1", "type": "pump", "site": "s", "line": "l", "coap": {"host": "h"}},
                {
                    "id": "p2",
                    "type": "pump",
                    "site": "s",
                    "line": "l",
                    "coap": {"host": "h", "port": 6000, "telemetry": "p2/all"},
                },
                {"id": "p3", "type": "pump", "site": "s", "line": "l"},
            ],
        }
    )
    assert resources_of(model, model.by_id["p1"]) == [
        SensorResource("p1", "h", 5683, "t", "temp", "degF"),
        SensorResource("p1", "h", 5683, "f", "flow", "m3/h"),
    ]
    assert resources_of(model, model.by_id["p2"]) == [TelemetryResource("p2", "h", 6000, "p2/all")]
    assert resources_of(model, model.by_id["p3"]) == []


def test_two_entities_on_one_resource_are_refused() -> None:
    one = SensorResource("p1", "h", 5683, "flow", "flow", "m3/h")
    other = SensorResource("p2", "h", 5683, "flow", "flow", "m3/h")
    _check_distinct([one, SensorResource("p2", "h", 5684, "flow", "flow", "m3/h")])
    with pytest.raises(
        ConfigError, match=r"coap://h:5683/flow is in the coap maps of both p1 and p2"
    ):
        _check_distinct([one, other])
