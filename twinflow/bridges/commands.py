"""Command delivery, the Kafka side both bridges share: ``twin.commands`` to the machines.

Each bridge reads ``twin.commands`` in a consumer group of its own
(``twinflow-bridge-<mqtt|opcua>-commands``) and takes every ``command`` message in order:

- a machine this bridge does not serve: skipped without a result, another bridge may
  serve it (an OPC UA server without the entity's nodes, MQTT without a subscriber);
- an entity or setpoint the twin model does not know, or a value it does not allow:
  ``failed``, nothing sent;
- past its ``expires_ms``: ``expired``, nothing sent;
- else handed to the bridge's ``deliver``: ``delivered`` or ``failed`` with the reason.
  When the machine side cannot be reached (broker or server down, no acknowledgement)
  the command is read again from the same offset and retried until it is delivered or
  expires.

The result goes to ``twin.commands`` (key = entity id) and the command's offset is
committed only once Kafka acknowledged that result. A bridge killed in between delivers
the command again after its restart: at least once, and machines apply a command id
once. ``result`` messages, the bridges' own, are read past.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from connectors.kafka import client_config, reliable_producer
from schemas.control import (
    Command,
    CommandResult,
    ControlError,
    DeliveryStatus,
    decode_command,
    encode,
)
from twinflow.errors import TwinflowError
from twinflow.settings import Settings
from twinflow.twin_model import TwinModel

log = logging.getLogger(__name__)

BridgeName = Literal["mqtt", "opcua"]

_POLL_S = 0.5
_RETRY_S = 1.0
_RESULT_TIMEOUT_S = 30.0
# A killed bridge keeps its place in the group until this runs out, and its restart waits
# for that before it gets the partition back: 10 s, not librdkafka's 45 s.
_SESSION_TIMEOUT_MS = 10_000


class CommandLoopError(TwinflowError):
    """Command delivery stopped: Kafka did not take a result, or its consumer failed.

    The command being handled stays uncommitted and is delivered again on restart.
    """


@dataclass(frozen=True, slots=True)
class Done:
    """The command was handed over, or never will be: report ``status``."""

    status: DeliveryStatus
    detail: str = ""


@dataclass(frozen=True, slots=True)
class NotServed:
    """Not this bridge's machine: no result, committed (another bridge may serve it)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    """The machine side cannot be reached now: not committed, tried again."""

    reason: str


Outcome = Done | NotServed | Retry
Serves = Callable[[str], bool | None]
"""Whether the bridge serves an entity id; None while it cannot tell (never connected)."""
Deliver = Callable[[Command], Outcome]
"""Hands a checked, unexpired command to its machine; returns within seconds."""


@dataclass(frozen=True, slots=True)
class Ignore:
    """A message on ``twin.commands`` that is not a command to deliver."""

    reason: str
    unexpected: bool
    """True for a message that meets no contract (logged), False for a result."""


def group_id(by: BridgeName) -> str:
    """The consumer group of a bridge's command loop.

    >>> group_id("opcua")
    'twinflow-bridge-opcua-commands'
    """
    return f"twinflow-bridge-{by}-commands"


def read_command(payload: bytes | None) -> Command | Ignore:
    """The command in a ``twin.commands`` payload, or why there is none to deliver.

    >>> read_command(b'{"kind":"result","command_id":"c1","entity_id":"pump-001",'
    ...     b'"setpoint":"speed","status":"delivered","ts_ms":1,"by":"mqtt"}')
    Ignore(reason='a result of command c1', unexpected=False)
    """
    try:
        message = decode_command(payload or b"")
    except ControlError as exc:
        return Ignore(str(exc), unexpected=True)
    if isinstance(message, CommandResult):
        return Ignore(f"a result of command {message.command_id}", unexpected=False)
    return message


def problem_with(command: Command, model: TwinModel) -> str | None:
    """Why the twin model forbids ``command``, or None when it allows it.

    The flow checked the command before sending it; a bridge checks again because its
    model may differ, and a machine must never get a value out of its range.
    """
    if command.entity_id not in model.by_id:
        return f"entity {command.entity_id!r} is not in the twin model"
    setpoints = model.setpoints_of(command.entity_id)
    spec = setpoints.get(command.setpoint)
    if spec is None:
        known = ", ".join(sorted(setpoints)) or "none"
        return f"{command.entity_id} has no setpoint {command.setpoint!r} (it has: {known})"
    problem = spec.check(command.value)
    return None if problem is None else f"{command.setpoint}: {problem}"


def triage(command: Command, now_ms: int, model: TwinModel, serves: Serves) -> Outcome | None:
    """What becomes of ``command`` before any delivery; None means deliver it now."""
    serving = serves(command.entity_id)
    expired = now_ms > command.expires_ms
    if serving is None:
        # Before its first connection a bridge cannot tell its machines from another
        # bridge's, so it reports nothing it might not own.
        if expired:
            return NotServed("expired before the bridge could tell whether it serves it")
        return Retry("the bridge does not know its machines yet (never connected)")
    if not serving:
        return NotServed(f"{command.entity_id} is not a machine of this bridge")
    problem = problem_with(command, model)
    if problem is not None:
        return Done(DeliveryStatus.FAILED, problem)
    if expired:
        late_s = (now_ms - command.expires_ms) / 1000
        return Done(DeliveryStatus.EXPIRED, f"not sent: it expired {late_s:.1f} s ago")
    return None


def now_ms() -> int:
    """Wall-clock epoch milliseconds, the clock ``expires_ms`` is on."""
    return time.time_ns() // 1_000_000


