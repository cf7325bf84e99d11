"""Kafka clients: shared configuration, a producer that loses nothing, topic creation."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from twinflow.errors import TwinflowError
from twinflow.settings import KafkaSettings

# librdkafka reports every refused connection while a broker starts; route those lines
# through logging instead of stderr so they show only at DEBUG.
_librdkafka_log = logging.getLogger("twinflow.librdkafka")


class KafkaSetupError(TwinflowError):
    """A topic could not be created or exists with the wrong shape."""


def client_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """Base confluent-kafka configuration for ``kafka``, plus librdkafka ``overrides``."""
    return {"bootstrap.servers": kafka.bootstrap, "logger": _librdkafka_log, **overrides}


def reliable_producer(kafka: KafkaSettings, **overrides: Any) -> Producer:
    """An idempotent producer with acks=all: no loss, no duplicates from its own retries.

    Callers must still check every delivery report: librdkafka gives up on a message
    after ``message.timeout.ms`` and says so only there.
    """
    config = client_config(
        kafka,
        **{
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000,
            **overrides,
        },
    )
    return Producer(config)


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """One message for a Kafka sink."""

    topic: str
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class TopicSpec:
    """A topic twinflow creates up front."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def ensure_topics(kafka: KafkaSettings, specs: Iterable[TopicSpec], timeout_s: float = 30) -> None:
    """Create missing topics; refuse an existing one with a different partition count."""
    admin = AdminClient(client_config(kafka))
    wanted = {spec.name: spec for spec in specs}
    existing = admin.list_topics(timeout=timeout_s).topics
    missing = [spec for name, spec in wanted.items() if name not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=-1,
                    config=spec.config,
                )
                for spec in missing
            ],
            operation_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise KafkaSetupError(f"cannot create topic {name}: {exc}") from None
    # A topic just created (here, or by a bridge and a flow starting together) can take
    # a moment to appear in the broker's metadata.
    deadline = time.monotonic() + timeout_s
    topics = admin.list_topics(timeout=timeout_s).topics
    while not wanted.keys() <= topics.keys():
        if time.monotonic() > deadline:
            absent = sorted(wanted.keys() - topics.keys())
            raise KafkaSetupError(f"topics {absent} did not appear within {timeout_s:g} s")
        time.sleep(0.1)
        topics = admin.list_topics(timeout=timeout_s).topics
    for name, spec in wanted.items():
        actual = len(topics[name].partitions)
        if actual != spec.partitions:
            raise KafkaSetupError(
                f"topic {name} has {actual} partitions, twinflow expects {spec.partitions}; "
                "delete the topic or change the partition setting to match"
            )
