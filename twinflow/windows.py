"""Event-time tumbling windows of one entity, aligned to the epoch.

A window ``[start, start + length)`` closes when the entity's watermark — its newest
event time minus the allowed lateness — passes the window's end. An entity that goes
silent (no reading for ``idle_close`` of system time) has all its open windows closed,
so its last window is not held open forever. A reading whose window already closed is
late: it is handed back to the caller (for ``twin.late``), never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from schemas.outputs import Flag, SensorWindow


@dataclass
class _Buffer:
    ts: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)


@dataclass
class EntityWindows:
    """Open windows of one entity and its watermark."""

    entity_id: str
    length_ms: int
    lateness_ms: int
    newest_ms: int = -1
    closed_until_ms: int = -1
    """Every window ending at or before this has closed."""
    open: dict[int, dict[str, _Buffer]] = field(default_factory=dict)

    def add(self, sensor: str, ts_ms: int, value: float, flags: int) -> bool:
        """Put a reading in its window; False if that window already closed (late)."""
        start = ts_ms - ts_ms % self.length_ms
        if start + self.length_ms <= self.closed_until_ms:
            return False
        buffer = self.open.setdefault(start, {}).setdefault(sensor, _Buffer())
        buffer.ts.append(ts_ms)
        buffer.values.append(value)
        buffer.flags.append(flags)
        self.newest_ms = max(self.newest_ms, ts_ms)
        return True

    @property
    def watermark_ms(self) -> int:
        """Event time before which no more readings are expected."""
        return self.newest_ms - self.lateness_ms

    def close_due(self, idle: bool = False) -> list[tuple[int, dict[str, SensorWindow]]]:
        """Close the windows the watermark passed (all open ones when ``idle``).

        Returns ``(window start, features by sensor)`` in time order.
        """
        if not self.open:
            return []
        limit = max(self.open) + self.length_ms if idle else self.watermark_ms
        if min(self.open) + self.length_ms > limit:
            return []  # the common case, checked without sorting
        closed = []
        for start in sorted(self.open):
            end = start + self.length_ms
            if end > limit:
                break
            buffers = self.open.pop(start)
            closed.append((start, features(self.entity_id, start, end, buffers)))
            self.closed_until_ms = max(self.closed_until_ms, end)
        return closed


def features(
    entity_id: str, start_ms: int, end_ms: int, buffers: dict[str, _Buffer]
) -> dict[str, SensorWindow]:
    """Per-sensor features of one window; spikes are left out, other flags counted."""
    result = {}
    for sensor, buffer in buffers.items():
        flags = np.asarray(buffer.flags, dtype=np.int64)
        keep = (flags & Flag.SPIKE) == 0
        if not keep.any():
            continue
        order = np.argsort(np.asarray(buffer.ts, dtype=np.int64)[keep], kind="stable")
        ts = np.asarray(buffer.ts, dtype=np.int64)[keep][order]
        values = np.asarray(buffer.values, dtype=np.float64)[keep][order]
        slope = 0.0
        if len(values) >= 2 and ts[-1] > ts[0]:
            seconds = (ts - ts[0]) / 1000.0
            centred = seconds - seconds.mean()
            slope = float((centred * (values - values.mean())).sum() / (centred**2).sum())
        result[sensor] = SensorWindow(
            entity_id=entity_id,
            sensor=sensor,
            window_start_ms=start_ms,
            window_end_ms=end_ms,
            count=len(values),
            mean=float(values.mean()),
            min=float(values.min()),
            max=float(values.max()),
            std=float(values.std()),
            last=float(values[-1]),
            slope=slope,
            flagged=int((flags != 0).sum()),
        )
    return result
