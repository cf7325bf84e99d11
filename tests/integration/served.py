"""A plant served by ``twinflow serve``: its own topics, a flow over them, and the server.

Every entity of the example plant sends a few minutes of steady telemetry; pump-001
sends 40 minutes in which its flow steps up for good after 35 (the warm-up is 30), so
the flow raises an alarm on it that a test can judge. ``more_pump_telemetry`` sends the
rest, which the flow needs to act on a verdict (windows close on data only here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from tests.helpers import free_ports
from tests.integration.flows import FlowProcess, create_topics, flow_process, produce
from twinflow.settings import Settings
from twinflow.twin_model import SensorSpec, load_twin_model

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "infra" / "twin-model" / "example-plant.yaml"
SHIFT_S = 2100
"""pump-001's flow steps up after 35 min of plant time."""
FIRST_S, LAST_S = 2400, 3300
"""Seconds of pump-001 time sent at start, and in all."""
OTHERS_S = 300
"""Seconds of telemetry every other entity sends."""
OPERATOR_TOKEN = "operator-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789"


@dataclass
class ServedPlant:
    """The running server over a flow's outputs; ``url`` ends without a slash."""

    stack: Settings
    topics: dict[str, str]
    flow: FlowProcess
    server: subprocess.Popen[bytes]
    env: dict[str, str]
    url: str
    start_ms: int
    log: Path

    def get(self, path: str, token: str | None = OPERATOR_TOKEN) -> tuple[int, Any]:
        """GET ``path`` (under the server); the status and the decoded JSON body."""
        return request(self.url + path, token=token)

    def more_pump_telemetry(self) -> None:
        """The rest of pump-001's telemetry, after the step (the flow acts on verdicts)."""
        produce(
            self.stack, self.topics["raw"], pump_readings(self.start_ms, range(FIRST_S, LAST_S))
        )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def request(
    url: str, *, token: str | None = OPERATOR_TOKEN, method: str = "GET", body: object = None
) -> tuple[int, Any]:
    """One HTTP request; the status and the decoded JSON body (None if not JSON).

    ``body`` is sent as JSON, or as it is when it is bytes.
    """
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def pump_readings(start_ms: int, seconds: range) -> list[bytes]:
    """pump-001's telemetry, one message a second; its flow steps up at SHIFT_S."""
    rng = np.random.default_rng(7)
    noise = rng.normal(0.0, 1.0, size=(LAST_S, 5)).tolist()
    return [
        msgspec.json.encode(
            {
                "entity_id": "pump-001",
                "ts": start_ms + second * 1000,
                "values": {
                    "flow": (150.0 if second >= SHIFT_S else 120.0) + 1.5 * noise[second][0],
                    "discharge_pressure": 8.0 + 0.05 * noise[second][1],
                    "motor_current": 90.0 + 0.6 * noise[second][2],
                    "vibration_rms": 2.5 + 0.05 * noise[second][3],
                    "bearing_temp": 50.0 + 0.1 * noise[second][4],
                },
            }
        )
        for second in seconds
    ]


def steady_readings(start_ms: int) -> list[tuple[str, bytes]]:
    """Every entity but pump-001: mid-range telemetry with a little noise, 1 message/s."""
    model = load_twin_model(MODEL)
    rng = np.random.default_rng(11)
    messages = []
    for entity in model.entities:
        if entity.id == "pump-001":
            continue
        sensors = model.sensors_of(entity.id)
        for second in range(OTHERS_S):
            values = {}
            for name, spec in sensors.items():
                low, high = _healthy(spec)
                values[name] = low + 0.4 * (high - low) * (1 + 0.01 * float(rng.normal()))
            body = {"entity_id": entity.id, "ts": start_ms + second * 1000, "values": values}
            messages.append((entity.id, msgspec.json.encode(body)))
    return messages


def _healthy(spec: SensorSpec) -> tuple[float, float]:
    """The part of a sensor's range inside its warning limits."""
    low, high = spec.range
    limits = spec.limits
    if limits is not None:
        low = max(low, *(v for v in (limits.warn_low, limits.alarm_low) if v is not None), low)
        high = min(high, *(v for v in (limits.warn_high, limits.alarm_high) if v is not None), high)
    return low, high


def serve_plant(stack: Settings, workdir: Path) -> Iterator[ServedPlant]:
    """Topics, a flow and a server (operator and viewer tokens); stopped after use."""
    suffix = f"{int(time.time())}{os.getpid() % 1000:03d}"
    topics = {name: f"sv.{name}.{suffix}" for name in ("raw", "deadletter", "feedback", "commands")}
    create_topics(stack, topics)
    start_ms = (int(time.time()) - 2 * 3600) * 1000
    produce(stack, topics["raw"], pump_readings(start_ms, range(FIRST_S)))
    _produce_keyed(stack, topics["raw"], steady_readings(start_ms + (FIRST_S - OTHERS_S) * 1000))
    flow = flow_process(stack, topics, workdir, "served")
    flow.start()
    (port,) = free_ports(1)
    env = {
        **flow.env,
        "TWINFLOW_SERVE__PORT": str(port),
        "TWINFLOW_SERVE__TOKEN": OPERATOR_TOKEN,
        "TWINFLOW_SERVE__USERS__VIEWER__TOKEN": VIEWER_TOKEN,
        "TWINFLOW_SERVE__USERS__VIEWER__ROLE": "viewer",
        "TWINFLOW_SERVE__WINDOWS_REFRESH_S": "1",
    }
    log = workdir / "serve.log"
    with log.open("a") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "twinflow", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    plant = ServedPlant(stack, topics, flow, server, env, f"http://127.0.0.1:{port}", start_ms, log)
    try:
        _wait_for_server(plant)
        yield plant
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        flow.stop()


def _produce_keyed(stack: Settings, topic: str, messages: list[tuple[str, bytes]]) -> None:
    from connectors.kafka import reliable_producer

    producer = reliable_producer(stack.kafka)
    for key, payload in messages:
        producer.produce(topic, value=payload, key=key.encode())
        producer.poll(0)
    assert producer.flush(60) == 0


def _wait_for_server(plant: ServedPlant, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert plant.server.poll() is None, f"serve exited:\n{plant.tail()}"
        try:
            status, _body = plant.get("/api/v1/health")
        except (urllib.error.URLError, OSError):
            status = 0
        if status == 200:
            return
        time.sleep(0.3)
    raise AssertionError(f"serve did not answer in {timeout_s} s:\n{plant.tail()}")
