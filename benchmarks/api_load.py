"""``python -m benchmarks.api_load``: how many requests ``twinflow serve`` answers, how fast.

One run, on the local services (``twinflow up``) and all on 127.0.0.1:

1. writes a twin model of ``--entities`` machines (the workload's, with setpoints, a
   derived metric and pump/motor pairs) and produces one state per entity to topics of
   its own (``bench.api.<id>.*``), about 5 % of them with an active alarm;
2. starts ``twinflow serve`` over those topics and waits until it has read them all;
3. runs three phases of ``--seconds`` with ``--clients`` closed-loop keep-alive clients:
   ``GET /api/v1/entities/{id}`` over every entity, ``GET /api/v1/plant``, then the
   entity load again with ``--sse`` clients on ``/api/v1/events`` while
   ``--change-rate`` states a second change (every change is one event to every client);
4. stops the server and writes ``api_load.json``, ``api_load.md`` and ``api_load.png``
   to ``--out`` (default ``STATE_DIR/bench/api_load``). Topics are left in Kafka.

The clients speak raw HTTP/1.1 over asyncio streams (status line and Content-Length
only) in ``--processes`` processes of their own. Client and server share the machine's
cores (with Kafka and QuestDB), so every phase reports the CPU each of them used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import yaml

from benchmarks.latency import LiveSchedule
from benchmarks.results import write_results
from benchmarks.throughput import bench_env
from benchmarks.workload import ASSET_TYPE, WorkloadConfig, twin_model
from connectors.kafka import ensure_topics, reliable_producer
from schemas.outputs import (
    Alarm,
    AlarmEvent,
    AlarmKind,
    Contribution,
    Counts,
    SensorState,
    SetpointState,
    SetpointStatus,
    Status,
    TwinState,
    encode,
)
from twinflow.services.process import cpu_seconds
from twinflow.settings import Settings, TopicSettings, load_settings
from twinflow.topics import control_topics, output_topics
from twinflow.twin_model import AssetType, TwinModel

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
API = "/api/v1"
STEM = "api_load"
TARGET_REQUESTS_PER_S = 2000
TARGET_P99_MS = 50.0
ALARM_SHARE = 0.05
_SSE_GRACE_S = 2.0
"""How long SSE clients keep listening after the load, for events still on their way."""
_SAMPLE_S = 0.2
_BACKGROUND_S = 3.0
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0
_ERROR_SAMPLES = 5


# -- the plant and its synthetic state ----------------------------------------------------


def bench_model(entities: int) -> dict[str, Any]:
    """The twin model served, as YAML-ready data.

    The throughput workload's machines, with two setpoints and a derived metric, and
    every second machine the child of the one before (a pump and its motor, as in the
    example plant), so the plant tree nests.
    """
    config = WorkloadConfig(entities=entities, readings=entities * WorkloadConfig.sensors)
    model: dict[str, Any] = twin_model(config)
    asset = model["asset_types"][ASSET_TYPE]
    asset["derived"] = {"hydraulic_power": {"expression": "flow * pressure / 36", "unit": "kW"}}
    asset["setpoints"] = {
        "speed": {
            "type": "float",
            "unit": "rpm",
            "range": [600.0, 3600.0],
            "default": 1480.0,
            "tolerance": 5.0,
        },
        "enabled": {"type": "bool", "default": True},
    }
    for index, entity in enumerate(model["entities"]):
        entity["line"] = f"line-{index // 2 % 10}"
        if index % 2:
            entity["parent"] = model["entities"][index - 1]["id"]
    return model


def synthetic_records(
    model: TwinModel, now_ms: int, seed: int = 1, alarm_share: float = ALARM_SHARE
) -> tuple[list[TwinState], list[Alarm]]:
    """One state per entity of ``model`` as of ``now_ms``, and the alarms active in them.

    ``alarm_share`` of the entities (rounded) are in ALARM with one active alarm each.
    """
    rng = np.random.default_rng(seed)
    ids = [entity.id for entity in model.entities]
    alarmed = set(rng.choice(len(ids), size=round(len(ids) * alarm_share), replace=False).tolist())
    states, alarms = [], []
    for index, entity_id in enumerate(ids):
        asset = model.asset_types[model.by_id[entity_id].type]
        alarm = synthetic_alarm(asset, entity_id, now_ms, rng) if index in alarmed else None
        states.append(synthetic_state(asset, entity_id, now_ms, rng, alarm))
        if alarm is not None:
            alarms.append(alarm)
    return states, alarms


def synthetic_state(
    asset: AssetType,
    entity_id: str,
    ts_ms: int,
    rng: np.random.Generator,
    alarm: Alarm | None = None,
) -> TwinState:
    """A plausible state of an entity: mid-range readings, counts, setpoints, its alarm."""
    sensors = {}
    for name, spec in asset.sensors.items():
        low, high = spec.range
        sensors[name] = SensorState(
            value=round(low + (high - low) * float(rng.uniform(0.3, 0.7)), 3),
            ts_ms=ts_ms - int(rng.integers(0, 1000)),
            flags=0,
            unit=spec.unit,
        )
    values = {name: reading.value for name, reading in sensors.items()}
    threshold = round(float(rng.uniform(2.5, 3.5)), 3)
    # An alarmed entity scores above its threshold and is in poorer health.
    score_share = rng.uniform(1.2, 3.0) if alarm else rng.uniform(0.1, 0.8)
    health = rng.uniform(0.2, 0.5) if alarm else rng.uniform(0.8, 1.0)
    return TwinState(
        msg_id=f"{entity_id}@{ts_ms}",
        entity_id=entity_id,
        ts_ms=ts_ms,
        status=Status.ALARM if alarm else Status.OK,
        health=round(float(health), 4),
        anomaly_score=round(float(score_share) * threshold, 3),
        threshold=threshold,
        sensors=sensors,
        derived={name: metric.evaluate(values) for name, metric in asset.derived.items()},
        counts=_counts(len(sensors), alarmed=alarm is not None, rng=rng),
        active_alarms=[alarm.alarm_id] if alarm else [],
        setpoints=_setpoints(asset, entity_id, ts_ms, rng),
    )


def _counts(sensors: int, *, alarmed: bool, rng: np.random.Generator) -> Counts:
    readings = int(rng.integers(10_000, 100_000))
    windows = readings // (10 * sensors)  # one reading per sensor a second, 10-s windows
    return Counts(
        readings=readings,
        flagged=readings // 500,
        duplicates=int(rng.integers(0, 20)),
        late=int(rng.integers(0, 10)),
        dead_letters=int(rng.integers(0, 5)),
        windows=windows,
        anomalies=int(rng.integers(3, 30)) if alarmed else int(rng.integers(0, 3)),
        alarms=1 if alarmed else 0,
    )


def _setpoints(
    asset: AssetType, entity_id: str, ts_ms: int, rng: np.random.Generator
) -> dict[str, SetpointState]:
    """Every setpoint reported; about a quarter of them commanded and in sync."""
    found = {}
    for name, spec in asset.setpoints.items():
        if rng.random() < 0.25:
            low, high = spec.range or (0.0, 1.0)
            desired: float | bool = (
                True if spec.type == "bool" else float(round(rng.uniform(low, high)))
            )
            found[name] = SetpointState(
                desired=desired,
                reported=desired,
                status=SetpointStatus.IN_SYNC,
                command_id=f"{entity_id}/{name}@{ts_ms - 60_000}",
                issued_ms=ts_ms - 60_000,
                expires_ms=ts_ms,
                reported_ms=ts_ms - 55_000,
            )
        else:
            found[name] = SetpointState(
                desired=None, reported=spec.default, status=None, reported_ms=ts_ms
            )
    return found


def synthetic_alarm(
    asset: AssetType, entity_id: str, now_ms: int, rng: np.random.Generator
) -> Alarm:
    """An active anomaly alarm, raised in the last hour, explained by up to 3 sensors."""
    start_ms = now_ms - int(rng.integers(60, 3600)) * 1000
    names = list(asset.sensors)
    picked = rng.choice(len(names), size=min(3, len(names)), replace=False)
    weights = sorted(rng.dirichlet(np.ones(len(picked))).tolist(), reverse=True)
    contributions = []
    for index, weight in zip(picked.tolist(), weights, strict=True):
        low, high = asset.sensors[names[index]].range
        span = high - low
        contributions.append(
            Contribution(
                sensor=names[index],
                feature="mean",
                value=round(low + 0.8 * span, 3),
                expected_low=round(low + 0.4 * span, 3),
                expected_high=round(low + 0.6 * span, 3),
                weight=round(weight, 3),
            )
        )
    threshold = round(float(rng.uniform(2.5, 3.5)), 3)
    alarm_id = f"{entity_id}@{start_ms}"
    return Alarm(
        msg_id=f"{alarm_id}/{AlarmEvent.RAISED.value}",
        alarm_id=alarm_id,
        entity_id=entity_id,
        kind=AlarmKind.ANOMALY,
        event=AlarmEvent.RAISED,
        active=True,
        ts_ms=start_ms + 10_000,
        start_ms=start_ms,
        end_ms=None,
        peak_score=round(threshold * float(rng.uniform(1.2, 3.0)), 3),
        threshold=threshold,
        anomalous_windows=int(rng.integers(1, 30)),
        contributions=contributions,
    )


def changed_state(state: TwinState, ts_ms: int, rng: np.random.Generator) -> TwinState:
    """``state`` a moment later, at ``ts_ms``, with a different health (so it is an event)."""
    return msgspec.structs.replace(
        state, msg_id=f"{state.entity_id}@{ts_ms}", ts_ms=ts_ms, health=nudged(state.health, rng)
    )


def nudged(health: float, rng: np.random.Generator) -> float:
    """A health near ``health``, never equal to it, within [0, 1] (4 decimals)."""
    moved = min(1.0, max(0.0, round(health + float(rng.normal(0.0, 0.02)), 4)))
    if moved == health:
        moved = round(health - 0.0001 if health > 0.5 else health + 0.0001, 4)
    return moved


# -- the figures -------------------------------------------------------------------------


def latency_summary(latencies_ms: npt.ArrayLike) -> dict[str, float]:
    """p50, p90, p99, max and mean in ms, rounded to 0.01 ms (empty: none).

    >>> latency_summary([1.0, 2.0, 3.0, 4.0])
    {'p50_ms': 2.5, 'p90_ms': 3.7, 'p99_ms': 3.97, 'max_ms': 4.0, 'mean_ms': 2.5}
    """
    values = np.asarray(latencies_ms, dtype=np.float64)
    if not values.size:
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(values.max()), 2),
        "mean_ms": round(float(values.mean()), 2),
    }


def per_second(count: float, seconds: float) -> float:
    """``count`` per second over ``seconds``, to 0.1 (0 for no time).

    >>> per_second(1000, 8.0), per_second(5, 0.0)
    (125.0, 0.0)
    """
    return round(count / seconds, 1) if seconds > 0 else 0.0


def events_summary(received: Sequence[int], expected: int) -> dict[str, float | int]:
    """SSE events per client against the ``expected`` number each should have had.

    >>> summary = events_summary([10, 8, 9], 10)
    >>> summary["min"], summary["mean"], summary["max"], summary["delivered_share"]
    (8, 9.0, 10, 0.9)
    """
    total = expected * len(received)
    return {
        "clients": len(received),
        "expected_per_client": expected,
        "min": min(received, default=0),
        "mean": round(sum(received) / len(received), 1) if received else 0.0,
        "max": max(received, default=0),
        "delivered_share": round(sum(received) / total, 4) if total else 0.0,
    }


def machine_cpu_ticks(stat: str) -> tuple[int, int]:
    r"""Busy and total clock ticks of all CPUs, from ``/proc/stat`` (idle and iowait are idle).

    >>> machine_cpu_ticks("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4")
    (150, 1000)
    """
    ticks = [int(value) for value in stat.splitlines()[0].split()[1:]]
    total = sum(ticks[:8])  # guest time is already in user and nice
    return total - ticks[3] - ticks[4], total


def memory_kib(status: str) -> dict[str, int]:
    r"""VmRSS and VmHWM (peak RSS) in KiB, from a ``/proc/<pid>/status``.

    >>> memory_kib("Name: python\nVmHWM:\t 2048 kB\nVmRSS:\t 1024 kB\n")
    {'VmHWM': 2048, 'VmRSS': 1024}
    """
    found = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in {"VmRSS", "VmHWM"}:
            found[name] = int(value.split()[0])
    return found


def content_length(head: bytes) -> int:
    r"""The Content-Length of a response head (ValueError without one).

    >>> content_length(b"HTTP/1.1 200 OK\r\ncontent-type: x\r\nContent-Length: 42\r\n\r\n")
    42
    """
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("response without Content-Length")


def sse_event(block: bytes) -> tuple[str, bytes] | None:
    r"""The name and data of one SSE event block (None for a comment such as a ping).

    >>> sse_event(b'event: state\ndata: {"a": 1}')
    ('state', b'{"a": 1}')
    >>> sse_event(b": ping") is None
    True
    """
    name, data, seen = "message", [], False
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        key, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if key == b"event":
            name, seen = value.decode(), True
        elif key == b"data":
            data.append(value)
            seen = True
    return (name, b"\n".join(data)) if seen else None


def targets(phases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, each with its measured value and whether it is met."""
    found = []
    for phase in phases:
        if phase["endpoint"] != f"{API}/entities/{{id}}":
            continue
        rate, p99 = phase["requests_per_s"], phase["latency"].get("p99_ms")
        found.append(
            {
                "target": f"{phase['name']}: >= {TARGET_REQUESTS_PER_S:,} req/s",
                "measured": rate,
                "met": rate >= TARGET_REQUESTS_PER_S,
            }
        )
        found.append(
            {
                "target": f"{phase['name']}: p99 <= {TARGET_P99_MS:g} ms",
                "measured": p99,
                "met": p99 is not None and p99 <= TARGET_P99_MS,
            }
        )
    errors = sum(phase["errors"] for phase in phases)
    found.append(
        {"target": "no request errors in any phase", "measured": errors, "met": errors == 0}
    )
    streams = [phase["sse"] for phase in phases if phase["sse"]]
    if streams:
        failed = sum(sse["streams_failed"] for sse in streams)
        found.append(
            {"target": "every SSE stream lasts its phase", "measured": failed, "met": not failed}
        )
    return found


