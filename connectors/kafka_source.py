"""A Bytewax source that reads Kafka partitions in batches: one item per batch.

Bytewax's own KafkaSource emits one item per message, and every item costs a trip
through each operator. This source emits ``(partition key, MessageBatch)``, so a
list-level step pays that cost once per batch. The partition's next offset is its
resume state: recovery snapshots it with the step states of the same epoch.

While a partition has no new messages it still emits an empty batch every ``tick_s``,
so the step can act on system time (close the windows of silent entities). It ticks
only when the broker confirms the partition holds nothing more: while the broker is
unreachable, or messages are waiting to be fetched, silence is not the entities'.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from connectors.kafka import broker_unavailable, client_config
from schemas.transport import InputMessage, MessageBatch
from twinflow import metrics
from twinflow.errors import TwinflowError
from twinflow.settings import KafkaSettings

Batch = tuple[str, Sequence[InputMessage]]
log = logging.getLogger("twinflow.source.kafka")
_IDLE_POLL_S = 0.05
_WATERMARK_TIMEOUT_S = 0.5
_LAG_EVERY_S = 1.0
_UNANSWERED_WARN_S = 30.0
"""How long ticks may wait for an unanswered watermark query before the log says so."""
_STATS_EVERY_MS = 5000


class KafkaSourceError(TwinflowError):
    """The source topic is missing or a partition cannot be read."""


def check_read_error(error: KafkaError, where: str) -> None:
    """Raise for a consumer error the flow cannot read past; log one it can wait out.

    A broker that is down or restarting is waited out: the consumer reconnects and
    fetches on from its position, so nothing is skipped.
    """
    if error.code() == KafkaError._PARTITION_EOF:
        return
    if broker_unavailable(error):
        log.warning("reading %s waits for the broker: %s", where, error.str())
        return
    raise KafkaSourceError(f"reading {where} failed: {error}")


def flow_consumer(kafka: KafkaSettings, **overrides: Any) -> Consumer:
    """A consumer for the flow's sources: assigned partitions, offsets never committed."""
    return Consumer(
        client_config(
            kafka,
            **{
                # Offsets live in Bytewax's recovery snapshots, not in Kafka.
                "group.id": "twinflow-flow",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "fetch.min.bytes": 1,
                **overrides,
            },
        )
    )


def watermarks_client(kafka: KafkaSettings) -> Consumer:
    """A client that only asks the broker for watermarks: it never fetches.

    A watermark query on a fetching consumer's connection waits behind the pending
    fetch's long poll (``fetch.wait.max.ms``: 500 ms by default), and the flow's worker
    waits with it; on a connection of its own it takes a fraction of a millisecond.
    """
    return Consumer(client_config(kafka, **{"group.id": "twinflow-watermarks"}))


def partition_key(topic: str, partition: int) -> str:
    """The name of a partition's part: its items' key, under which recovery keeps its state."""
    return f"{topic}#{partition}"


