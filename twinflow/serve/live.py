"""The server's live twin: a :class:`~twinflow.plant.PlantView` fed from Kafka and QuestDB.

``twin.state`` (compacted) and ``twin.alarms`` are read from their beginning at start and
followed; the latest window of every sensor is re-read from QuestDB every
``serve.windows_refresh_s``. Reads take a lock only long enough to build an answer;
changes go to every SSE subscriber's queue, encoded once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from connectors.questdb import QuestDBError, QuestDBHttp
from connectors.topic_reader import TopicReader
from schemas.outputs import Alarm, TwinState
from twinflow import metrics
from twinflow.plant import PlantView
from twinflow.serve.history import latest_windows
from twinflow.settings import Settings
from twinflow.tables import tables
from twinflow.twin_model import TwinModel

log = logging.getLogger(__name__)

T = TypeVar("T")
Chunk = bytes | None
"""Server-Sent Events as they go on the wire, several at once; None ends the stream."""

_PENDING_LIMIT = 500
"""Chunks a subscriber may have waiting; beyond, it is too slow and its stream ends (an
EventSource reconnects and reads the view afresh rather than showing it wrong)."""
_SLICE = 100


@dataclass(slots=True)
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk]


class LiveTwin:
    """The plant view, the threads that keep it current and the SSE subscribers."""

    def __init__(self, settings: Settings, model: TwinModel) -> None:
        self.settings = settings
        self.view = PlantView(model)
        self._lock = threading.Lock()
        self._subscribers: list[_Subscriber] = []
        self._states = msgspec.json.Decoder(TwinState)
        self._alarms = msgspec.json.Decoder(Alarm)
        self._reader = TopicReader(
            settings.kafka, [settings.topics.state, settings.topics.alarms], self._records
        )
        self._stop = threading.Event()
        self._windows_thread = threading.Thread(
            target=self._refresh_windows, name="windows", daemon=True
        )
        self.questdb_error: str | None = None
        self.skipped = 0
        """Records of the topics that were not the contract's messages."""

    @property
    def reader_error(self) -> str | None:
        """The last error reading the topics, if any."""
        return self._reader.error

    @property
    def caught_up(self) -> bool:
        """Whether the topics have been read up to where they ended at start."""
        return self._reader.caught_up.is_set()

    def start(self) -> None:
        """Start reading the topics and QuestDB."""
        self._reader.start()
        metrics.serve_caught_up.set(self.caught_up)
        self._windows_thread.start()

    def stop(self) -> None:
        """Stop the threads and end every subscriber's stream."""
        self._stop.set()
        self._reader.stop()
        self._windows_thread.join(timeout=10)
        with self._lock:
            subscribers, self._subscribers = self._subscribers, []
        for subscriber in subscribers:
            subscriber.loop.call_soon_threadsafe(_offer, subscriber.queue, None)

    def read(self, answer: Callable[[PlantView], T]) -> T:
        """``answer(view)`` while no update is applied."""
        with self._lock:
            return answer(self.view)

    def subscribe(self) -> asyncio.Queue[Chunk]:
        """A queue of this loop that receives every change from now on, as SSE bytes."""
        subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Queue(_PENDING_LIMIT))
        with self._lock:
            self._subscribers.append(subscriber)
        return subscriber.queue

    def unsubscribe(self, queue: asyncio.Queue[Chunk]) -> None:
        """Stop sending changes to ``queue``."""
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s.queue is not queue]

    def _records(self, topic: str, values: Sequence[bytes]) -> None:
        # In slices, so a long read at start never holds the lock for long: the API's
        # reads run on the server's event loop and wait for it.
        for start in range(0, len(values), _SLICE):
            self._apply(topic, values[start : start + _SLICE])

    def _apply(self, topic: str, values: Sequence[bytes]) -> None:
        metrics.serve_records.labels(topic).inc(len(values))
        events: list[bytes] = []
        is_state = topic == self.settings.topics.state
        with self._lock:
            for value in values:
                try:
                    if is_state:
                        changed = self.view.apply_state(self._states.decode(value))
                        if changed is not None:
                            events.append(sse_event("state", changed))
                    else:
                        alarm = self.view.apply_alarm(self._alarms.decode(value))
                        if alarm is not None:
                            events.append(sse_event("alarm", alarm))
                except msgspec.MsgspecError as exc:
                    # Another producer's record (or a newer contract): skip it, say so.
                    self.skipped += 1
                    log.warning("skipped a record of %s that is not a v1 message: %s", topic, exc)
            subscribers = list(self._subscribers)
        metrics.serve_caught_up.set(self.caught_up)
        if not events:
            return
        # Encoded once for all subscribers, handed over as one chunk per slice.
        chunk = b"".join(events)
        for subscriber in subscribers:
            subscriber.loop.call_soon_threadsafe(_offer, subscriber.queue, chunk)

    def _refresh_windows(self) -> None:
        sql = QuestDBHttp(self.settings.questdb, timeout_s=10.0)
        names = tables(self.settings.questdb.table_prefix)
        while not self._stop.is_set():
            try:
                windows = latest_windows(sql, names)
            except QuestDBError as exc:
                if self.questdb_error is None:
                    log.warning("latest windows unavailable (QuestDB): %s", exc)
                self.questdb_error = str(exc)
            else:
                self.questdb_error = None
                with self._lock:
                    self.view.set_windows(windows)
            self._stop.wait(self.settings.serve.windows_refresh_s)


def sse_event(name: str, data: object) -> bytes:
    """One Server-Sent Event with JSON data (msgspec writes no newline into it)."""
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def _offer(queue: asyncio.Queue[Chunk], chunk: Chunk) -> None:
    """Queue a chunk; a subscriber too far behind is ended instead."""
    if queue.full():
        while not queue.empty():
            queue.get_nowait()
        chunk = None
    queue.put_nowait(chunk)
