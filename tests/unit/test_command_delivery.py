"""Command delivery without brokers: what a bridge does with each twin.commands message."""

import json
import math
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from asyncua import ua
from asyncua.ua.status_codes import StatusCodes
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from connectors.mqtt import message_expiry
from schemas.control import Command, CommandResult, DeliveryStatus, decode_command, encode
from schemas.raw import decode_raw
from twinflow.bridges.commands import (
    CommandLoop,
    Done,
    Ignore,
    NotServed,
    Outcome,
    Retry,
    Serves,
    group_id,
    read_command,
    triage,
)
from twinflow.bridges.opcua import (
    MonitoredSetpoint,
    encode_reported,
    setpoint_variant,
    write_outcome,
)
from twinflow.bridges.routing import puback_outcome
from twinflow.settings import load_settings
from twinflow.twin_model import TwinModel, load_twin_model

ROOT = Path(__file__).resolve().parents[2]
RAW_SCHEMA = json.loads((ROOT / "schemas" / "json" / "raw_reading.v1.schema.json").read_text())
NOW = 1_767_225_600_000
SPEED = MonitoredSetpoint("pump-001", "speed", "float", "ns=2;s=pump-001/setpoints/speed")
ENABLE = MonitoredSetpoint("motor-001", "enable", "bool", "ns=2;s=motor-001/setpoints/enable")


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return load_twin_model(ROOT / "infra" / "twin-model" / "example-plant.yaml")


def _command(**changes: object) -> Command:
    fields: dict[str, object] = {
        "command_id": "c-1",
        "entity_id": "pump-001",
        "setpoint": "speed",
        "value": 1500.0,
        "issued_ms": NOW - 1000,
        "expires_ms": NOW + 60_000,
        "user": "ops",
    }
    return Command(**{**fields, **changes})  # type: ignore[arg-type]


def _serves_all(_entity: str) -> bool:
    return True


# --- reading twin.commands -------------------------------------------------------------


def test_a_command_is_read_and_results_and_garbage_are_ignored() -> None:
    command = _command()
    assert read_command(encode(command)) == command
    result = CommandResult(
        command_id="c-1",
        entity_id="pump-001",
        setpoint="speed",
        status=DeliveryStatus.DELIVERED,
        ts_ms=NOW,
        by="mqtt",
    )
    assert read_command(encode(result)) == Ignore("a result of command c-1", unexpected=False)
    for garbage in (b"", None, b"{", b'{"kind":"command"}', b'{"kind":"launch"}'):
        ignored = read_command(garbage)
        assert isinstance(ignored, Ignore) and ignored.unexpected, garbage


def test_group_ids_are_one_per_bridge_kind() -> None:
    assert group_id("mqtt") == "twinflow-bridge-mqtt-commands"
    assert group_id("opcua") == "twinflow-bridge-opcua-commands"


# --- triage: before any delivery -------------------------------------------------------


def test_a_valid_command_is_to_be_delivered(model: TwinModel) -> None:
    assert triage(_command(), NOW, model, _serves_all) is None
    enable = _command(entity_id="motor-001", setpoint="enable", value=False)
    assert triage(enable, NOW, model, _serves_all) is None
    # Exactly at the expiry it may still go; a millisecond later it may not.
    assert triage(_command(expires_ms=NOW), NOW, model, _serves_all) is None


