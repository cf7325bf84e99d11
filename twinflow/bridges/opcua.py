"""The OPC UA -> Kafka bridge: every data change of a plant sensor becomes a raw reading.

The bridge finds ``Objects/Plant/<entity>/<sensor>`` for each sensor of the twin model,
monitors them all in one subscription and produces each notification to ``twin.raw``
(single form, key = entity id) with the source timestamp, the canonical unit and the
quality the status code's severity gives.

asyncua's own auto-reconnect stays off; the bridge owns that policy. It probes the
server every second and, on any failure, aborts the connection, produces what it had
already received, backs off (at most ``opcua.reconnect_max_backoff_s``), reconnects and
monitors the same node ids again. A value it already produced that comes back on
resubscribing (a server that kept running) is not produced twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Literal, TypeVar

import msgspec
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent, Subscription
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256, SecurityPolicyNone
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from confluent_kafka import KafkaError, Message, Producer

from connectors.kafka import ensure_topics, reliable_producer
from connectors.opcua import certificate_der, certificate_uri, fingerprint
from twinflow import metrics
from twinflow.errors import TwinflowError
from twinflow.settings import OpcUaSettings, Settings
from twinflow.topics import ingest_topics
from twinflow.twin_model import TwinModel

log = logging.getLogger(__name__)

Quality = Literal["good", "uncertain", "bad"]
_T = TypeVar("_T")

STATS_INTERVAL_S = 10.0
_TICK_S = 0.1
_PROBE_INTERVAL_S = 1.0
_PROBE_TIMEOUT_S = 2.0
_FIRST_BACKOFF_S = 0.5
_CLOSE_TIMEOUT_S = 5.0
_FLUSH_TIMEOUT_S = 30.0
# How long a server keeps a session the bridge lost, its subscription still queueing.
_SESSION_TIMEOUT_MS = 60_000
# Servers cap the operations per call (MaxNodesPerTranslateBrowsePathsToNodeIds,
# MaxMonitoredItemsPerCall); 1000 is below every cap seen in practice.
_BATCH = 1000
_EPOCH = ua.DateTime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# The raw contract's upper bound on epoch milliseconds (2200-01-01).
_MAX_EPOCH_MS = 7_258_118_400_000
_RESERVED_IN_BROWSE_NAMES = frozenset("/.<>:#!&")
# Answers that retrying cannot change: the server refuses who or what the bridge is.
_REFUSALS = frozenset(
    {
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadIdentityTokenInvalid,
        StatusCodes.BadIdentityTokenRejected,
        StatusCodes.BadSecurityPolicyRejected,
        StatusCodes.BadSecurityChecksFailed,
        StatusCodes.BadCertificateInvalid,
        StatusCodes.BadCertificateUntrusted,
        StatusCodes.BadCertificateRevoked,
        StatusCodes.BadCertificateTimeInvalid,
        StatusCodes.BadCertificateUriInvalid,
        StatusCodes.BadCertificateUseNotAllowed,
    }
)


class OpcUaBridgeError(TwinflowError):
    """The OPC UA bridge stopped; readings after the last produced one are not in Kafka."""


class DeliveryError(OpcUaBridgeError):
    """Kafka did not accept a reading; the bridge stops rather than lose it silently."""


class OpcUaSecurityError(OpcUaBridgeError):
    """The server is not the pinned one, or refuses the bridge's security or identity."""


@dataclass(frozen=True, slots=True)
class MonitoredSensor:
    """One sensor variable the bridge monitors."""

    entity_id: str
    sensor: str
    unit: str
    node_id: str

    @property
    def source(self) -> str:
        """The reading's ``source`` field."""
        return f"opcua:{self.node_id}"


class RawReading(msgspec.Struct, frozen=True):
    """The single form of the raw contract, every field the bridge knows set."""

    entity_id: str
    sensor: str
    ts: int
    value: float
    unit: str
    quality: Quality
    source: str


_encoder = msgspec.json.Encoder()


