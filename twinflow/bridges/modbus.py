"""The Modbus TCP -> Kafka bridge: every poll of a device's registers becomes raw readings.

Each entity of the twin model with a ``modbus`` device is polled every
``poll_interval_s`` by an asyncio task of its own, with the reads
:func:`~twinflow.bridges.modbus_codec.plan_reads` makes of its register map; the
units (entities) behind one ``host:port`` share one TCP connection, which serialises
their requests. Every value of one poll carries the poll's wall-clock time (epoch ms),
strictly increasing per device, so a poll repeated after a failure or a restart never
produces an ``(entity, sensor, ts)`` twice. Readings go to ``twin.raw`` in the single
form, key = entity id, unit = the register's, quality good.

A device answering a read with an exception response loses that range, not the poll:
one dead letter per range (``device_exception``, source kind ``modbus``, the device
and the registers). A value that is not finite is dead-lettered as ``non_finite``.

A device that times out or refuses the connection is retried with back-off (0.5 s
doubling up to ``modbus.reconnect_max_backoff_s``) while the others go on polling.
pymodbus's own reconnection stays off: the bridge owns that policy. The outage is
logged once when it starts and once when the device answers again, with the gap's
length and the polls it cost, and counted (``twinflow_bridge_gaps``,
``twinflow_bridge_polls_missed``). ``twinflow_bridge_connected`` is 1 while every
device answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from confluent_kafka import KafkaError, Message, Producer
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from connectors.kafka import reliable_producer
from schemas import deadletter
from schemas.raw import RawReading, Reason
from twinflow import metrics
from twinflow.bridges.modbus_codec import (
    PolledDevice,
    Rejected,
    decode,
    polled_devices,
    refused,
)
from twinflow.bridges.running import run_bridge
from twinflow.errors import ConfigError, TwinflowError
from twinflow.settings import Settings
from twinflow.topics import ingest_topics
from twinflow.twin_model import TwinModel

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 10.0
_TICK_S = 0.1
_FIRST_BACKOFF_S = 0.5
_FLUSH_TIMEOUT_S = 30.0
_LABEL = "modbus"


class ModbusBridgeError(TwinflowError):
    """The Modbus bridge stopped; readings after the last produced one are not in Kafka."""


class DeliveryError(ModbusBridgeError):
    """Kafka did not accept a message; the bridge stops rather than lose it silently."""


def run(settings: Settings, model: TwinModel, stop: threading.Event | None = None) -> None:
    """Poll the twin model's Modbus devices into ``settings.topics.raw`` until ``stop`` is set.

    Raises ConfigError when no entity has a Modbus device or a map does not fit the
    read size, and :class:`DeliveryError` when Kafka refuses or times out a message;
    devices that do not answer are retried with back-off.
    """
    devices = polled_devices(model, settings.modbus)
    if not devices:
        raise ConfigError(
            "the twin model maps no entity to a Modbus device: give the entities to poll "
            "a `modbus:` device (host, port, unit_id) and a register layout"
        )
    run_bridge(
        settings,
        "modbus_bridge_port",
        ingest_topics(settings.topics),
        lambda: _Bridge(settings, devices, stop or threading.Event()),
        DeliveryError,
    )


class _Unreachable(Exception):
    """The device did not answer: no connection, a timeout, or a broken reply."""


class _Link:
    """One TCP connection to a Modbus server, shared by the units behind it."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.name = f"{host}:{port}"
        # retries=0: a timeout is the bridge's to handle, and a late answer to a retried
        # request would be taken for the next one's; reconnect_delay=0: no reconnecting
        # behind the bridge's back-off.
        self._client = AsyncModbusTcpClient(
            host, port=port, timeout=timeout_s, retries=0, reconnect_delay=0, name=self.name
        )
        self._connecting = asyncio.Lock()
        self.connections = 0

    async def read(self, kind: str, address: int, count: int, unit_id: int) -> ModbusPDU:
        connection = await self._connect()
        call = (
            self._client.read_holding_registers
            if kind == "holding"
            else self._client.read_input_registers
        )
        try:
            return await call(address, count=count, device_id=unit_id)
        except (ModbusException, OSError) as exc:
            # Requests of other units queue behind a silent one and fail after it; they
            # must not close the connection a unit has opened again meanwhile.
            if connection == self.connections:
                self._client.close()
            raise _Unreachable(f"{self.name}: {exc}") from exc

    async def _connect(self) -> int:
        """Connect unless connected; the number of the connection to read on."""
        async with self._connecting:
            if self._client.connected:
                return self.connections
            if not await self._client.connect():
                raise _Unreachable(f"cannot connect to {self.name}")
            self.connections += 1
            if self.connections > 1:
                metrics.bridge_reconnects.labels(_LABEL).inc()
            log.info("connected to modbus://%s", self.name)
            return self.connections

    def close(self) -> None:
        self._client.close()


