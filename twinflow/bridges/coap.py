"""The CoAP -> Kafka bridge: every notification of an observed resource reaches Kafka.

For every entity with a CoAP map the bridge observes (RFC 7641: GET with Observe 0)
each of its resources, all from one aiocoap client context, and produces every
notification: a reading to ``twin.raw`` (key = entity id), anything else to
``twin.deadletter`` with the device and path as its source. What a representation
means is :mod:`twinflow.bridges.coap_codec`'s to say.

CoAP over UDP has no connection to lose: a server that is gone simply falls silent.
So an observation counts as lost when it ends (the server ended it, sent an error or a
reset), when a request fails, and when no notification came for ``coap.silence_s``. A
lost resource is observed again with back-off (0.5 s doubling to
``coap.reconnect_max_backoff_s``) while the other resources go on. A device's gap is
logged once when its first resource is lost and once when all of them are back, with
its length, and counted in ``twinflow_bridge_reconnects_total``.
``twinflow_bridge_connected`` is 1 while every resource is observed.

Nothing is forwarded twice: a re-registration's first response is the resource's
current representation, which the bridge may have forwarded already; it is skipped
when it is the one last handled (see :func:`_repeat_key`).

Every notification that arrives is handled: aiocoap's own blockwise layer and its
``async for`` iterator pass notifications through a one-slot queue, where one arriving
while the previous is handled replaces it, so the bridge requests without blockwise
handling and takes notifications in a callback. A body sent in blocks (over ~1 KiB) is
dead-lettered as ``too_large``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiocoap import GET, Context, Message
from aiocoap import error as coap_error
from aiocoap.protocol import Request
from confluent_kafka import KafkaError, Producer
from confluent_kafka import Message as KafkaMessage

from connectors.kafka import reliable_producer
from schemas.raw import Reason
from twinflow import metrics
from twinflow.bridges.coap_codec import (
    ObservedResource,
    Reading,
    Rejected,
    SensorResource,
    TelemetryResource,
    dead_letter,
    decode,
)
from twinflow.bridges.running import run_bridge
from twinflow.errors import ConfigError, TwinflowError
from twinflow.settings import Settings
from twinflow.topics import ingest_topics
from twinflow.twin_model import Entity, TwinModel

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 10.0
_TICK_S = 0.1
_FIRST_BACKOFF_S = 0.5
_FLUSH_TIMEOUT_S = 30.0
_SHUTDOWN_TIMEOUT_S = 5.0


class CoapBridgeError(TwinflowError):
    """The CoAP bridge stopped; notifications after the last produced one are not in Kafka."""


class DeliveryError(CoapBridgeError):
    """Kafka did not accept a message; the bridge stops rather than lose it silently."""


def resources_of(model: TwinModel, entity: Entity) -> list[ObservedResource]:
    """The resources the bridge observes for ``entity`` (none without a CoAP map)."""
    coap = entity.coap
    if coap is None:
        return []
    if coap.telemetry is not None:
        return [TelemetryResource(entity.id, coap.host, coap.port, coap.telemetry)]
    sensors = model.sensors_of(entity.id)
    return [
        SensorResource(
            entity.id,
            coap.host,
            coap.port,
            mapped.path,
            sensor,
            mapped.unit or sensors[sensor].unit,
        )
        for sensor, mapped in model.coap_resources(entity).items()
    ]


def run(settings: Settings, model: TwinModel, stop: threading.Event | None = None) -> None:
    """Bridge CoAP to ``settings.topics.raw`` until ``stop`` is set.

    Raises :class:`DeliveryError` when Kafka refuses or times out a message; lost
    observations are re-registered with back-off.
    """
    run_bridge(
        settings,
        "coap_bridge_port",
        ingest_topics(settings.topics),
        lambda: _Bridge(settings, model, stop or threading.Event()),
        DeliveryError,
    )


class _Lost(Exception):
    """An observation ended, failed, or fell silent."""


@dataclass
class _Device:
    """One server's observations, for logging and counting its gaps once."""

    name: str
    lost: set[str] = field(default_factory=set)
    lost_at: float | None = None
    heard_at: float | None = None
    """When the last notification from it arrived (monotonic); None before the first."""
    silent_since: float | None = None
    """During a gap: when the last notification before it arrived."""


