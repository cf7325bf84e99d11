"""Mosquitto with users and an ACL: the refusals a plant's broker must make.

Every test runs its own broker (own state folder, free port), never the session's, with
the documented ACL (infra/mosquitto/acl.example) for its own topic prefix: machines
publish only their own telemetry and read only their own commands, the bridge reads
telemetry and publishes commands.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from confluent_kafka import Producer
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from connectors.kafka import client_config
from connectors.mqtt import login_refused, new_client
from schemas.control import Command, CommandResult, decode_command, encode
from tests.helpers import (
    clean_env,
    consume_all,
    isolated_settings,
    refusal_row,
    twinflow_cli,
    wait_for_line,
)
from twinflow.bridges.mqtt import MqttBridge
from twinflow.services import manager
from twinflow.services.provision import find_executable
from twinflow.settings import KafkaSettings, MqttSettings, Settings
from twinflow.twin_model import TwinModel

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

log = logging.getLogger("tests.chaos.security")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_MODEL = ROOT / "infra" / "twin-model" / "example-plant.yaml"
EXAMPLE_ACL = ROOT / "infra" / "mosquitto" / "acl.example"
BRIDGE_USER, OBSERVER_USER = "twinflow-bridge", "observer"
# Machines log in as their entity ids; both are pumps of site-a/line-1 in the example model.
MACHINES = ("pump-001", "pump-002")


@dataclass(frozen=True)
class SecuredBroker:
    """A Mosquitto that knows the bridge, an observer of everything, and two machines."""

    settings: Settings  # logs in as the bridge user
    observer: MqttSettings
    machines: dict[str, MqttSettings]
    prefix: str
    bridge_password: str

    def topic(self, entity_id: str, kind: str) -> str:
        """The telemetry or cmd topic of a machine of site-a/line-1."""
        return f"{self.prefix}/site-a/line-1/{entity_id}/{kind}"


@pytest.fixture
def broker(stack: Settings, tmp_path: Path, unique: str) -> Iterator[SecuredBroker]:
    tool = find_executable("mosquitto_passwd")
    assert tool is not None, "mosquitto_passwd comes with Debian's mosquitto package"
    passwords = {
        user: f"{user[:2]}-{uuid.uuid4().hex}" for user in (BRIDGE_USER, OBSERVER_USER, *MACHINES)
    }
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    for index, (user, password) in enumerate(passwords.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run(
            [tool, "-b", *create, str(passwd), user, password], check=True, capture_output=True
        )
    prefix = f"plant{unique}"
    documented = EXAMPLE_ACL.read_text().replace(" plant/", f" {prefix}/")
    assert f"user {BRIDGE_USER}\n" in documented
    acl.write_text(f"{documented}\nuser {OBSERVER_USER}\ntopic read #\n")
    base = isolated_settings(stack, tmp_path / "state")
    # Validated, not model_copy'd: the new settings checks run on the way.
    secured = MqttSettings.model_validate(
        {
            **base.mqtt.model_dump(),
            "username": BRIDGE_USER,
            "password": passwords[BRIDGE_USER],
            "password_file": passwd,
            "acl_file": acl,
        }
    )
    settings = base.model_copy(update={"mqtt": secured})

    def login(user: str) -> MqttSettings:
        return secured.model_copy(
            update={
                "username": user,
                "password": SecretStr(passwords[user]),
                "password_file": None,
                "acl_file": None,
            }
        )

    machines = {machine: login(machine) for machine in MACHINES}
    # Healthy means the health check's CONNECT, with the bridge user, was accepted.
    manager.up(settings, ["mosquitto"], log.info)
    try:
        yield SecuredBroker(
            settings, login(OBSERVER_USER), machines, prefix, passwords[BRIDGE_USER]
        )
    finally:
        manager.down(settings, ["mosquitto"], log.info)


class _Client:
    """A connected (or refused) paho client with what the broker answered."""

    def __init__(self, settings: MqttSettings, name: str) -> None:
        self.client = new_client(settings, f"{name}-{uuid.uuid4().hex[:8]}")
        self.connack: ReasonCode | None = None
        self.answered = threading.Event()
        self.messages: list[mqtt.MQTTMessage] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.append(msg)
        self.client.on_publish = self._on_publish
        self.client.connect(settings.host, settings.port, keepalive=10)
        self.client.loop_start()
        assert self.answered.wait(10), "the broker never answered the CONNECT"

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if self.connack is None:
            self.connack = reason
        if reason.is_failure:
            client.disconnect()  # refused: no reconnect attempts behind the test's back
        self.answered.set()

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self.pubacks[mid] = reason

    def subscribe(self, topic: str) -> ReasonCode:
        """Subscribe at QoS 1; the broker's SUBACK reason."""
        granted: list[ReasonCode] = []
        answered = threading.Event()

        def on_subscribe(*args: object) -> None:
            reasons = args[3]
            assert isinstance(reasons, list)
            granted.extend(reasons)
            answered.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos=1)
        assert answered.wait(10), f"no SUBACK for {topic}"
        return granted[0]

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1; the broker's PUBACK reason."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        return self.pubacks[info.mid]

    def received(self) -> list[tuple[str, bytes]]:
        return [(message.topic, bytes(message.payload)) for message in self.messages]

    def wait_for(self, topic: str) -> None:
        deadline = time.monotonic() + 10
        while not any(message.topic == topic for message in self.messages):
            assert time.monotonic() < deadline, f"nothing came on {topic}"
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def _clients(*logins: tuple[MqttSettings, str]) -> Iterator[list[_Client]]:
    """Connected clients, each logged in; closed after."""
    clients: list[_Client] = []
    try:
        for settings, name in logins:
            clients.append(_Client(settings, name))
            connack = clients[-1].connack
            assert connack is not None and connack.value == 0, (name, str(connack))
        yield clients
    finally:
        for client in clients:
            client.close()


