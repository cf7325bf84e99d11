"""Mosquitto with users and an ACL: the refusals a plant's broker must make.

Every test runs its own broker (own state folder, free port), never the session's.
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
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from connectors.mqtt import login_refused, new_client
from tests.helpers import (
    clean_env,
    isolated_settings,
    refusal_row,
    twinflow_cli,
    wait_for_line,
)
from twinflow.services import manager
from twinflow.services.provision import find_executable
from twinflow.settings import KafkaSettings, MqttSettings, Settings

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

log = logging.getLogger("tests.chaos.security")
EXAMPLE_MODEL = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
BRIDGE_USER, OBSERVER_USER = "bridge", "observer"


@dataclass(frozen=True)
class SecuredBroker:
    """A Mosquitto that knows two users: the bridge (its plant's prefix) and an observer."""

    settings: Settings  # logs in as the bridge user
    observer: MqttSettings
    prefix: str
    bridge_password: str


@pytest.fixture
def broker(stack: Settings, tmp_path: Path, unique: str) -> Iterator[SecuredBroker]:
    tool = find_executable("mosquitto_passwd")
    assert tool is not None, "mosquitto_passwd comes with Debian's mosquitto package"
    bridge_password, observer_password = f"br-{uuid.uuid4().hex}", f"ob-{uuid.uuid4().hex}"
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    for create, user, password in (
        (["-c"], BRIDGE_USER, bridge_password),
        ([], OBSERVER_USER, observer_password),
    ):
        subprocess.run(
            [tool, "-b", *create, str(passwd), user, password], check=True, capture_output=True
        )
    prefix = f"plant{unique}"
    acl.write_text(
        f"user {BRIDGE_USER}\ntopic readwrite {prefix}/#\n\nuser {OBSERVER_USER}\ntopic read #\n"
    )
    base = isolated_settings(stack, tmp_path / "state")
    # Validated, not model_copy'd: the new settings checks run on the way.
    secured = MqttSettings.model_validate(
        {
            **base.mqtt.model_dump(),
            "username": BRIDGE_USER,
            "password": bridge_password,
            "password_file": passwd,
            "acl_file": acl,
        }
    )
    settings = base.model_copy(update={"mqtt": secured})
    observer = secured.model_copy(
        update={
            "username": OBSERVER_USER,
            "password": SecretStr(observer_password),
            "password_file": None,
            "acl_file": None,
        }
    )
    # Healthy means the health check's CONNECT, with the bridge user, was accepted.
    manager.up(settings, ["mosquitto"], log.info)
    try:
        yield SecuredBroker(settings, observer, prefix, bridge_password)
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

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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


def test_acl_denied_publish_reaches_no_subscriber(
    broker: SecuredBroker, unique: str, chaos_table: list[dict[str, object]]
) -> None:
    observer = _Client(broker.observer, "observer")
    publisher = _Client(broker.settings.mqtt, "publisher")
    try:
        assert observer.connack is not None and observer.connack.value == 0
        assert publisher.connack is not None and publisher.connack.value == 0
        granted = threading.Event()
        observer.client.on_subscribe = lambda *_args: granted.set()
        observer.client.subscribe("#", qos=1)
        assert granted.wait(10)

        denied_topic = f"elsewhere{unique}/pump-001/telemetry"
        allowed_topic = f"{broker.prefix}/pump-001/telemetry"
        denied = publisher.client.publish(denied_topic, b"denied", qos=1)
        denied.wait_for_publish(10)
        allowed = publisher.client.publish(allowed_topic, b"allowed", qos=1)
        allowed.wait_for_publish(10)

        # The control: the allowed message, sent after the denied one on the same
        # connection, does arrive; a delivered denied message would have come first.
        deadline = time.monotonic() + 10
        while not any(m.topic == allowed_topic for m in observer.messages):
            assert time.monotonic() < deadline, "the allowed publish never reached the observer"
            time.sleep(0.05)
        time.sleep(1.0)
        received = [(m.topic, m.payload) for m in observer.messages]
        chaos_table.append(
            {
                "fault": "10. MQTT QoS 1 publish outside the user's ACL",
                "runs": 1,
                "lost": 0,
                "duplicates": 0,
                "mismatches": 0,
                "notes": f"an observer of # received only {received}",
            }
        )
        assert received == [(allowed_topic, b"allowed")]
        # MQTT 5 tells the publisher too: the denied PUBACK says "Not authorized".
        assert publisher.pubacks[allowed.mid].value == 0
        assert publisher.pubacks[denied.mid].value == 0x87
    finally:
        observer.close()
        publisher.close()
