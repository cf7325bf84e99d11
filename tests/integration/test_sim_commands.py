"""The simulator obeys commands, over a real Mosquitto and over its real OPC UA server.

Each test runs ``twinflow simulate`` in its own process at wall-clock speed, on pump-001
and motor-001 (the motor driving the pump), and compares what it publishes with the same
seeded scenario computed here without commands: until a command is applied the values
are the very same; after it the pump turns at the commanded speed. MQTT runs on a broker
of the test's own with users and an ACL (the simulator may only publish telemetry and
read commands); OPC UA over Basic256Sha256 with the login the OPC UA bridge uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import SecretStr

from connectors.mqtt import new_client
from schemas.control import Command, encode
from schemas.raw import decode_raw
from tests.helpers import clean_env, free_ports, isolated_settings, opcua_certificate, wait_for_line
from twinflow.services import manager
from twinflow.services.provision import find_executable
from twinflow.settings import MqttSettings, Settings
from twinflow.sim.faults import FaultPlan
from twinflow.sim.opcua_server import (
    command_id_node_id_string,
    node_id_string,
    setpoint_node_id_string,
)
from twinflow.sim.physics import RAMP_S
from twinflow.sim.scenario import Scenario, ScenarioConfig
from twinflow.twin_model import TwinModel, load_twin_model

pytestmark = pytest.mark.integration

log = logging.getLogger("tests.sim_commands")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_MODEL = ROOT / "infra" / "twin-model" / "example-plant.yaml"
PUMP, MOTOR = "pump-001", "motor-001"
SEED, RATE = 5, 20.0  # 10 sensors: one tick every 500 ms
SLOWER = 1000.0
S = SLOWER / 1480.0
SETTLED_MS = int(RAMP_S * 1000) + 1_000
SIM_USER, OPERATOR_USER = "twinflow-sim", "operator"

Baseline = dict[tuple[str, int], dict[str, float]]
"""Values without commands, by (entity, ts_ms)."""


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return load_twin_model(EXAMPLE_MODEL)


# --- `twinflow simulate` ---------------------------------------------------------------


@dataclass
class _Simulation:
    """A ``twinflow simulate`` process and the command-free run it must match."""

    process: subprocess.Popen[bytes]
    log: Path
    out: Path
    truth: Path
    baseline: Baseline

    def finish(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the end of the run; its ground truth."""
        code = self.process.wait(timeout_s)
        assert code == 0, self.log.read_text()[-3000:]
        assert '"commands"' in self.out.read_text()  # the printed summary has them
        truth: dict[str, Any] = json.loads(self.truth.read_text())
        return truth


@contextmanager
def _simulate(
    model: TwinModel, env: dict[str, str], workdir: Path, duration_s: float, *extra: str
) -> Iterator[_Simulation]:
    start = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    config = ScenarioConfig(
        start_ms=int(start.replace(tzinfo=UTC).timestamp() * 1000),
        duration_s=duration_s,
        rate=RATE,
        entities=2,
        seed=SEED,
        faults=FaultPlan(0.0, 0.0),
    )
    baseline = {(s.entity_id, s.ts_ms): s.values for s in Scenario(model, config).samples()}
    log_file, out_file, truth = workdir / "sim.log", workdir / "sim.out", workdir / "truth.json"
    with log_file.open("wb") as log_out, out_file.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twinflow",
                "simulate",
                "--entities",
                "2",
                "--rate",
                str(RATE),
                "--duration",
                str(duration_s),
                "--seed",
                str(SEED),
                "--start",
                start.strftime("%Y-%m-%dT%H:%M:%S"),
                "--fault-share",
                "0",
                "--data-faults",
                "0",
                "--ground-truth",
                str(truth),
                *extra,
            ],
            env=env,
            stdout=out,
            stderr=log_out,
        )
    try:
        yield _Simulation(process, log_file, out_file, truth, baseline)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


