"""`twinflow up | status | down` driven through the real CLI on an isolated stack."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.questdb import QuestDBError, QuestDBHttp
from tests.helpers import clean_env, twinflow_cli, wait_for_line
from tests.helpers import isolated_env as isolated_stack_env
from twinflow.services.process import port_is_free, process_start_ticks
from twinflow.services.serve import ServeService
from twinflow.settings import Settings
from twinflow.twin_model import load_twin_model

pytestmark = pytest.mark.integration


@pytest.fixture
def isolated_env(stack: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a second stack: own state folder, own free ports, shared jars."""
    env = isolated_stack_env(stack, tmp_path / "state")
    yield env
    twinflow_cli(env, "down")  # never leave a process behind, even when an assert failed


def _status(env: dict[str, str]) -> list[dict[str, object]]:
    result = twinflow_cli(env, "status", "--json")
    return json.loads(result.stdout)


def test_up_twice_is_a_noop_and_down_leaves_nothing(isolated_env: dict[str, str]) -> None:
    first = twinflow_cli(isolated_env, "up")
    assert first.returncode == 0, first.stderr
    rows = _status(isolated_env)
    assert [(row["name"], row["state"]) for row in rows] == [
        ("kafka", "healthy"),
        ("questdb", "healthy"),
        ("mosquitto", "healthy"),
        ("prometheus", "healthy"),
    ]
    pids = {row["name"]: row["pid"] for row in rows}
    assert all(isinstance(pid, int) and process_start_ticks(pid) for pid in pids.values())
    ports = [port for row in rows for port in row["ports"].values()]  # type: ignore[union-attr]
    assert not any(port_is_free(port) for port in ports)
    state_dir = Path(isolated_env["TWINFLOW_STATE_DIR"])
    assert state_dir.stat().st_mode & 0o777 == 0o700

    second = twinflow_cli(isolated_env, "up")
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("already running") == 4
    assert {row["name"]: row["pid"] for row in _status(isolated_env)} == pids

    stopped = twinflow_cli(isolated_env, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert all(process_start_ticks(pid) is None for pid in pids.values())  # type: ignore[arg-type]
    assert all(port_is_free(port) for port in ports)
    after = twinflow_cli(isolated_env, "status", "--json")
    assert after.returncode == 1
    assert {row["state"] for row in json.loads(after.stdout)} == {"stopped"}


def test_occupied_port_gives_a_clear_error(isolated_env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(isolated_env["TWINFLOW_MQTT__PORT"])))
        squatter.listen()
        result = twinflow_cli(isolated_env, "up", "mosquitto")
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert f"port {isolated_env['TWINFLOW_MQTT__PORT']} on 127.0.0.1 (mqtt.port)" in message
    assert "TWINFLOW_MQTT__PORT=<port>" in message
    assert _status(isolated_env)[0]["state"] == "stopped"


def test_invalid_port_fails_fast_naming_the_setting(isolated_env: dict[str, str]) -> None:
    result = twinflow_cli({**isolated_env, "TWINFLOW_KAFKA__PORT": "0"}, "up")
    assert result.returncode == 2
    assert "kafka.port (env TWINFLOW_KAFKA__PORT)" in result.stderr
    assert "greater than or equal to 1" in " ".join(result.stderr.split())


def test_demo_runs_the_whole_pipeline(stack: Settings) -> None:
    sql = QuestDBHttp(stack.questdb)

    def readings() -> int:
        try:
            return int(sql.exec("SELECT count() FROM readings").rows[0][0])
        except QuestDBError:
            return 0

    before = readings()
    serving_before = ServeService(stack).pid_file.live_pid() is not None
    try:
        result = twinflow_cli(
            dict(os.environ),
            "demo",
            "--hours",
            "0.1",
            "--speed",
            "40",
            "--entities",
            "4",
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "answered a round trip each" in result.stderr
        summary = " ".join(result.stdout.split())
        assert re.search(r"plant: \d+ MQTT messages, \d+ valid readings", summary)
        assert "readings in QuestDB" in summary
        assert stack.questdb.http_url in summary
        assert readings() > before
        viewer = f"http://127.0.0.1:{stack.serve.port}/"
        assert f"twin viewer: {viewer}" in summary
        # The viewer outlives the demo, like the services; it shows the demo's plant.
        with urllib.request.urlopen(viewer + "api/v1/plant", timeout=10) as response:
            tree = json.loads(response.read())
        assert tree["entities"] == len(load_twin_model(stack.twin_model).entities)
        rows = _status(dict(os.environ))
        assert ("serve", "healthy") in [(row["name"], row["state"]) for row in rows]
    finally:
        if not serving_before:
            twinflow_cli(dict(os.environ), "down", "serve")


def test_a_flow_started_with_sigint_ignored_still_stops_on_sigint(
    stack: Settings, tmp_path: Path
) -> None:
    # A non-interactive shell's `&` (a CI runner, `twinflow run &`) starts a process with
    # SIGINT ignored; the demo stops its flow with SIGINT.
    suffix = f"{int(time.time())}{os.getpid()}"
    env = clean_env(
        state_dir=str(stack.state_dir),
        topics__raw=f"sigint.raw.{suffix}",
        topics__deadletter=f"sigint.deadletter.{suffix}",
        topics__state=f"sigint.state.{suffix}",
        topics__anomalies=f"sigint.anomalies.{suffix}",
        topics__late=f"sigint.late.{suffix}",
        topics__feedback=f"sigint.feedback.{suffix}",
        topics__commands=f"sigint.commands.{suffix}",
        topics__alarms=f"sigint.alarms.{suffix}",
        questdb__table_prefix=f"sigint_{suffix}_",
        flow__recovery_dir=str(tmp_path / "recovery"),
    )
    log = tmp_path / "flow.log"
    with log.open("w") as out:
        flow = subprocess.Popen(
            [sys.executable, "-m", "twinflow", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    try:
        wait_for_line(log, "created recovery store", timeout_s=120)
        time.sleep(3)  # into the dataflow
        os.kill(flow.pid, signal.SIGINT)
        # A stop that was asked for: status 0, no traceback.
        assert flow.wait(60) == 0
        assert "Traceback" not in log.read_text()
        assert "stopped on SIGINT" in log.read_text()
    finally:
        if flow.poll() is None:
            flow.kill()  # by PID: never leave the flow behind a failed assert
            flow.wait()
