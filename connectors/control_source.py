"""A Bytewax source of the back channel: operator verdicts, commands and their results.

``twin.feedback`` and ``twin.commands`` have one partition each and little traffic. Every
raw partition's twins read a copy of this source's one part (``flows.partition``), which
reads both topics and keys each batch by raw partition (each twins apply what concerns
the machines they hold), with the progress :mod:`twinflow.merge` orders them by:
the newest broker timestamp read, or, once the broker confirms both partitions hold
nothing more, the wall clock less a margin (``flow.back_channel_margin_s``). Its resume
state is the next offset of each topic, snapshotted with each raw partition's twins.

A message that does not decode becomes a dead letter, on one partition's copy only.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from connectors.kafka import client_config
from connectors.kafka_source import (
    KafkaSourceError,
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

    def list_parts(self) -> list[str]:
        """One part: both topics have one partition."""
        return [_PART]

    def build_part(self, step_id: str, for_part: str, resume_state: Offsets | None) -> _Part:
        """Open both topics at their resume offsets."""
        return _Part(self, self._raw_keys(), resume_state or {})

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


class _Part(StatefulSourcePartition[Item, Offsets]):
    def __init__(self, source: BackChannelSource, raw_keys: list[str], offsets: Offsets) -> None:
        self._source = source
        self._raw_keys = raw_keys
        self._consumer = flow_consumer(source.kafka)
        self._marks = watermarks_client(source.kafka)
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
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaSourceError(f"reading {message.topic()} failed: {error}")
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
        """Whether both partitions are read to their end; if so, their progress is now."""
        now_ms = time.time_ns() // 1_000_000 - self._source.margin_ms
        for topic in self._source.topics:
            try:
                marks = self._marks.get_watermark_offsets(
                    TopicPartition(topic, 0), timeout=_WATERMARK_TIMEOUT_S, cached=False
                )
            except KafkaException:
                return False
            if marks is None:
                return False
            low, high = marks
            if self._next.get(topic, low) < high:
                return False
        for topic in self._source.topics:
            self._read_ms[topic] = max(self._read_ms[topic], now_ms)
        return True

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> Offsets:
        return dict(self._next)

    def close(self) -> None:
        self._consumer.close()
        self._marks.close()


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
