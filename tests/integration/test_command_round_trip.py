"""Commands end to end: `twinflow command --wait` -> Kafka -> bridge -> simulated machine
-> telemetry -> bridge -> Kafka -> twin flow -> twin.state (in sync) and QuestDB.

Each test runs the simulator, one bridge and the flow as separate processes on the
session's Kafka, QuestDB and Mosquitto, with topics, tables and MQTT prefix of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from connectors.kafka import client_config
from connectors.questdb import QuestDBHttp
from tests.helpers import clean_env, free_ports, twinflow_cli, wait_for_line
from twinflow.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PUMP = "pump-001"


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "twinflow", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _env(stack: Settings, workdir: Path) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:10]
    document = yaml.safe_load((ROOT / "infra" / "twin-model" / "example-plant.yaml").read_text())
    document["mqtt_topic_prefix"] = f"cmd{suffix}"
    model = workdir / "plant.yaml"
    model.write_text(yaml.safe_dump(document))
    (opcua_port,) = free_ports(1)
    topics = ("raw", "deadletter", "state", "anomalies", "late", "alarms", "feedback", "commands")
    return clean_env(
        twin_model=str(model),
        state_dir=str(stack.state_dir),
        questdb__table_prefix=f"cmd_{suffix}_",
        flow__recovery_dir=str(workdir / "recovery"),
        mqtt__bridge_client_id=f"cmd-bridge-{suffix}",
        mqtt__session_expiry_s="60",
        opcua__endpoint=f"opc.tcp://127.0.0.1:{opcua_port}/twinflow/",
        **{f"topics__{name}": f"cmd.{name}.{suffix}" for name in topics},
    )


@contextmanager
def _plant(stack: Settings, workdir: Path, protocol: str) -> Iterator[dict[str, str]]:
    """Simulator (2 entities, real time), the protocol's bridge and the flow, running."""
    env = _env(stack, workdir)
    simulate = ["simulate", "--entities", "2", "--rate", "10", "--duration", "600"]
    simulate += ["--fault-share", "0", "--data-faults", "0"]
    simulate += ["--mqtt", "--no-opcua"] if protocol == "mqtt" else ["--no-mqtt", "--opcua"]
    with ExitStack() as stack_:
        # The flow and the bridge first: they create the topics the others use.
        flow_log = workdir / "flow.log"
        stack_.enter_context(_process(["run"], env, flow_log))
        bridge_log = workdir / "bridge.log"
        if protocol == "mqtt":
            stack_.enter_context(_process(["bridge", "mqtt"], env, bridge_log))
            wait_for_line(bridge_log, "subscribed", timeout_s=60)
        sim_log = workdir / "sim.log"
        stack_.enter_context(_process(simulate, env, sim_log))
        if protocol == "mqtt":
            wait_for_line(sim_log, "subscribed to 2 command topics", timeout_s=60)
        else:
            stack_.enter_context(_process(["bridge", "opcua"], env, bridge_log))
            wait_for_line(bridge_log, "entities take commands", timeout_s=90)
        yield env


def _flow_mean(env: dict[str, str], stack: Settings, since: str, until: str) -> float:
    table = f"{env['TWINFLOW_QUESTDB__TABLE_PREFIX']}readings"
    rows = (
        QuestDBHttp(stack.questdb)
        .exec(
            f"SELECT avg(value), count() FROM '{table}' WHERE entity = '{PUMP}' "
            f"AND sensor = 'flow' AND ts >= '{since}' AND ts < '{until}'"
        )
        .rows
    )
    assert rows and rows[0][1] > 5, rows
    return float(rows[0][0])


def _iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(epoch_s))


def _commands_end(stack: Settings, env: dict[str, str]) -> int:
    consumer = Consumer(client_config(stack.kafka, **{"group.id": f"t-{uuid.uuid4()}"}))
    try:
        _low, high = consumer.get_watermark_offsets(
            TopicPartition(env["TWINFLOW_TOPICS__COMMANDS"], 0), timeout=10
        )
    finally:
        consumer.close()
    return int(high)


@pytest.mark.parametrize("protocol", ["mqtt", "opcua"])
def test_a_command_reaches_the_machine_and_the_twin_shows_it_in_sync(
    stack: Settings, tmp_path: Path, protocol: str
) -> None:
    with _plant(stack, tmp_path, protocol) as env:
        time.sleep(20)  # telemetry at the default speed, for comparison
        before_from, sent_at = time.time() - 20, time.time()
        result = twinflow_cli(env, "command", PUMP, "speed", "1000", "--wait", "--timeout", "90")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"in sync: {PUMP} reports speed = 1000" in result.stdout
        time.sleep(15)
        # The new physics: flow follows the speed (1000 / 1480 = 0.68).
        ratio = _flow_mean(env, stack, _iso(time.time() - 12), _iso(time.time())) / _flow_mean(
            env, stack, _iso(before_from), _iso(sent_at)
        )
        assert 0.5 < ratio < 0.85, ratio

        table = f"{env['TWINFLOW_QUESTDB__TABLE_PREFIX']}setpoints"
        statuses = [
            row[0]
            for row in QuestDBHttp(stack.questdb)
            .exec(f"SELECT status FROM '{table}' WHERE entity = '{PUMP}' ORDER BY ts")
            .rows
        ]
        assert statuses[-2:] == ["pending", "in_sync"] or statuses[-1] == "in_sync", statuses

        if protocol == "mqtt":
            # Out of range: refused before Kafka, nothing written.
            end = _commands_end(stack, env)
            refused = twinflow_cli(env, "command", PUMP, "speed", "5000")
            assert refused.returncode == 1
            assert "5000 is outside [600, 1800] rpm" in refused.stderr
            assert _commands_end(stack, env) == end
            # Expired before any bridge could deliver it: never applied, ends expired.
            expired = twinflow_cli(
                env, "command", PUMP, "speed", "1300", "--expires", "0.001", "--wait"
            )
            assert expired.returncode == 1, expired.stdout + expired.stderr
            assert "expired" in expired.stderr
            still = twinflow_cli(env, "command", PUMP, "speed", "1000", "--wait")
            assert still.returncode == 0, still.stdout + still.stderr
