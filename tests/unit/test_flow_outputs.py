from datetime import UTC, datetime

from flows.outputs import deadletter_batches
from schemas.deadletter import Source, dead_letter, encode
from schemas.raw import Reason
from twinflow.tables import tables
from twinflow.twin import InputMessage


def test_dead_letters_become_rows_and_strangers_are_kept() -> None:
    letter = dead_letter(
        b"{bad",
        Reason.BAD_JSON,
        "truncated",
        Source(kind="mqtt", topic="plant/a/b/pump-001/telemetry"),
        datetime(2026, 11, 1, 12, 0, 0, 123000, tzinfo=UTC),
        entity_id="pump-001",
    )
    messages = [
        InputMessage("twin.deadletter", 0, 7, 1_793_000_000_000, encode(letter)),
        InputMessage("twin.deadletter", 0, 8, 1_793_000_000_500, b"not a dead letter"),
    ]
    (batch,) = deadletter_batches(messages, tables())
    assert batch.spec.name == "deadletters"
    rows = batch.frame.to_dict("records")
    assert rows[0]["reason"] == "bad_json"
    assert rows[0]["source"] == "plant/a/b/pump-001/telemetry"
    assert rows[0]["entity"] == "pump-001"
    assert rows[0]["ts"].value // 1_000_000 == 1_793_534_400_123
    assert rows[1]["reason"] == "schema"
    assert rows[1]["source_kind"] == "kafka"
    assert rows[1]["kafka_offset"] == 8
    assert rows[1]["payload_excerpt"] == "not a dead letter"
    assert deadletter_batches([], tables()) == []