def quality_of(status: ua.StatusCode | None) -> Quality:
    """The quality of a status code's severity; no status code means Good (Part 4, 7.7).

    >>> quality_of(ua.StatusCode(ua.UInt32(StatusCodes.UncertainLastUsableValue)))
    'uncertain'
    """
    if status is None or status.is_good():
        return "good"
    if status.is_uncertain():
        return "uncertain"
    return "bad"


def epoch_ms(value: ua.DataValue) -> int | None:
    """The source timestamp (else the server's) as epoch milliseconds; None if neither."""
    for stamp in (value.SourceTimestamp, value.ServerTimestamp):
        if stamp is None:
            continue
        aware = stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)
        millis = (aware - _EPOCH) // _MS
        # Servers send 1601-01-01 (FILETIME 0) for "no timestamp".
        if 0 <= millis < _MAX_EPOCH_MS:
            return millis
    return None


def encode_reading(sensor: MonitoredSensor, value: ua.DataValue) -> bytes | None:
    """The raw reading JSON for one notification, or None when it carries no reading.

    A notification carries a reading when it has a finite number and a timestamp,
    whatever its status: a Bad value the server still sends is forwarded as "bad".
    """
    number = value.Value.Value if value.Value is not None else None
    if isinstance(number, bool) or not isinstance(number, int | float):
        return None
    if not math.isfinite(number):
        return None
    ts = epoch_ms(value)
    if ts is None:
        return None
    return _encoder.encode(
        RawReading(
            entity_id=sensor.entity_id,
            sensor=sensor.sensor,
            ts=ts,
            value=float(number),
            unit=sensor.unit,
            quality=quality_of(value.StatusCode),
            source=sensor.source,
        )
    )


def run(settings: Settings, model: TwinModel, stop: threading.Event | None = None) -> None:
    """Bridge OPC UA to ``settings.topics.raw`` until ``stop`` is set.

    Raises :class:`DeliveryError` when Kafka refuses or times out a reading and
    :class:`OpcUaSecurityError` when the server is not the pinned one or refuses the
    bridge's credentials; connection failures are retried with backoff.
    """
    port = settings.metrics.opcua_bridge_port
    with metrics.serving(settings.metrics, port, "opcua_bridge_port"):
        ensure_topics(settings.kafka, ingest_topics(settings.topics))
        bridge = _Bridge(settings, model, stop or threading.Event())
        try:
            asyncio.run(bridge.forward())
        except BaseException:
            # Keep what was received, but let the first failure be the one raised.
            with contextlib.suppress(DeliveryError):
                bridge.finish()
            raise
        bridge.finish()


class _ConnectionLost(Exception):
    """The server stopped answering, or ended the subscription."""


