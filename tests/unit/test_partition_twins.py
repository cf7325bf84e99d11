import pickle
from pathlib import Path

import msgspec

from schemas.outputs import Status, TwinState
from schemas.transport import InputMessage
from twinflow.detection import DetectorConfig
from twinflow.settings import load_settings
from twinflow.twin import MAX_STEP_GAP_MS, PartitionTwins
from twinflow.twin_model import load_twin_model

MODEL = load_twin_model(
    Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
)
START = 1_793_000_000_000


def _message(offset: int, ts_ms: int) -> InputMessage:
    body = {
        "entity_id": "pump-001",
        "ts": ts_ms,
        "values": {"flow": 100.0 + offset % 3, "bearing_temp": 50.0},
    }
    return InputMessage("twin.raw", 0, offset, ts_ms, msgspec.json.encode(body))


def _tick(twins: PartitionTwins, from_ms: int, to_ms: int) -> list[TwinState]:
    """Empty steps every second, as the source sends while a partition is quiet."""
    return [
        state
        for now in range(from_ms + 1000, to_ms + 1, 1000)
        for state in twins.step([], now).states
    ]


def test_silence_closes_windows_then_marks_stale_at_its_own_time() -> None:
    flow = load_settings().flow
    twins = PartitionTwins(MODEL, flow, DetectorConfig())
    wall = 10_000_000
    out = twins.step([_message(i, START + i * 1000) for i in range(25)], wall)
    closed_by_data = [s.ts_ms for s in out.states]
    assert closed_by_data and all(s.status is not Status.STALE for s in out.states)
    # Silent past idle_close_s: the open window closes on system time.
    idle_at = wall + int(flow.idle_close_s * 1000)
    assert _tick(twins, wall, idle_at - 1000) == []
    idle = _tick(twins, idle_at - 1000, idle_at)
    window_ms = int(flow.window_s * 1000)
    assert [s.ts_ms for s in idle] == [START + 2 * window_ms, START + 3 * window_ms]
    # Silent past stale_after_s: STALE, at an event time no real state has.
    (state,) = _tick(twins, idle_at, wall + int(flow.stale_after_s * 1000))
    assert state.status is Status.STALE
    assert state.ts_ms == START + 24 * 1000 + int(flow.stale_after_s * 1000)
    assert state.ts_ms not in closed_by_data + [s.ts_ms for s in idle]
    # Readings again: the next closed window brings the entity back from STALE.
    back = twins.step(
        [_message(i, START + 200_000 + i * 1000) for i in range(25, 50)], wall + 70_000_000
    )
    assert back.states and back.states[-1].status is not Status.STALE


def test_a_restored_partition_does_not_take_the_restart_for_silence() -> None:
    flow = load_settings().flow
    twins = PartitionTwins(MODEL, flow, DetectorConfig())
    twins.step([_message(i, START + i * 1000) for i in range(5)], 1_000)
    restored = pickle.loads(pickle.dumps(twins))
    # Hours later by the clock: a restore, not hours of silence.
    assert restored.step([], 10_000_000).states == []
    assert restored.open_window_starts("pump-001")
    # Live again, the silence counts from the restore on.
    idle_ms = int(flow.idle_close_s * 1000)
    assert _tick(restored, 10_000_000, 10_000_000 + idle_ms - 1000) == []
    assert _tick(restored, 10_000_000 + idle_ms - 1000, 10_000_000 + idle_ms)


def test_a_stalled_pipeline_is_not_the_entities_silence() -> None:
    flow = load_settings().flow
    twins = PartitionTwins(MODEL, flow, DetectorConfig())
    twins.step([_message(i, START + i * 1000) for i in range(5)], 1_000)
    # No step for ten minutes (the broker or the sink was down): one capped gap.
    assert twins.step([], 1_000 + 600_000).states == []
    assert twins.open_window_starts("pump-001")
    later = 1_000 + 600_000
    gap = MAX_STEP_GAP_MS
    idle_ms = int(flow.idle_close_s * 1000)
    assert _tick(twins, later, later + idle_ms - gap - 1000) == []
    assert _tick(twins, later + idle_ms - gap - 1000, later + idle_ms - gap)


def _batched(offset: int, ts_ms: int, kafka_ms: int | None = None, **values: float) -> InputMessage:
    body = {"entity_id": "pump-001", "ts": ts_ms, "values": values}
    return InputMessage(
        "twin.raw", 0, offset, ts_ms if kafka_ms is None else kafka_ms, msgspec.json.encode(body)
    )


def test_every_reading_is_kept_or_accounted_for_in_the_entity_counts() -> None:
    twins = PartitionTwins(MODEL, load_settings().flow, DetectorConfig())
    messages = [
        # flow's range is [0, 400] and bearing_temp's [-20, 150]: the edges are readings.
        _batched(0, START, flow=0.0, bearing_temp=150.0),
        _batched(1, START + 1000, flow=400.5, bearing_temp=50.0),
        _batched(2, START + 400_000, kafka_ms=START + 2000, flow=1.0),
        _batched(3, START, flow=0.0, bearing_temp=150.0),
        *[_batched(4 + i, START + 2000 + i * 1000, flow=10.0 + i) for i in range(20)],
        _batched(24, START + 500, flow=3.0),
    ]
    out = twins.step(messages, 1_000)
    assert [(r.reason.value, r.source.offset) for r in out.dead_letters] == [
        ("ts_in_future", 2),
        ("out_of_range", 1),
    ]
    assert len(out.readings) == 2 + 1 + 20 + 1
    assert [(late.sensor, late.ts_ms) for late in out.late] == [("flow", START + 500)]
    counts = twins.entities["pump-001"].counts
    assert {k: counts[k] for k in ("readings", "duplicates", "late", "dead_letters")} == {
        "readings": 24,
        "duplicates": 2,
        "late": 1,
        "dead_letters": 2,
    }
    first_state = out.states[0]
    assert first_state.ts_ms == START + 10_000
    # The state at a window's end holds each sensor's newest reading before that end.
    assert first_state.sensors["flow"].ts_ms == START + 9000
    assert first_state.sensors["bearing_temp"].value == 50.0
