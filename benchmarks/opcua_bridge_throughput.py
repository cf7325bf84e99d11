"""Readings per second through simulator OPC UA server -> OPC UA bridge -> Kafka.

    .venv/bin/python -m benchmarks.opcua_bridge_throughput [--rate VALUES_PER_S] [--out FILE]

Needs the local services (``twinflow up``). The server runs in a process of its own and
writes every variable of the plant once per tick, flat out or at ``--rate`` values/s;
the bridge runs here and produces to a fresh topic, which is deleted afterwards.
Readings are counted from the topic's offsets, so counting costs the bridge nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import socket
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.kafka import TopicSpec, client_config, ensure_topics
from twinflow.bridges import opcua as bridge
from twinflow.settings import OpcUaSettings, Settings, load_settings
from twinflow.sim.opcua_server import PlantOpcUaServer
from twinflow.sim.samples import Sample
from twinflow.twin_model import load_twin_model

WARMUP_S = 3.0
DRAIN_S = 5.0


def _serve(
    opcua: OpcUaSettings,
    model_file: Path,
    rate: float | None,
    gates: tuple[ProcessEvent, ProcessEvent, ProcessEvent, ProcessEvent],
    written: Synchronized[int],
) -> None:
    ready, go, pause, stop = gates
    logging.basicConfig(level=logging.WARNING)
    model = load_twin_model(model_file)
    sensors = {entity.id: list(model.sensors_of(entity.id)) for entity in model.entities}
    variables = sum(map(len, sensors.values()))

    async def publish() -> None:
        async with PlantOpcUaServer(opcua, model, list(sensors)) as server:
            last_ts = 0

            async def write(tick: int) -> None:
                nonlocal last_ts
                # Distinct timestamps per tick, even when ticks come faster than 1 ms.
                ts_ms = last_ts = max(time.time_ns() // 1_000_000, last_ts + 1)
                for entity_id, names in sensors.items():
                    values = {
                        name: float((tick + index) % 1000) for index, name in enumerate(names)
                    }
                    await server.publish(Sample(entity_id, ts_ms, values))

            # Tick 0 is what the bridge reads when it subscribes; only once it has, is
            # every write a notification the bridge must forward.
            await write(0)
            ready.set()
            while not go.is_set():
                await asyncio.sleep(0.05)
            started, tick = time.monotonic(), 1
            while not pause.is_set():
                if rate is not None:
                    delay = started + tick * variables / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await write(tick)
                tick += 1
                with written.get_lock():
                    written.value += variables
            # Keep serving until the bridge has fetched everything written.
            while not stop.is_set():
                await asyncio.sleep(0.1)

    asyncio.run(publish())


def _produced(consumer: Consumer, topic: str, partitions: int) -> int:
    return sum(
        consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
        for partition in range(partitions)
    )


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure(settings: Settings, rate: float | None, duration_s: float) -> dict[str, Any]:
    """Run server and bridge for ``duration_s`` after a warm-up; return the figures."""
    model = load_twin_model(settings.twin_model)
    topic = f"bench.opcua.{uuid.uuid4().hex[:10]}"
    partitions = settings.topics.raw_partitions
    ensure_topics(settings.kafka, [TopicSpec(topic, partitions)])
    bench = settings.model_copy(
        update={
            "topics": settings.topics.model_copy(update={"raw": topic}),
            "opcua": settings.opcua.model_copy(
                update={"endpoint": f"opc.tcp://127.0.0.1:{_free_port()}/twinflow/"}
            ),
        }
    )
    context = multiprocessing.get_context("spawn")
    ready, go, pause_server, stop_server = (context.Event() for _ in range(4))
    written = context.Value("q", 0)
    server = context.Process(
        target=_serve,
        args=(
            bench.opcua,
            bench.twin_model,
            rate,
            (ready, go, pause_server, stop_server),
            written,
        ),
    )
    stop_bridge = threading.Event()
    failures: list[BaseException] = []

    def forward() -> None:
        try:
            bridge.run(bench, model, stop_bridge)
        except BaseException as exc:
            failures.append(exc)

    bridging = threading.Thread(target=forward)
    consumer = Consumer(client_config(settings.kafka, **{"group.id": f"bench-{uuid.uuid4()}"}))
    server.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the OPC UA server did not start within 60 s")
        bridging.start()
        variables = sum(len(model.sensors_of(entity.id)) for entity in model.entities)
        deadline = time.monotonic() + 60
        while (subscribed := _produced(consumer, topic, partitions)) < variables:
            if time.monotonic() > deadline or failures:
                raise RuntimeError(f"the bridge forwarded {subscribed} of {variables} first values")
            time.sleep(0.2)
        go.set()
        time.sleep(WARMUP_S)
        assert server.pid is not None
        offered_from, produced_from = written.value, _produced(consumer, topic, partitions)
        server_cpu_from, bridge_cpu_from = _cpu_s(server.pid), time.process_time()
        started = time.monotonic()
        time.sleep(duration_s)
        elapsed = time.monotonic() - started
        offered_to, produced_to = written.value, _produced(consumer, topic, partitions)
        server_cpu = (_cpu_s(server.pid) - server_cpu_from) / elapsed
        bridge_cpu = (time.process_time() - bridge_cpu_from) / elapsed
        pause_server.set()
        # What is still queued or in flight arrives now; then every write is accounted for.
        time.sleep(DRAIN_S)
        total_offered = written.value
        total_produced = _produced(consumer, topic, partitions) - subscribed
        stop_bridge.set()
        bridging.join(60)
    finally:
        pause_server.set()
        stop_server.set()
        stop_bridge.set()
        if server.is_alive():
            server.kill()
        server.join(10)
        consumer.close()
        admin = AdminClient(client_config(settings.kafka))
        for deleted in admin.delete_topics([topic]).values():
            deleted.result(30)
    if failures:
        raise failures[0]
    return {
        "benchmark": "opcua_bridge_throughput",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "readings_per_s": round((produced_to - produced_from) / elapsed, 1),
        "offered_values_per_s": round((offered_to - offered_from) / elapsed, 1),
        "target_rate": rate,
        "measured_s": round(elapsed, 2),
        "total_written": total_offered,
        "total_produced": total_produced,
        "lost": total_offered - total_produced,
        "server_cpu_cores": round(server_cpu, 2),
        "bridge_cpu_cores": round(bridge_cpu, 2),
        "variables": variables,
        "entities": len(model.entities),
        "publishing_interval_ms": settings.opcua.publishing_interval_ms,
        "queue_size": settings.opcua.queue_size,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figure and write the JSON report."""
    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rate", type=float, default=None, help="values/s the server writes (default: flat out)"
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured")
    parser.add_argument(
        "--out",
        type=Path,
        default=settings.state_dir / "bench" / "opcua_bridge_throughput.json",
        help="JSON report",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    report = measure(settings, args.rate, args.duration)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"OPC UA -> Kafka: {report['readings_per_s']:,.0f} readings/s "
        f"(server wrote {report['offered_values_per_s']:,.0f} values/s; "
        f"{report['lost']:,} of {report['total_written']:,} writes not in Kafka) -> {args.out}",
        file=sys.stdout,
    )


if __name__ == "__main__":
    main()