def test_an_expired_command_is_reported_expired_and_not_delivered(model: TwinModel) -> None:
    outcome = triage(_command(expires_ms=NOW - 2500), NOW, model, _serves_all)
    assert outcome == Done(DeliveryStatus.EXPIRED, "not sent: it expired 2.5 s ago")


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"entity_id": "pump-999"}, "entity 'pump-999' is not in the twin model"),
        ({"setpoint": "torque"}, "pump-001 has no setpoint 'torque' (it has: speed)"),
        ({"entity_id": "compressor-001"}, "compressor-001 has no setpoint 'speed' (it has: none)"),
        ({"value": 5000.0}, "speed: 5000 is outside [600, 1800] rpm"),
        ({"value": True}, "speed: expected a number in [600, 1800] rpm, got a bool"),
        ({"value": math.nan}, "speed: expected a number in [600, 1800] rpm, got nan"),
        (
            {"entity_id": "motor-001", "setpoint": "enable", "value": 1.0},
            "enable: expected true or false, got 1.0",
        ),
    ],
)
def test_a_command_the_model_forbids_fails_without_delivery(
    model: TwinModel, changes: dict[str, object], detail: str
) -> None:
    assert triage(_command(**changes), NOW, model, _serves_all) == Done(
        DeliveryStatus.FAILED, detail
    )


def test_a_forbidden_command_fails_even_when_expired(model: TwinModel) -> None:
    outcome = triage(_command(value=5000.0, expires_ms=NOW - 1), NOW, model, _serves_all)
    assert isinstance(outcome, Done) and outcome.status == DeliveryStatus.FAILED


def test_another_bridges_machine_is_skipped_without_a_result(model: TwinModel) -> None:
    def only_motors(entity_id: str) -> bool:
        return entity_id.startswith("motor-")

    assert triage(_command(), NOW, model, only_motors) == NotServed(
        "pump-001 is not a machine of this bridge"
    )
    # Not even an expired or a forbidden one is reported: it may be another bridge's.
    for command in (_command(expires_ms=NOW - 1), _command(value=5000.0)):
        assert isinstance(triage(command, NOW, model, only_motors), NotServed)


def test_before_its_first_connection_a_bridge_waits_and_reports_nothing(
    model: TwinModel,
) -> None:
    def unknown(_entity: str) -> None:
        return None

    assert isinstance(triage(_command(), NOW, model, unknown), Retry)
    assert isinstance(triage(_command(expires_ms=NOW - 1), NOW, model, unknown), NotServed)


# --- the loop: results, commits and retries --------------------------------------------


@dataclass
class _Message:
    payload: bytes | None
    at: int

    def value(self) -> bytes | None:
        return self.payload

    def topic(self) -> str:
        return "twin.commands"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.at


@dataclass
class _Consumer:
    commits: list[int] = field(default_factory=list)
    seeks: list[int] = field(default_factory=list)

    def commit(self, *, message: _Message, asynchronous: bool) -> None:
        assert not asynchronous
        self.commits.append(message.offset())

    def seek(self, partition: object) -> None:
        self.seeks.append(partition.offset)  # type: ignore[attr-defined]


@dataclass
class _Producer:
    produced: list[tuple[str, bytes, str]] = field(default_factory=list)
    pending: list[object] = field(default_factory=list)
    fails: bool = False

    def produce(self, topic: str, value: bytes, key: str, on_delivery: object) -> None:
        self.produced.append((topic, value, key))
        self.pending.append(on_delivery)

    def flush(self, _timeout: float) -> int:
        for callback in self.pending:
            callback("refused" if self.fails else None, None)  # type: ignore[operator]
        self.pending.clear()
        return 0


class _Bridge:
    """What a bridge hands the loop: the entities it serves and its delivery."""

    def __init__(self, outcomes: list[Outcome], serves: Serves = _serves_all) -> None:
        self.outcomes = outcomes
        self.delivered: list[Command] = []
        self.serves = serves

    def deliver(self, command: Command) -> Outcome:
        self.delivered.append(command)
        return self.outcomes.pop(0)


def _handle(loop: CommandLoop, consumer: _Consumer, producer: _Producer, message: _Message) -> None:
    """The loop's handling of one message, with the fakes standing in for Kafka."""
    fakes: tuple[Any, Any, Any] = (consumer, producer, message)
    loop._handle(*fakes)


def _loop(model: TwinModel, bridge: _Bridge) -> CommandLoop:
    loop = CommandLoop(load_settings(), model, "mqtt", bridge.serves, bridge.deliver)
    loop.stopping.set()  # retries do not sleep
    return loop