def _command(
    command_id: str, entity_id: str, setpoint: str, value: float | bool, expires_in_s: float = 60
) -> Command:
    now_ms = time.time_ns() // 1_000_000
    return Command(
        command_id=command_id,
        entity_id=entity_id,
        setpoint=setpoint,
        value=value,
        issued_ms=now_ms,
        expires_ms=now_ms + int(expires_in_s * 1000),
        user="test",
    )


def _ratio(pairs: list[tuple[float, float]]) -> float:
    """Mean commanded value over mean command-free value."""
    new, old = np.array(pairs).T
    return float(new.mean() / old.mean())


# --- MQTT ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Broker:
    settings: Settings
    """Logs in as the simulator's user."""
    operator: MqttSettings


@pytest.fixture
def broker(settings: Settings, tmp_path: Path) -> Iterator[_Broker]:
    """A Mosquitto of this test's own: the simulator and an operator, each with an ACL."""
    tool = find_executable("mosquitto_passwd")
    assert tool is not None, "mosquitto_passwd comes with Debian's mosquitto package"
    passwords = {user: uuid.uuid4().hex for user in (SIM_USER, OPERATOR_USER)}
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    for index, (user, password) in enumerate(passwords.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run(
            [tool, "-b", *create, str(passwd), user, password], check=True, capture_output=True
        )
    acl.write_text(
        f"user {SIM_USER}\ntopic write plant/+/+/+/telemetry\ntopic read plant/+/+/+/cmd\n\n"
        f"user {OPERATOR_USER}\ntopic write plant/+/+/+/cmd\ntopic read plant/+/+/+/telemetry\n"
    )
    base = isolated_settings(settings, tmp_path / "state")
    secured = MqttSettings.model_validate(
        {
            **base.mqtt.model_dump(),
            "username": SIM_USER,
            "password": passwords[SIM_USER],
            "password_file": passwd,
            "acl_file": acl,
        }
    )
    operator = secured.model_copy(
        update={
            "username": OPERATOR_USER,
            "password": SecretStr(passwords[OPERATOR_USER]),
            "password_file": None,
            "acl_file": None,
        }
    )
    secured_settings = base.model_copy(update={"mqtt": secured})
    manager.up(secured_settings, ["mosquitto"], log.info)
    try:
        yield _Broker(secured_settings, operator)
    finally:
        manager.down(secured_settings, ["mosquitto"], log.info)


class _Operator:
    """A plain paho client: reads the machines' telemetry, publishes their commands."""

    def __init__(self, settings: MqttSettings, topics: list[str]) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._client = new_client(settings, f"operator-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_args: subscribed.set()
        self._client.connect(settings.host, settings.port, keepalive=10)
        self._client.loop_start()
        self._client.subscribe([(topic, 1) for topic in topics])
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        body["ts"] = decode_raw(bytes(message.payload)).ts_ms  # some send RFC 3339
        with self._lock:
            self.messages.append(body)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                got = list(self.messages)
            if done(got):
                return
            assert time.monotonic() < deadline, f"timed out with {len(got)} messages"
            time.sleep(0.1)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _readings(message: dict[str, Any]) -> dict[str, float]:
    if "values" in message:
        return dict(message["values"])
    return {message["sensor"]: message["value"]}


def _reported_speed_since(messages: list[dict[str, Any]], speed: float) -> int | None:
    """The first pump telemetry timestamp reporting ``speed``, if any."""
    times: list[int] = [
        m["ts"] for m in messages if m["entity_id"] == PUMP and m["reported"]["speed"] == speed
    ]
    return min(times) if times else None


def test_mqtt_commands_are_applied_once_and_never_late(
    broker: _Broker, model: TwinModel, tmp_path: Path
) -> None:
    mqtt_settings = broker.settings.mqtt
    assert mqtt_settings.password is not None
    env = clean_env(
        state_dir=str(broker.settings.state_dir),
        mqtt__port=str(mqtt_settings.port),
        mqtt__username=SIM_USER,
        mqtt__password=mqtt_settings.password.get_secret_value(),
    )
    pump, motor = model.by_id[PUMP], model.by_id[MOTOR]
    operator = _Operator(broker.operator, [model.mqtt_topic(pump), model.mqtt_topic(motor)])
    try:
        with _simulate(model, env, tmp_path, 30.0, "--no-opcua") as simulation:
            wait_for_line(simulation.log, "subscribed to 2 command topics", timeout_s=60)
            operator.wait_for(lambda got: len(got) >= 10, timeout_s=20)
            slower = encode(_command("mqtt-1", PUMP, "speed", SLOWER))
            operator.publish(model.mqtt_command_topic(pump), slower)
            operator.wait_for(lambda got: _reported_speed_since(got, SLOWER) is not None, 10)
            applied_ms = _reported_speed_since(operator.messages, SLOWER)
            assert applied_ms is not None
            operator.wait_for(
                lambda got: any(
                    m["entity_id"] == MOTOR and m["ts"] >= applied_ms + SETTLED_MS + 3_000
                    for m in got
                ),
                timeout_s=15,
            )
            # Redelivered, expired, refused, not for this machine, not a command at all.
            operator.publish(model.mqtt_command_topic(pump), slower)
            stale = _command("mqtt-2", PUMP, "speed", 700.0, expires_in_s=-1)
            operator.publish(model.mqtt_command_topic(pump), encode(stale))
            too_fast = _command("mqtt-3", PUMP, "speed", 5000.0)
            operator.publish(model.mqtt_command_topic(pump), encode(too_fast))
            misrouted = _command("mqtt-4", MOTOR, "enable", False)
            operator.publish(model.mqtt_command_topic(pump), encode(misrouted))
            operator.publish(model.mqtt_command_topic(pump), b'{"kind": "command", "command_')
            truth = simulation.finish(timeout_s=90)
    finally:
        operator.close()

    assert truth["counts"]["commands"] == {"applied": 1, "repeated": 1, "expired": 1, "refused": 2}
    sim_log = simulation.log.read_text()
    assert "ignored a message on the command topic of pump-001" in sim_log
    assert "came on the channel of 'pump-001'" in sim_log

    messages = sorted(operator.messages, key=lambda m: (m["ts"], m["entity_id"]))
    # Every message reports what its machine runs at: the pump's speed changed once.
    pump_speeds = [m["reported"]["speed"] for m in messages if m["entity_id"] == PUMP]
    changed = pump_speeds.index(SLOWER)
    assert set(pump_speeds[:changed]) == {1480.0} and set(pump_speeds[changed:]) == {SLOWER}
    assert all(m["reported"] == {"enable": True} for m in messages if m["entity_id"] == MOTOR)

    # The last pump sample at the default speed was taken before the command was
    # applied; the motor's next one may already have been taken after it.
    untouched_until = max(
        m["ts"] for m in messages if m["entity_id"] == PUMP and m["reported"]["speed"] == 1480.0
    )
    before, after = 0, []
    for message in messages:
        expected = simulation.baseline[(message["entity_id"], message["ts"])]
        for sensor, value in _readings(message).items():
            if message["ts"] <= untouched_until:
                # Published with six significant digits, as devices do.
                assert value == float(f"{expected[sensor]:.6g}")
                before += 1
            elif message["ts"] >= applied_ms + SETTLED_MS:
                after.append((message["entity_id"], sensor, value, expected[sensor]))
    assert before > 0

    def ratio(entity_id: str, sensor: str) -> float:
        pairs = [(new, old) for e, s, new, old in after if (e, s) == (entity_id, sensor)]
        assert len(pairs) >= 5, (entity_id, sensor, len(pairs))
        return _ratio(pairs)

    assert ratio(MOTOR, "speed") == pytest.approx(S, abs=0.01)
    assert ratio(PUMP, "flow") == pytest.approx(S, rel=0.1)
    assert ratio(PUMP, "discharge_pressure") == pytest.approx(S**2, rel=0.15)
    assert ratio(PUMP, "motor_current") < 0.75
    assert ratio(MOTOR, "current") < 0.75


# --- OPC UA ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Login:
    endpoint: str
    namespace: str
    username: str
    password: str
    client_cert: Path
    client_key: Path
    server_cert: Path


async def _connect(login: _Login, password: str | None = None, timeout_s: float = 60) -> Client:
    """A session as the OPC UA bridge opens it; retried while the server starts."""
    deadline = time.monotonic() + timeout_s
    while True:
        client = Client(login.endpoint)
        client.set_user(login.username)
        client.set_password(password or login.password)
        client.application_uri = "urn:twinflow:test:bridge"
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            certificate=str(login.client_cert),
            private_key=str(login.client_key),
            server_certificate=str(login.server_cert),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        try:
            await client.connect()
            return client
        except (TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def _node(identifier: str, index: int) -> ua.NodeId:
    return ua.NodeId(ua.String(identifier), ua.Int16(index))


async def _command_write(
    client: Client, command_id: ua.NodeId, setpoint: ua.NodeId, cid: str, value: ua.Variant
) -> list[ua.StatusCode]:
    """Deliver a command as a bridge does: ONE Write, the command id first."""
    statuses: list[ua.StatusCode] = await client.uaclient.write_attributes(
        [command_id, setpoint],
        [
            ua.DataValue(Value=ua.Variant(cid, ua.VariantType.String), StatusCode=None),
            ua.DataValue(Value=value, StatusCode=None),
        ],
        AttributeIds.Value,
    )
    return statuses


async def _sensor_pairs(
    client: Client,
    index: int,
    baseline: Baseline,
    wanted: list[tuple[str, str]],
    reads: int = 6,
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(served value, command-free value) pairs, one read of each sensor every 0.5 s."""
    pairs: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in wanted}
    for _ in range(reads):
        for entity_id, sensor in wanted:
            node = client.get_node(_node(node_id_string(entity_id, sensor), index))
            value = await node.read_data_value()
            assert value.SourceTimestamp is not None and value.Value is not None
            ts_ms = round(value.SourceTimestamp.timestamp() * 1000)
            pairs[(entity_id, sensor)].append(
                (value.Value.Value, baseline[(entity_id, ts_ms)][sensor])
            )
        await asyncio.sleep(0.5)
    return pairs


async def _drive_opcua(login: _Login, baseline: Baseline) -> None:
    client = await _connect(login)
    try:
        index = await client.get_namespace_index(login.namespace)
        speed = await client.nodes.objects.get_child(
            [f"{index}:Plant", f"{index}:{PUMP}", f"{index}:setpoints", f"{index}:speed"]
        )
        assert speed.nodeid == _node(setpoint_node_id_string(PUMP, "speed"), index)
        pump_cid = client.get_node(_node(command_id_node_id_string(PUMP), index))
        enable = client.get_node(_node(setpoint_node_id_string(MOTOR, "enable"), index))
        motor_cid = client.get_node(_node(command_id_node_id_string(MOTOR), index))
        default = await speed.read_data_value()
        assert default.Value is not None and default.Value.Value == 1480.0
        assert default.Value.VariantType == ua.VariantType.Double
        assert await enable.read_value() is True
        assert await pump_cid.read_value() == ""

        # Before any command the server serves exactly the command-free run.
        sensors = [(PUMP, "flow"), (PUMP, "discharge_pressure"), (MOTOR, "speed")]
        for pairs in (await _sensor_pairs(client, index, baseline, sensors, reads=2)).values():
            assert all(new == old for new, old in pairs)

        slower = ua.Variant(SLOWER, ua.VariantType.Double)
        statuses = await _command_write(client, pump_cid.nodeid, speed.nodeid, "opc-1", slower)
        assert all(status.is_good() for status in statuses), statuses
        assert await speed.read_value() == SLOWER
        assert await pump_cid.read_value() == "opc-1"
        await asyncio.sleep(SETTLED_MS / 1000 + 1.5)
        slow = await _sensor_pairs(client, index, baseline, [*sensors, (PUMP, "motor_current")])
        assert _ratio(slow[(MOTOR, "speed")]) == pytest.approx(S, abs=0.01)
        assert _ratio(slow[(PUMP, "flow")]) == pytest.approx(S, rel=0.1)
        assert _ratio(slow[(PUMP, "discharge_pressure")]) == pytest.approx(S**2, rel=0.15)
        assert _ratio(slow[(PUMP, "motor_current")]) < 0.75

        # The same command again (a bridge's retry) is harmless; a refused value says so.
        statuses = await _command_write(client, pump_cid.nodeid, speed.nodeid, "opc-1", slower)
        assert all(status.is_good() for status in statuses), statuses
        too_fast = ua.Variant(5000.0, ua.VariantType.Double)
        statuses = await _command_write(client, pump_cid.nodeid, speed.nodeid, "opc-2", too_fast)
        assert statuses[0].is_good()
        assert statuses[1] == ua.StatusCode(ua.UInt32(StatusCodes.BadOutOfRange))
        assert await speed.read_value() == SLOWER

        stop = ua.Variant(False, ua.VariantType.Boolean)
        statuses = await _command_write(client, motor_cid.nodeid, enable.nodeid, "opc-3", stop)
        assert all(status.is_good() for status in statuses), statuses
        assert await enable.read_value() is False
        await asyncio.sleep(SETTLED_MS / 1000 + 1.5)
        stopped = await _sensor_pairs(
            client, index, baseline, [(MOTOR, "current"), (MOTOR, "speed")], reads=3
        )
        assert max(new for new, _old in stopped[(MOTOR, "current")]) < 3.0
        assert max(new for new, _old in stopped[(MOTOR, "speed")]) < 10.0
    finally:
        await client.disconnect()

    # Another password gets no session, so it can write nothing either.
    with pytest.raises(UaStatusCodeError):
        await _connect(login, password="not-the-password", timeout_s=0)


def test_opcua_writes_of_the_command_nodes_are_commands(
    settings: Settings, model: TwinModel, tmp_path: Path
) -> None:
    server_cert, server_key = opcua_certificate(
        tmp_path, "server", "urn:twinflow:test:server", [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    client_cert, client_key = opcua_certificate(
        tmp_path, "client", "urn:twinflow:test:bridge", [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    (port,) = free_ports(1)
    login = _Login(
        endpoint=f"opc.tcp://127.0.0.1:{port}/twinflow/",
        namespace=settings.opcua.namespace,
        username="bridge",
        password=uuid.uuid4().hex,
        client_cert=client_cert,
        client_key=client_key,
        server_cert=server_cert,
    )
    env = clean_env(
        state_dir=str(tmp_path / "state"),
        opcua__endpoint=login.endpoint,
        opcua__namespace=login.namespace,
        opcua__security="basic256sha256",
        opcua__username=login.username,
        opcua__password=login.password,
        opcua__client_cert_file=str(client_cert),
        opcua__client_key_file=str(client_key),
        opcua__server_cert_file=str(server_cert),
        opcua__server_key_file=str(server_key),
    )
    with _simulate(model, env, tmp_path, 45.0, "--no-mqtt", "--opcua") as simulation:
        asyncio.run(_drive_opcua(login, simulation.baseline))
        truth = simulation.finish(timeout_s=90)
    assert truth["counts"]["commands"] == {"applied": 2, "repeated": 1, "expired": 0, "refused": 1}
    assert "OPC UA command opc-2 refused: 5000 is outside [600, 1800] rpm" in (
        simulation.log.read_text()
    )