@dataclass
class _Outage:
    started: float
    last_answer: float | None


class _Bridge:
    def __init__(
        self, settings: Settings, devices: list[PolledDevice], stop: threading.Event
    ) -> None:
        self._modbus = settings.modbus
        self._devices = devices
        self._stop = stop
        self._raw = settings.topics.raw
        self._deadletter = settings.topics.deadletter
        self._producer: Producer = reliable_producer(settings.kafka)
        self._failure: KafkaError | None = None
        self._links: dict[tuple[str, int], _Link] = {}
        self._outages: dict[str, _Outage] = {}
        # Per entity: when its device last answered a whole poll (monotonic clock).
        self._answered: dict[str, float] = {}
        self._refusals_seen: set[tuple[str, str]] = set()
        self._polls = self._received = self._forwarded = self._dead_lettered = 0
        self._gaps = self._missed = 0
        self._next_stats = time.monotonic() + STATS_INTERVAL_S
        self._connected = metrics.bridge_connected.labels(_LABEL)
        self._received_total = metrics.bridge_received.labels(_LABEL)
        self._forwarded_total = metrics.bridge_forwarded.labels(_LABEL)

    async def forward(self) -> None:
        for device in self._devices:
            key = (device.address.host, device.address.port)
            if key not in self._links:
                self._links[key] = _Link(*key, self._modbus.timeout_s)
        log.info(
            "polling %d Modbus devices on %d connections",
            len(self._devices),
            len(self._links),
        )
        tasks = [
            asyncio.create_task(self._poll_device(device), name=device.address.name)
            for device in self._devices
        ]
        try:
            while not self._stop.is_set():
                done, _ = await asyncio.wait(
                    tasks, timeout=_TICK_S, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    # A device task ends only by failing: let it stop the bridge.
                    task.result()
                self._poll_kafka()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in self._links.values():
                link.close()
            self._connected.set(0)

    def finish(self) -> None:
        """Wait for Kafka to confirm every message; raise if any is not confirmed."""
        undelivered = self._producer.flush(_FLUSH_TIMEOUT_S)
        self._log_stats()
        if undelivered or self._failure is not None:
            message = (
                f"Kafka did not confirm {undelivered} message(s) for {self._raw} "
                f"and {self._deadletter}"
                + (f": {self._failure}" if self._failure is not None else "")
            )
            log.error("%s", message)
            raise DeliveryError(message)

    async def _poll_device(self, device: PolledDevice) -> None:
        loop = asyncio.get_running_loop()
        link = self._links[(device.address.host, device.address.port)]
        backoff = _FIRST_BACKOFF_S
        last_ts = 0
        next_at = loop.time()
        # Not `while True`: on Python 3.11 asyncio.wait_for (inside pymodbus) swallows a
        # cancellation that arrives as the answer does, and the task would poll on after
        # the bridge cancelled it to stop.
        while not self._stop.is_set():
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # Strictly increasing: two polls within a millisecond must not share a ts.
            last_ts = max(time.time_ns() // 1_000_000, last_ts + 1)
            try:
                await self._poll_once(device, link, last_ts)
            except _Unreachable as exc:
                self._lost(device, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._modbus.reconnect_max_backoff_s)
                next_at = loop.time()
                continue
            backoff = _FIRST_BACKOFF_S
            self._answering(device)
            # A poll that overran its interval is followed at once, without a burst of
            # the polls it overran.
            next_at = max(next_at + device.interval_s, loop.time())

    async def _poll_once(self, device: PolledDevice, link: _Link, ts: int) -> None:
        address = device.address
        for read in device.reads:
            answer = await link.read(read.kind, read.address, read.count, address.unit_id)
            if isinstance(answer, ExceptionResponse) or answer.isError():
                code = getattr(answer, "exception_code", 0)
                rejected = refused(read, code, device.entity_id, address, ts)
                if (address.name, read.label) not in self._refusals_seen:
                    # Once per range: a device keeps refusing what it lacks, every poll.
                    self._refusals_seen.add((address.name, read.label))
                    log.warning("%s; dead-lettering each refusal", rejected.detail)
                self._reject(device, rejected)
                continue
            got = len(answer.registers)
            if got < read.count:
                raise _Unreachable(f"{address.name} answered {read.label} with {got} registers")
            for outcome in decode(read, answer.registers, device.entity_id, address, ts):
                self._received += 1
                self._received_total.inc()
                if isinstance(outcome, RawReading):
                    self._produce(self._raw, device.entity_id, _encode(outcome), None)
                else:
                    self._reject(device, outcome)
        self._polls += 1

    def _reject(self, device: PolledDevice, rejected: Rejected) -> None:
        letter = deadletter.dead_letter(
            rejected.payload,
            rejected.reason,
            rejected.detail,
            deadletter.Source(kind="modbus", device=device.address.name, address=rejected.address),
            datetime.now(UTC),
            entity_id=device.entity_id,
        )
        log.debug("dead letter: %s", rejected.detail)
        self._produce(
            self._deadletter, device.entity_id, deadletter.encode(letter), rejected.reason
        )

    def _produce(self, topic: str, key: str, value: bytes, reason: Reason | None) -> None:
        on_delivery = self._on_delivery(reason)
        while True:
            try:
                self._producer.produce(topic, value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                # librdkafka's queue is full: let deliveries drain it. Polls wait
                # meanwhile; the devices keep their registers.
                self._producer.poll(0.1)
        self._producer.poll(0)

    def _on_delivery(self, reason: Reason | None) -> Callable[[KafkaError | None, Message], None]:
        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                if self._failure is None:
                    self._failure = error
                return
            if reason is None:
                self._forwarded += 1
                self._forwarded_total.inc()
            else:
                self._dead_lettered += 1
                metrics.bridge_dead_letters.labels(_LABEL, reason.value).inc()

        return delivered

    def _poll_kafka(self) -> None:
        self._producer.poll(0)
        if self._failure is not None:
            raise DeliveryError(
                f"Kafka did not accept a message for {self._raw}: {self._failure}; "
                "stopping so that no reading is lost silently"
            )
        if time.monotonic() >= self._next_stats:
            self._log_stats()

    def _lost(self, device: PolledDevice, exc: _Unreachable, backoff: float) -> None:
        if device.entity_id in self._outages:
            log.debug("%s still unreachable: %s", device.address.name, exc)
            return
        self._outages[device.entity_id] = _Outage(
            time.monotonic(), self._answered.get(device.entity_id)
        )
        self._connected.set(0)
        log.warning(
            "Modbus device %s (%s) lost: %s; retrying with back-off from %.1f s",
            device.address.name,
            device.entity_id,
            str(exc.__cause__ or exc) or repr(exc),
            backoff,
        )

    def _answering(self, device: PolledDevice) -> None:
        now = time.monotonic()
        first = device.entity_id not in self._answered
        self._answered[device.entity_id] = now
        outage = self._outages.pop(device.entity_id, None)
        if outage is not None:
            since = outage.last_answer if outage.last_answer is not None else outage.started
            gap_s = now - since
            missed = max(0, round(gap_s / device.interval_s) - 1)
            self._gaps += 1
            self._missed += missed
            metrics.bridge_gaps.labels(_LABEL).inc()
            metrics.bridge_polls_missed.labels(_LABEL).inc(missed)
            log.warning(
                "Modbus device %s (%s) answers again after a gap of %.1f s: %d polls missed",
                device.address.name,
                device.entity_id,
                gap_s,
                missed,
            )
        if first or outage is not None:
            self._update_connected()

    def _update_connected(self) -> None:
        every = not self._outages and len(self._answered) == len(self._devices)
        self._connected.set(1 if every else 0)

    def _log_stats(self) -> None:
        self._next_stats = time.monotonic() + STATS_INTERVAL_S
        log.info(
            "modbus bridge: polls=%d received=%d forwarded=%d dead_letters=%d gaps=%d "
            "missed_polls=%d reconnects=%d unreachable=%d",
            self._polls,
            self._received,
            self._forwarded,
            self._dead_lettered,
            self._gaps,
            self._missed,
            sum(max(0, link.connections - 1) for link in self._links.values()),
            len(self._outages),
        )


_encoder = msgspec.json.Encoder()


def _encode(reading: RawReading) -> bytes:
    return _encoder.encode(reading)