def _login(settings: MqttSettings) -> ReasonCode:
    client = _Client(settings, "login")
    try:
        assert client.connack is not None
        return client.connack
    finally:
        client.close()


def test_anonymous_and_wrong_password_are_refused(broker: SecuredBroker) -> None:
    mqtt_settings = broker.settings.mqtt
    anonymous = mqtt_settings.model_copy(update={"username": None, "password": None})
    wrong = mqtt_settings.model_copy(update={"password": SecretStr("not-the-password")})
    unknown = mqtt_settings.model_copy(update={"username": "intruder"})
    for refused in (anonymous, wrong, unknown):
        reason = _login(refused)
        assert reason.is_failure and login_refused(reason), (refused.username, str(reason))
    # The control: the right login is let in, so the refusals above are the broker's.
    assert _login(mqtt_settings).value == 0
    assert _login(broker.observer).value == 0


def _section_env(name: str, section: KafkaSettings) -> dict[str, str]:
    """TWINFLOW_<NAME>__* for every set field of ``section`` (secrets in clear)."""
    env = {}
    for field, value in section.model_dump().items():
        if value is None:
            continue
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        env[f"TWINFLOW_{name.upper()}__{field.upper()}"] = text
    return env


def _bridge_env(
    stack: Settings, broker: SecuredBroker, tmp_path: Path, unique: str
) -> dict[str, str]:
    model = yaml.safe_load(EXAMPLE_MODEL.read_text())
    model["mqtt_topic_prefix"] = broker.prefix
    model_file = tmp_path / "plant.yaml"
    model_file.write_text(yaml.safe_dump(model))
    env = clean_env(
        twin_model=str(model_file),
        state_dir=str(broker.settings.state_dir),
        topics__raw=f"test.secraw.{unique}",
        topics__deadletter=f"test.secdead.{unique}",
        topics__commands=f"test.seccmd.{unique}",
        mqtt__port=str(broker.settings.mqtt.port),
        mqtt__username=BRIDGE_USER,
        mqtt__password=broker.bridge_password,
        mqtt__bridge_client_id=f"bridge-{unique}",
        mqtt__session_expiry_s="60",
    )
    env.update(_section_env("kafka", stack.kafka))  # the session's Kafka, however secured
    return env


