"""A Bytewax sink producing :class:`KafkaRecord` items and checking every delivery.

Bytewax's stock ``KafkaSink`` produces without a delivery callback and ignores what
``flush`` leaves behind, so a message librdkafka gives up on (unknown topic, broker
down past ``message.timeout.ms``) is lost while the flow carries on. This sink waits
for every delivery report of a write batch. Messages that failed because the broker
was unavailable (timed out, transport errors, no leader yet) are produced again with
back-off (:mod:`connectors.outage`) until they are delivered or ``flow.sink_give_up_s``
passes; any other failure, or a topic that does not exist, raises
:class:`KafkaSinkError` at once and the flow stops so that recovery replays the batch.
A message that timed out may still have reached the broker: resending it can repeat
it, which consumers drop by its ``msg_id``.

Measured: 0.27 M messages/s per worker for 100,000 142-byte records in one write batch
(2 vCPU, broker on the same host); the per-message delivery callback is most of the
Python cost, plain ``produce`` without one reached about 0.35 M/s.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from connectors.kafka import KafkaRecord, broker_unavailable, reliable_producer
from connectors.outage import OutageWait, SinkGaveUpError
from twinflow import metrics
from twinflow.errors import TwinflowError
from twinflow.settings import KafkaSettings

log = logging.getLogger("twinflow.sink.kafka")

_REPORTED_ERRORS = 5
_METADATA_TIMEOUT_S = 5.0


class KafkaSinkError(TwinflowError):
    """Kafka did not acknowledge every message of a batch; the flow must stop and replay."""


class _Unavailable(Exception):
    """Messages of a write batch await delivery while the broker is unavailable."""


def _record(message: Message) -> KafkaRecord:
    return KafkaRecord(message.topic() or "", message.key(), message.value() or b"")


class KafkaOutputSink(DynamicSink[KafkaRecord]):
    """Produces :class:`KafkaRecord` items with a :func:`reliable_producer` per worker.

    ``give_up_s`` bounds how long a write batch waits out an unavailable broker
    (``flow.sink_give_up_s``). ``overrides`` are librdkafka settings for the producer
    (e.g. ``{"message.timeout.ms": 30000}``). ``flush_timeout_s`` bounds one wait for
    delivery reports; messages still unacknowledged then are waited for again while
    their topics exist, and fail the batch if a topic does not.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        give_up_s: float,
        flush_timeout_s: float = 60.0,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self._kafka = kafka
        self._give_up_s = give_up_s
        self._flush_timeout_s = flush_timeout_s
        # librdkafka must give up no later than the sink stops waiting: otherwise a message
        # reported undelivered could still arrive, and the replay would repeat it.
        self._overrides = {"message.timeout.ms": int(flush_timeout_s * 1000), **(overrides or {})}

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> StatelessSinkPartition[KafkaRecord]:
        """A partition with its own producer."""
        producer = reliable_producer(self._kafka, **self._overrides)
        outage = OutageWait("kafka", f"Kafka at {self._kafka.bootstrap}", self._give_up_s)
        return _KafkaPartition(
            producer, self._flush_timeout_s, f"{step_id}[{worker_index}]", outage
        )


