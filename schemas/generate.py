"""JSON Schemas of the output and back-channel topics, derived from their structs.

The files in schemas/json/ are the published contract; ``python -m schemas.generate``
rewrites them after a struct changes, and a test fails while they differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from schemas.control import Command, CommandResult, Feedback
from schemas.outputs import VERSION, Alarm, Anomaly, LateReading, TwinState

SCHEMA_DIR = Path(__file__).resolve().parent / "json"
OUTPUT_TOPICS: dict[str, tuple[Any, str]] = {
    "twin_state": (TwinState, "twin.state (compacted; key = entity_id)"),
    "anomaly": (Anomaly, "twin.anomalies (key = entity_id)"),
    "alarm": (Alarm, "twin.alarms (key = entity_id)"),
    "late_reading": (LateReading, "twin.late (key = entity_id)"),
    "feedback": (Feedback, "twin.feedback (key = entity_id)"),
    "command": (
        Command | CommandResult,
        "twin.commands (key = entity_id; kind = command | result)",
    ),
}


def output_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema of every output and back-channel topic's message."""
    schemas = {}
    for name, (struct, topic) in OUTPUT_TOPICS.items():
        schema = msgspec.json.schema(struct)
        structs = getattr(struct, "__args__", (struct,))
        for part in structs:
            root = schema["$defs"][part.__name__]
            # A consumer must be able to rely on the version: required, and this one.
            root["properties"]["version"] = {"const": VERSION}
            root["required"] = sorted({*root.get("required", ()), "version"})
        schemas[f"{name}.v{VERSION}.schema.json"] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"twinflow:{name}:v{VERSION}",
            "title": f"twinflow {name} (topic {topic})",
            **schema,
        }
    return schemas


def main() -> None:
    """Write the schema files."""
    for file_name, schema in output_schemas().items():
        (SCHEMA_DIR / file_name).write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {SCHEMA_DIR / file_name}")


if __name__ == "__main__":
    main()
