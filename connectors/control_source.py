"""A Bytewax source of the back channel: operator verdicts, commands and their results.

``twin.feedback`` and ``twin.commands`` have one partition each and little traffic. Every
raw partition's twins read a copy of this source's one part (``flows.partition``), which
reads both topics and keys each batch by raw partition (each twins apply what concerns
the machines they hold), with the progress :mod:`twinflow.merge` orders them by:
the newest broker timestamp read, or, once the broker confirms both partitions hold
nothing more, the wall clock less a margin (``flow.back_channel_margin_s``). Its resume
state is the next offset of each topic, snapshotted with each raw partition's twins.

The copies in one process ask the broker for the topics' ends together, at most once
a tick (:class:`_Ends`): each copy asking on its own tick cost a worker 7 % of its time
at four raw partitions.

A message that does not decode becomes a dead letter, on one partition's copy only.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from connectors.kafka import client_config
from connectors.kafka_source import (
    KafkaSourceError,
    check_read_error,
    flow_consumer,
    partition_key,
    watermarks_client,
)
from schemas import control, deadletter
from schemas.raw import Reason
from schemas.transport import ControlBatch, ControlMessage, ControlPayload
from twinflow import metrics
from twinflow.settings import KafkaSettings

log = logging.getLogger("twinflow.source.control")
_PART = "back-channel"
_IDLE_POLL_S = 0.05
_WATERMARK_TIMEOUT_S = 1.0
_UNANSWERED_WARN_S = 30.0
_NEVER_MS = -(2**62)

Item = tuple[str, ControlBatch]
Offsets = dict[str, int]


class BackChannelSource(FixedPartitionedSource[Item, Offsets]):
    """``feedback_topic`` and ``commands_topic`` (partition 0), for every part of ``raw_topic``."""

    def __init__(
        self,
        kafka: KafkaSettings,
        raw_topic: str,
        feedback_topic: str,
        commands_topic: str,
        margin_s: float,
        batch_size: int = 1000,
        tick_s: float = 0.05,
    ) -> None:
        self.kafka = kafka
        self.raw_topic = raw_topic
        self.topics = (feedback_topic, commands_topic)
        self.batch_size = batch_size
        self.tick_s = tick_s
        self.margin_ms = int(margin_s * 1000)
        self._ends: _Ends | None = None

    def list_parts(self) -> list[str]:
        """One part: both topics have one partition."""
        return [_PART]

    def build_part(self, step_id: str, for_part: str, resume_state: Offsets | None) -> _Part:
        """Open both topics at their resume offsets."""
        if self._ends is None or self._ends.closed:
            self._ends = _Ends(self.kafka, self.topics, self.tick_s)
        return _Part(self, self._ends.acquire(), self._raw_keys(), resume_state or {})

    def _raw_keys(self) -> list[str]:
        consumer = Consumer(client_config(self.kafka, **{"group.id": "twinflow-metadata"}))
        try:
            topics = consumer.list_topics(timeout=30).topics
        finally:
            consumer.close()
        for topic in (self.raw_topic, *self.topics):
            metadata = topics.get(topic)
            if metadata is None or metadata.error is not None or not metadata.partitions:
                raise KafkaSourceError(
                    f"topic {topic} does not exist on {self.kafka.bootstrap} "
                    "(twinflow run creates its topics before starting)"
                )
        return [partition_key(self.raw_topic, p) for p in sorted(topics[self.raw_topic].partitions)]


class _Ends:
    """The back channel's end offsets, asked of the broker at most once per ``max_age_s``.

    Shared by the copies of the back channel in one process (worker threads); each
    answer carries the wall-clock time taken just before the query, so a copy that has
    read up to those ends knows every message sent before that time.
    """

    def __init__(self, kafka: KafkaSettings, topics: tuple[str, str], max_age_s: float) -> None:
        self._client = watermarks_client(kafka)
        self._topics = topics
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._asked = -float("inf")
        self._answer: tuple[int, dict[str, tuple[int, int]]] | None = None
        self._users = 0
        self.closed = False
        self._answered = time.monotonic()
        self._warned = self._answered

    def acquire(self) -> _Ends:
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and not self.closed:
                self.closed = True
                self._client.close()

    def latest(self) -> tuple[int, dict[str, tuple[int, int]]] | None:
        """``(wall ms before the query, (low, high) offsets per topic)``, or ``None``."""
        with self._lock:
            now = time.monotonic()
            if now - self._asked >= self._max_age_s:
                self._asked = now
                self._answer = self._ask()
            return self._answer

    def _ask(self) -> tuple[int, dict[str, tuple[int, int]]] | None:
        asked_ms = time.time_ns() // 1_000_000
        ends: dict[str, tuple[int, int]] = {}
        for topic in self._topics:
            try:
                marks = self._client.get_watermark_offsets(
                    TopicPartition(topic, 0), timeout=_WATERMARK_TIMEOUT_S, cached=False
                )
            except KafkaException as exc:
                self._not_answered(topic, str(exc))
                return None
            if marks is None:
                self._not_answered(topic, "no answer")
                return None
            ends[topic] = marks
        self._answered = time.monotonic()
        return asked_ms, ends

    def _not_answered(self, topic: str, why: str) -> None:
        """Say so when the back channel's progress has stood still for want of answers."""
        now = time.monotonic()
        if now - self._answered >= _UNANSWERED_WARN_S and now - self._warned >= _UNANSWERED_WARN_S:
            self._warned = now
            log.warning(
                "the back channel's progress stands still for %.0f s: the broker did not "
                "answer a watermark query of %s within %.1f s (%s); raw messages wait",
                now - self._answered,
                topic,
                _WATERMARK_TIMEOUT_S,
                why,
            )