def _results(producer: _Producer) -> list[CommandResult]:
    results = []
    for topic, value, key in producer.produced:
        result = decode_command(value)
        assert topic == "twin.commands" and isinstance(result, CommandResult)
        assert key == result.entity_id
        results.append(result)
    return results


def test_a_delivered_command_is_reported_then_committed(model: TwinModel) -> None:
    consumer, producer = _Consumer(), _Producer()
    bridge = _Bridge([Done(DeliveryStatus.DELIVERED, "PUBACK on p/cmd")])
    command = _command(expires_ms=2**62)
    _handle(_loop(model, bridge), consumer, producer, _Message(encode(command), 7))
    assert bridge.delivered == [command]
    (result,) = _results(producer)
    assert (result.command_id, result.status, result.by, result.detail) == (
        "c-1",
        DeliveryStatus.DELIVERED,
        "mqtt",
        "PUBACK on p/cmd",
    )
    assert consumer.commits == [7]


def test_an_unreachable_machine_leaves_the_command_uncommitted_and_read_again(
    model: TwinModel,
) -> None:
    consumer, producer = _Consumer(), _Producer()
    bridge = _Bridge([Retry("broker down"), Retry("broker down"), Done(DeliveryStatus.DELIVERED)])
    loop = _loop(model, bridge)
    message = _Message(encode(_command(expires_ms=2**62)), 3)
    for _attempt in range(2):
        _handle(loop, consumer, producer, message)
        assert producer.produced == [] and consumer.commits == []
    assert consumer.seeks == [3, 3]
    _handle(loop, consumer, producer, message)
    assert [r.status for r in _results(producer)] == [DeliveryStatus.DELIVERED]
    assert consumer.commits == [3]


def test_expired_results_and_skips_are_committed_without_delivery(model: TwinModel) -> None:
    consumer, producer = _Consumer(), _Producer()
    bridge = _Bridge([], serves=lambda entity_id: entity_id != "pump-002")
    loop = _loop(model, bridge)
    result = CommandResult(
        command_id="c-0",
        entity_id="pump-001",
        setpoint="speed",
        status=DeliveryStatus.DELIVERED,
        ts_ms=NOW,
        by="opcua",
    )
    messages = [
        _Message(encode(_command(expires_ms=1)), 0),  # long expired
        _Message(encode(result), 1),
        _Message(b"not json", 2),
        _Message(encode(_command(entity_id="pump-002", expires_ms=2**62)), 3),
    ]
    for message in messages:
        _handle(loop, consumer, producer, message)
    assert bridge.delivered == []
    assert [r.status for r in _results(producer)] == [DeliveryStatus.EXPIRED]
    assert consumer.commits == [0, 1, 2, 3]


def test_a_result_kafka_refuses_stops_the_loop_before_the_commit(model: TwinModel) -> None:
    consumer, producer = _Consumer(), _Producer(fails=True)
    loop = _loop(model, _Bridge([Done(DeliveryStatus.DELIVERED)]))
    with pytest.raises(Exception, match="Kafka did not take the result of command c-1"):
        _handle(loop, consumer, producer, _Message(encode(_command(expires_ms=2**62)), 5))
    assert consumer.commits == []


def test_a_machine_the_bridge_finds_it_does_not_serve_is_skipped(model: TwinModel) -> None:
    consumer, producer = _Consumer(), _Producer()
    bridge = _Bridge([NotServed("no machine subscribes to p/cmd")])
    _handle(
        _loop(model, bridge), consumer, producer, _Message(encode(_command(expires_ms=2**62)), 9)
    )
    assert len(bridge.delivered) == 1
    assert producer.produced == [] and consumer.commits == [9]


# --- MQTT: the PUBACK ------------------------------------------------------------------