class _KafkaPartition(StatelessSinkPartition[KafkaRecord]):
    def __init__(
        self, producer: Producer, flush_timeout_s: float, name: str, outage: OutageWait
    ) -> None:
        self._producer = producer
        self._flush_timeout_s = flush_timeout_s
        self._name = name
        self._outage = outage
        self._failures: list[tuple[KafkaError, Message]] = []
        self._broken = False
        self._batch: list[KafkaRecord] = []
        self._resend: list[KafkaRecord] = []
        """Messages of the batch that failed for want of a broker: produced again next."""

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        # Runs once per message inside poll/flush: keep the success path minimal.
        if error is not None:
            self._failures.append((error, message))

    def write_batch(self, items: list[KafkaRecord]) -> None:
        if not items:
            return
        started = time.perf_counter()
        self._batch, self._resend = items, items
        try:
            self._outage.attempt(self._deliver, lambda exc: isinstance(exc, _Unavailable))
        except SinkGaveUpError as exc:
            self._broken = True
            metrics.sink_failures.labels("kafka").inc()
            raise KafkaSinkError(
                f"Kafka did not acknowledge {len(self._resend)} of {len(items)} messages: {exc}"
            ) from exc
        except BaseException:
            self._broken = True
            metrics.sink_failures.labels("kafka").inc()
            raise
        finally:
            self._batch, self._resend = [], []
        elapsed_s = time.perf_counter() - started
        metrics.kafka_delivery_seconds.observe(elapsed_s)
        for topic, count in Counter(record.topic for record in items).items():
            metrics.kafka_records.labels(topic).inc(count)
        if log.isEnabledFor(logging.DEBUG):
            elapsed_ms = elapsed_s * 1000
            log.debug("%s delivered %d messages in %.1f ms", self._name, len(items), elapsed_ms)

    def _deliver(self) -> None:
        """Produce what awaits (re)sending and wait for every report of the batch."""
        resend, self._resend = self._resend, []
        self._produce(resend)
        remaining = self._producer.flush(self._flush_timeout_s)
        failures, self._failures = self._failures, []
        refused = [(error, msg) for error, msg in failures if not broker_unavailable(error)]
        if refused:
            self._refused(refused, len(failures))
        self._resend = [_record(msg) for _, msg in failures]
        if not self._resend and not remaining:
            return
        # Timed out for want of a topic is not an outage: say so at once.
        waiting = {record.topic for record in (self._batch if remaining else self._resend)}
        missing = self._missing_topics(waiting)
        if missing and failures:
            self._refused(
                [(e, msg) for e, msg in failures if msg.topic() in missing], len(failures)
            )
        if missing:
            raise KafkaSinkError(
                f"{remaining} of {len(self._batch)} messages to {sorted(waiting)} got no "
                f"delivery report within {self._flush_timeout_s:g} s, and topics {missing} do "
                "not exist. The flow stops so that recovery replays them; twinflow creates "
                "its topics at start: was one deleted?"
            )
        reason = failures[0][0].str() if failures else "no delivery report yet"
        undelivered = len(self._resend) + remaining
        raise _Unavailable(f"{undelivered} of {len(self._batch)} messages undelivered: {reason}")

    def _refused(self, shown: list[tuple[KafkaError, Message]], failed: int) -> None:
        shown = shown[:_REPORTED_ERRORS]
        text = "; ".join(f"topic {msg.topic()!r}: {error.str()}" for error, msg in shown)
        more = f" (first {len(shown)} shown)" if failed > len(shown) else ""
        raise KafkaSinkError(
            f"Kafka refused {failed} of {len(self._batch)} messages{more}: {text}. The "
            "flow stops so that recovery replays them; check that the topic exists "
            "(twinflow creates its topics at start) and the broker is reachable."
        )

    def _missing_topics(self, topics: set[str]) -> list[str]:
        """Topics the broker says do not exist; none when it cannot be asked."""
        if not topics:
            return []
        try:
            known = self._producer.list_topics(timeout=_METADATA_TIMEOUT_S).topics
        except KafkaException:
            return []  # the broker is unavailable: that is what is waited out
        return sorted(
            topic for topic in topics if topic not in known or known[topic].error is not None
        )

    def _produce(self, items: list[KafkaRecord]) -> None:
        produce, on_delivery = self._producer.produce, self._on_delivery
        for record in items:
            try:
                produce(record.topic, record.value, record.key, on_delivery=on_delivery)
            except BufferError:
                self._produce_when_room(record)
            except KafkaException as exc:
                raise KafkaSinkError(
                    f"cannot produce to topic {record.topic!r}: {exc.args[0]}"
                ) from exc

    def _produce_when_room(self, record: KafkaRecord) -> None:
        """Produce once the local queue has room; serving delivery reports makes room."""
        while True:
            self._producer.poll(0.05)
            try:
                self._producer.produce(
                    record.topic, record.value, record.key, on_delivery=self._on_delivery
                )
                return
            except BufferError:
                continue

    def close(self) -> None:
        if self._broken:
            # Bytewax 0.21.1 closes partitions also while unwinding from a failed write;
            # raising (or waiting) here would abort the process and hide the first error.
            return
        # Every successful write batch left nothing pending.
        self._producer.flush(self._flush_timeout_s)
