"""Commands from twin.commands to the machines, through real Kafka, Mosquitto and OPC UA.

The MQTT machine is a paho subscriber on its cmd topic. The OPC UA machines are the
simulator's own server, and an asyncua server of this file's with the same command
address space (``Objects/Plant/<entity>/setpoints/<name>`` and ``.../command_id``, string
node ids ``<entity>/setpoints/<name>`` and ``<entity>/command_id``) built so that it
refuses a write, as a misconfigured server would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from asyncua import ua
from asyncua.server.server import Server
from confluent_kafka import Consumer, Producer
from pydantic import SecretStr

from connectors.kafka import client_config, ensure_topics
from connectors.mqtt import new_client
from schemas.control import Command, CommandResult, DeliveryStatus, decode_command, encode
from schemas.raw import decode_raw
from tests.helpers import clean_env, free_ports, isolated_settings, wait_for_line
from twinflow.bridges import opcua
from twinflow.bridges.mqtt import MqttBridge
from twinflow.services import manager
from twinflow.settings import MqttSettings, Settings
from twinflow.sim.opcua_server import PlantOpcUaServer
from twinflow.sim.samples import Sample
from twinflow.topics import control_topics, ingest_topics
from twinflow.twin_model import TwinModel

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_MODEL = ROOT / "infra" / "twin-model" / "example-plant.yaml"


@pytest.fixture
def model(unique: str) -> TwinModel:
    """The example plant with a topic prefix of this test's own."""
    document = yaml.safe_load(EXAMPLE_MODEL.read_text())
    document["mqtt_topic_prefix"] = f"c{unique}"
    return TwinModel.model_validate(document)


@pytest.fixture
def bridged(stack: Settings, unique: str) -> Settings:
    """The session's services with this test's own topics (created) and bridge session."""
    (metrics_port,) = free_ports(1)
    bridged = stack.model_copy(
        update={
            "topics": stack.topics.model_copy(
                update={
                    "raw": f"test.cmdraw.{unique}",
                    "deadletter": f"test.cmddead.{unique}",
                    "commands": f"test.commands.{unique}",
                }
            ),
            "mqtt": stack.mqtt.model_copy(
                update={"bridge_client_id": f"bridge-{unique}", "session_expiry_s": 60}
            ),
            "metrics": stack.metrics.model_copy(update={"opcua_bridge_port": metrics_port}),
        }
    )
    topics = bridged.topics
    ensure_topics(stack.kafka, [*ingest_topics(topics), *control_topics(topics)])
    return bridged


