"""Read whole topics from their beginning, then follow them: a materialized view's input.

No consumer group: every reader assigns itself all partitions and starts at the
beginning, so any number of readers (several ``twinflow serve`` processes) each see
every record and none commits offsets.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from connectors.kafka import client_config
from twinflow.errors import TwinflowError
from twinflow.settings import KafkaSettings

log = logging.getLogger(__name__)

_NO_LEADER_YET = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
}

OnRecords = Callable[[str, Sequence[bytes]], None]
"""Called with a topic and the values of a batch of its records, in offset order per
partition (tombstones skipped)."""


class TopicReader:
    """A thread that reads ``topics`` from the beginning and hands batches to ``on_records``.

    ``caught_up`` is set once every partition has been read up to where it ended when
    the reader started, so a server can say whether its view is complete yet.
    """

    def __init__(self, kafka: KafkaSettings, topics: Sequence[str], on_records: OnRecords) -> None:
        self._topics = list(topics)
        self._on_records = on_records
        self._consumer = Consumer(
            client_config(
                kafka,
                **{
                    "group.id": f"twinflow-serve-{uuid.uuid4()}",
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                },
            )
        )
        self._stop = threading.Event()
        self.caught_up = threading.Event()
        self.error: str | None = None
        """The last error reading the topics, until a record is read again."""
        self._behind: set[tuple[str, int]] = set()
        self._thread = threading.Thread(target=self._run, name="topic-reader", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        """Assign every partition at its beginning and start reading."""
        assigned = []
        for topic in self._topics:
            metadata = self._consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
            if metadata is None or metadata.error is not None:
                raise TwinflowError(f"topic {topic} does not exist; `twinflow run` creates it")
            for partition in sorted(metadata.partitions):
                low, high = self._ends(TopicPartition(topic, partition), timeout_s)
                if high > low:
                    self._behind.add((topic, partition))
                assigned.append(TopicPartition(topic, partition, OFFSET_BEGINNING))
        self._consumer.assign(assigned)
        if not self._behind:
            self.caught_up.set()
        self._thread.start()

    def _ends(self, partition: TopicPartition, timeout_s: float) -> tuple[int, int]:
        """A partition's low and high offsets, waiting out a leader not elected yet."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                low, high = self._consumer.get_watermark_offsets(partition, timeout=timeout_s)
                return low, high
            except KafkaException as exc:
                # A topic created a moment ago has no leader yet for a while.
                if time.monotonic() > deadline or exc.args[0].code() not in _NO_LEADER_YET:
                    raise TwinflowError(
                        f"cannot read where {partition.topic} [{partition.partition}] ends: "
                        f"{exc.args[0].str()}"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop reading and close the consumer."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            # consume() waits out its whole timeout unless 5000 records come first, so
            # the timeout bounds how late a change is seen.
            messages = self._consumer.consume(num_messages=5000, timeout=0.02)
            batches: dict[str, list[bytes]] = {}
            ends = []
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        ends.append((message.topic() or "", message.partition() or 0))
                        continue
                    self.error = str(error)
                    log.warning("reading %s failed: %s", message.topic(), error)
                    continue
                self.error = None  # reading again
                value = message.value()
                if value is not None:
                    batches.setdefault(message.topic() or "", []).append(value)
            for topic, values in batches.items():
                try:
                    self._on_records(topic, values)
                except Exception:  # one bad batch must not stop the view
                    log.exception("could not apply a batch of %s", topic)
            # Only once the batch that reached an end is applied is the view complete.
            self._behind.difference_update(ends)
            if ends and not self._behind:
                self.caught_up.set()
