"""Waiting out a server's outage in a sink: bounded exponential back-off, then give up.

A sink's ``write_batch`` runs on its worker's thread, so while it waits the worker
steps nothing else: its sources stop reading, and Bytewax keeps the others to one
epoch ahead of the slowest output (its inputs wait for the previous epoch to finish).
That is the back-pressure: readings wait in Kafka, not in memory. Snapshots stop too,
so a kill during the wait resumes from before it; outputs are idempotent.

Only errors a retry can cure are waited out (``transient``); the rest raise at once.
After ``give_up_s`` of failures in a row the sink raises :class:`SinkGaveUpError`, which
names ``flow.sink_give_up_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from twinflow import metrics
from twinflow.errors import TwinflowError

log = logging.getLogger("twinflow.sink")

T = TypeVar("T")
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 15.0
"""A server back after an outage is written to within this long."""


class SinkGaveUpError(TwinflowError):
    """A sink's server stayed unreachable for longer than ``flow.sink_give_up_s``."""


class OutageWait:
    """Retries one sink's writes while its server is down (one per sink partition).

    ``sink`` labels the metrics (``questdb``, ``kafka``); ``server`` names the server in
    log lines and errors. ``clock`` and ``sleep`` are for tests.
    """

    def __init__(
        self,
        sink: str,
        server: str,
        give_up_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.sink = sink
        self.server = server
        self.give_up_s = give_up_s
        self._clock = clock
        self._sleep = sleep
        self._waiting = metrics.sink_waiting.labels(sink)
        self._retries = metrics.sink_retries.labels(sink)

    def attempt(self, write: Callable[[], T], transient: Callable[[Exception], bool]) -> T:
        """``write()``, repeated with back-off while it fails with a transient error."""
        started: float | None = None
        delay = FIRST_DELAY_S
        retries = 0
        while True:
            try:
                result = write()
            except Exception as exc:
                if not transient(exc):
                    raise
                now = self._clock()
                if started is None:
                    started = now
                    self._waiting.set(1)
                    log.warning(
                        "%s is unavailable (%s); the %s sink waits for it, retrying with "
                        "back-off, and the flow reads nothing meanwhile (gives up after "
                        "flow.sink_give_up_s = %g s)",
                        self.server,
                        _first_line(exc),
                        self.sink,
                        self.give_up_s,
                    )
                waited = now - started
                if waited >= self.give_up_s:
                    self._waiting.set(0)
                    raise SinkGaveUpError(
                        f"{self.server} has been unavailable for {waited:.0f} s "
                        f"({retries} retries; last error: {_first_line(exc)}). The flow stops; "
                        "recovery replays the unwritten outputs when it is restarted. Set "
                        "TWINFLOW_FLOW__SINK_GIVE_UP_S to wait longer."
                    ) from exc
                if retries and retries % 10 == 0:
                    log.warning(
                        "%s still unavailable after %.0f s (%d retries): %s",
                        self.server,
                        waited,
                        retries,
                        _first_line(exc),
                    )
                self._sleep(min(delay, self.give_up_s - waited))
                delay = min(delay * 2, MAX_DELAY_S)
                retries += 1
                self._retries.inc()
                continue
            if started is not None:
                self._waiting.set(0)
                log.warning(
                    "%s is back: the %s sink wrote again after %.1f s (%d retries)",
                    self.server,
                    self.sink,
                    self._clock() - started,
                    retries,
                )
            return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