# -- the load generator (runs in processes of its own) ------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """What one load process does."""

    port: int
    paths: tuple[str, ...]
    clients: int
    first_client: int
    """Index of its first client among all processes' clients: where it starts in paths."""
    all_clients: int
    sse: int
    seconds: float


@dataclass
class WorkerResult:
    """What one load process saw."""

    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    sse_events: list[int] = field(default_factory=list)
    """State events each SSE client received."""
    sse_delays_ms: array[float] = field(default_factory=lambda: array("d"))
    """Receive time minus the state's ts_ms (its produce time), per event."""
    cpu_s: float = 0.0
    """CPU time of the process during the load."""
    load_s: float = 0.0
    """From the start to the last answer of its clients."""
    sse_failures: int = 0
    """SSE streams that broke or were ended by the server before the phase ended."""

    def error(self, what: str, *, stream: bool = False) -> None:
        if stream:
            self.sse_failures += 1
        else:
            self.errors += 1
        if len(self.error_samples) < _ERROR_SAMPLES:
            self.error_samples.append(what)


class _Connection:
    """A keep-alive HTTP/1.1 connection that reads no more of an answer than it must."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Connection:
        return cls(*await asyncio.open_connection(HOST, port))

    async def get(self, request: bytes) -> int:
        """Send a request and read its answer; the status."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        await self.reader.readexactly(content_length(head))
        return int(head[9:12])

    def close(self) -> None:
        self.writer.close()


