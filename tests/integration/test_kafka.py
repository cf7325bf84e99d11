import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client import REGISTRY

from connectors.kafka import client_config
from connectors.kafka_source import KafkaBatchSource, partition_key
from twinflow.settings import Settings

pytestmark = pytest.mark.integration


def test_produce_consume_round_trip_on_a_fresh_topic(stack: Settings, unique: str) -> None:
    topic = f"test.roundtrip.{unique}"
    admin = AdminClient(client_config(stack.kafka))
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)

    sent = {f"entity-{i % 7}": [] for i in range(7)}
    producer = Producer(client_config(stack.kafka, acks="all", **{"enable.idempotence": True}))
    failures: list[object] = []
    for i in range(500):
        key = f"entity-{i % 7}"
        value = f"{key}:{i}".encode()
        sent[key].append(value)
        producer.produce(topic, value, key=key, on_delivery=lambda e, _m: e and failures.append(e))
    assert producer.flush(30) == 0
    assert failures == []

    consumer = Consumer(
        client_config(
            stack.kafka,
            **{"group.id": f"test-{uuid.uuid4()}", "auto.offset.reset": "earliest"},
        )
    )
    consumer.subscribe([topic])
    received: dict[str, list[bytes]] = {key: [] for key in sent}
    partitions_by_key: dict[str, set[int]] = {key: set() for key in sent}
    try:
        for _ in range(200):
            for message in consumer.consume(num_messages=500, timeout=0.5):
                assert message.error() is None
                key = message.key().decode()
                received[key].append(message.value())
                partitions_by_key[key].add(message.partition())
            if sum(map(len, received.values())) >= 500:
                break
    finally:
        consumer.close()

    # Every message once, per-key order kept, one partition per key.
    assert received == sent
    assert all(len(parts) == 1 for parts in partitions_by_key.values())


def test_auto_topic_creation_is_off(stack: Settings, unique: str) -> None:
    producer = Producer(client_config(stack.kafka, **{"message.timeout.ms": 3000}))
    errors: list[str] = []
    producer.produce(f"test.typo.{unique}", b"x", on_delivery=lambda e, _m: errors.append(str(e)))
    producer.flush(10)
    # librdkafka reports an unknown topic as such or, while it keeps retrying, as a timeout.
    assert len(errors) == 1
    assert "UNKNOWN_TOPIC" in errors[0] or "_MSG_TIMED_OUT" in errors[0]
    assert (
        f"test.typo.{unique}"
        not in AdminClient(client_config(stack.kafka)).list_topics(timeout=10).topics
    )


def test_the_flow_source_reads_ahead_a_batch_not_the_backlog(stack: Settings, unique: str) -> None:
    """The Kafka client's fetch queue follows the batch size, and its gauge shows its bytes."""
    topic = f"test.readahead.{unique}"
    admin = AdminClient(client_config(stack.kafka))
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    producer = Producer(client_config(stack.kafka, **{"linger.ms": 20}))
    payload = b"x" * 1000
    for _ in range(20_000):
        producer.produce(topic, payload)
        producer.poll(0)
    assert producer.flush(30) == 0

    # A batch of one message: the queue refills only once it is empty, one fetch at a time.
    source = KafkaBatchSource(stack.kafka, topic, batch_size=1)
    part = source.build_part("test", partition_key(topic, 0), None)
    queued: list[float] = []
    read = 0
    try:
        # Statistics come every 5 s, served by the source's reads.
        deadline = time.monotonic() + 11
        while time.monotonic() < deadline:
            for _key, batch in part.next_batch():
                read += len(batch)
            queued.append(
                REGISTRY.get_sample_value(
                    "twinflow_kafka_fetch_queue_bytes", {"topic": topic, "partition": "0"}
                )
                or 0.0
            )
            time.sleep(0.05)
    finally:
        part.close()
    assert 0 < read < 1000
    # The backlog is 20 MB; one fetch brings at most max.partition.fetch.bytes (1 MiB).
    assert 0 < max(queued) <= 2**20 + 2 * len(payload), max(queued)