RepeatKey = tuple[object, ...]


def _repeat_key(etag: bytes | None, decoded: Reading | Rejected, payload: bytes) -> RepeatKey:
    """What makes a representation the same as the one the bridge last handled.

    The re-registration's first response is the resource's current value. Whether the
    bridge has it already is for the server's ETag to say (RFC 7252 5.10.6: it changes
    with the representation; the simulator's names the sample). Without one the bridge
    compares contents: a telemetry body carries its ``ts``, so same values at the same
    ``ts`` is the same reading; a per-sensor number carries no time, so the same number
    is taken for the same reading. That loses the one reading of a sensor stuck at its
    value that happens to fall on a re-registration, where the other choice would write
    a value twice, at a time it was not measured (a per-sensor reading's time is its
    arrival). A dead letter is compared the same way, so a bad value is kept once.

    >>> from schemas.raw import Reason
    >>> _repeat_key(b"v1", Rejected(Reason.BAD_PAYLOAD, "x"), b"abc")
    ('etag', b'v1')
    >>> _repeat_key(None, Reading(b"{}", 5, (3.0,)), b"3")
    ('reading', (3.0,))
    """
    if etag is not None:
        return ("etag", etag)
    if isinstance(decoded, Reading):
        return ("reading", decoded.identity)
    return ("rejected", payload)