class _Stamped(msgspec.Struct):
    ts_ms: int


_STAMPED = msgspec.json.Decoder(_Stamped)


class _EventStream:
    """An open ``/events`` response: its chunked body, split into SSE events."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.pending = b""

    @classmethod
    async def open(cls, port: int) -> _EventStream:
        """Subscribe, and return once the server's ``ready`` event says it is subscribed."""
        connection = await _Connection.open(port)
        connection.writer.write(_request(port, f"{API}/events", b"Accept: text/event-stream\r\n"))
        head = await connection.reader.readuntil(b"\r\n\r\n")
        if int(head[9:12]) != 200 or b"chunked" not in head.lower():
            raise ValueError(f"unexpected answer to /events: {head[:200]!r}")
        stream = cls(connection)
        while not any(name == "ready" for name, _data in await stream.events()):
            pass
        return stream

    async def events(self) -> list[tuple[str, bytes]]:
        """The events the next chunk completes (EOFError at the end of the body)."""
        reader = self.connection.reader
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            raise EOFError("the server ended the event stream")
        self.pending += (await reader.readexactly(size + 2))[:-2]
        *blocks, self.pending = self.pending.replace(b"\r\n", b"\n").split(b"\n\n")
        return [event for block in blocks if (event := sse_event(block)) is not None]