class KafkaBatchSource(FixedPartitionedSource[Batch, int]):
    """Every partition of ``topic``, read from the start or the recovered offset."""

    def __init__(
        self, kafka: KafkaSettings, topic: str, batch_size: int, tick_s: float = 1.0
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.batch_size = batch_size
        self.tick_s = tick_s

    def list_parts(self) -> list[str]:
        """One part per Kafka partition."""
        consumer = Consumer(client_config(self.kafka, **{"group.id": "twinflow-metadata"}))
        try:
            metadata = consumer.list_topics(self.topic, timeout=30).topics.get(self.topic)
        finally:
            consumer.close()
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise KafkaSourceError(
                f"topic {self.topic} does not exist on {self.kafka.bootstrap}; start a bridge "
                "or create it (twinflow run creates its topics before starting)"
            )
        return [partition_key(self.topic, p) for p in sorted(metadata.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _BatchPartition:
        """Open one partition at its resume offset."""
        partition = int(for_part.rsplit("#", 1)[1])
        return _BatchPartition(self, for_part, partition, resume_state)


class _BatchPartition(StatefulSourcePartition[Batch, int]):
    def __init__(
        self, source: KafkaBatchSource, key: str, partition: int, offset: int | None
    ) -> None:
        self._source = source
        self._key = key
        self._partition = partition
        self._fetch_queue = metrics.kafka_fetch_queue.labels(source.topic, str(partition))
        self._consumer = flow_consumer(
            source.kafka,
            **{
                # Read ahead one batch. The queue's memory stays in the process after
                # it drains (the allocator keeps it), so a deeper one costs RSS to the
                # peak of every lag for no throughput: a fetch into an emptied queue
                # returns in milliseconds, and the step spends far longer on a batch.
                "queued.min.messages": source.batch_size,
                "statistics.interval.ms": _STATS_EVERY_MS,
                "stats_cb": self._read_stats,
            },
        )
        start = OFFSET_BEGINNING if offset is None else offset
        self._consumer.assign([TopicPartition(source.topic, partition, start)])
        self._marks = watermarks_client(source.kafka)
        self._next_offset = offset
        self._reading = False
        self._awake: datetime | None = None
        self._last_emit = time.monotonic()
        self._consumed = metrics.messages_consumed.labels(source.topic)
        self._lag = metrics.consumer_lag.labels(source.topic, str(partition))
        self._lag_reported = 0.0
        self._unanswered = 0
        self._warned = time.monotonic()

    def next_batch(self) -> list[Batch]:
        messages = self._consumer.consume(num_messages=self._source.batch_size, timeout=0)
        for message in messages:
            error = message.error()
            if error is not None:
                check_read_error(error, f"{self._source.topic}[{self._partition}]")
        if any(message.error() is not None for message in messages):
            messages = [message for message in messages if message.error() is None]
        now = time.monotonic()
        if messages:
            batch = MessageBatch(
                self._source.topic,
                self._partition,
                [message.offset() for message in messages],  # type: ignore[misc]
                [message.timestamp()[1] for message in messages],
                [message.value() or b"" for message in messages],
            )
            if not self._reading:
                self._reading = True
                log.info("%s: first batch from offset %d", self._key, batch.offsets[0])
            self._next_offset = batch.offsets[-1] + 1
            self._awake = None
            self._last_emit = now
            self._consumed.inc(len(messages))
            if now - self._lag_reported >= _LAG_EVERY_S:
                self._report_lag(now)
            return [(self._key, batch)]
        self._awake = datetime.now(UTC) + timedelta(seconds=_IDLE_POLL_S)
        if now - self._last_emit >= self._source.tick_s and self._caught_up():
            self._last_emit = now
            return [(self._key, MessageBatch(self._source.topic, self._partition, [], [], []))]
        return []

    def _caught_up(self) -> bool:
        """Whether the broker answers and has no message past what was emitted."""
        partition = TopicPartition(self._source.topic, self._partition)
        try:
            marks = self._marks.get_watermark_offsets(
                partition, timeout=_WATERMARK_TIMEOUT_S, cached=False
            )
        except KafkaException as exc:
            self._not_answered(str(exc))
            return False
        if marks is None:
            self._not_answered("no answer")
            return False
        self._unanswered = 0
        low, high = marks
        position = low if self._next_offset is None else self._next_offset
        self._lag.set(max(0, high - position))
        self._lag_reported = time.monotonic()
        return position >= high

    def _not_answered(self, why: str) -> None:
        """Count a watermark query the broker did not answer; say so when ticks stall."""
        self._unanswered += 1
        now = time.monotonic()
        if now - self._last_emit >= _UNANSWERED_WARN_S and now - self._warned >= _UNANSWERED_WARN_S:
            self._warned = now
            log.warning(
                "%s: no tick for %.0f s: the broker answered none of the last %d watermark "
                "queries within %.1f s (%s); windows of silent entities stay open meanwhile",
                self._key,
                now - self._last_emit,
                self._unanswered,
                _WATERMARK_TIMEOUT_S,
                why,
            )

    def _report_lag(self, now: float) -> None:
        """Lag from the watermarks the consumer's fetches cached (no broker round trip)."""
        self._lag_reported = now
        partition = TopicPartition(self._source.topic, self._partition)
        marks = self._consumer.get_watermark_offsets(partition, cached=True)
        if marks is not None and marks[1] >= 0 and self._next_offset is not None:
            self._lag.set(max(0, marks[1] - self._next_offset))

    def _read_stats(self, stats_json: str) -> None:
        """The Kafka client's statistics (served by ``consume``): its fetch queue's bytes."""
        topics = json.loads(stats_json).get("topics", {})
        partition = topics.get(self._source.topic, {}).get("partitions", {})
        found = partition.get(str(self._partition), {}).get("fetchq_size")
        if found is not None:
            self._fetch_queue.set(found)

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> int:
        # Before the first message there is nothing to resume from but the beginning.
        return self._next_offset if self._next_offset is not None else 0

    def close(self) -> None:
        self._consumer.close()
        self._marks.close()