class _Part(StatefulSourcePartition[Item, Offsets]):
    def __init__(
        self, source: BackChannelSource, ends: _Ends, raw_keys: list[str], offsets: Offsets
    ) -> None:
        self._source = source
        self._raw_keys = raw_keys
        self._consumer = flow_consumer(source.kafka)
        self._ends = ends
        self._consumer.assign(
            [
                TopicPartition(topic, 0, offsets.get(topic, OFFSET_BEGINNING))
                for topic in source.topics
            ]
        )
        self._next: Offsets = dict(offsets)
        self._read_ms = dict.fromkeys(source.topics, _NEVER_MS)
        """Per topic: every message stamped at or before this has been read."""
        self._awake: datetime | None = None
        self._last_tick = 0.0

    def next_batch(self) -> list[Item]:
        messages = self._consumer.consume(num_messages=self._source.batch_size, timeout=0)
        read: list[ControlMessage] = []
        letters: list[deadletter.DeadLetter] = []
        for message in messages:
            error = message.error()
            if error is not None:
                check_read_error(error, str(message.topic()))
                continue
            topic, offset = message.topic(), message.offset()
            assert topic is not None and offset is not None
            stamp_ms = message.timestamp()[1]
            self._next[topic] = offset + 1
            self._read_ms[topic] = max(self._read_ms[topic], stamp_ms)
            metrics.messages_consumed.labels(topic).inc()
            payload = message.value() or b""
            try:
                decoded: ControlPayload = (
                    control.decode_feedback(payload)
                    if topic == self._source.topics[0]
                    else control.decode_command(payload)
                )
            except control.ControlError as exc:
                letters.append(_dead_letter(payload, str(exc), topic, offset, stamp_ms))
                continue
            read.append(ControlMessage(topic, offset, stamp_ms, decoded))
        now = time.monotonic()
        if not messages:
            self._awake = datetime.now(UTC) + timedelta(seconds=_IDLE_POLL_S)
            if now - self._last_tick < self._source.tick_s or not self._caught_up():
                return []
        else:
            self._awake = None
        self._last_tick = now
        read.sort(key=lambda m: (m.timestamp_ms, m.topic, m.offset))
        progress = min(self._read_ms.values())
        return [
            (key, ControlBatch(tuple(read), progress, tuple(letters) if i == 0 else (), i == 0))
            for i, key in enumerate(self._raw_keys)
        ]

    def _caught_up(self) -> bool:
        """Whether both partitions are read to their ends; if so, their progress is then."""
        latest = self._ends.latest()
        if latest is None:
            return False
        asked_ms, ends = latest
        if any(self._next.get(topic, low) < high for topic, (low, high) in ends.items()):
            return False
        for topic in self._source.topics:
            self._read_ms[topic] = max(self._read_ms[topic], asked_ms - self._source.margin_ms)
        return True

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> Offsets:
        return dict(self._next)

    def close(self) -> None:
        self._consumer.close()
        self._ends.release()


def _dead_letter(
    payload: bytes, detail: str, topic: str, offset: int, stamp_ms: int
) -> deadletter.DeadLetter:
    return deadletter.dead_letter(
        payload,
        Reason.SCHEMA,
        detail,
        deadletter.Source(kind="kafka", topic=topic, partition=0, offset=offset),
        datetime.fromtimestamp(stamp_ms / 1000, UTC),
    )
