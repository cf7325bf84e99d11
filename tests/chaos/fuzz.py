"""Hypothesis strategies for raw messages that must each become exactly one dead letter.

Every message drawn here is bad in one way (and valid in every other), in the single
form, so it owes exactly one dead letter: truncated JSON, wrong types, NaN/+-Inf,
1e308, empty, random bytes, unknown entity, timestamps far in the past or future.
"""

from __future__ import annotations

import time

import msgspec
from hypothesis import strategies as st

DAY_MS = 86_400_000
MAX_TS_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z"""
TEN_MB = 10 * 1024 * 1024


def _valid(entity: str, sensor: str, ts_ms: int, value: float) -> dict[str, object]:
    return {"entity_id": entity, "sensor": sensor, "ts": ts_ms, "value": value}


def bad_messages(
    entities: list[str], ranges: dict[str, tuple[float, float]], now_ms: int
) -> st.SearchStrategy[bytes]:
    """One bad payload; ``now_ms`` is about when it will be produced (Kafka time)."""
    entity = st.sampled_from(entities)
    sensor = st.sampled_from(sorted(ranges))
    recent = st.integers(now_ms - DAY_MS, now_ms)
    in_range = sensor.flatmap(
        lambda name: st.tuples(
            st.just(name),
            st.floats(*ranges[name], allow_nan=False, allow_infinity=False),
        )
    )
    good = st.builds(lambda e, sv, ts: _valid(e, sv[0], ts, sv[1]), entity, in_range, recent)
    encoded = good.map(msgspec.json.encode)
    truncated = encoded.flatmap(lambda p: st.integers(0, len(p) - 1).map(lambda cut: p[:cut]))
    not_a_string = st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=2))
    not_a_number = st.one_of(st.text(max_size=5), st.booleans(), st.just([1.0]), st.just({}))
    wrong_type = st.one_of(
        st.builds(lambda m, v: {**m, "entity_id": v}, good, not_a_string),
        st.builds(lambda m, v: {**m, "value": v}, good, not_a_number),
        st.builds(lambda m, v: {**m, "ts": v}, good, st.one_of(st.booleans(), st.just([1]))),
    ).map(msgspec.json.encode)
    non_finite = st.builds(
        lambda m, token: msgspec.json.encode({**m, "value": 0.5}).replace(b"0.5", token),
        good,
        st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]),
    )
    huge = st.builds(
        lambda m, v: msgspec.json.encode({**m, "value": v}),
        good,
        st.sampled_from([1e308, -1e308, 1.7976931348623157e308]),
    )
    ghost = st.builds(
        lambda m, n: msgspec.json.encode({**m, "entity_id": f"ghost-{n}"}), good, st.integers(0)
    )
    past = st.builds(
        lambda m, ts: msgspec.json.encode({**m, "ts": ts}),
        good,
        st.integers(0, now_ms - 8 * DAY_MS),
    )
    future = st.builds(
        lambda m, ts: msgspec.json.encode({**m, "ts": ts}),
        good,
        st.integers(now_ms + DAY_MS, MAX_TS_MS),
    )
    garbage = st.binary(max_size=64).filter(lambda b: not b.lstrip().startswith(b"{"))
    return st.one_of(
        truncated, wrong_type, non_finite, huge, ghost, past, future, garbage, st.just(b"")
    )


def ten_megabytes(entity: str, sensor: str, now_ms: int) -> bytes:
    """A 10 MB message: a reading whose value is a 10 MB string."""
    return msgspec.json.encode(_valid(entity, sensor, now_ms, 1.0) | {"value": "9" * TEN_MB})


def wall_ms() -> int:
    """Now, in epoch milliseconds."""
    return time.time_ns() // 1_000_000
