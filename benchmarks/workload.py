"""The throughput benchmark's workload: a seeded plant of identical machines.

``entities`` machines with ``sensors`` sensors each report once a second. Values are
bounded random walks (the detectors see plausible signals, not white noise). On top:

- a share of messages is **malformed** (truncated JSON): every reading in it is lost
  to a dead letter;
- a share of readings is **out of range** (ten times the upper bound): each becomes a
  dead letter, the other readings of its message are fine;
- a share of readings is **late**: re-sent as single messages, half a second off the
  ticks (so their identity is unique) and far enough behind their entity's newest
  reading that its window has closed.

The generator knows exactly what a correct consumer must produce (valid readings,
dead letters, windows closed by the data itself), so the harness can refuse a fast
wrong result. Everything here is pure: :func:`messages` yields payloads, the
harness produces them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from twinflow.detection import DEFAULT_PERIODS

SENSORS: tuple[tuple[str, str, float, float], ...] = (
    ("flow", "m3/h", 0.0, 400.0),
    ("pressure", "bar", 0.0, 25.0),
    ("current", "A", 0.0, 250.0),
    ("vibration", "mm/s", 0.0, 50.0),
    ("temperature", "degC", -20.0, 150.0),
    ("speed", "rpm", 0.0, 4000.0),
    ("voltage", "V", 0.0, 500.0),
    ("power", "kW", 0.0, 400.0),
)
"""Sensor name, unit, valid range; a workload uses the first ``sensors`` of them."""

ASSET_TYPE = "machine"
_TICK_MS = 1000
_LATE_BEHIND_MS = 30_000


@dataclass(frozen=True)
class WorkloadConfig:
    """What to generate."""

    entities: int = 1000
    sensors: int = 6
    readings: int = 2_000_000
    """Readings on time; late ones come on top."""
    batched: bool = True
    """One message per entity and tick (gateway style), else one per reading."""
    malformed_share: float = 0.001
    out_of_range_share: float = 0.001
    late_share: float = 0.001
    seed: int = 1
    window_s: float = 10.0
    lateness_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.sensors <= len(SENSORS):
            raise ValueError(f"sensors must be 1..{len(SENSORS)}, not {self.sensors}")
        if self.entities < 1 or self.readings < self.entities * self.sensors:
            raise ValueError("need at least one tick: readings >= entities * sensors")
        if (self.window_s + self.lateness_s) * 1000 >= _LATE_BEHIND_MS:
            raise ValueError("late readings must fall behind a closed window")

    @property
    def ticks(self) -> int:
        """Seconds of plant time."""
        return self.readings // (self.entities * self.sensors)

    @property
    def sensor_names(self) -> list[str]:
        """The sensors every entity has."""
        return [name for name, *_ in SENSORS[: self.sensors]]

    def entity_ids(self) -> list[str]:
        """Entity ids: ``m0000``, ``m0001`` and so on."""
        return [f"m{index:04d}" for index in range(self.entities)]


@dataclass
class Expected:
    """What a correct consumer of the workload produces."""

    messages: int = 0
    readings: int = 0
    """Every reading sent, valid or not."""
    valid_readings: int = 0
    """Rows of ``readings``: valid ones, late ones included."""
    late_readings: int = 0
    dead_letter_readings: int = 0
    malformed_messages: int = 0
    out_of_range_readings: int = 0
    closed_windows: int = 0
    """(entity, sensor, window) rows the data's own watermark closes."""
    all_windows: int = 0
    """... plus the last windows, which only idleness closes."""
    first_ts_ms: int = 0
    last_ts_ms: int = 0
    per_partition: dict[int, int] = field(default_factory=dict)