class _Bridge:
    def __init__(self, settings: Settings, model: TwinModel, stop: threading.Event) -> None:
        self._opcua = settings.opcua
        self._model = model
        self._stop = stop
        self._topic = settings.topics.raw
        self._producer: Producer = reliable_producer(settings.kafka, on_delivery=self._delivered)
        self._failure: KafkaError | None = None
        self._sensors: dict[int, MonitoredSensor] = {}
        self._last_sent: dict[str, bytes] = {}
        self._received = self._produced = self._gaps = self._repeats = self._reconnects = 0
        self._last_reading_at: float | None = None
        self._lost_at: float | None = None
        self._next_stats = time.monotonic() + STATS_INTERVAL_S
        self._connected = metrics.bridge_connected.labels("opcua")
        self._received_total = metrics.bridge_received.labels("opcua")
        self._forwarded = metrics.bridge_forwarded.labels("opcua")

    async def forward(self) -> None:
        backoff = _FIRST_BACKOFF_S
        connected_before = False
        while not self._stop.is_set():
            client = self._new_client()
            connected = False
            try:
                await self._secure(client)
                await client.connect()
                connected = True
                self._connected.set(1)
                if connected_before:
                    self._reconnects += 1
                    metrics.bridge_reconnects.labels("opcua").inc()
                connected_before = True
                backoff = _FIRST_BACKOFF_S
                await self._stream(client)
            except UaStatusCodeError as exc:
                if exc.code in _REFUSALS:
                    raise OpcUaSecurityError(
                        f"OPC UA server {self._opcua.endpoint} refused the bridge: {exc}; "
                        "check opcua.security, the certificates and username/password"
                    ) from exc
                self._lost(exc, backoff)
            except (OSError, UaError, _ConnectionLost) as exc:
                self._lost(exc, backoff)
            finally:
                self._connected.set(0)
                if connected:
                    await self._close(client)
            await self._sleep(backoff)
            backoff = min(backoff * 2, self._opcua.reconnect_max_backoff_s)

    def finish(self) -> None:
        """Wait for Kafka to confirm every reading; raise if any is not confirmed."""
        undelivered = self._producer.flush(_FLUSH_TIMEOUT_S)
        self._log_stats()
        if undelivered or self._failure is not None:
            message = f"Kafka did not confirm {undelivered} reading(s) for {self._topic}" + (
                f": {self._failure}" if self._failure is not None else ""
            )
            log.error("%s", message)
            raise DeliveryError(message)

    def _new_client(self) -> Client:
        client = Client(self._opcua.endpoint)
        client.name = client.description = "twinflow OPC UA bridge"
        client.session_timeout = _SESSION_TIMEOUT_MS
        if self._opcua.username is not None:
            client.set_user(self._opcua.username)
        if self._opcua.password is not None:
            client.set_password(self._opcua.password.get_secret_value())
        return client

    async def _secure(self, client: Client) -> None:
        opcua = self._opcua
        endpoint = await _offered_endpoint(client, opcua)
        if opcua.security == "none":
            return
        assert opcua.client_cert_file is not None and opcua.client_key_file is not None
        presented = _leading_certificate(endpoint.ServerCertificate)
        if opcua.server_cert_file is not None:
            pinned = certificate_der(opcua.server_cert_file)
            if presented != pinned:
                raise OpcUaSecurityError(
                    f"OPC UA server {opcua.endpoint} presents certificate sha256:"
                    f"{fingerprint(presented)}, not the pinned {opcua.server_cert_file} "
                    f"(sha256:{fingerprint(pinned)}); refusing to connect"
                )
        # Servers match the session's ApplicationUri against the client certificate.
        client_uri = certificate_uri(certificate_der(opcua.client_cert_file))
        if client_uri is not None:
            client.application_uri = client_uri
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            certificate=str(opcua.client_cert_file),
            private_key=str(opcua.client_key_file),
            server_certificate=presented,
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )

    async def _stream(self, client: Client) -> None:
        self._sensors = await self._find_sensors(client)
        subscription = await client.create_subscription(
            self._opcua.publishing_interval_ms, None, queue_maxsize=0
        )
        await self._monitor(subscription)
        log.info("monitoring %d OPC UA variables at %s", len(self._sensors), self._opcua.endpoint)
        consumer = asyncio.create_task(self._consume(subscription))
        try:
            await self._watch(client, consumer)
        except _ConnectionLost:
            _drop_connection(client)
            raise
        finally:
            await self._drain(subscription, consumer)

    async def _watch(self, client: Client, consumer: asyncio.Task[None]) -> None:
        next_probe = time.monotonic() + _PROBE_INTERVAL_S
        while not self._stop.is_set():
            done, _ = await asyncio.wait({consumer}, timeout=_TICK_S)
            if done:
                consumer.result()
                raise _ConnectionLost("the subscription ended")
            self._poll()
            if time.monotonic() >= next_probe:
                await self._probe(client)
                next_probe = time.monotonic() + _PROBE_INTERVAL_S

    async def _drain(self, subscription: Subscription, consumer: asyncio.Task[None]) -> None:
        if not consumer.done():
            # Deleting the subscription ends its iterator after the notifications
            # already received (even when the server is gone): produce those, don't
            # drop them with the client.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(subscription.delete(), _CLOSE_TIMEOUT_S)
            await asyncio.wait({consumer})
        failure = consumer.exception()
        if isinstance(failure, DeliveryError):
            raise failure

    async def _find_sensors(self, client: Client) -> dict[int, MonitoredSensor]:
        try:
            index = await client.get_namespace_index(self._opcua.namespace)
        except ValueError:
            raise _ConnectionLost(
                f"the server has no namespace {self._opcua.namespace}; not a twinflow plant?"
            ) from None
        wanted = [
            (entity.id, sensor, spec.unit)
            for entity in self._model.entities
            for sensor, spec in self._model.sensors_of(entity.id).items()
        ]
        paths = [
            f"/{index}:Plant/{index}:{_escape(entity_id)}/{index}:{_escape(sensor)}"
            for entity_id, sensor, _unit in wanted
        ]
        objects = ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder))
        results: list[ua.BrowsePathResult] = []
        for batch in _batches(paths):
            results.extend(await client.translate_browsepaths(objects, batch))
        found: dict[int, MonitoredSensor] = {}
        missing = []
        for (entity_id, sensor, unit), result in zip(wanted, results, strict=True):
            if not result.StatusCode.is_good() or not result.Targets:
                missing.append(f"{entity_id}/{sensor}")
                continue
            target = result.Targets[0].TargetId
            node_id = ua.NodeId(target.Identifier, target.NamespaceIndex)
            found[len(found) + 1] = MonitoredSensor(entity_id, sensor, unit, node_id.to_string())
        if missing:
            log.warning(
                "%d of %d twin model sensors are not on the OPC UA server, skipped: %s",
                len(missing),
                len(wanted),
                ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else ""),
            )
        if not found:
            raise _ConnectionLost("none of the twin model's sensors is on the server")
        return found

    async def _monitor(self, subscription: Subscription) -> None:
        # StatusValueTimestamp: a stuck sensor repeats its value with new timestamps,
        # and those repeats are readings too.
        every_change = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
        requests = [
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(
                    NodeId=ua.NodeId.from_string(sensor.node_id),
                    AttributeId=ua.UInt32(AttributeIds.Value),
                ),
                MonitoringMode=ua.MonitoringMode.Reporting,
                RequestedParameters=ua.MonitoringParameters(
                    ClientHandle=ua.UInt32(handle),
                    SamplingInterval=ua.Double(0),
                    Filter=every_change,
                    QueueSize=ua.UInt32(self._opcua.queue_size),
                    DiscardOldest=True,
                ),
            )
            for handle, sensor in self._sensors.items()
        ]
        refused: list[tuple[ua.MonitoredItemCreateRequest, ua.StatusCode]] = []
        for batch in _batches(requests):
            results = await subscription.create_monitored_items(batch)
            refused.extend(
                (request, result)
                for request, result in zip(batch, results, strict=True)
                if isinstance(result, ua.StatusCode)
            )
        for request, status in refused:
            handle = int(request.RequestedParameters.ClientHandle)
            log.warning("server refused to monitor %s: %s", self._sensors.pop(handle), status)
        if not self._sensors:
            raise _ConnectionLost("the server refused to monitor every sensor")

    async def _consume(self, subscription: Subscription) -> None:
        async for event in subscription:
            if isinstance(event, DataChangeEvent):
                self._on_change(event.data.monitored_item)
            elif isinstance(event, StatusChangeEvent) and event.notification.Status.is_bad():
                raise _ConnectionLost(f"subscription status {event.notification.Status.name}")

    def _on_change(self, item: ua.MonitoredItemNotification) -> None:
        self._received += 1
        self._received_total.inc()
        handle = int(item.ClientHandle)
        sensor = self._sensors[handle]
        payload = encode_reading(sensor, item.Value)
        if payload is None:
            self._gaps += 1
            metrics.bridge_skipped.labels("opcua", "no_value").inc()
            log.debug("no reading in %s: %s", sensor.source, item.Value.StatusCode)
            return
        # A new subscription starts with each item's current value, which the bridge
        # already produced if the server kept running.
        if self._last_sent.get(sensor.node_id) == payload:
            self._repeats += 1
            metrics.bridge_skipped.labels("opcua", "repeat").inc()
            return
        self._last_sent[sensor.node_id] = payload
        now = time.monotonic()
        if self._lost_at is not None and self._last_reading_at is not None:
            log.warning(
                "OPC UA readings resumed after a gap of %.1f s (connection lost %.1f s ago)",
                now - self._last_reading_at,
                now - self._lost_at,
            )
        self._lost_at = None
        self._last_reading_at = now
        while True:
            try:
                self._producer.produce(self._topic, payload, key=sensor.entity_id)
                break
            except BufferError:
                # librdkafka's queue is full: let deliveries drain it. Blocking here
                # holds back OPC UA, whose server queues values meanwhile.
                self._producer.poll(0.1)
        self._poll()

    def _poll(self) -> None:
        self._producer.poll(0)
        if self._failure is not None:
            raise DeliveryError(
                f"Kafka did not accept a reading for {self._topic}: {self._failure}; "
                "stopping so that no reading is lost silently"
            )
        if time.monotonic() >= self._next_stats:
            self._log_stats()

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            self._produced += 1
            self._forwarded.inc()
        elif self._failure is None:
            self._failure = error

    async def _probe(self, client: Client) -> None:
        try:
            state = await asyncio.wait_for(client.nodes.server_state.read_value(), _PROBE_TIMEOUT_S)
        except (OSError, TimeoutError, UaError) as exc:
            raise _ConnectionLost(f"server did not answer: {exc!r}") from exc
        if state != ua.ServerState.Running:
            raise _ConnectionLost(f"server state is {state!r}")

    def _lost(self, exc: Exception, backoff: float) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        log.warning(
            "OPC UA connection to %s failed: %s; retrying in %.1f s",
            self._opcua.endpoint,
            str(exc) or repr(exc),
            backoff,
        )

    async def _close(self, client: Client) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), _CLOSE_TIMEOUT_S)

    async def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(min(_TICK_S, deadline - time.monotonic()))
            self._poll()

    def _log_stats(self) -> None:
        self._next_stats = time.monotonic() + STATS_INTERVAL_S
        log.info(
            "opcua bridge: received=%d produced=%d gaps=%d repeats=%d reconnects=%d monitored=%d",
            self._received,
            self._produced,
            self._gaps,
            self._repeats,
            self._reconnects,
            len(self._sensors),
        )