def _request(port: int, path: str, headers: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n".encode() + headers + b"\r\n"


_FAILURES = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


async def _client(plan: WorkerPlan, number: int, until: float, result: WorkerResult) -> None:
    """One closed-loop client: the next request as soon as the last is answered."""
    requests = [_request(plan.port, path) for path in plan.paths]
    # Each client walks every path, from its own place, so the load covers them all.
    index = (plan.first_client + number) * len(requests) // plan.all_clients
    connection = await _reconnect(plan.port, until, result)
    while connection is not None and time.perf_counter() < until:
        started = time.perf_counter()
        try:
            status = await connection.get(requests[index % len(requests)])
        except _FAILURES as exc:
            result.error(f"{type(exc).__name__}: {exc}")
            connection.close()
            connection = await _reconnect(plan.port, until, result)
            continue
        index += 1
        result.requests += 1
        if 200 <= status < 300:
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
        else:
            result.error(f"HTTP {status}")
    if connection is not None:
        connection.close()


async def _reconnect(port: int, until: float, result: WorkerResult) -> _Connection | None:
    while time.perf_counter() < until:
        try:
            return await _Connection.open(port)
        except OSError as exc:
            result.error(f"connect: {exc}")
            await asyncio.sleep(0.05)
    return None


async def _listen(stream: _EventStream, until: float, index: int, result: WorkerResult) -> None:
    """Count one SSE client's state events, and how long each took from its producer."""
    try:
        async with asyncio.timeout_at(until):
            while True:
                for name, data in await stream.events():
                    if name == "state":
                        result.sse_events[index] += 1
                        now_ms = time.time() * 1000
                        result.sse_delays_ms.append(now_ms - _STAMPED.decode(data).ts_ms)
    except TimeoutError:
        pass
    except _FAILURES as exc:
        result.error(f"SSE: {type(exc).__name__}: {exc}", stream=True)
    finally:
        stream.connection.close()


async def _work(plan: WorkerPlan, barrier: Barrier) -> WorkerResult:
    result = WorkerResult(sse_events=[0] * plan.sse)
    try:
        async with asyncio.timeout(_START_TIMEOUT_S):
            streams = [await _EventStream.open(plan.port) for _ in range(plan.sse)]
    except BaseException:
        barrier.abort()  # the other processes and the harness stop waiting at once
        raise
    await asyncio.to_thread(barrier.wait, _START_TIMEOUT_S)
    loop = asyncio.get_running_loop()
    started, cpu = time.perf_counter(), time.process_time()
    until = started + plan.seconds
    grace = loop.time() + plan.seconds + _SSE_GRACE_S
    listeners = [
        asyncio.create_task(_listen(stream, grace, index, result))
        for index, stream in enumerate(streams)
    ]
    await asyncio.gather(*(_client(plan, number, until, result) for number in range(plan.clients)))
    result.cpu_s = time.process_time() - cpu
    result.load_s = time.perf_counter() - started
    await asyncio.gather(*listeners)
    return result


def _worker(
    plan: WorkerPlan, barrier: Barrier, results: multiprocessing.Queue[WorkerResult]
) -> None:
    results.put(asyncio.run(_work(plan, barrier)))


# -- the server ---------------------------------------------------------------------------


class ServedTwin:
    """``twinflow serve`` as a subprocess: start, health, memory, CPU, stop."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "twinflow", "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def get(self, path: str) -> bytes:
        """The body of the answer to ``GET path``."""
        url = f"http://{HOST}:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body: bytes = response.read()
        return body

    def wait_caught_up(self, timeout_s: float = _START_TIMEOUT_S) -> float:
        """Wait until the server has read its topics; the seconds since it was started."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"twinflow serve exited ({self.proc.returncode}); see {self.log}"
                )
            try:
                if json.loads(self.get(f"{API}/health"))["caught_up"]:
                    return time.monotonic() - started
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        raise RuntimeError(f"twinflow serve did not catch up in {timeout_s:g} s; see {self.log}")

    def memory_mib(self) -> dict[str, float]:
        """Its RSS now and its peak RSS so far, in MiB."""
        kib = memory_kib(Path(f"/proc/{self.proc.pid}/status").read_text())
        return {"rss": kib["VmRSS"] / 1024, "hwm": kib["VmHWM"] / 1024}

    def cpu_s(self) -> float:
        """CPU seconds it has used, every thread included."""
        used = cpu_seconds(self.proc.pid)
        if used is None:
            raise RuntimeError(f"the server (pid {self.proc.pid}) has ended")
        return used

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended in time."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def server_env(settings: Settings, model: Path, topics: TopicSettings, port: int) -> dict[str, str]:
    """The server's environment: no inherited TWINFLOW_*, the bench's model, topics, port."""
    env = bench_env(settings, model)
    env.update(
        TWINFLOW_TOPICS__STATE=topics.state,
        TWINFLOW_TOPICS__ALARMS=topics.alarms,
        TWINFLOW_TOPICS__FEEDBACK=topics.feedback,
        TWINFLOW_TOPICS__COMMANDS=topics.commands,
        TWINFLOW_SERVE__PORT=str(port),
        # Metrics on, as in production, on a port no other twinflow process holds.
        TWINFLOW_METRICS__SERVE_PORT=str(_free_port()),
    )
    return env


