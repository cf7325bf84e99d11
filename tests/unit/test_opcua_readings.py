import json
import math
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from asyncua import ua

from schemas.raw import decode_raw
from twinflow.bridges.opcua import MonitoredSensor, encode_reading, epoch_ms, quality_of

ROOT = Path(__file__).resolve().parents[2]
RAW_SCHEMA = json.loads((ROOT / "schemas" / "json" / "raw_reading.v1.schema.json").read_text())
SENSOR = MonitoredSensor("pump-001", "flow", "m3/h", "ns=2;s=pump-001/flow")
SOURCE_TS = datetime(2026, 1, 1, 0, 0, 0, 123_456, UTC)
SOURCE_MS = 1_767_225_600_123
SERVER_TS = datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)


def _status(name: str) -> ua.StatusCode:
    return ua.StatusCode(getattr(ua.StatusCodes, name))


def _value(
    value: object,
    status: str = "Good",
    source: datetime | None = SOURCE_TS,
    server: datetime | None = SERVER_TS,
) -> ua.DataValue:
    variant = ua.Variant(None) if value is None else ua.Variant(value)
    return ua.DataValue(
        Value=variant, StatusCode=_status(status), SourceTimestamp=source, ServerTimestamp=server
    )


@pytest.mark.parametrize(
    ("status", "quality"),
    [
        ("Good", "good"),
        ("GoodNoData", "good"),
        ("GoodClamped", "good"),
        ("Uncertain", "uncertain"),
        ("UncertainLastUsableValue", "uncertain"),
        ("UncertainSensorNotAccurate", "uncertain"),
        ("Bad", "bad"),
        ("BadNoCommunication", "bad"),
        ("BadSensorFailure", "bad"),
        ("BadWaitingForInitialData", "bad"),
    ],
)
def test_quality_is_the_status_severity(status: str, quality: str) -> None:
    assert quality_of(_status(status)) == quality


def test_no_status_code_means_good() -> None:
    assert quality_of(None) == "good"


def test_severity_bits_decide_even_for_unknown_codes() -> None:
    assert quality_of(ua.StatusCode(ua.UInt32(0x00FF0000))) == "good"
    assert quality_of(ua.StatusCode(ua.UInt32(0x40FF0000))) == "uncertain"
    assert quality_of(ua.StatusCode(ua.UInt32(0x80FF0000))) == "bad"
    # 11 is reserved; clients must treat it as Bad.
    assert quality_of(ua.StatusCode(ua.UInt32(0xC0000000))) == "bad"


def test_good_notification_becomes_a_valid_single_form_reading() -> None:
    payload = encode_reading(SENSOR, _value(123.5))
    assert payload is not None
    reading = json.loads(payload)
    assert reading == {
        "entity_id": "pump-001",
        "sensor": "flow",
        "ts": SOURCE_MS,
        "value": 123.5,
        "unit": "m3/h",
        "quality": "good",
        "source": "opcua:ns=2;s=pump-001/flow",
    }
    jsonschema.validate(reading, RAW_SCHEMA)
    decoded = decode_raw(payload)
    assert decoded.readings() == [("flow", 123.5, "m3/h")]
    assert decoded.ts_ms == SOURCE_MS


@pytest.mark.parametrize(
    ("status", "quality"), [("UncertainLastUsableValue", "uncertain"), ("BadSensorFailure", "bad")]
)
def test_a_finite_value_is_forwarded_whatever_the_status(status: str, quality: str) -> None:
    payload = encode_reading(SENSOR, _value(7.0, status))
    assert payload is not None
    assert json.loads(payload)["quality"] == quality
    jsonschema.validate(json.loads(payload), RAW_SCHEMA)


@pytest.mark.parametrize(
    "value", [None, math.nan, math.inf, -math.inf, True, "12.5", [1.0, 2.0]], ids=repr
)
def test_no_finite_number_is_no_reading(value: object) -> None:
    assert encode_reading(SENSOR, _value(value, "BadNoCommunication")) is None
    assert encode_reading(SENSOR, _value(value)) is None


def test_integer_values_become_numbers() -> None:
    payload = encode_reading(SENSOR, _value(ua.Variant(42, ua.VariantType.Int32).Value))
    assert payload is not None
    assert json.loads(payload)["value"] == 42.0


def test_timestamp_is_the_source_timestamp_to_the_millisecond() -> None:
    assert epoch_ms(_value(1.0)) == SOURCE_MS
    assert epoch_ms(_value(1.0, source=datetime(1970, 1, 1, tzinfo=UTC))) == 0


def test_server_timestamp_stands_in_for_a_missing_source_timestamp() -> None:
    assert epoch_ms(_value(1.0, source=None)) == 1_767_225_601_000
    # FILETIME 0 (1601-01-01) is how servers say "no timestamp".
    null_time = datetime(1601, 1, 1, tzinfo=UTC)
    assert epoch_ms(_value(1.0, source=null_time)) == 1_767_225_601_000


def test_naive_timestamps_are_utc() -> None:
    assert epoch_ms(_value(1.0, source=SOURCE_TS.replace(tzinfo=None))) == SOURCE_MS


def test_no_timestamp_is_no_reading() -> None:
    assert epoch_ms(_value(1.0, source=None, server=None)) is None
    assert encode_reading(SENSOR, _value(1.0, source=None, server=None)) is None