def _drop_connection(client: Client) -> None:
    # Requests to a server that is gone or unreachable only wait for their timeouts,
    # so abort the socket (close() would wait for unsent bytes) and let teardown and
    # reconnect start now. Not client.disconnect_socket(): it does nothing once
    # asyncua's own watchdog has marked the client disconnected.
    protocol = client.uaclient.protocol
    if protocol is not None and protocol.transport is not None:
        protocol.transport.abort()


async def _offered_endpoint(client: Client, opcua: OpcUaSettings) -> ua.EndpointDescription:
    """The server's endpoint for the configured security, or a clear refusal."""
    if opcua.security == "none":
        policy, mode = SecurityPolicyNone.URI, ua.MessageSecurityMode.None_
    else:
        policy, mode = SecurityPolicyBasic256Sha256.URI, ua.MessageSecurityMode.SignAndEncrypt
    endpoints = await client.connect_and_get_server_endpoints()
    for endpoint in endpoints:
        if (
            endpoint.SecurityPolicyUri == policy
            and endpoint.SecurityMode == mode
            and (mode == ua.MessageSecurityMode.None_ or endpoint.ServerCertificate)
        ):
            return endpoint
    offered = sorted({f"{e.SecurityPolicyUri} {e.SecurityMode.name}" for e in endpoints})
    raise OpcUaSecurityError(
        f"OPC UA server {opcua.endpoint} offers no {policy} {mode.name} endpoint for "
        f"opcua.security={opcua.security} (it offers: {', '.join(offered)})"
    )


def _leading_certificate(der: bytes) -> bytes:
    # A server may send its certificate followed by its chain: take the first DER
    # SEQUENCE (tag, then a short or long form length).
    size = der[1]
    if size < 0x80:
        return der[: 2 + size]
    width = size & 0x7F
    return der[: 2 + width + int.from_bytes(der[2 : 2 + width], "big")]


def _escape(name: str) -> str:
    return "".join(f"&{char}" if char in _RESERVED_IN_BROWSE_NAMES else char for char in name)


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]