def test_the_puback_decides_an_mqtt_delivery() -> None:
    topic = "plant/site-a/line-1/pump-001/cmd"
    assert puback_outcome(ReasonCode(PacketTypes.PUBACK, "Success"), topic) == Done(
        DeliveryStatus.DELIVERED, f"PUBACK on {topic}"
    )
    assert puback_outcome(ReasonCode(PacketTypes.PUBACK, identifier=0x10), topic) == NotServed(
        f"no machine subscribes to {topic}"
    )
    refused = puback_outcome(ReasonCode(PacketTypes.PUBACK, "Not authorized"), topic)
    assert refused == Done(
        DeliveryStatus.FAILED, f"the MQTT broker refused {topic}: Not authorized"
    )


def test_a_command_message_expires_with_the_command() -> None:
    assert message_expiry(30).MessageExpiryInterval == 30  # type: ignore[attr-defined]
    # A command due to expire within the second still gets its second.
    assert message_expiry(0).MessageExpiryInterval == 1  # type: ignore[attr-defined]


# --- OPC UA: the write and the reported values -----------------------------------------


def _node_id(name: str) -> ua.NodeId:
    return ua.NodeId(ua.String(name), ua.Int16(2))


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def test_setpoint_values_are_written_as_double_or_boolean() -> None:
    assert setpoint_variant(1500.0) == ua.Variant(1500.0, ua.VariantType.Double)
    assert setpoint_variant(3) == ua.Variant(3.0, ua.VariantType.Double)
    assert setpoint_variant(True) == ua.Variant(True, ua.VariantType.Boolean)


def test_any_bad_status_of_the_write_fails_the_command_with_its_name() -> None:
    ids = [_node_id("pump-001/command_id"), _node_id("pump-001/setpoints/speed")]
    good, denied = _status(StatusCodes.Good), _status(StatusCodes.BadUserAccessDenied)
    assert write_outcome([good, good], ids) == Done(
        DeliveryStatus.DELIVERED, "wrote ns=2;s=pump-001/setpoints/speed"
    )
    assert write_outcome([denied, denied], ids) == Done(
        DeliveryStatus.FAILED,
        "the OPC UA server refused ns=2;s=pump-001/command_id: BadUserAccessDenied, "
        "ns=2;s=pump-001/setpoints/speed: BadUserAccessDenied",
    )


def _value(value: object, status: int = StatusCodes.Good) -> ua.DataValue:
    return ua.DataValue(
        Value=ua.Variant(value),
        StatusCode=_status(status),
        ServerTimestamp=ua.DateTime(2026, 1, 1, tzinfo=UTC),
    )


def test_a_setpoint_change_is_a_reported_raw_message() -> None:
    payload = encode_reported(SPEED, _value(1500.0))
    assert payload is not None
    document = json.loads(payload)
    assert document == {
        "entity_id": "pump-001",
        "ts": NOW,
        "reported": {"speed": 1500.0},
        "quality": "good",
        "source": "opcua:ns=2;s=pump-001/setpoints/speed",
    }
    jsonschema.validate(document, RAW_SCHEMA)
    message = decode_raw(payload)
    assert message.reported == {"speed": 1500.0} and message.readings() == []

    enable = encode_reported(ENABLE, _value(False, StatusCodes.UncertainLastUsableValue))
    assert enable is not None
    assert json.loads(enable)["reported"] == {"enable": False}
    assert json.loads(enable)["quality"] == "uncertain"
    jsonschema.validate(json.loads(enable), RAW_SCHEMA)


@pytest.mark.parametrize(
    ("setpoint", "value"),
    [
        (SPEED, True),  # a bool is no speed
        (SPEED, "fast"),
        (SPEED, math.inf),
        (SPEED, None),
        (ENABLE, 1.0),  # nor a number an enable
    ],
)
def test_a_value_of_the_wrong_kind_is_not_reported(
    setpoint: MonitoredSetpoint, value: object
) -> None:
    assert encode_reported(setpoint, _value(value)) is None


def test_a_value_without_a_timestamp_is_not_reported() -> None:
    assert encode_reported(SPEED, ua.DataValue(Value=ua.Variant(1500.0))) is None