def _machine_ticks() -> tuple[int, int]:
    return machine_cpu_ticks(Path("/proc/stat").read_text())


def busy_cores(seconds: float) -> float:
    """Cores busy on average over the next ``seconds``, whoever keeps them busy."""
    busy, total = _machine_ticks()
    time.sleep(seconds)
    busy_after, total_after = _machine_ticks()
    share = (busy_after - busy) / max(total_after - total, 1)
    return round(share * (os.cpu_count() or 1), 2)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


# -- the harness --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    """What to run."""

    entities: int = 1000
    clients: int = 50
    sse: int = 100
    seconds: float = 20.0
    change_rate: float = 200.0
    """State changes a second produced while the SSE clients listen."""
    processes: int = 1
    """Load generator processes."""
    out: Path | None = None
    seed: int = 1


@dataclass(frozen=True)
class Phase:
    """One measured load."""

    name: str
    endpoint: str
    paths: tuple[str, ...]
    sse: int = 0


@dataclass
class PhaseResult:
    """One phase's figures."""

    name: str
    endpoint: str
    clients: int
    sse_clients: int
    seconds: float
    requests: int
    requests_per_s: float
    requests_per_server_cpu_s: float
    """Requests per CPU second the server used: its rate on a core of its own, roughly."""
    errors: int
    error_samples: list[str]
    latency: dict[str, float]
    server_rss_mib: dict[str, float]
    """before, after and peak (sampled every 0.2 s) during the phase; hwm: since start."""
    cpu_cores: dict[str, float]
    """Cores busy on average: the server, the load processes, the harness, the machine."""
    sse: dict[str, Any] | None = None


class ChangeFeed(threading.Thread):
    """Produces changed states at a steady rate, entity after entity, for a while."""

    def __init__(
        self, settings: Settings, topic: str, states: list[TwinState], rate: float, seconds: float
    ) -> None:
        super().__init__(name="change-feed", daemon=True)
        self.producer = reliable_producer(settings.kafka, **{"linger.ms": 1})
        self.topic = topic
        self.states = list(states)
        self.schedule = LiveSchedule(rate, seconds)
        self.rng = np.random.default_rng(7)
        self.produced = 0
        self.failures: list[str] = []

    def run(self) -> None:
        for due, count in self.schedule.slices():
            self.schedule.wait(due)
            now_ms = time.time_ns() // 1_000_000
            for _ in range(count):
                index = self.produced % len(self.states)
                state = changed_state(self.states[index], now_ms, self.rng)
                self.states[index] = state
                self.producer.produce(
                    self.topic, encode(state), state.entity_id, on_delivery=self._report
                )
                self.produced += 1
            self.producer.poll(0)
        if self.producer.flush(30):
            self.failures.append("not every change was delivered within 30 s")

    def _report(self, error: Any, _message: Any) -> None:
        if error is not None:
            self.failures.append(str(error))