def test_bridge_with_a_wrong_password_exits_fast_naming_the_settings(
    stack: Settings,
    broker: SecuredBroker,
    tmp_path: Path,
    unique: str,
    chaos_table: list[dict[str, object]],
) -> None:
    env = _bridge_env(stack, broker, tmp_path, unique)
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    started = time.monotonic()
    result = twinflow_cli({**env, "TWINFLOW_MQTT__PASSWORD": wrong_password}, "bridge", "mqtt")
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    message = " ".join(result.stderr.split())  # rich wraps long lines
    chaos_table.append(refusal_row("MQTT bridge with a wrong password", result.returncode, elapsed))
    assert result.returncode == 1, output[-3000:]
    assert elapsed < 30
    assert f"mqtt://127.0.0.1:{broker.settings.mqtt.port} refused the bridge's login" in message
    assert "Not authorized" in message
    assert "TWINFLOW_MQTT__USERNAME" in message and "TWINFLOW_MQTT__PASSWORD" in message
    assert "reconnecting" not in message
    # Rich may break a line anywhere: look for the passwords with all whitespace gone.
    squeezed = "".join(output.split())
    assert wrong_password not in squeezed
    assert broker.bridge_password not in squeezed

    # The control: the same bridge with the right password logs in and subscribes.
    bridge_log = tmp_path / "bridge.log"
    with bridge_log.open("w") as sink:
        bridge = subprocess.Popen(
            [sys.executable, "-m", "twinflow", "bridge", "mqtt"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_line(bridge_log, f"subscribed to {broker.prefix}/")
    finally:
        if bridge.poll() is None:
            os.kill(bridge.pid, signal.SIGTERM)
        code = bridge.wait(30)
    assert code == 0, bridge_log.read_text()[-3000:]
    assert broker.bridge_password not in "".join(bridge_log.read_text().split())


NOT_AUTHORIZED = 0x87


def test_a_machine_publishes_only_its_own_telemetry(
    broker: SecuredBroker, unique: str, chaos_table: list[dict[str, object]]
) -> None:
    own, other = MACHINES
    with _clients((broker.observer, "observer"), (broker.machines[own], own)) as (
        observer,
        machine,
    ):
        assert observer.subscribe("#").value == 1
        denied = [
            broker.topic(other, "telemetry"),  # forging another machine's readings
            broker.topic(other, "cmd"),  # commanding another machine
            broker.topic(own, "cmd"),  # commanding itself: only the bridge commands
            f"elsewhere{unique}/site-a/line-1/{own}/telemetry",
        ]
        refusals = {topic: machine.publish(topic, b"denied").value for topic in denied}
        # The control: the allowed message, sent after the denied ones on the same
        # connection, does arrive; a delivered denied message would have come first.
        allowed = broker.topic(own, "telemetry")
        assert machine.publish(allowed, b"allowed").value == 0
        observer.wait_for(allowed)
        time.sleep(1.0)
        received = observer.received()
    chaos_table.append(
        {
            "fault": "10. MQTT QoS 1 publishes outside a machine's ACL (another machine's "
            "telemetry and commands, its own commands)",
            "runs": 1,
            "lost": int((allowed, b"allowed") not in received),
            "duplicates": "n/a",
            # Denied messages that got through to a subscriber.
            "mismatches": sum(1 for topic, _ in received if topic in denied),
            "notes": f"mismatches: denied messages delivered; an observer of # received "
            f"only {received}",
        }
    )
    assert received == [(allowed, b"allowed")]
    # MQTT 5 tells the publisher too: each denied PUBACK says "Not authorized".
    assert refusals == dict.fromkeys(denied, NOT_AUTHORIZED)


def test_the_bridge_publishes_commands_and_no_telemetry(broker: SecuredBroker) -> None:
    machine = MACHINES[0]
    with _clients((broker.observer, "observer"), (broker.settings.mqtt, "bridge")) as (
        observer,
        bridge,
    ):
        assert observer.subscribe("#").value == 1
        forged = broker.topic(machine, "telemetry")
        assert bridge.publish(forged, b"forged").value == NOT_AUTHORIZED
        command = broker.topic(machine, "cmd")
        assert bridge.publish(command, b"command").value == 0
        observer.wait_for(command)
        time.sleep(0.5)
        assert observer.received() == [(command, b"command")]


def test_a_machine_reads_its_own_commands_only(broker: SecuredBroker) -> None:
    own, other = MACHINES
    mine, theirs = broker.topic(own, "cmd"), broker.topic(other, "cmd")
    with _clients(
        (broker.machines[own], own),
        (broker.machines[own], f"{own}-snooping"),
        (broker.settings.mqtt, "bridge"),
    ) as (machine, snoop, bridge):
        assert machine.subscribe(mine).value == 1
        # Mosquitto grants any subscription and checks each message as it delivers it.
        snoop.subscribe(theirs)
        snoop.subscribe(f"{broker.prefix}/+/+/+/cmd")
        assert bridge.publish(theirs, b"theirs").value in {0, 0x10}
        assert bridge.publish(mine, b"mine").value == 0
        machine.wait_for(mine)
        snoop.wait_for(mine)
        time.sleep(0.5)
        assert machine.received() == [(mine, b"mine")]
        # The wildcard brings its own commands only; the other machine's never come.
        assert snoop.received() == [(mine, b"mine")]


def test_the_bridge_delivers_a_command_through_the_acl(
    stack: Settings, broker: SecuredBroker, tmp_path: Path, unique: str
) -> None:
    model_data = yaml.safe_load(EXAMPLE_MODEL.read_text())
    model_data["mqtt_topic_prefix"] = broker.prefix
    model = TwinModel.model_validate(model_data)
    settings = broker.settings.model_copy(
        update={
            "kafka": stack.kafka,
            "topics": stack.topics.model_copy(
                update={
                    "raw": f"test.secraw.{unique}",
                    "deadletter": f"test.secdead.{unique}",
                    "commands": f"test.seccmd.{unique}",
                }
            ),
            "mqtt": broker.settings.mqtt.model_copy(
                update={"bridge_client_id": f"bridge-{unique}", "session_expiry_s": 60}
            ),
        }
    )
    machine_id = MACHINES[0]
    issued = time.time_ns() // 1_000_000
    command = Command(
        command_id=f"cmd-{unique}",
        entity_id=machine_id,
        setpoint="speed",
        value=1500.0,
        issued_ms=issued,
        expires_ms=issued + 120_000,
        user="chaos",
    )
    bridge = MqttBridge(settings, model)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            bridge.run(stop)
        except BaseException as exc:
            errors.append(exc)

    with _clients((broker.machines[machine_id], machine_id)) as (machine,):
        assert machine.subscribe(model.mqtt_command_topic(model.by_id[machine_id])).value == 1
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            assert bridge.subscribed.wait(30), errors
            producer = Producer(client_config(stack.kafka))
            producer.produce(settings.topics.commands, encode(command), key=machine_id)
            assert producer.flush(30) == 0
            machine.wait_for(model.mqtt_command_topic(model.by_id[machine_id]))
            results = [
                decode_command(message.value() or b"")
                for message in consume_all(stack.kafka, settings.topics.commands, expected=2)
            ]
        finally:
            stop.set()
            worker.join(30)
    assert errors == []
    assert decode_command(bytes(machine.messages[0].payload)) == command
    assert machine.messages[0].qos == 1
    assert results[0] == command
    (result,) = results[1:]
    assert isinstance(result, CommandResult)
    assert (result.command_id, result.status, result.by) == (
        command.command_id,
        "delivered",
        "mqtt",
    )