@pytest.fixture
def broker(stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A Mosquitto of the test's own: no stranger's subscription answers for a machine,
    and the test may stop it."""
    own = isolated_settings(stack, tmp_path / "broker")
    manager.up(own, ["mosquitto"], print)
    try:
        yield own
    finally:
        manager.down(own, ["mosquitto"], print)


@pytest.fixture
def mqtt_settings(bridged: Settings, broker: Settings) -> Settings:
    """:func:`bridged` with the test's own broker."""
    return bridged.model_copy(
        update={"mqtt": bridged.mqtt.model_copy(update={"port": broker.mqtt.port})}
    )


def _command(entity_id: str, setpoint: str, value: float | bool, expires_in_ms: int) -> Command:
    issued = time.time_ns() // 1_000_000
    return Command(
        command_id=f"cmd-{uuid.uuid4().hex[:12]}",
        entity_id=entity_id,
        setpoint=setpoint,
        value=value,
        issued_ms=issued,
        expires_ms=issued + expires_in_ms,
        user="test",
    )


def _produce(settings: Settings, *commands: Command) -> None:
    producer = Producer(client_config(settings.kafka, acks="all"))
    for command in commands:
        producer.produce(settings.topics.commands, encode(command), key=command.entity_id)
    assert producer.flush(30) == 0


class _Topic:
    """Everything a Kafka topic holds, read from its start as it grows."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._consumer = Consumer(
            client_config(
                settings.kafka,
                **{"group.id": f"test-{uuid.uuid4()}", "auto.offset.reset": "earliest"},
            )
        )
        self._consumer.subscribe([topic])
        self.values: list[bytes] = []

    def read(self, quiet_s: float = 0.2) -> list[bytes]:
        for message in self._consumer.consume(num_messages=1000, timeout=quiet_s):
            assert message.error() is None, message.error()
            self.values.append(message.value() or b"")
        return self.values

    def wait_for(self, done: Callable[[list[bytes]], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self.read()):
            assert time.monotonic() < deadline, f"timed out with {len(self.values)} messages"

    def close(self) -> None:
        self._consumer.close()


@contextmanager
def _topic(settings: Settings, topic: str) -> Iterator[_Topic]:
    reader = _Topic(settings, topic)
    try:
        yield reader
    finally:
        reader.close()


def _results(values: list[bytes]) -> dict[str, CommandResult]:
    """The results on twin.commands by command id (failing on a second result)."""
    results: dict[str, CommandResult] = {}
    for value in values:
        message = decode_command(value)
        if isinstance(message, CommandResult):
            assert message.command_id not in results, f"two results for {message.command_id}"
            results[message.command_id] = message
    return results


class _Machine:
    """An MQTT machine listening on its cmd topic at QoS 1."""

    def __init__(self, mqtt_settings: MqttSettings, topic: str) -> None:
        self.topic = topic
        self.messages: list[mqtt.MQTTMessage] = []
        self._client = new_client(mqtt_settings, f"machine-{uuid.uuid4().hex[:8]}")
        subscribed = threading.Event()
        self._client.on_message = lambda _c, _u, message: self.messages.append(message)
        self._client.on_connect = lambda client, *_args: client.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *_args: subscribed.set()
        self._client.connect(mqtt_settings.host, mqtt_settings.port, keepalive=10)
        self._client.loop_start()
        assert subscribed.wait(10), f"no SUBACK for {topic}"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@contextmanager
def _machine(mqtt_settings: MqttSettings, topic: str) -> Iterator[_Machine]:
    machine = _Machine(mqtt_settings, topic)
    try:
        yield machine
    finally:
        machine.close()


class _Thread:
    """A bridge's ``run(stop)`` in a thread; it must stop cleanly."""

    def __init__(self, target: Callable[[threading.Event], None]) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._target = target
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._target(self.stop)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> _Thread:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the bridge did not stop"
        assert self.errors == []


# --- MQTT ------------------------------------------------------------------------------


def test_a_command_reaches_its_mqtt_machine_and_is_reported_delivered(
    mqtt_settings: Settings, model: TwinModel
) -> None:
    settings = mqtt_settings
    pump = model.by_id["pump-001"]
    command = _command("pump-001", "speed", 1500.0, expires_in_ms=120_000)
    bridge = MqttBridge(settings, model)
    with (
        _machine(settings.mqtt, model.mqtt_command_topic(pump)) as machine,
        _topic(settings, settings.topics.commands) as topic,
        _Thread(bridge.run),
    ):
        assert bridge.subscribed.wait(30)
        _produce(settings, command)
        topic.wait_for(lambda values: command.command_id in _results(values))
        # The PUBACK came after the broker took it for the machine's session.
        deadline = time.monotonic() + 10
        while not machine.messages:
            assert time.monotonic() < deadline, "the machine got nothing"
            time.sleep(0.05)
        result = _results(topic.values)[command.command_id]

    (message,) = machine.messages
    assert message.topic == model.mqtt_command_topic(pump)
    assert message.payload == encode(command)
    assert decode_command(bytes(message.payload)) == command
    assert message.qos == 1 and not message.retain
    # The broker drops it when the command expires, should the machine be offline.
    assert message.properties is not None
    assert 0 < message.properties.MessageExpiryInterval <= 120  # type: ignore[attr-defined]
    assert (result.status, result.by, result.entity_id, result.setpoint) == (
        DeliveryStatus.DELIVERED,
        "mqtt",
        "pump-001",
        "speed",
    )
    assert result.detail == f"PUBACK on {model.mqtt_command_topic(pump)}"
    assert result.ts_ms >= command.issued_ms


def test_expired_forbidden_and_unheard_commands_are_never_delivered(
    mqtt_settings: Settings, model: TwinModel
) -> None:
    settings = mqtt_settings
    pump = model.by_id["pump-001"]
    expired = _command("pump-001", "speed", 1200.0, expires_in_ms=-1)
    unknown = _command("pump-404", "speed", 1200.0, expires_in_ms=120_000)
    out_of_range = _command("pump-001", "speed", 9000.0, expires_in_ms=120_000)
    unheard = _command("pump-002", "speed", 1200.0, expires_in_ms=120_000)  # no subscriber
    last = _command("pump-001", "speed", 1300.0, expires_in_ms=120_000)
    bridge = MqttBridge(settings, model)
    with (
        _machine(settings.mqtt, model.mqtt_command_topic(pump)) as machine,
        _topic(settings, settings.topics.commands) as topic,
        _Thread(bridge.run),
    ):
        assert bridge.subscribed.wait(30)
        _produce(settings, expired, unknown, out_of_range, unheard, last)
        # One partition, taken in order: once the last is reported, all were handled.
        topic.wait_for(lambda values: last.command_id in _results(values))
        time.sleep(1.0)
        results = _results(topic.read())

    assert [decode_command(bytes(message.payload)) for message in machine.messages] == [last]
    assert results[expired.command_id].status == DeliveryStatus.EXPIRED
    assert results[unknown.command_id].status == DeliveryStatus.FAILED
    assert "not in the twin model" in results[unknown.command_id].detail
    assert results[out_of_range.command_id].status == DeliveryStatus.FAILED
    assert results[out_of_range.command_id].detail == "speed: 9000 is outside [600, 1800] rpm"
    # Nobody listens on pump-002's topic: not an MQTT machine, so not this bridge's to report.
    assert unheard.command_id not in results
    assert results[last.command_id].status == DeliveryStatus.DELIVERED
    assert len(results) == 4


def _kafka_env(settings: Settings) -> dict[str, str]:
    env = {}
    for name, value in settings.kafka.model_dump().items():
        if value is not None:
            text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
            env[f"TWINFLOW_KAFKA__{name.upper()}"] = text
    return env


def test_a_bridge_killed_before_delivering_delivers_after_its_restart(
    stack: Settings, bridged: Settings, broker: Settings, model: TwinModel, tmp_path: Path
) -> None:
    settings = bridged
    # Stopped, the test's own broker holds the bridge in the window between consuming a
    # command and delivering it, for as long as the test needs.
    model_file = tmp_path / "plant.yaml"
    model_file.write_text(yaml.safe_dump(model.model_dump(mode="json")))
    topics = settings.topics
    env = clean_env(
        twin_model=str(model_file),
        state_dir=str(stack.state_dir),
        topics__raw=topics.raw,
        topics__deadletter=topics.deadletter,
        topics__commands=topics.commands,
        mqtt__port=str(broker.mqtt.port),
        mqtt__bridge_client_id=settings.mqtt.bridge_client_id,
        mqtt__session_expiry_s="60",
    )
    env.update(_kafka_env(stack))
    pump = model.by_id["pump-001"]
    command = _command("pump-001", "speed", 1500.0, expires_in_ms=300_000)
    bridges: list[subprocess.Popen[bytes]] = []

    def start_bridge(name: str) -> Path:
        log_file = tmp_path / f"{name}.log"
        with log_file.open("w") as sink:
            bridges.append(
                subprocess.Popen(
                    [sys.executable, "-m", "twinflow", "bridge", "mqtt"],
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
        return log_file

    try:
        first = start_bridge("bridge-1")
        wait_for_line(first, "subscribed to")
        wait_for_line(first, "delivering commands from")
        manager.down(broker, ["mosquitto"], print)
        wait_for_line(first, "MQTT connection lost")
        _produce(settings, command)
        # Consumed, not deliverable: the bridge says so, and is killed right there.
        wait_for_line(first, f"command {command.command_id} for pump-001 waits")
        os.kill(bridges[0].pid, signal.SIGKILL)
        assert bridges[0].wait(30) == -signal.SIGKILL
        with _topic(settings, topics.commands) as topic:
            time.sleep(1.0)
            assert _results(topic.read()) == {}, "the killed bridge reported the command"

            manager.up(broker, ["mosquitto"], print)
            with _machine(broker.mqtt, model.mqtt_command_topic(pump)) as machine:
                second = start_bridge("bridge-2")
                topic.wait_for(lambda values: command.command_id in _results(values))
                deadline = time.monotonic() + 10
                while not machine.messages:
                    assert time.monotonic() < deadline, "the machine got nothing"
                    time.sleep(0.05)
            os.kill(bridges[1].pid, signal.SIGTERM)
            assert bridges[1].wait(30) == 0, second.read_text()[-3000:]
            time.sleep(1.0)
            results = _results(topic.read())
    finally:
        for bridge in bridges:
            if bridge.poll() is None:
                bridge.kill()
                bridge.wait(30)

    assert [decode_command(bytes(message.payload)) for message in machine.messages] == [command]
    assert list(results) == [command.command_id]
    assert results[command.command_id].status == DeliveryStatus.DELIVERED
    assert ": delivered" not in first.read_text()
    assert f"command {command.command_id} speed=1500.0 for pump-001: delivered" in (
        second.read_text()
    )


# --- OPC UA ----------------------------------------------------------------------------

# entity -> setpoint -> (variant type of its variable, initial value). motor-002's enable
# is a Double by mistake: the server refuses a Boolean written to it (BadTypeMismatch).
SERVED: dict[str, dict[str, tuple[ua.VariantType, Any]]] = {
    "pump-001": {"speed": (ua.VariantType.Double, 1480.0)},
    "motor-001": {"enable": (ua.VariantType.Boolean, True)},
    "motor-002": {"enable": (ua.VariantType.Double, 1.0)},
}
SENSOR = "vibration_rms"  # pumps and motors both have it


class _SetpointServer:
    """An asyncua server in a thread of its own, with each entity's setpoints, command id
    and one sensor, all writable."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings.opcua
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = Server()
        self.index = -1

    def __enter__(self) -> _SetpointServer:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *_exc: object) -> None:
        self._call(self._server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def node_id(self, name: str) -> ua.NodeId:
        return ua.NodeId(ua.String(name), ua.Int16(self.index))

    def read(self, name: str) -> Any:
        return self._call(self._server.get_node(self.node_id(name)).read_value())

    async def _start(self) -> None:
        server = self._server
        await server.init()
        server.set_endpoint(self._settings.endpoint)
        server.socket_address = ("127.0.0.1", self._settings.port)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.index = index = await server.register_namespace(self._settings.namespace)
        plant = await server.nodes.objects.add_folder(
            self.node_id("Plant"), ua.QualifiedName("Plant", index)
        )
        now = ua.DateTime.now(UTC)
        for entity_id, setpoints in SERVED.items():
            entity = await plant.add_object(
                self.node_id(entity_id), ua.QualifiedName(entity_id, index)
            )
            sensor = await entity.add_variable(
                self.node_id(f"{entity_id}/{SENSOR}"), ua.QualifiedName(SENSOR, index), 1.5
            )
            folder = await entity.add_folder(
                self.node_id(f"{entity_id}/setpoints"), ua.QualifiedName("setpoints", index)
            )
            command_id = await entity.add_variable(
                self.node_id(f"{entity_id}/command_id"),
                ua.QualifiedName("command_id", index),
                "",
                ua.VariantType.String,
            )
            await command_id.set_writable()
            for name, (variant_type, initial) in setpoints.items():
                variable = await folder.add_variable(
                    self.node_id(f"{entity_id}/setpoints/{name}"),
                    ua.QualifiedName(name, index),
                    initial,
                    variant_type,
                )
                await variable.set_writable()
                await variable.write_value(
                    ua.DataValue(ua.Variant(initial, variant_type), SourceTimestamp=now)
                )
            await sensor.write_value(
                ua.DataValue(ua.Variant(1.5, ua.VariantType.Double), SourceTimestamp=now)
            )
        await server.start()


@pytest.fixture
def opcua_settings(bridged: Settings) -> Settings:
    (port,) = free_ports(1)
    return bridged.model_copy(
        update={
            "opcua": bridged.opcua.model_copy(
                update={
                    "endpoint": f"opc.tcp://127.0.0.1:{port}/twinflow/",
                    "security": "none",
                    "username": None,
                    "password": None,
                }
            )
        }
    )


def _raw(values: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(value) for value in values]


def _reported(values: list[bytes], entity_id: str) -> list[dict[str, Any]]:
    return [
        message["reported"]
        for message in _raw(values)
        if message["entity_id"] == entity_id and "reported" in message
    ]


def test_opcua_commands_are_written_and_the_new_values_reported(
    opcua_settings: Settings, model: TwinModel
) -> None:
    settings = opcua_settings
    absent = _command("pump-002", "speed", 1000.0, expires_in_ms=300_000)  # not on the server
    speed = _command("pump-001", "speed", 1500.0, expires_in_ms=300_000)
    mistyped = _command("motor-002", "enable", False, expires_in_ms=300_000)
    enable = _command("motor-001", "enable", False, expires_in_ms=300_000)
    with (
        _topic(settings, settings.topics.commands) as commands,
        _topic(settings, settings.topics.raw) as raw,
        _Thread(lambda stop: opcua.run(settings, model, stop)),
    ):
        # Produced while no server answers: they wait for the bridge's first connection.
        _produce(settings, absent, speed, mistyped, enable)
        time.sleep(2.0)
        assert _results(commands.read()) == {}
        with _SetpointServer(settings) as server:
            commands.wait_for(lambda values: enable.command_id in _results(values))
            raw.wait_for(
                lambda values: (
                    {"speed": 1500.0} in _reported(values, "pump-001")
                    and {"enable": False} in _reported(values, "motor-001")
                )
            )
            values = {
                name: server.read(name)
                for name in (
                    "pump-001/setpoints/speed",
                    "pump-001/command_id",
                    "motor-001/setpoints/enable",
                    "motor-001/command_id",
                    "motor-002/setpoints/enable",
                )
            }
            time.sleep(1.0)
            results = _results(commands.read())
            messages = _raw(raw.read())

    assert values == {
        "pump-001/setpoints/speed": 1500.0,
        "pump-001/command_id": speed.command_id,
        "motor-001/setpoints/enable": False,
        "motor-001/command_id": enable.command_id,
        "motor-002/setpoints/enable": 1.0,  # refused, unchanged
    }
    # pump-002 has no nodes on this server: another bridge's machine, no result.
    assert list(results) == [speed.command_id, mistyped.command_id, enable.command_id]
    assert all(result.by == "opcua" for result in results.values())
    assert results[speed.command_id].status == DeliveryStatus.DELIVERED
    assert results[speed.command_id].detail == f"wrote ns={server.index};s=pump-001/setpoints/speed"
    assert results[enable.command_id].status == DeliveryStatus.DELIVERED
    refused = results[mistyped.command_id]
    assert refused.status == DeliveryStatus.FAILED
    assert refused.detail.endswith("motor-002/setpoints/enable: BadTypeMismatch")

    # The initial values, then the written ones, each reported once, as raw messages.
    assert _reported(raw.values, "pump-001") == [{"speed": 1480.0}, {"speed": 1500.0}]
    assert _reported(raw.values, "motor-001") == [{"enable": True}, {"enable": False}]
    assert _reported(raw.values, "motor-002") == []  # a Double is no enable
    for message in messages:
        decoded = decode_raw(json.dumps(message).encode())
        if decoded.reported is not None:
            (name,) = decoded.reported
            assert (
                decoded.source == f"opcua:ns={server.index};s={decoded.entity_id}/setpoints/{name}"
            )
            assert decoded.quality == "good" and decoded.readings() == []
        else:  # the sensor path is unchanged
            assert decoded.sensor == SENSOR and decoded.value == 1.5
    assert {m["entity_id"] for m in messages if "sensor" in m} == set(SERVED)


@contextmanager
def _simulator(settings: Settings, model: TwinModel, entity_ids: list[str]) -> Iterator[Any]:
    """The simulator's OPC UA server, in a thread of its own, each entity's first sample
    published (which shows its setpoints)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = PlantOpcUaServer(settings.opcua, model, entity_ids)

    def call(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    call(server.__aenter__())
    try:
        now_ms = time.time_ns() // 1_000_000
        for entity_id in entity_ids:
            setpoints = server.actuators.setpoints(entity_id)
            call(server.publish(Sample(entity_id, now_ms, {SENSOR: 1.5}, setpoints=setpoints)))
        yield server
    finally:
        call(server.__aexit__(None, None, None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_the_simulator_applies_the_opcua_bridges_commands(
    opcua_settings: Settings, model: TwinModel
) -> None:
    settings = opcua_settings
    speed = _command("pump-001", "speed", 1500.0, expires_in_ms=300_000)
    enable = _command("motor-001", "enable", False, expires_in_ms=300_000)
    with (
        _simulator(settings, model, ["pump-001", "motor-001"]) as simulator,
        _topic(settings, settings.topics.commands) as commands,
        _topic(settings, settings.topics.raw) as raw,
        _Thread(lambda stop: opcua.run(settings, model, stop)),
    ):
        raw.wait_for(lambda values: {"speed": 1480.0} in _reported(values, "pump-001"))
        _produce(settings, speed, enable)
        commands.wait_for(lambda values: enable.command_id in _results(values))
        raw.wait_for(
            lambda values: (
                {"speed": 1500.0} in _reported(values, "pump-001")
                and {"enable": False} in _reported(values, "motor-001")
            )
        )
        applied = {
            "pump-001": dict(simulator.actuators.setpoints("pump-001")),
            "motor-001": dict(simulator.actuators.setpoints("motor-001")),
        }
        results = _results(commands.read())

    assert [result.status for result in results.values()] == [DeliveryStatus.DELIVERED] * 2
    assert applied == {"pump-001": {"speed": 1500.0}, "motor-001": {"enable": False}}
    assert _reported(raw.values, "pump-001") == [{"speed": 1480.0}, {"speed": 1500.0}]
    assert _reported(raw.values, "motor-001") == [{"enable": True}, {"enable": False}]
