"""What the field-bridge benchmarks (OPC UA, Modbus, CoAP) share.

A run: a fresh topic, the simulator's server in a process of its own, the bridge in a
thread of this one producing to that topic. Once the bridge has forwarded every first
value, the server is let go; after a warm-up a window of ``duration_s`` is measured:
messages produced (from the topic's offsets, so counting costs the bridge nothing),
values the server wrote, CPU of each side. Then the server pauses, what is in flight
drains, and the totals say what of the whole run reached Kafka. The topic is deleted.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.kafka import TopicSpec, client_config, ensure_topics
from twinflow.services.process import cpu_seconds
from twinflow.settings import Settings
from twinflow.sim.samples import Sample
from twinflow.twin_model import TwinModel

WARMUP_S = 3.0
DRAIN_S = 5.0
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Gates:
    """How the benchmark steers its server process: started, go, pause writing, stop."""

    ready: ProcessEvent
    go: ProcessEvent
    pause: ProcessEvent
    stop: ProcessEvent


@dataclass(frozen=True)
class Measured:
    """A run's figures: the measured window's, then the whole run's after the drain."""

    elapsed_s: float
    produced: int
    """Messages the bridge produced during the window."""
    written: int
    """Values the server wrote during the window (0 for a server that does not count)."""
    server_cpu_cores: float
    bridge_cpu_cores: float
    total_written: int
    total_produced: int
    """Messages produced over the whole run, the first values excluded."""


async def write_ticks(
    publish: Callable[[Sample], Awaitable[None]],
    sensors: Mapping[str, Sequence[str]],
    rate: float | None,
    gates: Gates,
    written: Synchronized[int],
    modulo: int,
) -> None:
    """Write every sensor once per tick: tick 0, then flat out or at ``rate`` values/s.

    Tick 0 is what the bridge finds when it subscribes or registers; only once it has,
    is every write one the bridge must forward. Writing stops at ``pause``; serving goes
    on until ``stop``, so the bridge can fetch everything written.
    """
    values_per_tick = sum(map(len, sensors.values()))
    last_ts = 0

    async def write(tick: int) -> None:
        nonlocal last_ts
        # Distinct timestamps per tick, even when ticks come faster than 1 ms.
        ts_ms = last_ts = max(time.time_ns() // 1_000_000, last_ts + 1)
        for entity_id, names in sensors.items():
            values = {name: float((tick + index) % modulo) for index, name in enumerate(names)}
            await publish(Sample(entity_id, ts_ms, values))

    await write(0)
    gates.ready.set()
    while not gates.go.is_set():
        await asyncio.sleep(0.05)
    started, tick = time.monotonic(), 1
    while not gates.pause.is_set():
        if rate is not None:
            delay = started + tick * values_per_tick / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await write(tick)
        tick += 1
        with written.get_lock():
            written.value += values_per_tick
    while not gates.stop.is_set():
        await asyncio.sleep(0.1)


def produced(consumer: Consumer, topic: str, partitions: int) -> int:
    """Messages in ``topic`` (the sum of its partitions' high watermarks)."""
    return sum(
        consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
        for partition in range(partitions)
    )


def _cpu_seconds(pid: int) -> float:
    used = cpu_seconds(pid)
    if used is None:
        raise RuntimeError(f"the server (pid {pid}) ended during the measurement")
    return used


def run(
    settings: Settings,
    kind: str,
    model: TwinModel,
    bridge: Callable[[Settings, TwinModel, threading.Event], None],
    serve: Callable[..., None],
    serve_args: tuple[Any, ...],
    first_values: int,
    duration_s: float,
    settings_update: Mapping[str, Any] | None = None,
) -> Measured:
    """Run ``serve(*serve_args, gates, written)`` and ``bridge``; measure (see the module doc).

    ``first_values``: messages the bridge forwards before the server is let go.
    """
    topic = f"bench.{kind}.{uuid.uuid4().hex[:10]}"
    partitions = settings.topics.raw_partitions
    ensure_topics(settings.kafka, [TopicSpec(topic, partitions)])
    bench = settings.model_copy(
        update={
            "topics": settings.topics.model_copy(update={"raw": topic}),
            **(settings_update or {}),
        }
    )
    context = multiprocessing.get_context("spawn")
    gates = Gates(*(context.Event() for _ in range(4)))
    written = context.Value("q", 0)
    server = context.Process(target=serve, args=(*serve_args, gates, written))
    stop_bridge = threading.Event()
    failures: list[BaseException] = []

    def forward() -> None:
        try:
            bridge(bench, model, stop_bridge)
        except BaseException as exc:
            failures.append(exc)

    bridging = threading.Thread(target=forward)
    consumer = Consumer(client_config(settings.kafka, **{"group.id": f"bench-{uuid.uuid4()}"}))
    server.start()
    try:
        if not gates.ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the {kind} server did not start within {START_TIMEOUT_S:g} s")
        bridging.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while (first := produced(consumer, topic, partitions)) < first_values:
            if time.monotonic() > deadline or failures:
                raise RuntimeError(f"the bridge forwarded {first} of {first_values} first values")
            time.sleep(0.2)
        gates.go.set()
        time.sleep(WARMUP_S)
        assert server.pid is not None
        written_from, produced_from = written.value, produced(consumer, topic, partitions)
        server_cpu_from, bridge_cpu_from = _cpu_seconds(server.pid), time.process_time()
        started = time.monotonic()
        time.sleep(duration_s)
        elapsed = time.monotonic() - started
        written_to, produced_to = written.value, produced(consumer, topic, partitions)
        server_cpu = (_cpu_seconds(server.pid) - server_cpu_from) / elapsed
        bridge_cpu = (time.process_time() - bridge_cpu_from) / elapsed
        gates.pause.set()
        # What is still queued or in flight arrives now; then every write is accounted for.
        time.sleep(DRAIN_S)
        total_written = written.value
        total_produced = produced(consumer, topic, partitions) - first
        stop_bridge.set()
        bridging.join(60)
    finally:
        gates.pause.set()
        gates.stop.set()
        stop_bridge.set()
        server.join(10)
        if server.is_alive():
            server.kill()
            server.join(10)
        consumer.close()
        admin = AdminClient(client_config(settings.kafka))
        for deleted in admin.delete_topics([topic]).values():
            deleted.result(30)
    if failures:
        raise failures[0]
    return Measured(
        elapsed_s=elapsed,
        produced=produced_to - produced_from,
        written=written_to - written_from,
        server_cpu_cores=round(server_cpu, 2),
        bridge_cpu_cores=round(bridge_cpu, 2),
        total_written=total_written,
        total_produced=total_produced,
    )
