"""Pure decisions of the MQTT bridge: where a message goes, when to ack, what a PUBACK says."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from paho.mqtt.reasoncodes import ReasonCode

from schemas.control import DeliveryStatus
from schemas.raw import Reason, SchemaError, decode_raw
from twinflow.bridges.commands import Done, NotServed
from twinflow.twin_model import TwinModel

MAX_PAYLOAD_BYTES = 900 * 1024
"""Larger payloads cannot go to Kafka whole (its default message limit is 1 MiB)."""
NO_MATCHING_SUBSCRIBERS = 0x10
"""MQTT 5 PUBACK reason: accepted, but no session subscribes to the topic."""


@dataclass(frozen=True, slots=True)
class Forward:
    """A valid raw message, to ``twin.raw`` keyed by its entity."""

    entity_id: str


@dataclass(frozen=True, slots=True)
class Reject:
    """A message for the dead-letter topic."""

    reason: Reason
    detail: str
    entity_id: str | None = None


def route(topic: str, payload: bytes, model: TwinModel) -> Forward | Reject:
    """Decide what to do with one MQTT message.

    The topic names the entity (the twin model maps topics to entities); the payload
    must meet the raw contract and name the same entity. Deeper checks (sensors, units,
    ranges) belong to the flow, which sees every source.
    """
    entity = model.by_mqtt_topic.get(topic)
    if entity is None:
        return Reject(Reason.UNKNOWN_ENTITY, f"no entity publishes on {topic}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Reject(Reason.TOO_LARGE, f"{len(payload)} bytes", entity.id)
    try:
        message = decode_raw(payload)
    except SchemaError as exc:
        return Reject(exc.reason, exc.detail, entity.id)
    if message.entity_id != entity.id:
        return Reject(
            Reason.ENTITY_MISMATCH,
            f"payload says {message.entity_id!r}, topic belongs to {entity.id!r}",
            entity.id,
        )
    return Forward(entity.id)


class InOrderAcks:
    """Releases MQTT acknowledgements in the order the messages arrived.

    MQTT requires QoS 1 PUBACKs in receive order, while Kafka confirms deliveries per
    partition, so confirmations come back out of order. Not thread-safe: the caller
    holds a lock.

    >>> acks = InOrderAcks()
    >>> for mid in (1, 2, 3):
    ...     acks.received(mid)
    >>> acks.confirmed(2), acks.confirmed(1), acks.confirmed(3)
    ([], [1, 2], [3])
    """

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._confirmed: set[int] = set()

    def received(self, mid: int) -> None:
        """A message arrived and awaits its Kafka confirmation."""
        self._order.append(mid)

    def confirmed(self, mid: int) -> list[int]:
        """Kafka confirmed ``mid``; return the ids that may be acknowledged now, in order."""
        self._confirmed.add(mid)
        ready = []
        while self._order and self._order[0] in self._confirmed:
            head = self._order.popleft()
            self._confirmed.discard(head)
            ready.append(head)
        return ready

    def __len__(self) -> int:
        return len(self._order)


def puback_outcome(reason: ReasonCode, topic: str) -> Done | NotServed:
    """What the PUBACK of a command published on ``topic`` says about its delivery.

    A success hands the command to every session subscribed to its machine's topic,
    online or queued. "No matching subscribers" means no machine listens there at all:
    not an MQTT machine (another bridge may serve it), so no result.

    >>> from paho.mqtt.packettypes import PacketTypes
    >>> puback_outcome(ReasonCode(PacketTypes.PUBACK, "Not authorized"), "p/s/l/e/cmd")
    Done(status=<DeliveryStatus.FAILED: 'failed'>, detail='the MQTT broker refused ...')
    """
    if reason.value == NO_MATCHING_SUBSCRIBERS:
        return NotServed(f"no machine subscribes to {topic}")
    if reason.is_failure:
        return Done(DeliveryStatus.FAILED, f"the MQTT broker refused {topic}: {reason}")
    return Done(DeliveryStatus.DELIVERED, f"PUBACK on {topic}")
