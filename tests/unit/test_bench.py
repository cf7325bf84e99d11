"""The benchmark's own arithmetic: what the workload promises, latency from counts, verdicts."""

from __future__ import annotations

import msgspec
import pytest

from benchmarks.latency import latencies
from benchmarks.throughput import Expected, verdict
from benchmarks.workload import WorkloadConfig, messages, sensor_ranges

START_MS = 1_790_000_000_000


@pytest.mark.parametrize("jump_ms", [0, 1_790_000])
@pytest.mark.parametrize("batched", [True, False])
def test_the_workload_promises_what_its_messages_hold(batched: bool, jump_ms: int) -> None:
    config = WorkloadConfig(
        entities=7,
        sensors=4,
        readings=7 * 4 * 90,
        batched=batched,
        malformed_share=0.03,
        out_of_range_share=0.03,
        late_share=0.03,
    )
    expected = Expected()
    ranges = sensor_ranges(config)
    # Count again from the payloads alone, the way a consumer sees them.
    malformed = out_of_range = late = valid = 0
    series_windows: dict[tuple[str, str], set[int]] = {}
    newest: dict[str, int] = {}
    for _key, payload in messages(config, START_MS, expected, jump_ms):
        try:
            message = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            malformed += 1
            continue
        # The first window, then the clock jumps: nothing falls into the skipped time.
        assert not START_MS + 10_000 <= message["ts"] < START_MS + 10_000 + jump_ms
        values = message.get("values") or {message["sensor"]: message["value"]}
        for sensor, value in values.items():
            low, high = ranges[sensor]
            if not low <= value <= high:
                out_of_range += 1
            elif message["ts"] % 1000:
                late += 1
                valid += 1
            else:
                valid += 1
                windows = series_windows.setdefault((message["entity_id"], sensor), set())
                windows.add(message["ts"] // 10_000)
                newest[message["entity_id"]] = max(
                    newest.get(message["entity_id"], 0), message["ts"]
                )
    assert malformed == expected.malformed_messages > 0
    assert out_of_range == expected.out_of_range_readings > 0
    assert late == expected.late_readings > 0
    assert valid == expected.valid_readings
    assert expected.readings == valid + expected.dead_letter_readings
    assert sum(len(w) for w in series_windows.values()) == expected.all_windows
    # An entity's watermark (its newest valid reading - 5 s) closes its windows.
    closed = sum(
        1
        for (entity, _sensor), windows in series_windows.items()
        for window in windows
        if (window + 1) * 10_000 <= newest[entity] - 5_000
    )
    assert 0 < closed == expected.closed_windows < expected.all_windows


def test_the_workload_jumps_only_by_whole_windows() -> None:
    with pytest.raises(ValueError, match="jump_ms must be a multiple of 10000"):
        next(messages(WorkloadConfig(entities=1, sensors=1, readings=60), START_MS, Expected(), 5))


def test_the_workload_is_the_same_for_the_same_seed() -> None:
    config = WorkloadConfig(entities=3, sensors=2, readings=600)
    first = list(messages(config, START_MS, Expected()))
    assert first == list(messages(config, START_MS, Expected()))
    other = WorkloadConfig(entities=3, sensors=2, readings=600, seed=2)
    assert first != list(messages(other, START_MS, Expected()))


def test_latency_pairs_the_kth_reading_sent_with_the_kth_visible() -> None:
    sent = [(10.0, 100), (11.0, 200)]
    seen = [(10.05, 0), (10.30, 100), (11.10, 150), (11.50, 200)]
    result = latencies(sent, seen, 200)
    assert result["visible"] == 200
    assert result["p50_ms"] == pytest.approx(300.0)
    assert result["max_ms"] == pytest.approx(500.0)
    # Readings never seen do not count as fast ones.
    partial = latencies(sent, seen[:3], 200)
    assert partial["visible"] == 150 and partial["max_ms"] == pytest.approx(300.0)


def test_a_fast_wrong_variant_is_caught() -> None:
    expected = Expected(
        messages=100,
        valid_readings=580,
        closed_windows=40,
        all_windows=60,
        malformed_messages=2,
        out_of_range_readings=3,
    )
    right = {"readings": 580, "sensor_windows": 60, "deadletters": 5}
    assert verdict("twinflow", expected, right) == []
    assert verdict("twinflow", expected, right | {"readings": 600}) == [
        "readings: 600 rows, expected 580"
    ]
    assert verdict("twinflow", expected, right | {"deadletters": 4}) == [
        "deadletters: 4 rows, expected 5"
    ]
    assert verdict("peer-quix", expected, {"readings": 580, "sensor_windows": 12}) == [
        "sensor_windows: 12 rows, expected 40..60"
    ]
    assert verdict("limit-questdb", expected, {"readings": 580}) == []
    assert verdict("limit-kafka", expected, {"messages": 99}) == [
        "messages: 99 consumed, expected 100"
    ]
