"""The back channel's contracts: operator feedback on alarms, and commands to machines.

- ``twin.feedback`` (key = entity id, feedback.v1.schema.json): an operator's verdict
  on an alarm.
- ``twin.commands`` (key = entity id, command.v1.schema.json): a setpoint command, and
  the bridges' delivery results for it (``kind`` tells them apart). The bridges deliver
  ``command`` messages to the machines; the flow folds both kinds into the twin state.

Both topics have one partition, so every reader sees one order, and are stamped by the
broker (``LogAppendTime``): the flow merges them with ``twin.raw`` by that time, which is
what makes a replay after a crash decide the same way as the first run.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

VERSION = 1


class Verdict(StrEnum):
    """What an operator says of an alarm."""

    ACK = "ack"
    """Seen; someone is on it. Changes nothing in the model."""
    CONFIRM = "confirm"
    """A true fault: its windows are kept out of learning for good."""
    REJECT = "reject"
    """A false alarm: it ends, and the model learns its windows as normal."""


class Feedback(msgspec.Struct, frozen=True, kw_only=True):
    """One verdict on one alarm (topic ``twin.feedback``)."""

    feedback_id: str
    """Unique per verdict (a UUID): a verdict read twice is applied once."""
    alarm_id: str
    entity_id: str
    verdict: Verdict
    user: str
    ts_ms: int
    """When the operator gave it (epoch ms)."""
    note: str = ""
    version: int = VERSION


class Command(msgspec.Struct, frozen=True, kw_only=True, tag="command", tag_field="kind"):
    """Set one setpoint of one machine (topic ``twin.commands``, MQTT ``.../<entity>/cmd``)."""

    command_id: str
    """Unique per command (a UUID): a machine applies a command id once."""
    entity_id: str
    setpoint: str
    value: float | bool
    """In the setpoint's unit, checked against the twin model before it was sent."""
    issued_ms: int
    expires_ms: int
    """Not to be delivered or applied after this time (epoch ms)."""
    user: str
    version: int = VERSION


class DeliveryStatus(StrEnum):
    """What a bridge did with a command."""

    DELIVERED = "delivered"
    """Handed to the machine (MQTT PUBACK, or an OPC UA write answered Good)."""
    FAILED = "failed"
    """The machine or its server refused it; ``detail`` says why."""
    EXPIRED = "expired"
    """It reached the bridge after its expiry and was not delivered."""


class CommandResult(msgspec.Struct, frozen=True, kw_only=True, tag="result", tag_field="kind"):
    """What a bridge did with one command (topic ``twin.commands``)."""

    command_id: str
    entity_id: str
    setpoint: str
    status: DeliveryStatus
    ts_ms: int
    by: str
    """The bridge: ``mqtt`` or ``opcua``."""
    detail: str = ""
    version: int = VERSION


CommandMessage = Command | CommandResult

_feedback = msgspec.json.Decoder(Feedback)
_command = msgspec.json.Decoder(CommandMessage)
_encoder = msgspec.json.Encoder()


class ControlError(ValueError):
    """A back-channel message that does not meet its contract."""


def decode_feedback(payload: bytes) -> Feedback:
    """Decode a ``twin.feedback`` message or raise :class:`ControlError`."""
    try:
        return _feedback.decode(payload)
    except msgspec.DecodeError as exc:
        raise ControlError(f"feedback: {exc}") from None


def decode_command(payload: bytes) -> CommandMessage:
    """Decode a ``twin.commands`` message (a command or a result) or raise ControlError.

    >>> decode_command(b'{"kind":"command","command_id":"c1","entity_id":"pump-001",'
    ...     b'"setpoint":"speed","value":1200,"issued_ms":1,"expires_ms":2,"user":"ops"}')
    Command(command_id='c1', entity_id='pump-001', setpoint='speed', value=1200.0, ...)
    """
    try:
        return _command.decode(payload)
    except msgspec.DecodeError as exc:
        raise ControlError(f"command: {exc}") from None


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of a back-channel message."""
    return _encoder.encode(message)