class _Registration:
    """One observe request; hands its notifications to the bridge in arrival order."""

    def __init__(self, request: Request, handle: Callable[[Message, bool], None]) -> None:
        self.request = request
        self.response: asyncio.Future[Message] = request.response
        self.ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self.heard_at = time.monotonic()
        self._handle = handle
        self._first_taken = False

    def take_first(self) -> None:
        """Handle the first response, unless done already (a notification came first)."""
        if self._first_taken or not self.response.done() or self.response.cancelled():
            return
        if self.response.exception() is not None:
            return
        self._first_taken = True
        self.heard_at = time.monotonic()
        self._handle(self.response.result(), True)

    def notified(self, message: Message) -> None:
        # Called by aiocoap as the datagram arrives, possibly before the task awaiting
        # the first response ran: that one goes first.
        self.take_first()
        self.heard_at = time.monotonic()
        self._handle(message, False)

    def failed(self, exc: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_result(exc)


class _Bridge:
    def __init__(self, settings: Settings, model: TwinModel, stop: threading.Event) -> None:
        self._resources = [r for entity in model.entities for r in resources_of(model, entity)]
        _check_distinct(self._resources)
        self._coap = settings.coap
        self._stop = stop
        self._raw = settings.topics.raw
        self._deadletters = settings.topics.deadletter
        self._producer: Producer = reliable_producer(settings.kafka, on_delivery=self._delivered)
        self._failure: KafkaError | None = None
        self._devices: dict[str, _Device] = {}
        for resource in self._resources:
            self._devices.setdefault(resource.device, _Device(resource.device))
        self._observing: set[str] = set()
        self._last: dict[str, RepeatKey] = {}
        self._received = self._produced = self._dead_lettered = 0
        self._repeats = self._gaps = self._reconnects = 0
        self._next_stats = time.monotonic() + STATS_INTERVAL_S
        self._connected = metrics.bridge_connected.labels("coap")
        self._received_total = metrics.bridge_received.labels("coap")
        self._forwarded = metrics.bridge_forwarded.labels("coap")
        self._skipped = metrics.bridge_skipped.labels("coap", "repeat")

    async def forward(self) -> None:
        if not self._resources:
            log.warning("no entity of the twin model has a coap map: nothing to observe")
        context = await Context.create_client_context(transports=["udp6"])
        observers = [
            asyncio.create_task(self._observe(context, resource)) for resource in self._resources
        ]
        log.info(
            "observing %d CoAP resources on %d devices", len(self._resources), len(self._devices)
        )
        try:
            while not self._stop.is_set():
                await asyncio.sleep(_TICK_S)
                for observer in observers:
                    if observer.done():
                        observer.result()
                self._poll()
        finally:
            for observer in observers:
                observer.cancel()
            await asyncio.gather(*observers, return_exceptions=True)
            self._connected.set(0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.shutdown(), _SHUTDOWN_TIMEOUT_S)

    def finish(self) -> None:
        """Wait for Kafka to confirm every message; raise if any is not confirmed."""
        undelivered = self._producer.flush(_FLUSH_TIMEOUT_S)
        self._log_stats()
        if undelivered or self._failure is not None:
            message = f"Kafka did not confirm {undelivered} message(s) for {self._raw}" + (
                f": {self._failure}" if self._failure is not None else ""
            )
            log.error("%s", message)
            raise DeliveryError(message)

    async def _observe(self, context: Context, resource: ObservedResource) -> None:
        """Observe ``resource`` until cancelled, re-registering whenever it is lost."""
        backoff = _FIRST_BACKOFF_S
        while True:
            registration = self._register(context, resource)
            try:
                await self._first_response(registration)
                backoff = _FIRST_BACKOFF_S
                self._observed(resource)
                await self._follow(registration)
            except _Lost as exc:
                self._lost(resource, str(exc), backoff)
            finally:
                _forget(registration)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._coap.reconnect_max_backoff_s)

    def _register(self, context: Context, resource: ObservedResource) -> _Registration:
        # The last representation handled is what a re-registration's first response
        # is compared with; a first registration compares with nothing.
        known = self._last.get(resource.uri)
        request = context.request(
            Message(code=GET, uri=resource.uri, observe=0), handle_blockwise=False
        )

        def handle(message: Message, first: bool) -> None:
            self._on_notification(resource, message, known if first else None)

        registration = _Registration(request, handle)
        # The supported alternative, `async for`, is the lossy queue this avoids.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            request.observation.register_callback(registration.notified)
            request.observation.register_errback(registration.failed)
        return registration

    async def _first_response(self, registration: _Registration) -> None:
        try:
            response = await asyncio.wait_for(registration.response, self._coap.timeout_s)
        except TimeoutError:
            raise _Lost(f"no answer within {self._coap.timeout_s:g} s") from None
        except (coap_error.Error, OSError) as exc:
            raise _Lost(_describe(exc)) from None
        if not response.code.is_successful():
            raise _Lost(f"the server answered {response.code}: {_text(response.payload)}")
        registration.take_first()

    async def _follow(self, registration: _Registration) -> None:
        silence = self._coap.silence_s
        while True:
            remaining = registration.heard_at + silence - time.monotonic()
            if remaining <= 0:
                raise _Lost(f"no notification for {silence:g} s")
            done, _ = await asyncio.wait({registration.ended}, timeout=remaining)
            if done:
                raise _Lost(_describe(registration.ended.result()))

    def _on_notification(
        self, resource: ObservedResource, message: Message, known: RepeatKey | None
    ) -> None:
        """Produce one representation; ``known`` is set for a re-registration's first."""
        if not message.code.is_successful():
            # It ends the observation; the errback that follows says so.
            return
        self._received += 1
        self._received_total.inc()
        device = self._devices[resource.device]
        device.heard_at = time.monotonic()
        payload = bytes(message.payload)
        decoded: Reading | Rejected
        if message.opt.block2 is not None and message.opt.block2.more:
            decoded = Rejected(Reason.TOO_LARGE, "the body comes in blocks (Block2)")
        else:
            decoded = decode(resource, payload, time.time_ns() // 1_000_000)
        key = _repeat_key(message.opt.etag, decoded, payload)
        if known is not None and key == known:
            self._repeats += 1
            self._skipped.inc()
            return
        self._last[resource.uri] = key
        if isinstance(decoded, Reading):
            self._produce(self._raw, resource.entity_id, decoded.payload, None)
            return
        letter = dead_letter(resource, payload, decoded, datetime.now(UTC))
        log.debug("dead letter from %s: %s %s", resource.uri, decoded.reason, decoded.detail)
        reason = str(decoded.reason)

        def delivered(error: KafkaError | None, _message: KafkaMessage) -> None:
            if error is None:
                self._dead_lettered += 1
                metrics.bridge_dead_letters.labels("coap", reason).inc()
            elif self._failure is None:
                self._failure = error

        self._produce(self._deadletters, resource.entity_id, letter, delivered)

    def _produce(
        self,
        topic: str,
        key: str,
        value: bytes,
        on_delivery: Callable[[KafkaError | None, KafkaMessage], None] | None,
    ) -> None:
        while True:
            try:
                if on_delivery is None:
                    self._producer.produce(topic, value, key=key)
                else:
                    self._producer.produce(topic, value, key=key, on_delivery=on_delivery)
                return
            except BufferError:
                # librdkafka's queue is full: let deliveries drain it. Blocking here
                # holds back the datagrams, which the servers' observe layer coalesces.
                self._producer.poll(0.1)

    def _observed(self, resource: ObservedResource) -> None:
        self._observing.add(resource.uri)
        device = self._devices[resource.device]
        device.lost.discard(resource.uri)
        if not device.lost and device.lost_at is not None:
            if device.silent_since is not None:
                self._reconnects += 1
                metrics.bridge_reconnects.labels("coap").inc()
                log.warning(
                    "CoAP device %s is back: observed again after a gap of %.1f s without "
                    "notifications (lost %.1f s ago)",
                    device.name,
                    time.monotonic() - device.silent_since,
                    time.monotonic() - device.lost_at,
                )
            device.lost_at = device.silent_since = None
        self._connected.set(1 if len(self._observing) == len(self._resources) else 0)

    def _lost(self, resource: ObservedResource, reason: str, backoff: float) -> None:
        self._observing.discard(resource.uri)
        self._connected.set(0)
        device = self._devices[resource.device]
        device.lost.add(resource.uri)
        if device.lost_at is None:
            device.lost_at = time.monotonic()
            device.silent_since = device.heard_at
            if device.heard_at is None:
                what = "cannot be observed yet"
            else:
                what = "lost"
                self._gaps += 1
            log.warning(
                "CoAP device %s %s: %s: %s; observing its resources again with back-off "
                "(at most %g s)",
                device.name,
                what,
                resource.uri,
                reason,
                self._coap.reconnect_max_backoff_s,
            )
        else:
            log.debug("%s lost: %s; again in %.1f s", resource.uri, reason, backoff)

    def _poll(self) -> None:
        self._producer.poll(0)
        if self._failure is not None:
            raise DeliveryError(
                f"Kafka did not accept a message for {self._raw}: {self._failure}; "
                "stopping so that no reading is lost silently"
            )
        if time.monotonic() >= self._next_stats:
            self._log_stats()

    def _delivered(self, error: KafkaError | None, _message: KafkaMessage) -> None:
        if error is None:
            self._produced += 1
            self._forwarded.inc()
        elif self._failure is None:
            self._failure = error

    def _log_stats(self) -> None:
        self._next_stats = time.monotonic() + STATS_INTERVAL_S
        log.info(
            "coap bridge: received=%d produced=%d dead_letters=%d repeats=%d gaps=%d "
            "reconnects=%d observed=%d/%d",
            self._received,
            self._produced,
            self._dead_lettered,
            self._repeats,
            self._gaps,
            self._reconnects,
            len(self._observing),
            len(self._resources),
        )


def _check_distinct(resources: list[ObservedResource]) -> None:
    """Refuse two entities reading one resource: its readings would be both entities'."""
    owners: dict[str, str] = {}
    for resource in resources:
        owner = owners.setdefault(resource.uri, resource.entity_id)
        if owner != resource.entity_id:
            raise ConfigError(
                f"{resource.uri} is in the coap maps of both {owner} and "
                f"{resource.entity_id}; give one of them another path or port"
            )


def _forget(registration: _Registration) -> None:
    # Stops the request's interest: the next notification from the server is answered
    # with a reset, which ends the server's side of the observation.
    if not registration.response.done():
        registration.response.cancel()
    observation = registration.request.observation
    if not observation.cancelled:
        observation.cancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, coap_error.NotObservable):
        return "the resource is not observable"
    if isinstance(exc, coap_error.ObservationCancelled):
        return "the server ended the observation"
    # aiocoap's network errors name only their class; the OS error behind says more.
    cause = f" ({exc.__cause__})" if isinstance(exc.__cause__, OSError) else ""
    return (str(exc) or repr(exc)) + cause


def _text(payload: bytes) -> str:
    return payload[:200].decode("utf-8", "replace")