class CommandLoop:
    """One bridge's command delivery, in a thread of its own; ``start`` then ``stop``."""

    def __init__(
        self,
        settings: Settings,
        model: TwinModel,
        by: BridgeName,
        serves: Serves,
        deliver: Deliver,
    ) -> None:
        self._settings = settings
        self._model = model
        self._by: BridgeName = by
        self._serves = serves
        self._deliver = deliver
        self._topic = settings.topics.commands
        self.stopping = threading.Event()
        """Set by :meth:`stop`; a ``deliver`` waiting for an acknowledgement gives up on it."""
        self.failure: CommandLoopError | None = None
        self._thread = threading.Thread(target=self._run, name=f"{by}-commands", daemon=True)
        self._waiting: tuple[str, float] | None = None

    def start(self) -> None:
        """Start consuming ``twin.commands`` (the topic must exist)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the command at hand; one not yet reported stays uncommitted."""
        self.stopping.set()
        self._thread.join()

    def _run(self) -> None:
        consumer = Consumer(
            client_config(
                self._settings.kafka,
                **{
                    "group.id": group_id(self._by),
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": _SESSION_TIMEOUT_MS,
                },
            )
        )
        producer = reliable_producer(self._settings.kafka)
        try:
            consumer.subscribe([self._topic])
            log.info("delivering commands from %s (group %s)", self._topic, group_id(self._by))
            while not self.stopping.is_set():
                message = consumer.poll(_POLL_S)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.fatal():
                        raise CommandLoopError(f"the {self._topic} consumer failed: {error}")
                    log.warning("%s: %s", self._topic, error)
                    continue
                self._handle(consumer, producer, message)
        except Exception as exc:
            # Any escape would end the thread unseen and commands would stop flowing:
            # the bridge stops instead, and says why.
            self.failure = (
                exc
                if isinstance(exc, CommandLoopError)
                else CommandLoopError(f"command delivery failed: {exc!r}")
            )
            log.error("%s; the bridge stops", self.failure)
        finally:
            consumer.close()

    def _handle(self, consumer: Consumer, producer: Producer, message: Message) -> None:
        command = read_command(message.value())
        if isinstance(command, Ignore):
            if command.unexpected:
                log.warning(
                    "%s offset %d is not a command (%s); skipped",
                    self._topic,
                    message.offset(),
                    command.reason,
                )
            self._commit(consumer, message)
            return
        outcome = triage(command, now_ms(), self._model, self._serves)
        attempted = outcome is None
        if outcome is None:
            outcome = self._deliver(command)
        if isinstance(outcome, Retry):
            self._retry(consumer, message, command, outcome)
            return
        if isinstance(outcome, Done):
            self._report(producer, command, outcome)
        else:
            # Found out by trying (MQTT: nobody subscribes), it may be a machine that is
            # offline: worth a line. Known beforehand, it is routine.
            log.log(
                logging.INFO if attempted else logging.DEBUG,
                "command %s for %s skipped: %s",
                command.command_id,
                command.entity_id,
                outcome.reason,
            )
        self._waiting = None
        self._commit(consumer, message)

    def _retry(self, consumer: Consumer, message: Message, command: Command, why: Retry) -> None:
        if self._waiting is None or self._waiting[0] != command.command_id:
            self._waiting = (command.command_id, time.monotonic())
            log.warning(
                "command %s for %s waits: %s; retrying until it is delivered or expires",
                command.command_id,
                command.entity_id,
                why.reason,
            )
        # Read it again from Kafka rather than hold it: the consumer keeps polling (so
        # the group keeps it), and no later command overtakes this one.
        partition, offset = message.partition(), message.offset()
        assert partition is not None and offset is not None  # a consumed message has both
        try:
            consumer.seek(TopicPartition(self._topic, partition, offset))
        except KafkaException as exc:
            log.warning("cannot seek back to command %s: %s", command.command_id, exc)
        self.stopping.wait(_RETRY_S)

    def _report(self, producer: Producer, command: Command, done: Done) -> None:
        result = CommandResult(
            command_id=command.command_id,
            entity_id=command.entity_id,
            setpoint=command.setpoint,
            status=done.status,
            ts_ms=now_ms(),
            by=self._by,
            detail=done.detail,
        )
        errors: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                errors.append(error)

        producer.produce(self._topic, encode(result), key=command.entity_id, on_delivery=delivered)
        unconfirmed = producer.flush(_RESULT_TIMEOUT_S)
        if errors or unconfirmed:
            reason = errors[0] if errors else f"no acknowledgement in {_RESULT_TIMEOUT_S:g} s"
            raise CommandLoopError(
                f"Kafka did not take the result of command {command.command_id} for "
                f"{self._topic}: {reason}; the command is delivered again on restart"
            )
        waited = ""
        if self._waiting is not None and self._waiting[0] == command.command_id:
            waited = f" after waiting {time.monotonic() - self._waiting[1]:.1f} s"
        log.info(
            "command %s %s=%s for %s: %s%s%s",
            command.command_id,
            command.setpoint,
            command.value,
            command.entity_id,
            done.status,
            waited,
            f" ({done.detail})" if done.detail else "",
        )

    def _commit(self, consumer: Consumer, message: Message) -> None:
        try:
            consumer.commit(message=message, asynchronous=False)
        except KafkaException as exc:
            # The next commit covers this offset; until then a restart would deliver the
            # command once more, which machines ignore by its id.
            log.warning("commit of %s offset %d failed: %s", self._topic, message.offset(), exc)
