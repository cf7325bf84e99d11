"""A round trip through each live service: proof that the stack really works."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from questdb import Sender, TimestampNanos

from connectors.kafka import client_config
from connectors.mqtt import new_client
from connectors.questdb import QuestDBHttp, TableSpec, ensure_table
from twinflow.errors import ServiceError
from twinflow.settings import Settings

SMOKE_TABLE = TableSpec(
    name="twinflow_smoke",
    columns=(("ts", "TIMESTAMP"), ("run_id", "SYMBOL"), ("value", "DOUBLE")),
    timestamp="ts",
    dedup_keys=("ts", "run_id"),
)


def kafka_round_trip(settings: Settings, topic: str, payload: bytes, timeout_s: float = 30) -> None:
    """Create ``topic``, produce ``payload`` with acks=all and consume it back."""
    admin = AdminClient(client_config(settings.kafka))
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise
    producer = Producer(client_config(settings.kafka, acks="all", **{"enable.idempotence": True}))
    delivery_errors: list[str] = []
    producer.produce(
        topic,
        payload,
        on_delivery=lambda err, _msg: delivery_errors.append(str(err)) if err else None,
    )
    if producer.flush(timeout_s) or delivery_errors:
        raise ServiceError(f"Kafka did not confirm delivery to {topic}: {delivery_errors}")
    consumer = Consumer(
        client_config(
            settings.kafka,
            **{"group.id": f"twinflow-smoke-{uuid.uuid4()}", "auto.offset.reset": "earliest"},
        )
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            if message.value() == payload:
                return
        raise ServiceError(f"produced message did not come back from {topic}")
    finally:
        consumer.close()


def questdb_round_trip(settings: Settings, run_id: str, value: float) -> int:
    """Write one row over ILP/HTTP and read it back over SQL; return the lag in ms."""
    sql = QuestDBHttp(settings.questdb)
    ensure_table(sql, SMOKE_TABLE)
    started = time.monotonic()
    with Sender.from_conf(settings.questdb.ilp_conf(auto_flush="off")) as sender:
        sender.row(
            SMOKE_TABLE.name,
            symbols={"run_id": run_id},
            columns={"value": value},
            at=TimestampNanos.from_datetime(datetime.now(UTC)),
        )
        sender.flush()
    query = f"SELECT value FROM {SMOKE_TABLE.name} WHERE run_id = '{run_id}'"  # noqa: S608
    # WAL tables apply commits asynchronously; the row is durable but may not be visible yet.
    while time.monotonic() - started < 30:
        if sql.exec(query).rows == ((value,),):
            return int((time.monotonic() - started) * 1000)
        time.sleep(0.05)
    raise ServiceError(f"row of run {run_id} did not become visible in {SMOKE_TABLE.name}")


def mqtt_round_trip(settings: Settings, topic: str, payload: bytes, timeout_s: float = 10) -> None:
    """Publish ``payload`` at QoS 1 and receive it on a subscription."""
    received = threading.Event()
    subscribed = threading.Event()
    client = new_client(settings.mqtt, client_id=f"twinflow-smoke-{uuid.uuid4().hex[:8]}")
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_message = lambda _c, _u, msg: received.set() if msg.payload == payload else None
    client.connect(settings.mqtt.host, settings.mqtt.client_port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        if not subscribed.wait(timeout_s):
            raise ServiceError(f"MQTT subscription to {topic} was not acknowledged")
        client.publish(topic, payload, qos=1).wait_for_publish(timeout_s)
        if not received.wait(timeout_s):
            raise ServiceError(f"QoS 1 message on {topic} did not come back")
    finally:
        client.disconnect()
        client.loop_stop()