def settled_start_ms(latest_ms: int, window_s: float) -> int:
    """A start at or before ``latest_ms`` whose twins leave their first seasonal bin early.

    A twin allocates its cycle profiles when its clock leaves its first bin (the
    shortest default period's, half an hour), and its state and snapshots keep that
    size from then on. Starting one window before a bin boundary puts that step into
    the first window, so what a run measures is the twin as it stays, not the newborn
    one, wherever the wall clock stands. The start is on a window boundary (the window
    counts of :func:`messages` need it).

    >>> settled_start_ms(9_123_456, 10.0)  # the bin boundary before it is 9,000,000
    8990000
    >>> settled_start_ms(9_000_000, 7.0)  # at least a window before, on a window boundary
    8988000
    """
    window_ms = int(window_s * 1000)
    bin_ms = min(period.length_ms // period.bins for period in DEFAULT_PERIODS)
    boundary = latest_ms // bin_ms * bin_ms
    return (boundary - window_ms) // window_ms * window_ms


def twin_model(config: WorkloadConfig) -> dict[str, object]:
    """The twin model of the workload's plant, as YAML-ready data."""
    sensors = {
        name: {
            "unit": unit,
            "range": [low, high],
            # Generous: the benchmark measures throughput, not the cleaning rules.
            "max_rate": high - low,
            "stuck_after_s": 600,
        }
        for name, unit, low, high in SENSORS[: config.sensors]
    }
    return {
        "version": 1,
        "asset_types": {ASSET_TYPE: {"description": "benchmark machine", "sensors": sensors}},
        "entities": [
            {"id": entity, "type": ASSET_TYPE, "site": "bench", "line": f"line-{i % 10}"}
            for i, entity in enumerate(config.entity_ids())
        ],
    }


def sensor_ranges(config: WorkloadConfig) -> dict[str, tuple[float, float]]:
    """Valid range per sensor."""
    return {name: (low, high) for name, _unit, low, high in SENSORS[: config.sensors]}


def messages(
    config: WorkloadConfig, start_ms: int, expected: Expected, jump_ms: int = 0
) -> Iterator[tuple[str, bytes]]:
    """``(entity id, payload)`` in produce order; fills ``expected`` as it goes.

    ``start_ms`` must be a multiple of the window length's milliseconds so that the
    window counts below hold. After the first window the clock jumps ahead by
    ``jump_ms`` (a multiple of the window length): a first window in an earlier
    seasonal bin, then the present (see :func:`settled_start_ms`).
    """
    rng = np.random.default_rng(config.seed)
    entities = config.entity_ids()
    names = config.sensor_names
    ranges = np.array([(low, high) for _n, _u, low, high in SENSORS[: config.sensors]])
    low, high = ranges[:, 0], ranges[:, 1]
    span = high - low
    level = low + span * rng.uniform(0.3, 0.7, size=(config.entities, config.sensors))
    encode = msgspec.json.encode
    window_ms = int(config.window_s * 1000)
    if jump_ms % window_ms or jump_ms < 0:
        raise ValueError(f"jump_ms must be a multiple of {window_ms}, not {jump_ms}")
    # Late readings trail their tick by _LATE_BEHIND_MS; after a jump they start that
    # long after it, so none falls into the skipped time.
    late_from_tick = (_LATE_BEHIND_MS + (window_ms if jump_ms else 0)) // _TICK_MS

    def tick_ms(tick: Any) -> Any:
        """The event time of a tick (or an array of them)."""
        offset = tick * _TICK_MS
        return start_ms + offset + np.where(offset >= window_ms, jump_ms, 0)

    expected.first_ts_ms = start_ms
    # Which (entity, sensor, window) got an on-time valid reading, and each entity's
    # newest valid reading: the windows its own watermark closes follow from these.
    has_reading = np.zeros((config.entities, config.sensors, config.ticks // 10 + 2), dtype=bool)
    newest_tick = np.full(config.entities, -1)
    for tick in range(config.ticks):
        ts = int(tick_ms(tick))
        level += rng.normal(0.0, 0.002, size=level.shape) * span
        np.clip(level, low + 0.1 * span, high - 0.1 * span, out=level)
        values = level + rng.normal(0.0, 0.005, size=level.shape) * span
        out_of_range = rng.random(values.shape) < config.out_of_range_share
        values[out_of_range] = high[np.nonzero(out_of_range)[1]] * 10 + 1
        malformed = rng.random(config.entities) < config.malformed_share
        late = rng.random(values.shape) < config.late_share
        rounded = np.round(values, 4).tolist()
        valid = ~out_of_range
        if config.batched:
            valid[malformed] = False
        else:
            valid[malformed, 0] = False
        window = tick * _TICK_MS // window_ms
        has_reading[:, :, window] |= valid
        newest_tick[valid.any(axis=1)] = tick
        for e, entity in enumerate(entities):
            row = rounded[e]
            bad_readings = int(out_of_range[e].sum())
            if config.batched:
                payload = encode(
                    {"entity_id": entity, "ts": ts, "values": dict(zip(names, row, strict=True))}
                )
                yield entity, _truncated(payload) if malformed[e] else payload
                expected.messages += 1
            else:
                for s, name in enumerate(names):
                    payload = encode(
                        {"entity_id": entity, "sensor": name, "ts": ts, "value": row[s]}
                    )
                    # In the single form only the first message of a malformed
                    # entity-tick is truncated, so the counts stay per message.
                    yield entity, _truncated(payload) if malformed[e] and s == 0 else payload
                    expected.messages += 1
            lost = config.sensors if config.batched else 1
            expected.readings += config.sensors
            if malformed[e]:
                expected.malformed_messages += 1
                expected.dead_letter_readings += lost
                if not config.batched:
                    bad_readings -= int(out_of_range[e, 0])
                else:
                    bad_readings = 0
            expected.out_of_range_readings += bad_readings
            expected.dead_letter_readings += bad_readings
            expected.valid_readings += config.sensors - (lost if malformed[e] else 0) - bad_readings
        if tick >= late_from_tick:
            for e, s in zip(*np.nonzero(late), strict=True):
                late_ts = ts - _LATE_BEHIND_MS + _TICK_MS // 2
                value = float(np.round(level[e, s], 4))
                payload = encode(
                    {"entity_id": entities[e], "sensor": names[s], "ts": late_ts, "value": value}
                )
                yield entities[e], payload
                expected.messages += 1
                expected.readings += 1
                expected.valid_readings += 1
                expected.late_readings += 1
    expected.last_ts_ms = int(tick_ms(config.ticks - 1))
    watermark = tick_ms(newest_tick) - int(config.lateness_s * 1000)
    windows = np.arange(has_reading.shape[2])
    window_end = tick_ms(windows * window_ms // _TICK_MS) + window_ms
    closed = window_end[None, :] <= watermark[:, None]
    expected.all_windows = int(has_reading.sum())
    expected.closed_windows = int((has_reading & closed[:, None, :]).sum())


def _truncated(payload: bytes) -> bytes:
    return payload[: len(payload) // 2]
