"""Readings per second through simulated Modbus devices -> Modbus bridge -> Kafka.

    .venv/bin/python -m benchmarks.modbus_bridge_throughput [--devices N] [--sensors S]
        [--servers K] [--poll-interval SECONDS] [--duration SECONDS] [--out DIR]

Needs the local services (``twinflow up``). N devices of S sensors each (half float32
holding registers, half int16 input registers in tenths, so one poll is two reads) sit
behind K Modbus TCP servers on loopback, in a process of their own that writes new
values every 50 ms; the bridge runs here, polls each device every ``--poll-interval``
and produces to a fresh topic, deleted afterwards. Readings are counted from the topic's
offsets, so counting costs the bridge nothing. The figure is what the bridge forwards;
``polls_per_s`` against ``target_polls_per_s`` says whether it kept up (a poll that
overruns its interval is followed at once, so an overloaded bridge polls slower, it
does not queue).

Writes ``modbus_bridge_throughput.json`` and ``.md`` under STATE_DIR/bench/modbus_bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from benchmarks.results import write_results
from connectors.kafka import TopicSpec, client_config, ensure_topics
from twinflow.bridges import modbus as bridge
from twinflow.bridges.modbus_codec import polled_devices
from twinflow.settings import Settings, load_settings
from twinflow.sim.modbus_server import PlantModbusServer
from twinflow.sim.samples import Sample
from twinflow.twin_model import TwinModel, load_twin_model

WARMUP_S = 3.0
DRAIN_S = 3.0
TICK_S = 0.05


def plant(devices: int, sensors: int, ports: list[int], poll_interval_s: float) -> dict[str, Any]:
    """A twin model of ``devices`` machines of ``sensors`` sensors behind ``ports``.

    >>> document = plant(3, 4, [5020, 5021], 0.1)
    >>> [(e["modbus"]["port"], e["modbus"]["unit_id"]) for e in document["entities"]]
    [(5020, 1), (5021, 1), (5020, 2)]
    >>> model = TwinModel.model_validate(document)
    >>> layout = model.modbus_layout(model.entities[0])
    >>> [(layout[name].kind, layout[name].address) for name in sorted(layout)]
    [('holding', 0), ('holding', 2), ('input', 0), ('input', 1)]
    """
    names = [f"s{index:02d}" for index in range(sensors)]
    floats = names[: (sensors + 1) // 2]
    layout = {
        name: (
            {"kind": "holding", "address": 2 * index, "type": "float32"}
            if name in floats
            else {
                "kind": "input",
                "address": index - len(floats),
                "type": "int16",
                "scale": 0.1,
            }
        )
        for index, name in enumerate(names)
    }
    spec = {"unit": "V", "range": [-1e6, 1e6], "max_rate": 1e9, "stuck_after_s": 3600}
    return {
        "version": 1,
        "asset_types": {
            "machine": {"sensors": {name: dict(spec) for name in names}, "modbus": layout}
        },
        "entities": [
            {
                "id": f"dev-{index:04d}",
                "type": "machine",
                "site": "bench",
                "line": "modbus",
                "modbus": {
                    "host": "127.0.0.1",
                    "port": ports[index % len(ports)],
                    "unit_id": 1 + index // len(ports),
                    "poll_interval_s": poll_interval_s,
                },
            }
            for index in range(devices)
        ],
    }


def _serve(model_file: Path, gates: tuple[ProcessEvent, ProcessEvent]) -> None:
    ready, stop = gates
    logging.basicConfig(level=logging.WARNING)
    model = load_twin_model(model_file)
    sensors = {entity.id: list(model.sensors_of(entity.id)) for entity in model.entities}

    async def publish() -> None:
        async with PlantModbusServer(model, list(sensors)) as server:
            tick = 0
            started = time.monotonic()
            while not stop.is_set():
                ts_ms = time.time_ns() // 1_000_000
                for entity_id, names in sensors.items():
                    values = {name: float((tick + i) % 1000) for i, name in enumerate(names)}
                    await server.publish(Sample(entity_id, ts_ms, values))
                if tick == 0:
                    ready.set()
                tick += 1
                await asyncio.sleep(max(0.0, started + tick * TICK_S - time.monotonic()))

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


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def measure(
    settings: Settings,
    devices: int,
    sensors: int,
    servers: int,
    poll_interval_s: float,
    duration_s: float,
) -> dict[str, Any]:
    """Run servers and bridge for ``duration_s`` after a warm-up; return the figures."""
    *ports, metrics_port = _free_ports(servers + 1)
    folder = Path(tempfile.mkdtemp(prefix="modbus-bench-"))
    model_file = folder / "plant.yaml"
    model_file.write_text(yaml.safe_dump(plant(devices, sensors, ports, poll_interval_s)))
    model: TwinModel = load_twin_model(model_file)
    topic = f"bench.modbus.{uuid.uuid4().hex[:10]}"
    partitions = settings.topics.raw_partitions
    ensure_topics(settings.kafka, [TopicSpec(topic, partitions)])
    bench = settings.model_copy(
        update={
            "topics": settings.topics.model_copy(update={"raw": topic}),
            "metrics": settings.metrics.model_copy(update={"modbus_bridge_port": metrics_port}),
        }
    )
    context = multiprocessing.get_context("spawn")
    ready, stop_server = context.Event(), context.Event()
    server = context.Process(target=_serve, args=(model_file, (ready, stop_server)))
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
            raise RuntimeError("the Modbus servers did not start within 60 s")
        bridging.start()
        deadline = time.monotonic() + 60
        while _produced(consumer, topic, partitions) < devices * sensors:
            if time.monotonic() > deadline or failures:
                raise RuntimeError("the bridge did not forward a first poll of every device")
            time.sleep(0.2)
        time.sleep(WARMUP_S)
        assert server.pid is not None
        produced_from = _produced(consumer, topic, partitions)
        server_cpu_from, bridge_cpu_from = _cpu_s(server.pid), time.process_time()
        started = time.monotonic()
        time.sleep(duration_s)
        elapsed = time.monotonic() - started
        produced_to = _produced(consumer, topic, partitions)
        server_cpu = (_cpu_s(server.pid) - server_cpu_from) / elapsed
        bridge_cpu = (time.process_time() - bridge_cpu_from) / elapsed
        stop_bridge.set()
        bridging.join(60)
        time.sleep(DRAIN_S)
    finally:
        stop_bridge.set()
        stop_server.set()
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
    readings_per_s = (produced_to - produced_from) / elapsed
    return {
        "benchmark": "modbus_bridge_throughput",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "readings_per_s": round(readings_per_s, 1),
        "target_readings_per_s": round(devices * sensors / poll_interval_s, 1),
        "polls_per_s": round(readings_per_s / sensors, 1),
        "target_polls_per_s": round(devices / poll_interval_s, 1),
        "measured_s": round(elapsed, 2),
        "devices": devices,
        "sensors_per_device": sensors,
        "reads_per_poll": len(polled_devices(model, settings.modbus)[0].reads),
        "servers": servers,
        "poll_interval_s": poll_interval_s,
        "server_cpu_cores": round(server_cpu, 2),
        "bridge_cpu_cores": round(bridge_cpu, 2),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    rows = "\n".join(f"| {name} | {value} |" for name, value in report.items())
    return (
        "# Modbus bridge throughput\n\n"
        f"{report['devices']} devices x {report['sensors_per_device']} sensors behind "
        f"{report['servers']} Modbus TCP servers on loopback, polled every "
        f"{report['poll_interval_s']} s, into Kafka.\n\n"
        "| figure | value |\n|---|---|\n" + rows + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figure and write the JSON and Markdown reports."""
    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=50, help="simulated devices")
    parser.add_argument("--sensors", type=int, default=10, help="sensors per device")
    parser.add_argument("--servers", type=int, default=5, help="Modbus TCP servers")
    parser.add_argument(
        "--poll-interval", type=float, default=0.05, help="seconds between polls of a device"
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured")
    parser.add_argument(
        "--out",
        type=Path,
        default=settings.state_dir / "bench" / "modbus_bridge",
        help="folder of the JSON and Markdown reports",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    report = measure(
        settings, args.devices, args.sensors, args.servers, args.poll_interval, args.duration
    )
    data, text = write_results(args.out, "modbus_bridge_throughput", report, markdown(report))
    print(
        f"Modbus -> Kafka: {report['readings_per_s']:,.0f} readings/s from {args.devices} "
        f"devices ({report['polls_per_s']:,.0f} of {report['target_polls_per_s']:,.0f} polls/s) "
        f"-> {data}, {text}",
        file=sys.stdout,
    )


if __name__ == "__main__":
    main()
