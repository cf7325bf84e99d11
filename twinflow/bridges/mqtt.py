"""MQTT -> Kafka bridge: every QoS 1 message reaches ``twin.raw`` or the dead letters.

A message is acknowledged to the MQTT broker only after Kafka confirmed its delivery
(paho manual ack), and the session is persistent (clean_start false, a session
expiry), so a crash or restart of the bridge loses nothing: the broker redelivers
what was not acknowledged, and those repeats carry the publisher's same ``seq``.

Beside it runs the bridge's command loop (:mod:`twinflow.bridges.commands`): each command
for a twin model entity is published as its JSON to the entity's ``.../cmd`` topic at
QoS 1, not retained, expiring with the command, and counts as delivered on the PUBACK.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from confluent_kafka import KafkaError, Message, Producer
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from connectors.kafka import ensure_topics, reliable_producer
from connectors.mqtt import (
    check_tls,
    login_hint,
    login_refused,
    message_expiry,
    new_client,
    session_properties,
)
from schemas import deadletter
from schemas.control import Command, encode
from twinflow import metrics
from twinflow.bridges.commands import CommandLoop, Outcome, Retry, now_ms
from twinflow.bridges.routing import InOrderAcks, Reject, puback_outcome, route
from twinflow.errors import TwinflowError
from twinflow.settings import Settings
from twinflow.topics import control_topics, ingest_topics
from twinflow.twin_model import TwinModel

log = logging.getLogger("twinflow.bridge.mqtt")
Headers = list[tuple[str, str | bytes | None]]
STATS_EVERY_S = 10.0
# Unacknowledged, a command is published again: a broker that answers at all answers a
# QoS 1 publish within milliseconds.
PUBACK_TIMEOUT_S = 10.0


class BridgeError(TwinflowError):
    """The bridge stopped because a message could not be delivered; nothing was acked."""


class LoginRefusedError(BridgeError):
    """The MQTT broker refused the bridge's credentials; retrying would not help."""


