import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from connectors.mqtt import new_client
from twinflow.settings import Settings

pytestmark = pytest.mark.integration


class _Collector:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.done = threading.Event()
        self.expected = 0

    def on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.append(msg.payload)
        if len(self.messages) >= self.expected:
            self.done.set()


def _connect(settings: Settings, client_id: str, *, clean_start: bool) -> mqtt.Client:
    client = new_client(settings.mqtt, client_id)
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 300
    client.connect(
        settings.mqtt.host, settings.mqtt.port, clean_start=clean_start, properties=properties
    )
    client.loop_start()
    assert connected.wait(10)
    return client


def _subscribe(client: mqtt.Client, topic: str) -> None:
    granted = threading.Event()
    client.on_subscribe = lambda *_args: granted.set()
    client.subscribe(topic, qos=1)
    assert granted.wait(10)


def _publish(settings: Settings, topic: str, payloads: list[bytes]) -> None:
    publisher = _connect(settings, f"pub-{uuid.uuid4().hex[:8]}", clean_start=True)
    try:
        for payload in payloads:
            publisher.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        publisher.disconnect()
        publisher.loop_stop()


def test_qos1_publish_subscribe(stack: Settings, unique: str) -> None:
    topic = f"test/{unique}/telemetry"
    collector = _Collector()
    collector.expected = 50
    subscriber = _connect(stack, f"sub-{unique}", clean_start=True)
    subscriber.on_message = collector.on_message
    try:
        _subscribe(subscriber, topic)
        payloads = [f"reading-{i}".encode() for i in range(50)]
        _publish(stack, topic, payloads)
        assert collector.done.wait(10)
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()
    assert collector.messages == payloads


def test_persistent_session_receives_what_was_published_while_offline(
    stack: Settings, unique: str
) -> None:
    topic = f"test/{unique}/offline"
    client_id = f"bridge-{unique}"
    first = _connect(stack, client_id, clean_start=True)
    _subscribe(first, topic)
    first.disconnect()
    first.loop_stop()

    payloads = [f"queued-{i}".encode() for i in range(20)]
    _publish(stack, topic, payloads)

    collector = _Collector()
    collector.expected = 20
    client = new_client(stack.mqtt, client_id)
    client.on_message = collector.on_message
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 300
    client.connect(stack.mqtt.host, stack.mqtt.port, clean_start=False, properties=properties)
    client.loop_start()
    try:
        assert collector.done.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert collector.messages == payloads
