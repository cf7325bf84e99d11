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

The back channel: the bridge also monitors ``Objects/Plant/<entity>/setpoints/<name>``
for each setpoint of the twin model and produces every change as a ``reported`` message
(``{"entity_id", "ts", "reported": {name: value}, "quality", "source"}``). Beside it runs
its command loop (:mod:`twinflow.bridges.commands`); it serves the entities that have an
``Objects/Plant/<entity>/command_id`` variable, and delivers a command as one Write of
``command_id`` then the setpoint's variable, over the bridge's own session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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

from connectors.kafka import reliable_producer
from connectors.opcua import certificate_der, certificate_uri, fingerprint
from schemas.control import Command, DeliveryStatus
from schemas.raw import RawReading
from twinflow import metrics
from twinflow.bridges.commands import CommandLoop, Done, NotServed, Outcome, Retry
from twinflow.bridges.running import run_bridge
from twinflow.errors import TwinflowError
from twinflow.settings import OpcUaSettings, Settings
from twinflow.topics import control_topics, ingest_topics
from twinflow.twin_model import SetpointValue, TwinModel

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
# A server that answers at all answers a Write within milliseconds; one that does not is
# written to again once the bridge has reconnected.
_WRITE_TIMEOUT_S = 10.0
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


@dataclass(frozen=True, slots=True)
class MonitoredSetpoint:
    """One setpoint variable the bridge monitors: what the machine runs at."""

    entity_id: str
    setpoint: str
    type: Literal["float", "int", "bool"]
    node_id: str

    @property
    def source(self) -> str:
        """The message's ``source`` field."""
        return f"opcua:{self.node_id}"


MonitoredItem = MonitoredSensor | MonitoredSetpoint


@dataclass(frozen=True)
class CommandTargets:
    """The variables a command to one entity is written to."""

    command_id: ua.NodeId
    setpoints: dict[str, ua.NodeId] = field(default_factory=dict)


class ReportedSetpoint(msgspec.Struct, frozen=True):
    """A raw message carrying one setpoint's reported value alone."""

    entity_id: str
    ts: int
    reported: dict[str, SetpointValue]
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


def encode_reported(setpoint: MonitoredSetpoint, value: ua.DataValue) -> bytes | None:
    """The raw message reporting a setpoint's value, or None when it carries none.

    A bool setpoint reports a Boolean, a number setpoint a finite number; anything else
    is not a value the twin model can compare with what it asked for.
    """
    reported = value.Value.Value if value.Value is not None else None
    if setpoint.type == "bool":
        if not isinstance(reported, bool):
            return None
    elif isinstance(reported, int | float) and not isinstance(reported, bool):
        if not math.isfinite(reported):
            return None
        reported = float(reported)
    else:
        return None
    ts = epoch_ms(value)
    if ts is None:
        return None
    return _encoder.encode(
        ReportedSetpoint(
            entity_id=setpoint.entity_id,
            ts=ts,
            reported={setpoint.setpoint: reported},
            quality=quality_of(value.StatusCode),
            source=setpoint.source,
        )
    )


def setpoint_variant(value: SetpointValue) -> ua.Variant:
    """A checked setpoint value as the server's variables hold it: Boolean or Double.

    >>> setpoint_variant(1200).VariantType, setpoint_variant(False).VariantType
    (<VariantType.Double: 11>, <VariantType.Boolean: 1>)
    """
    if isinstance(value, bool):
        return ua.Variant(value, ua.VariantType.Boolean)
    return ua.Variant(float(value), ua.VariantType.Double)


def write_outcome(statuses: Sequence[ua.StatusCode], node_ids: Sequence[ua.NodeId]) -> Done:
    """The result of a command's Write from its per-node status codes.

    >>> ids = [ua.NodeId("p/command_id", 2), ua.NodeId("p/setpoints/speed", 2)]
    >>> write_outcome([ua.StatusCode(), ua.StatusCode(StatusCodes.BadTypeMismatch)], ids).detail
    'the OPC UA server refused ns=2;s=p/setpoints/speed: BadTypeMismatch'
    >>> write_outcome([ua.StatusCode(), ua.StatusCode()], ids).status
    <DeliveryStatus.DELIVERED: 'delivered'>
    """
    refused = [
        f"{node_id.to_string()}: {status.name}"
        for node_id, status in zip(node_ids, statuses, strict=True)
        if not status.is_good()
    ]
    if refused:
        return Done(DeliveryStatus.FAILED, "the OPC UA server refused " + ", ".join(refused))
    return Done(DeliveryStatus.DELIVERED, f"wrote {node_ids[-1].to_string()}")


