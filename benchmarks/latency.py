"""End-to-end latency under a steady load, from cumulative counts.

A :class:`LiveSchedule` sends readings at a fixed rate, stamped with the send time,
and records how many were sent by when; a :class:`VisibilityProbe` polls QuestDB for
how many of them are visible by when. With readings becoming visible in about the
order they were sent, the k-th reading's latency is the time the visible count reached
k minus the time the sent count did. The probe's poll interval (50 ms) bounds the
resolution.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from connectors.questdb import QuestDBError, QuestDBHttp

_SLICE_S = 0.02
_POLL_S = 0.05


class LiveSchedule:
    """``rate`` readings per second for ``seconds``, in 20-ms slices."""

    def __init__(self, rate: float, seconds: float) -> None:
        self.rate = rate
        self.seconds = seconds
        self.sent_at: list[tuple[float, int]] = []
        self._started = time.monotonic()

    @property
    def total(self) -> int:
        """Readings sent so far."""
        return self.sent_at[-1][1] if self.sent_at else 0

    def slices(self) -> Iterator[tuple[float, int]]:
        """``(due monotonic time, readings)`` per slice; the counts add up exactly."""
        self._started = time.monotonic()
        slices = max(1, round(self.seconds / _SLICE_S))
        planned = np.round(np.linspace(0, self.rate * self.seconds, slices + 1)).astype(int)
        for index in range(slices):
            count = int(planned[index + 1] - planned[index])
            if count:
                yield self._started + index * _SLICE_S, count

    @staticmethod
    def wait(due: float) -> None:
        """Sleep until a slice is due."""
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def sent(self, count: int) -> None:
        """Record that a slice went out now."""
        self.sent_at.append((time.time(), self.total + count))


class VisibilityProbe:
    """Polls a table's count of rows newer than a start time, in the background."""

    def __init__(self, sql: QuestDBHttp, table: str) -> None:
        self._sql = sql
        self._table = table
        self.seen_at: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._after_ms = 0

    def start(self, after_ms: int) -> None:
        """Count rows with ``ts >= after_ms`` from now on."""
        self._after_ms = after_ms
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def count(self) -> int:
        """Rows visible now (0 before the table exists)."""
        query = (
            f"SELECT count() FROM '{self._table}' "  # noqa: S608 - names are ours
            f"WHERE ts >= cast({self._after_ms * 1000} AS timestamp)"
        )
        try:
            return int(self._sql.exec(query).rows[0][0])
        except QuestDBError:
            return 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.seen_at.append((time.time(), self.count()))
            self._stop.wait(_POLL_S)

    def finish(self, schedule: LiveSchedule, timeout_s: float = 120.0) -> dict[str, float | int]:
        """Wait until every sent reading is visible; return latency percentiles (ms)."""
        deadline = time.monotonic() + timeout_s
        while (not self.seen_at or self.seen_at[-1][1] < schedule.total) and (
            time.monotonic() < deadline
        ):
            time.sleep(_POLL_S)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return latencies(schedule.sent_at, self.seen_at, schedule.total)


def latencies(
    sent_at: list[tuple[float, int]], seen_at: list[tuple[float, int]], total: int
) -> dict[str, float | int]:
    """Percentiles of (time visible - time sent) over the k-th readings, in ms.

    >>> latencies([(0.0, 10), (1.0, 20)], [(0.5, 5), (0.6, 10), (1.2, 20)], 20)
    {'readings': 20, 'visible': 20, 'p50_ms': 350.0, 'p99_ms': 600.0, 'max_ms': 600.0}
    """
    sent_times, sent_counts = np.array([t for t, _ in sent_at]), np.array([c for _, c in sent_at])
    seen_times, seen_counts = np.array([t for t, _ in seen_at]), np.array([c for _, c in seen_at])
    visible = int(seen_counts.max(initial=0))
    k = np.arange(1, min(total, visible) + 1)
    if not len(k):
        return {
            "readings": total,
            "visible": visible,
            "p50_ms": np.nan,
            "p99_ms": np.nan,
            "max_ms": np.nan,
        }
    sent = sent_times[np.searchsorted(sent_counts, k, side="left")]
    seen = seen_times[np.searchsorted(np.maximum.accumulate(seen_counts), k, side="left")]
    return {"readings": total, "visible": visible, **percentiles((seen - sent) * 1000)}


def percentiles(delays_ms: npt.ArrayLike) -> dict[str, float]:
    """p50, p99 and max of delays in ms, rounded to 0.1 ms (empty: none).

    >>> percentiles([10.0, 20.0, 30.0])
    {'p50_ms': 20.0, 'p99_ms': 29.8, 'max_ms': 30.0}
    """
    delays = np.asarray(delays_ms, dtype=np.float64)
    if not len(delays):
        return {}
    return {
        "p50_ms": round(float(np.percentile(delays, 50)), 1),
        "p99_ms": round(float(np.percentile(delays, 99)), 1),
        "max_ms": round(float(delays.max()), 1),
    }