@dataclass
class BridgeStats:
    """Counters, logged periodically and on exit."""

    received: int = 0
    forwarded: int = 0
    dead_lettered: int = 0
    acked: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class MqttBridge:
    """One bridge instance: a persistent MQTT session feeding an idempotent producer."""

    def __init__(self, settings: Settings, model: TwinModel) -> None:
        self.settings = settings
        self.model = model
        self.stats = BridgeStats()
        self._acks = InOrderAcks()
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._refused: str | None = None
        self._stopping = threading.Event()
        self.subscribed = threading.Event()
        self._producer: Producer = reliable_producer(settings.kafka, error_cb=self._on_kafka_error)
        # Its own lock: paho calls on_publish holding its message lock, and _lock is
        # held around paho calls.
        self._puback_lock = threading.Lock()
        self._pubacks: dict[int, ReasonCode] = {}
        self._client = self._new_client()
        # Every twin model entity may be an MQTT machine; one nobody subscribes for is
        # found out by its PUBACK.
        self._commands = CommandLoop(
            settings, model, "mqtt", serves=lambda _entity: True, deliver=self._deliver
        )
        self._connections = 0
        self._connected = metrics.bridge_connected.labels("mqtt")
        self._received = metrics.bridge_received.labels("mqtt")
        self._forwarded = metrics.bridge_forwarded.labels("mqtt")

    def _new_client(self) -> mqtt.Client:
        client = new_client(self.settings.mqtt, self.settings.mqtt.bridge_client_id)
        client.manual_ack_set(True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def run(self, stop: threading.Event | None = None) -> None:
        """Bridge until ``stop`` is set (or a delivery fails: then raise BridgeError).

        A broker that refuses the login raises LoginRefusedError at once; a broker that
        cannot be reached is retried.
        """
        stop = stop or threading.Event()
        topics = self.settings.topics
        ensure_topics(self.settings.kafka, [*ingest_topics(topics), *control_topics(topics)])
        check_tls(self.settings.mqtt)  # paho would retry a refused handshake forever
        properties = session_properties(
            self.settings.mqtt.session_expiry_s, self.settings.mqtt.receive_maximum
        )
        self._client.connect_async(
            self.settings.mqtt.host,
            self.settings.mqtt.client_port,
            keepalive=30,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()
        poller = threading.Thread(target=self._poll_deliveries, name="kafka-deliveries")
        poller.start()
        self._commands.start()
        next_stats = time.monotonic() + STATS_EVERY_S
        try:
            while (
                not stop.is_set()
                and self._failure is None
                and self._refused is None
                and self._commands.failure is None
            ):
                stop.wait(0.2)
                if time.monotonic() >= next_stats:
                    self._log_stats()
                    next_stats += STATS_EVERY_S
        finally:
            self._shutdown(poller)
        if self._refused is not None:
            raise LoginRefusedError(self._refused)
        if self._failure is not None:
            raise BridgeError(
                f"{self._failure}. Unacknowledged messages stay in the broker's session "
                "and are delivered again when the bridge restarts."
            )
        if self._commands.failure is not None:
            raise self._commands.failure

    def _shutdown(self, poller: threading.Thread) -> None:
        # Commands first: a command waiting for its PUBACK needs the connection.
        self._commands.stop()
        # Deliver (and so acknowledge) what is in flight before leaving the session;
        # never unsubscribe: the persistent subscription is what keeps messages queued.
        if self._failure is None:
            self._producer.flush(30)
        self._client.disconnect()
        self._client.loop_stop()
        self._stopping.set()
        poller.join()
        self._log_stats()

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            if login_refused(reason):
                # A wrong login does not fix itself: stop (the caller exits non-zero)
                # instead of knocking on the broker forever. Network errors are retried.
                mqtt_settings = self.settings.mqtt
                self._refused = (
                    f"MQTT broker mqtt://{mqtt_settings.host}:{mqtt_settings.port} refused "
                    f"the bridge's login: {reason} (CONNACK reason code {reason.value:#04x}); "
                    f"{login_hint(mqtt_settings)}"
                )
                log.error("MQTT broker refused the login (%s); stopping", reason)
            else:
                log.error("MQTT connection refused: %s; retrying", reason)
            return
        self._connected.set(1)
        self._connections += 1
        if self._connections > 1:
            metrics.bridge_reconnects.labels("mqtt").inc()
        log.info(
            "connected to mqtt://%s:%d as %s",
            self.settings.mqtt.host,
            self.settings.mqtt.port,
            self.settings.mqtt.bridge_client_id,
        )
        client.subscribe(self.model.mqtt_topic_filter, qos=1)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if any(reason.is_failure for reason in reasons):
            self._failure = f"MQTT broker refused the subscription: {reasons}"
            return
        log.info("subscribed to %s (QoS 1)", self.model.mqtt_topic_filter)
        self.subscribed.set()

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        # paho calls this before it marks the message published, so a waiter that sees
        # it published finds its reason here. A reason whose waiter gave up stays until
        # paho reuses the mid, and the next publish with that mid overwrites it.
        with self._puback_lock:
            self._pubacks[mid] = reason

    def _deliver(self, command: Command) -> Outcome:
        """Publish ``command`` to its machine's topic at QoS 1; its PUBACK decides."""
        topic = self.model.mqtt_command_topic(self.model.by_id[command.entity_id])
        if not self._client.is_connected():
            mqtt_settings = self.settings.mqtt
            return Retry(f"not connected to mqtt://{mqtt_settings.host}:{mqtt_settings.port}")
        expires_in_s = math.ceil((command.expires_ms - now_ms()) / 1000)
        info = self._client.publish(
            topic, encode(command), qos=1, retain=False, properties=message_expiry(expires_in_s)
        )
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return Retry(f"publishing to {topic} failed: {mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + PUBACK_TIMEOUT_S
        while not info.is_published():
            # paho sends it again itself after a reconnect; past the deadline it is
            # published once more, and the machine ignores the repeated command id.
            if time.monotonic() >= deadline:
                return Retry(f"no PUBACK for {topic} within {PUBACK_TIMEOUT_S:g} s")
            if self._commands.stopping.is_set():
                return Retry("the bridge is stopping")
            info.wait_for_publish(0.1)
        with self._puback_lock:
            reason = self._pubacks.pop(info.mid)
        return puback_outcome(reason, topic)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._connected.set(0)
        if not self._stopping.is_set() and reason.is_failure and self._refused is None:
            log.warning("MQTT connection lost (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        decision = route(msg.topic, payload, self.model)
        self._received.inc()
        with self._lock:
            self.stats.received += 1
            if msg.qos > 0:
                self._acks.received(msg.mid)
        headers: Headers = [("source", f"mqtt:{msg.topic}".encode())]
        if isinstance(decision, Reject):
            letter = deadletter.dead_letter(
                payload,
                decision.reason,
                decision.detail,
                deadletter.Source(kind="mqtt", topic=msg.topic),
                datetime.now(UTC),
                entity_id=decision.entity_id,
            )
            self._produce(
                self.settings.topics.deadletter,
                decision.entity_id or msg.topic,
                deadletter.encode(letter),
                headers,
                msg,
                str(decision.reason),
            )
        else:
            self._produce(self.settings.topics.raw, decision.entity_id, payload, headers, msg, None)

    def _produce(
        self,
        topic: str,
        key: str,
        value: bytes,
        headers: Headers,
        msg: mqtt.MQTTMessage,
        reason: str | None,
    ) -> None:
        mid, qos = msg.mid, msg.qos

        def delivered(error: KafkaError | None, _message: Message) -> None:
            self._on_delivery(error, mid, qos, reason)

        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=delivered)
                return
            except BufferError:
                # The producer queue is full: block this MQTT thread, which stops reading
                # the socket and lets the broker hold the backlog.
                time.sleep(0.01)

    def _poll_deliveries(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.1)
        self._producer.poll(0)

    def _on_delivery(
        self, error: KafkaError | None, mid: int, qos: int, reason: str | None
    ) -> None:
        if error is not None:
            # Not acknowledging keeps the message in the MQTT session; stopping makes
            # the failure loud instead of leaving a hole in the stream.
            self._failure = f"Kafka did not accept a message: {error}"
            log.error("%s; stopping", self._failure)
            return
        with self._lock:
            if reason is None:
                self.stats.forwarded += 1
                self._forwarded.inc()
            else:
                self.stats.dead_lettered += 1
                metrics.bridge_dead_letters.labels("mqtt", reason).inc()
                self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
            ready = self._acks.confirmed(mid) if qos > 0 else []
            for ready_mid in ready:
                self._client.ack(ready_mid, 1)
            self.stats.acked += len(ready)

    def _on_kafka_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._failure = f"Kafka producer failed: {error}"
        else:
            log.debug("Kafka: %s", error)

    def _log_stats(self) -> None:
        with self._lock:
            stats: dict[str, Any] = dict(vars(self.stats))
            stats["in_flight"] = len(self._acks)
        log.info("mqtt bridge: %s", stats)


def run(settings: Settings, model: TwinModel, stop: threading.Event | None = None) -> None:
    """Run the MQTT bridge until ``stop`` is set.

    Raises BridgeError if Kafka fails, LoginRefusedError if the broker refuses the login.
    """
    with metrics.serving(settings.metrics, settings.metrics.mqtt_bridge_port, "mqtt_bridge_port"):
        MqttBridge(settings, model).run(stop)
