"""The JSON Schema files and the decoders must agree on what the contracts allow."""

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from schemas.deadletter import FULL_PAYLOAD_LIMIT, Source, dead_letter, encode
from schemas.raw import Reason, SchemaError, decode_raw

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "json"
RAW = json.loads((SCHEMAS / "raw_reading.v1.schema.json").read_text())
DEAD = json.loads((SCHEMAS / "deadletter.v1.schema.json").read_text())
CHECKER = jsonschema.Draft202012Validator(RAW, format_checker=jsonschema.FormatChecker())

VALID = [
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1767225600000, "value": 12.5},
    {
        "entity_id": "pump-001",
        "sensor": "flow",
        "ts": "2026-01-01T00:00:00.123Z",
        "value": 1,
        "unit": "l/s",
        "quality": "good",
        "seq": 7,
        "source": "opcua:ns=2;s=pump-001/flow",
    },
    {
        "entity_id": "pump-001",
        "ts": "2026-01-01T02:00:00+02:00",
        "values": {"flow": 1, "x": 2.5},
        "units": {"flow": "gpm"},
        "seq": 1,
    },
]
INVALID = [
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1, "value": "1"},
    {"entity_id": "pump-001", "sensor": "flow", "value": 1},
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1},
    {"entity_id": "pump-001", "ts": 1, "values": {}},
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1, "value": 1, "values": {"a": 1}},
    {"entity_id": "pump-001", "sensor": "flow", "ts": "2026-01-01T00:00:00", "value": 1},
    {"entity_id": "pump-001", "sensor": "flow", "ts": -5, "value": 1},
    {"entity_id": "pump-001", "sensor": "flow", "ts": 1, "value": True},
]


@pytest.mark.parametrize("document", VALID)
def test_valid_raw_messages_pass_both(document: dict[str, object]) -> None:
    CHECKER.validate(document)
    decode_raw(json.dumps(document).encode())


@pytest.mark.parametrize("document", INVALID)
def test_invalid_raw_messages_fail_both(document: dict[str, object]) -> None:
    assert not CHECKER.is_valid(document)
    with pytest.raises(SchemaError):
        decode_raw(json.dumps(document).encode())


@pytest.mark.parametrize("size", [0, 10, FULL_PAYLOAD_LIMIT + 1])
def test_dead_letters_match_their_schema(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    letter = dead_letter(
        payload,
        Reason.BAD_JSON,
        "d" * 5000,
        Source(kind="kafka", topic="twin.raw", partition=3, offset=42),
        datetime(2026, 1, 1, tzinfo=UTC),
        entity_id=None,
    )
    document = json.loads(encode(letter))
    jsonschema.validate(document, DEAD, format_checker=jsonschema.FormatChecker())
    assert document["payload_size"] == size
    assert (document["payload_b64"] is None) == (size > FULL_PAYLOAD_LIMIT)
    assert len(document["detail"]) == 1000
    assert document["reason"] == "bad_json"
    assert set(DEAD["properties"]["reason"]["enum"]) == {reason.value for reason in Reason}


def test_output_schema_files_match_the_structs() -> None:
    from schemas.generate import SCHEMA_DIR, output_schemas

    for file_name, schema in output_schemas().items():
        published = json.loads((SCHEMA_DIR / file_name).read_text())
        assert published == schema, f"{file_name} is stale: run python -m schemas.generate"