class ApiLoad:
    """One benchmark run: its model, topics, server and phases."""

    def __init__(self, settings: Settings, options: LoadOptions) -> None:
        self.settings = settings
        self.options = options
        self.run_id = uuid.uuid4().hex[:8]
        self.out = options.out or settings.state_dir / "bench" / STEM
        self.work = self.out / f"run-{self.run_id}"
        self.work.mkdir(parents=True, exist_ok=True)
        prefix = f"bench.api.{self.run_id}"
        self.topics = TopicSettings(
            state=f"{prefix}.state",
            alarms=f"{prefix}.alarms",
            feedback=f"{prefix}.feedback",
            commands=f"{prefix}.commands",
        )
        self.model_path = self.work / "model.yaml"
        raw = bench_model(options.entities)
        self.model = TwinModel.model_validate(raw)
        self.model_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.states: list[TwinState] = []
        self.alarms: list[Alarm] = []

    def produce(self) -> float:
        """Create the topics and produce every entity's state and the active alarms."""
        started = time.monotonic()
        wanted = {self.topics.state, self.topics.alarms}
        specs = [spec for spec in output_topics(self.topics) if spec.name in wanted]
        ensure_topics(self.settings.kafka, [*specs, *control_topics(self.topics)])
        now_ms = time.time_ns() // 1_000_000
        self.states, self.alarms = synthetic_records(self.model, now_ms, self.options.seed)
        producer = reliable_producer(self.settings.kafka)
        failures: list[str] = []

        def report(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        records = [(self.topics.alarms, a.entity_id, a) for a in self.alarms] + [
            (self.topics.state, s.entity_id, s) for s in self.states
        ]
        for topic, key, record in records:
            producer.produce(topic, encode(record), key, on_delivery=report)
            producer.poll(0)
        if producer.flush(60) or failures:
            raise RuntimeError(f"the states were not all produced: {failures[:3]}")
        return time.monotonic() - started

    def check(self, server: ServedTwin) -> dict[str, Any]:
        """What the server says it holds; refuse to measure a server that lacks the data."""
        plant_body = server.get(f"{API}/plant")
        entity_body = server.get(f"{API}/entities/{self.states[0].entity_id}")
        plant, entity = json.loads(plant_body), json.loads(entity_body)
        found = {
            "plant_entities": plant["entities"],
            "plant_active_alarms": plant["active_alarms"],
            "first_entity_status": entity["status"],
            "plant_bytes": len(plant_body),
            "entity_bytes": len(entity_body),
        }
        if (plant["entities"], plant["active_alarms"]) != (len(self.states), len(self.alarms)):
            raise RuntimeError(
                f"the server holds {found}, not {len(self.states)} entities and "
                f"{len(self.alarms)} active alarms"
            )
        return found

    def phases(self) -> list[Phase]:
        """Entities, the plant, then entities with SSE clients listening."""
        entities = tuple(f"{API}/entities/{entity.id}" for entity in self.model.entities)
        endpoint = f"{API}/entities/{{id}}"
        return [
            Phase("entities", endpoint, entities),
            Phase("plant", f"{API}/plant", (f"{API}/plant",)),
            Phase("entities under SSE", endpoint, entities, sse=self.options.sse),
        ]

    def plans(self, phase: Phase, port: int) -> list[WorkerPlan]:
        """The phase's clients and SSE clients, spread over the load processes."""
        count = self.options.processes
        clients, sse = self.options.clients, phase.sse
        plans = []
        for index in range(count):
            first = index * clients // count
            mine = (index + 1) * clients // count - first
            streams = (index + 1) * sse // count - index * sse // count
            plans.append(
                WorkerPlan(port, phase.paths, mine, first, clients, streams, self.options.seconds)
            )
        return plans

    def measure(self, server: ServedTwin, phase: Phase) -> tuple[PhaseResult, WorkerResult]:
        """Run one phase; its figures, and every worker's results merged."""
        workers, results = self._start_load(phase, server.port)
        usage = Usage(server)
        feed = None
        if phase.sse:
            feed = ChangeFeed(
                self.settings,
                self.topics.state,
                self.states,
                self.options.change_rate,
                self.options.seconds,
            )
            feed.start()
        usage.sample_until(self.options.seconds)
        rss, cpu = usage.figures()
        merged = _merge(_collect(results, workers))
        if feed is not None:
            feed.join()
            if feed.failures:
                raise RuntimeError(f"state changes were lost: {feed.failures[:3]}")
        # The clients' last answers come a little after the phase's end: rate and share
        # are over each process's own time to its last answer.
        cpu["load_generator"] = round(merged.cpu_s / merged.load_s, 2)
        result = PhaseResult(
            name=phase.name,
            endpoint=phase.endpoint,
            clients=self.options.clients,
            sse_clients=phase.sse,
            seconds=round(merged.load_s, 2),
            requests=merged.requests,
            requests_per_s=per_second(merged.requests, merged.load_s),
            requests_per_server_cpu_s=per_second(merged.requests, usage.server_cpu_s),
            errors=merged.errors,
            error_samples=merged.error_samples,
            latency=latency_summary(merged.latencies_ms),
            server_rss_mib=rss,
            cpu_cores=cpu,
            sse=None if feed is None else self._events(feed, merged),
        )
        return result, merged

    def _start_load(
        self, phase: Phase, port: int
    ) -> tuple[list[BaseProcess], multiprocessing.Queue[WorkerResult]]:
        """Start the load processes; return once every one is connected and subscribed."""
        context = multiprocessing.get_context("spawn")
        plans = self.plans(phase, port)
        barrier = context.Barrier(len(plans) + 1)
        results: multiprocessing.Queue[WorkerResult] = context.Queue()
        workers: list[BaseProcess] = [
            context.Process(target=_worker, args=(plan, barrier, results), daemon=True)
            for plan in plans
        ]
        for worker in workers:
            worker.start()
        barrier.wait(_START_TIMEOUT_S)
        return workers, results

    def _events(self, feed: ChangeFeed, merged: WorkerResult) -> dict[str, Any]:
        return {
            "changes_produced": feed.produced,
            "change_rate": self.options.change_rate,
            "events": events_summary(merged.sse_events, feed.produced),
            "streams_failed": merged.sse_failures,
            "delay": latency_summary(merged.sse_delays_ms),
        }


class Usage:
    """The server's memory and CPU, the harness's CPU and the machine's, from now on."""

    def __init__(self, server: ServedTwin) -> None:
        self.server = server
        self.before = server.memory_mib()
        self.peak = self.before["rss"]
        self.server_cpu_start, self.machine = server.cpu_s(), _machine_ticks()
        self.server_cpu_s = 0.0
        """CPU seconds the server used, once the figures are taken."""
        self.own_cpu = time.process_time()
        self.started = time.monotonic()

    def sample_until(self, seconds: float) -> None:
        """Sample the server's RSS every 0.2 s until ``seconds`` after the start."""
        while (left := self.started + seconds - time.monotonic()) > 0:
            time.sleep(min(_SAMPLE_S, left))
            self.peak = max(self.peak, self.server.memory_mib()["rss"])

    def figures(self) -> tuple[dict[str, float], dict[str, float]]:
        """Server RSS in MiB (before, after, peak, hwm) and cores busy since the start."""
        wall = time.monotonic() - self.started
        after = self.server.memory_mib()
        self.server_cpu_s = self.server.cpu_s() - self.server_cpu_start
        busy, total = (now - then for now, then in zip(_machine_ticks(), self.machine, strict=True))
        rss = {
            "before": round(self.before["rss"], 1),
            "after": round(after["rss"], 1),
            "peak": round(max(self.peak, after["rss"]), 1),
            "hwm": round(after["hwm"], 1),
        }
        cpu = {
            "server": round(self.server_cpu_s / wall, 2),
            "harness": round((time.process_time() - self.own_cpu) / wall, 2),
            "machine": round(busy / total * (os.cpu_count() or 1), 2),
        }
        return rss, cpu


def _collect(
    results: multiprocessing.Queue[WorkerResult], workers: Sequence[BaseProcess]
) -> list[WorkerResult]:
    """Every worker's result; a worker that died without one fails the phase."""
    found: list[WorkerResult] = []
    while len(found) < len(workers):
        try:
            found.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"a load process failed (exit code {dead[0].exitcode})"
                ) from None
    for worker in workers:
        worker.join(10)
    return found


