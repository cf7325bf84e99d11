"""The demo's closing summary, from a hand-made ground truth and alarm rows (no services)."""

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twinflow.demo import summarize

START = 1_793_000_000_000
"""2026-10-26T00:53:20Z."""
H = 3_600_000
W = 10_000
TRUTH: dict[str, Any] = {
    "scenario": {
        "start_ms": START,
        "duration_s": 2 * 3600.0,
        "entities": ["pump-001", "pump-002", "motor-001"],
    },
    "counts": {"messages": 1200, "valid_readings": 5400},
    "faults": [
        # During the 30-min warm-up: learned as normal, not scored.
        {
            "kind": "overload",
            "category": "process",
            "entity_id": "motor-001",
            "start_ms": START + 10 * 60_000,
            "end_ms": START + 20 * 60_000,
        },
        {
            "kind": "bearing_wear",
            "category": "process",
            "entity_id": "pump-001",
            "start_ms": START + H,
            "end_ms": START + H + 30 * 60_000,
        },
        {
            "kind": "cavitation",
            "category": "process",
            "entity_id": "pump-002",
            "start_ms": START + H,
            "end_ms": START + H + 20 * 60_000,
        },
        {
            "kind": "stuck",
            "category": "sensor",
            "entity_id": "motor-001",
            "sensor": "current",
            "start_ms": START + H,
            "end_ms": START + H + 10 * 60_000,
        },
        {
            "kind": "duplicate",
            "category": "data",
            "entity_id": "motor-001",
            "start_ms": START + 90 * 60_000,
            "end_ms": START + 90 * 60_000 + 1,
            "detail": "seq=7",
        },
    ],
}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Row = tuple[object, ...]


def row(entity: str, event: str, start: int, ts: int, end: int | None = None) -> Row:
    """An alarms-table row as QuestDB's /exec returns it (ISO timestamps)."""
    alarm_id = f"{entity}@{start}"
    return (iso(ts), entity, alarm_id, event, iso(start), None if end is None else iso(end), "x,y")


ROWS = [
    # pump-001: raised 2 min into its fault, cleared after it.
    row("pump-001", "raised", START + H + 110_000, START + H + 120_000),
    row(
        "pump-001", "cleared", START + H + 110_000, START + H + 40 * 60_000, START + H + 31 * 60_000
    ),
    # motor-001: inside its stuck sensor; then a false alarm, still active at the end.
    row("motor-001", "raised", START + H + 60_000, START + H + 70_000),
    row("motor-001", "cleared", START + H + 60_000, START + H + 5 * 60_000, START + H + 3 * 60_000),
    row("motor-001", "raised", START + 100 * 60_000, START + 100 * 60_000 + W),
]


def summary(
    rows: Sequence[Row] = ROWS, truth: dict[str, Any] = TRUTH, unread: str | None = None
) -> str:
    return summarize(
        truth,
        rows,
        forwarded=1190,
        dead_lettered=10,
        window_ms=W,
        warmup_windows=180,
        truth_file=Path("/tmp/truth.json"),
        unread=unread,
    )


def test_the_summary_says_faults_injected_detected_and_false_alarms() -> None:
    # Clean time: 3 entities x 1.5 h monitored, less each fault widened by a window on both
    # sides and followed by a 120-s margin (the overload ended before monitoring began):
    # 4.5 h - (1940 + 1340 + 740) s = 3.383 h; one false alarm: 0.30 per entity-hour.
    text = summary()
    assert "plant: 1200 MQTT messages, 5400 valid readings; bridge: 1190 to Kafka, 10" in text
    assert (
        "detection: 2 process faults injected (1 more during the 30-min warm-up, not scored), "
        "1 detected by an alarm (bearing_wear 1/1, cavitation 0/1; median delay 120 s), "
        "1 false alarm (0.30 per entity-hour); alarms raised: 3 (1 in sensor faults, "
        "0 in recovery margins)."
    ) in text
    assert text.endswith("Ground truth: /tmp/truth.json")


def test_epoch_milliseconds_serve_as_well_as_iso_text() -> None:
    as_ms = [
        (START + H + 120_000, "pump-002", "pump-002@1", "raised", START + H + 110_000, None, None)
    ]
    assert "1 detected by an alarm (bearing_wear 0/1, cavitation 1/1" in summary(as_ms)


def test_without_alarms_nothing_is_detected_and_nothing_is_false() -> None:
    text = summary([])
    assert "0 detected by an alarm (bearing_wear 0/1, cavitation 0/1)" in text
    assert "0 false alarms (0.00 per entity-hour); alarms raised: 0" in text


def test_unread_alarms_and_a_failed_simulation_are_said_not_guessed() -> None:
    assert "detection: alarms not read (QuestDB down)." in summary(unread="QuestDB down")
    text = summary([], {})
    assert text.startswith("plant: 0 MQTT messages, 0 valid readings")
    assert "detection" not in text
