"""What a CoAP notification means for ``twin.raw``: a raw reading, or a dead letter.

Two representations, as the twin model's CoAP maps describe them:

- a per-sensor resource holds one number as UTF-8 text (``71.6``) in the resource's
  unit; it carries no time, so its reading is stamped with the time the notification
  arrived, and a text that is no number is dead-lettered as ``bad_payload``
  (``non_finite`` for nan and infinity);
- a telemetry resource holds one raw-contract JSON message, which must name the entity
  the resource belongs to; it is forwarded as it is, its own ``ts`` included, or
  dead-lettered with the raw contract's reason.

Pure: no I/O; the caller passes the arrival time in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime

import msgspec

from schemas import deadletter
from schemas.raw import RawReading, Reason, SchemaError, decode_raw

MAX_PAYLOAD_BYTES = 900 * 1024
"""Larger bodies cannot go to Kafka whole (its default message limit is 1 MiB)."""
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
# What float() takes for nan and infinity: a reading that names them is non-finite,
# not unreadable.
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class SensorResource:
    """A resource holding one sensor's value as text."""

    entity_id: str
    host: str
    port: int
    path: str
    sensor: str
    unit: str
    """The value's unit: the resource's, else the sensor's canonical unit."""

    @property
    def device(self) -> str:
        """The server as a dead letter's ``source.device`` names it: ``host:port``."""
        return _authority(self.host, self.port)

    @property
    def uri(self) -> str:
        """The resource's URI, also the reading's ``source``."""
        return f"coap://{self.device}/{self.path}"


@dataclass(frozen=True, slots=True)
class TelemetryResource:
    """A resource holding one raw-contract JSON message of its entity."""

    entity_id: str
    host: str
    port: int
    path: str

    @property
    def device(self) -> str:
        """The server as a dead letter's ``source.device`` names it: ``host:port``."""
        return _authority(self.host, self.port)

    @property
    def uri(self) -> str:
        """The resource's URI."""
        return f"coap://{self.device}/{self.path}"


ObservedResource = SensorResource | TelemetryResource


@dataclass(frozen=True, slots=True)
class Reading:
    """A notification to forward to ``twin.raw`` as ``payload``."""

    payload: bytes
    ts_ms: int
    """When it was measured: the body's ``ts``, or the arrival for a per-sensor value."""
    identity: tuple[object, ...]
    """What makes it the same reading as another of its resource's: the values (and
    for telemetry the ``ts``), whatever the formatting."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A notification for the dead-letter topic."""

    reason: Reason
    detail: str


_encoder = msgspec.json.Encoder()


def decode(resource: ObservedResource, payload: bytes, arrived_ms: int) -> Reading | Rejected:
    """The reading in one notification's payload, or why there is none.

    >>> temp = SensorResource("pump-1", "127.0.0.1", 5683, "pump-1/temp", "bearing_temp", "degF")
    >>> reading = decode(temp, b"161.6", 1_767_225_600_000)
    >>> msgspec.json.decode(reading.payload)  # doctest: +NORMALIZE_WHITESPACE
    {'entity_id': 'pump-1', 'sensor': 'bearing_temp', 'ts': 1767225600000, 'value': 161.6,
     'unit': 'degF', 'quality': 'good', 'source': 'coap://127.0.0.1:5683/pump-1/temp'}
    >>> decode(temp, b"abc", 1_767_225_600_000)
    Rejected(reason=<Reason.BAD_PAYLOAD: 'bad_payload'>, detail="'abc' is not a number")
    >>> body = b'{"entity_id":"pump-2","ts":1767225600000,"values":{"flow":3}}'
    >>> decode(TelemetryResource("pump-1", "::1", 5683, "telemetry"), body, 0).detail
    "the body names 'pump-2', coap://[::1]:5683/telemetry belongs to 'pump-1'"
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Rejected(Reason.TOO_LARGE, f"{len(payload)} bytes")
    if isinstance(resource, SensorResource):
        return _decode_number(resource, payload, arrived_ms)
    return _decode_telemetry(resource, payload)


def _decode_number(resource: SensorResource, payload: bytes, arrived_ms: int) -> Reading | Rejected:
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return Rejected(Reason.BAD_PAYLOAD, f"not UTF-8 text: {exc}")
    if not text:
        return Rejected(Reason.BAD_PAYLOAD, "empty representation")
    if _NON_FINITE.fullmatch(text):
        return Rejected(Reason.NON_FINITE, f"{resource.sensor} is {text}")
    if not _DECIMAL.fullmatch(text):
        return Rejected(Reason.BAD_PAYLOAD, f"{text[:100]!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        return Rejected(Reason.NON_FINITE, f"{resource.sensor} is {text[:100]} (overflows)")
    reading = RawReading(
        entity_id=resource.entity_id,
        sensor=resource.sensor,
        ts=arrived_ms,
        value=value,
        unit=resource.unit,
        quality="good",
        source=resource.uri,
    )
    return Reading(_encoder.encode(reading), arrived_ms, (value,))


def _decode_telemetry(resource: TelemetryResource, payload: bytes) -> Reading | Rejected:
    try:
        message = decode_raw(payload)
    except SchemaError as exc:
        return Rejected(exc.reason, exc.detail)
    if message.entity_id != resource.entity_id:
        return Rejected(
            Reason.ENTITY_MISMATCH,
            f"the body names {message.entity_id!r}, {resource.uri} belongs to "
            f"{resource.entity_id!r}",
        )
    readings = tuple(sorted(message.readings()))
    reported = tuple(sorted((message.reported or {}).items()))
    return Reading(payload, message.ts_ms, (message.ts_ms, readings, reported))


def dead_letter(
    resource: ObservedResource, payload: bytes, rejected: Rejected, received_at: datetime
) -> bytes:
    """The dead letter of a rejected notification, its source the device and path.

    >>> from datetime import UTC
    >>> temp = SensorResource("pump-1", "127.0.0.1", 5683, "pump-1/temp", "bearing_temp", "degC")
    >>> letter = dead_letter(temp, b"nan", Rejected(Reason.NON_FINITE, "bearing_temp is nan"),
    ...     datetime(2026, 1, 1, tzinfo=UTC))
    >>> msgspec.json.decode(letter)["source"]
    {'kind': 'coap', 'device': '127.0.0.1:5683', 'address': 'pump-1/temp'}
    """
    letter = deadletter.dead_letter(
        payload,
        rejected.reason,
        rejected.detail,
        deadletter.Source(kind="coap", device=resource.device, address=resource.path),
        received_at,
        entity_id=resource.entity_id,
    )
    return deadletter.encode(letter)


def _authority(host: str, port: int) -> str:
    # An IPv6 literal is bracketed in a URI, or its colons would read as the port's.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