def _merge(results: list[WorkerResult]) -> WorkerResult:
    merged = WorkerResult()
    for result in results:
        merged.requests += result.requests
        merged.errors += result.errors
        merged.sse_failures += result.sse_failures
        merged.error_samples.extend(result.error_samples)
        merged.latencies_ms.extend(result.latencies_ms)
        merged.sse_events.extend(result.sse_events)
        merged.sse_delays_ms.extend(result.sse_delays_ms)
        merged.cpu_s += result.cpu_s
        merged.load_s = max(merged.load_s, result.load_s)
    merged.error_samples = merged.error_samples[:_ERROR_SAMPLES]
    return merged


def run(options: LoadOptions, say: Callable[[str], None] = print) -> Path:
    """Set up, serve, load, report; the Markdown report's path."""
    settings = load_settings()
    bench = ApiLoad(settings, options)
    say(f"producing {options.entities:,} states to {bench.topics.state}")
    produce_s = bench.produce()
    say(f"  {len(bench.states):,} states, {len(bench.alarms)} alarms in {produce_s:.1f} s")
    port = _free_port()
    server = ServedTwin(
        server_env(settings, bench.model_path, bench.topics, port), port, bench.work / "serve.log"
    )
    distributions: dict[str, npt.NDArray[np.float64]] = {}
    phases = []
    try:
        caught_up_s = server.wait_caught_up()
        checks = bench.check(server)
        idle = server.memory_mib()
        # The machine is shared: what else keeps it busy belongs in the report.
        server_cpu = server.cpu_s()
        background = busy_cores(_BACKGROUND_S)
        idle_cpu = (server.cpu_s() - server_cpu) / _BACKGROUND_S
        say(f"twinflow serve on port {port} caught up in {caught_up_s:.1f} s: {checks}")
        for phase in bench.phases():
            say(f"phase {phase.name}: {options.clients} clients, {phase.sse} SSE clients")
            result, merged = bench.measure(server, phase)
            phases.append(asdict(result))
            distributions[phase.name] = np.asarray(merged.latencies_ms)
            if phase.sse:
                distributions["SSE delivery (produce to receive)"] = np.asarray(
                    merged.sse_delays_ms
                )
            say(
                f"  {result.requests_per_s:,.0f} req/s, p99 {result.latency.get('p99_ms')} ms, "
                f"{result.errors} errors, server CPU {result.cpu_cores['server']} cores"
            )
    finally:
        server.stop()
    document = {
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "options": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in asdict(options).items()
        },
        "run": bench.run_id,
        "topics": {"state": bench.topics.state, "alarms": bench.topics.alarms},
        "setup": {
            "entities": len(bench.states),
            "active_alarms": len(bench.alarms),
            "produce_s": round(produce_s, 2),
            "caught_up_s": round(caught_up_s, 2),
            "idle_rss_mib": round(idle["rss"], 1),
            "background_cores": background,
            "idle_server_cores": round(idle_cpu, 2),
            "checks": checks,
        },
        "phases": phases,
        "targets": targets(phases),
    }
    _, report = write_results(bench.out, STEM, document, markdown(document))
    chart(distributions, bench.out / f"{STEM}.png", document)
    return report