def run(settings: Settings, model: TwinModel, stop: threading.Event | None = None) -> None:
    """Bridge OPC UA to ``settings.topics.raw`` until ``stop`` is set.

    Raises :class:`DeliveryError` when Kafka refuses or times out a reading,
    :class:`OpcUaSecurityError` when the server is not the pinned one or refuses the
    bridge's credentials, and CommandLoopError when Kafka does not take a command's
    result; connection failures are retried with backoff.
    """
    topics = settings.topics
    run_bridge(
        settings,
        "opcua_bridge_port",
        [*ingest_topics(topics), *control_topics(topics)],
        lambda: _Bridge(settings, model, stop or threading.Event()),
        DeliveryError,
    )


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
        self._items: dict[int, MonitoredItem] = {}
        # The command loop's view, from its own thread: the loop and session to write
        # with while connected, and the entities found at the last connection (None
        # before the first one).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._targets: dict[str, CommandTargets] | None = None
        self._commands = CommandLoop(
            settings, model, "opcua", serves=self._serves, deliver=self._deliver
        )
        self._last_sent: dict[str, bytes] = {}
        self._received = self._produced = self._gaps = self._repeats = self._reconnects = 0
        self._last_reading_at: float | None = None
        self._lost_at: float | None = None
        self._next_stats = time.monotonic() + STATS_INTERVAL_S
        self._connected = metrics.bridge_connected.labels("opcua")
        self._received_total = metrics.bridge_received.labels("opcua")
        self._forwarded = metrics.bridge_forwarded.labels("opcua")

    async def forward(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._commands.start()
        try:
            await self._connect_and_stream()
        finally:
            # In a thread: a command being written needs this event loop to finish.
            await asyncio.to_thread(self._commands.stop)

    async def _connect_and_stream(self) -> None:
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
        self._items, self._targets = await self._find_items(client)
        subscription = await client.create_subscription(
            self._opcua.publishing_interval_ms, None, queue_maxsize=0
        )
        await self._monitor(subscription)
        log.info(
            "monitoring %d OPC UA variables at %s; %d entities take commands",
            len(self._items),
            self._opcua.endpoint,
            len(self._targets),
        )
        consumer = asyncio.create_task(self._consume(subscription))
        self._client = client
        try:
            await self._watch(client, consumer)
        except _ConnectionLost:
            _drop_connection(client)
            raise
        finally:
            self._client = None
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

    async def _find_items(
        self, client: Client
    ) -> tuple[dict[int, MonitoredItem], dict[str, CommandTargets]]:
        """The variables to monitor by client handle, and the entities that take commands.

        Setpoints are looked for under every entity: a server lacking them serves those
        machines' telemetry only, and their commands are another bridge's.
        """
        try:
            index = await client.get_namespace_index(self._opcua.namespace)
        except ValueError:
            raise _ConnectionLost(
                f"the server has no namespace {self._opcua.namespace}; not a twinflow plant?"
            ) from None
        sensors = [
            (entity.id, sensor, spec.unit)
            for entity in self._model.entities
            for sensor, spec in self._model.sensors_of(entity.id).items()
        ]
        setpoints = [
            (entity.id, name, spec.type)
            for entity in self._model.entities
            for name, spec in self._model.setpoints_of(entity.id).items()
        ]
        commanded = list(dict.fromkeys(entity_id for entity_id, _name, _type in setpoints))
        paths = [
            *((entity_id, sensor) for entity_id, sensor, _unit in sensors),
            *((entity_id, "setpoints", name) for entity_id, name, _type in setpoints),
            *((entity_id, "command_id") for entity_id in commanded),
        ]
        node_ids = await _translate(client, index, paths)
        sensor_ids = node_ids[: len(sensors)]
        setpoint_ids = node_ids[len(sensors) : len(sensors) + len(setpoints)]
        command_ids = node_ids[len(sensors) + len(setpoints) :]

        found: dict[int, MonitoredItem] = {}
        missing = []
        for (entity_id, sensor, unit), node_id in zip(sensors, sensor_ids, strict=True):
            if node_id is None:
                missing.append(f"{entity_id}/{sensor}")
                continue
            found[len(found) + 1] = MonitoredSensor(entity_id, sensor, unit, node_id.to_string())
        if missing:
            log.warning(
                "%d of %d twin model sensors are not on the OPC UA server, skipped: %s",
                len(missing),
                len(sensors),
                ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else ""),
            )
        targets = {
            entity_id: CommandTargets(node_id)
            for entity_id, node_id in zip(commanded, command_ids, strict=True)
            if node_id is not None
        }
        for (entity_id, name, kind), node_id in zip(setpoints, setpoint_ids, strict=True):
            if node_id is None:
                continue
            found[len(found) + 1] = MonitoredSetpoint(entity_id, name, kind, node_id.to_string())
            if entity_id in targets:
                targets[entity_id].setpoints[name] = node_id
        if not found:
            raise _ConnectionLost("none of the twin model's sensors or setpoints is on the server")
        return found, targets

    async def _monitor(self, subscription: Subscription) -> None:
        # StatusValueTimestamp: a stuck sensor repeats its value with new timestamps,
        # and those repeats are readings too.
        every_change = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
        requests = [
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(
                    NodeId=ua.NodeId.from_string(monitored.node_id),
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
            for handle, monitored in self._items.items()
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
            log.warning("server refused to monitor %s: %s", self._items.pop(handle), status)
        if not self._items:
            raise _ConnectionLost("the server refused to monitor every variable")

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
        monitored = self._items[handle]
        payload = (
            encode_reading(monitored, item.Value)
            if isinstance(monitored, MonitoredSensor)
            else encode_reported(monitored, item.Value)
        )
        if payload is None:
            self._gaps += 1
            metrics.bridge_skipped.labels("opcua", "no_value").inc()
            log.debug("no reading in %s: %s", monitored.source, item.Value.StatusCode)
            return
        # A new subscription starts with each item's current value, which the bridge
        # already produced if the server kept running.
        if self._last_sent.get(monitored.node_id) == payload:
            self._repeats += 1
            metrics.bridge_skipped.labels("opcua", "repeat").inc()
            return
        self._last_sent[monitored.node_id] = payload
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
                self._producer.produce(self._topic, payload, key=monitored.entity_id)
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
        if self._commands.failure is not None:
            raise self._commands.failure
        if time.monotonic() >= self._next_stats:
            self._log_stats()

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            self._produced += 1
            self._forwarded.inc()
        elif self._failure is None:
            self._failure = error

    def _serves(self, entity_id: str) -> bool | None:
        targets = self._targets
        return None if targets is None else entity_id in targets

    def _deliver(self, command: Command) -> Outcome:
        """Write ``command`` with the bridge's session; called from the command thread."""
        loop, client, targets = self._loop, self._client, self._targets
        if loop is None or client is None or targets is None:
            return Retry(f"not connected to {self._opcua.endpoint}")
        nodes = targets.get(command.entity_id)
        if nodes is None:
            return NotServed(f"{command.entity_id} has no command_id variable on the server")
        setpoint = nodes.setpoints.get(command.setpoint)
        if setpoint is None:
            return Done(
                DeliveryStatus.FAILED,
                f"the OPC UA server has no variable {command.entity_id}/setpoints/"
                f"{command.setpoint}",
            )
        written = asyncio.run_coroutine_threadsafe(
            _write_command(client, nodes.command_id, setpoint, command), loop
        )
        try:
            statuses = written.result(_WRITE_TIMEOUT_S)
        except TimeoutError:
            written.cancel()
            return Retry(f"no answer to the write within {_WRITE_TIMEOUT_S:g} s")
        except (OSError, UaError, concurrent.futures.CancelledError) as exc:
            # A fault of the whole service call (session or channel gone, the client
            # torn down) is the connection's: written again on the next one.
            return Retry(f"the write failed: {str(exc) or repr(exc)}")
        return write_outcome(statuses, [nodes.command_id, setpoint])

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
            len(self._items),
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


async def _translate(
    client: Client, index: int, paths: Sequence[tuple[str, ...]]
) -> list[ua.NodeId | None]:
    """The node id at ``Objects/Plant/<path>`` for each path, None where there is none."""
    browse_paths = [
        f"/{index}:Plant" + "".join(f"/{index}:{_escape(name)}" for name in path) for path in paths
    ]
    objects = ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder))
    results: list[ua.BrowsePathResult] = []
    for batch in _batches(browse_paths):
        results.extend(await client.translate_browsepaths(objects, batch))
    found: list[ua.NodeId | None] = []
    for result in results:
        if not result.StatusCode.is_good() or not result.Targets:
            found.append(None)
            continue
        target = result.Targets[0].TargetId
        found.append(ua.NodeId(target.Identifier, target.NamespaceIndex))
    return found


async def _write_command(
    client: Client, command_id: ua.NodeId, setpoint: ua.NodeId, command: Command
) -> list[ua.StatusCode]:
    # One Write call, the id first, so a machine knows which command the value is from.
    # Values only: servers may refuse client timestamps or status (BadWriteNotSupported).
    values = [
        ua.DataValue(Value=ua.Variant(command.command_id, ua.VariantType.String), StatusCode=None),
        ua.DataValue(Value=setpoint_variant(command.value), StatusCode=None),
    ]
    statuses: list[ua.StatusCode] = await client.uaclient.write_attributes(
        [command_id, setpoint], values, AttributeIds.Value
    )
    return statuses


def _escape(name: str) -> str:
    return "".join(f"&{char}" if char in _RESERVED_IN_BROWSE_NAMES else char for char in name)


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]
