"""The raw reading contract of ``twin.raw`` (JSON Schema: raw_reading.v1.schema.json).

Two forms, both keyed by entity id in Kafka:

- single: ``{"entity_id", "sensor", "ts", "value", "unit"?, "quality"?, "seq"?, "source"?}``
- batched: ``{"entity_id", "ts", "values": {sensor: number}, "units"?, "quality"?, "seq"?,
  "source"?}``: one entity and timestamp, several sensors.

Either form may carry ``"reported": {setpoint: number | bool}``: the values the machine
runs its setpoints at (see the twin model's ``setpoints``). A message may also carry
``reported`` alone, with neither ``sensor`` nor ``values``.

``ts`` is RFC 3339 with an offset (normalised to UTC) or epoch milliseconds. ``seq`` is
the publisher's per-entity message counter: with ``entity_id`` and ``ts`` it identifies
a message (a restarted publisher may count from 1 again, at other timestamps).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

import msgspec

# Epoch milliseconds outside [1970, 2200) are certainly not reading times.
_MAX_EPOCH_MS = 7_258_118_400_000


class Reason(StrEnum):
    """Why a message was dead-lettered. Stable: consumers and dashboards group by it."""

    BAD_JSON = "bad_json"
    SCHEMA = "schema"
    BAD_FORM = "bad_form"
    NON_FINITE = "non_finite"
    BAD_TIMESTAMP = "bad_timestamp"
    UNKNOWN_ENTITY = "unknown_entity"
    ENTITY_MISMATCH = "entity_mismatch"
    UNKNOWN_SENSOR = "unknown_sensor"
    UNKNOWN_SETPOINT = "unknown_setpoint"
    BAD_UNIT = "bad_unit"
    OUT_OF_RANGE = "out_of_range"
    TS_TOO_OLD = "ts_too_old"
    TS_IN_FUTURE = "ts_in_future"
    TOO_LARGE = "too_large"
    DEVICE_EXCEPTION = "device_exception"
    """A Modbus device answered a read with an exception response."""
    BAD_PAYLOAD = "bad_payload"
    """A field-protocol value that is not a number (a CoAP resource's text)."""


class RawReading(msgspec.Struct, frozen=True):
    """The single form as the bridges write it: every field they know set."""

    entity_id: str
    sensor: str
    ts: int
    """Epoch milliseconds."""
    value: float
    unit: str
    quality: Literal["good", "uncertain", "bad"]
    source: str


class SchemaError(ValueError):
    """A payload does not meet the raw contract; ``reason`` says how."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RawMessage(msgspec.Struct, frozen=True):
    """One message on ``twin.raw``, single or batched form."""

    entity_id: str
    ts: datetime | int
    sensor: str | None = None
    value: float | None = None
    values: dict[str, float] | None = None
    unit: str | None = None
    units: dict[str, str] | None = None
    quality: str | None = None
    seq: int | None = None
    source: str | None = None
    reported: dict[str, float | bool] | None = None

    @property
    def ts_ms(self) -> int:
        """The timestamp as epoch milliseconds (UTC)."""
        if isinstance(self.ts, int):
            return self.ts
        return int(self.ts.timestamp() * 1000)

    def readings(self) -> list[tuple[str, float, str | None]]:
        """``(sensor, value, unit)`` for each reading the message carries."""
        if self.values is not None:
            units = self.units or {}
            return [(name, value, units.get(name)) for name, value in self.values.items()]
        if self.sensor is None or self.value is None:
            return []
        return [(self.sensor, self.value, self.unit)]


_decoder = msgspec.json.Decoder(RawMessage)


def decode_raw(payload: bytes) -> RawMessage:
    """Decode and check one raw message; raise :class:`SchemaError` with a reason code.

    >>> decode_raw(b'{"entity_id":"pump-001","sensor":"flow","ts":1700000000000,"value":3}')
    RawMessage(entity_id='pump-001', ts=1700000000000, sensor='flow', value=3.0, ...)
    >>> decode_raw(b'{"entity_id":"pump-001","ts":1700000000000}')
    Traceback (most recent call last):
    schemas.raw.SchemaError: bad_form: needs sensor+value, values, or reported alone
    """
    try:
        message = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise SchemaError(Reason.SCHEMA, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise SchemaError(Reason.BAD_JSON, str(exc)) from None
    has_single = message.sensor is not None or message.value is not None
    if has_single and message.values is not None:
        raise SchemaError(Reason.BAD_FORM, "needs either sensor+value or values, not both")
    if not has_single and message.values is None and not message.reported:
        raise SchemaError(Reason.BAD_FORM, "needs sensor+value, values, or reported alone")
    for setpoint, reported in (message.reported or {}).items():
        if not isinstance(reported, bool) and not math.isfinite(reported):
            raise SchemaError(Reason.NON_FINITE, f"reported {setpoint} is {reported}")
    if has_single and (message.sensor is None or message.value is None):
        raise SchemaError(Reason.BAD_FORM, "the single form needs both sensor and value")
    if message.values is not None and not message.values:
        raise SchemaError(Reason.BAD_FORM, "values is empty")
    if message.values is not None:
        for sensor, value in message.values.items():
            if not math.isfinite(value):
                raise SchemaError(Reason.NON_FINITE, f"{sensor} is {value}")
    elif message.value is not None and not math.isfinite(message.value):
        raise SchemaError(Reason.NON_FINITE, f"{message.sensor} is {message.value}")
    if isinstance(message.ts, datetime):
        if message.ts.tzinfo is None:
            raise SchemaError(Reason.BAD_TIMESTAMP, "RFC 3339 timestamp needs an offset (Z)")
        if message.ts.utcoffset():
            message = msgspec.structs.replace(message, ts=message.ts.astimezone(UTC))
    elif not 0 <= message.ts < _MAX_EPOCH_MS:
        raise SchemaError(Reason.BAD_TIMESTAMP, f"epoch milliseconds {message.ts} out of range")
    return message