# -- the report ---------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def markdown(document: dict[str, Any]) -> str:
    """The report: setup, one row per phase, SSE delivery, targets."""
    machine, setup, options = document["machine"], document["setup"], document["options"]
    lines = [
        "# twinflow serve: API load",
        "",
        f"{document['created']}, {machine['cpus']} CPUs, Python {machine['python']}. "
        f"The server, the load generator ({options['processes']} process(es), raw HTTP/1.1 "
        "keep-alive over asyncio), Kafka and QuestDB all share these "
        f"{machine['cpus']} cores: the CPU columns say who used how much (cores busy on "
        "average; machine = all processes). Before the load, with the server idle, the "
        f"machine was already {setup['background_cores']:.2f} cores busy "
        f"({setup['idle_server_cores']:.2f} of them the server's).",
        "",
        f"Plant: {setup['entities']:,} entities ({setup['active_alarms']} with an active "
        f"alarm); the server read them in {setup['caught_up_s']:.1f} s from start and then "
        f"held {setup['idle_rss_mib']:.0f} MiB. Answers: /plant "
        f"{setup['checks']['plant_bytes']:,} bytes, /entities/{{id}} "
        f"{setup['checks']['entity_bytes']:,} bytes. Each phase: {options['clients']} "
        f"closed-loop clients for {options['seconds']:g} s. No state changes during the "
        "first two, so /plant is the server's cached encoding of the tree throughout.",
        "",
        "| phase | endpoint | SSE clients | requests | req/s | req per server CPU s | p50 ms "
        "| p90 ms | p99 ms | max ms | errors | server RSS MiB before / after / peak "
        "| CPU server | CPU load gen | CPU machine |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for phase in document["phases"]:
        latency, rss, cpu = phase["latency"], phase["server_rss_mib"], phase["cpu_cores"]
        lines.append(
            f"| {phase['name']} | `{phase['endpoint']}` | {phase['sse_clients']} "
            f"| {phase['requests']:,} | {phase['requests_per_s']:,.0f} "
            f"| {phase['requests_per_server_cpu_s']:,.0f} "
            f"| {_ms(latency.get('p50_ms'))} | {_ms(latency.get('p90_ms'))} "
            f"| {_ms(latency.get('p99_ms'))} | {_ms(latency.get('max_ms'))} "
            f"| {phase['errors']} | {rss['before']:.0f} / {rss['after']:.0f} / {rss['peak']:.0f} "
            f"| {cpu['server']:.2f} | {cpu['load_generator']:.2f} | {cpu['machine']:.2f} |"
        )
    lines += _sse_lines(document["phases"])
    errors = [p for p in document["phases"] if p["error_samples"]]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {p['name']}: {'; '.join(p['error_samples'])}" for p in errors]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---:|---|"]
    for target in document["targets"]:
        measured = target["measured"]
        shown = "-" if measured is None else f"{measured:,.1f}"
        lines.append(f"| {target['target']} | {shown} | {'yes' if target['met'] else '**no**'} |")
    lines.append("")
    return "\n".join(lines)


def _sse_lines(phases: list[dict[str, Any]]) -> list[str]:
    lines = []
    for phase in phases:
        sse = phase["sse"]
        if not sse:
            continue
        events, delay = sse["events"], sse["delay"]
        lines += [
            "",
            f'## Events during "{phase["name"]}"',
            "",
            f"{sse['changes_produced']:,} state changes produced at {sse['change_rate']:g}/s, "
            f"each one event to each of {events['clients']} clients: per client "
            f"{events['min']:,} / {events['mean']:,} / {events['max']:,} (min / mean / max) of "
            f"{events['expected_per_client']:,} expected, {events['delivered_share']:.1%} "
            f"delivered; {sse['streams_failed']} streams broke or were ended by the server "
            f"before the end. Produce to receive: p50 {_ms(delay.get('p50_ms'))} ms, "
            f"p99 {_ms(delay.get('p99_ms'))} ms, max {_ms(delay.get('max_ms'))} ms.",
        ]
    return lines


def chart(distributions: dict[str, npt.NDArray[np.float64]], path: Path, document: Any) -> None:
    """The latency distribution of every phase (and SSE delivery) as a CDF, log time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in distributions.items():
        if not values.size:
            continue
        ordered = np.sort(values)
        share = np.arange(1, ordered.size + 1) / ordered.size
        style = "--" if name.startswith("SSE") else "-"
        ax.plot(ordered, share * 100, style, label=f"{name} (n={ordered.size:,})")
    ax.axvline(TARGET_P99_MS, color="#999999", linewidth=0.8)
    ax.axhline(99, color="#999999", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("share of requests at or below (%)")
    ax.set_title(
        f"twinflow serve, {document['setup']['entities']:,} entities, "
        f"{document['options']['clients']} clients, {document['machine']['cpus']} CPUs"
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Parse the options and run the benchmark."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api_load", description=__doc__)
    defaults = LoadOptions()
    parser.add_argument("--entities", type=int, default=defaults.entities)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--sse", type=int, default=defaults.sse, help="SSE clients")
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="per phase")
    parser.add_argument(
        "--change-rate", type=float, default=defaults.change_rate, help="states/s during SSE"
    )
    parser.add_argument(
        "--processes", type=int, default=defaults.processes, help="load generator processes"
    )
    parser.add_argument("--out", type=Path, default=None, help="default STATE_DIR/bench/api_load")
    args = parser.parse_args(argv)
    if min(args.entities, args.clients, args.processes) < 1 or args.sse < 0:
        parser.error("entities, clients and processes must be at least 1, sse at least 0")
    if args.clients < args.processes:
        parser.error("need at least one client per process")
    options = LoadOptions(
        entities=args.entities,
        clients=args.clients,
        sse=args.sse,
        seconds=args.seconds,
        change_rate=args.change_rate,
        processes=args.processes,
        out=args.out,
    )
    report = run(options, lambda text: print(text, flush=True))
    print(f"written {report}")


if __name__ == "__main__":
    # Run as benchmarks.api_load rather than __main__: the spawned load processes find
    # their plan's classes, and send back their results, under the module's real name.
    from benchmarks.api_load import main as _main

    _main()
