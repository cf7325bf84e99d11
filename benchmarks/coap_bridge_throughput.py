"""Readings per second through simulated CoAP devices -> CoAP bridge -> Kafka.

    .venv/bin/python -m benchmarks.coap_bridge_throughput [--devices N] [--form sensor|telemetry]
        [--rate VALUES_PER_S] [--duration S] [--out FOLDER]

Needs the local services (``twinflow up``). N pumps, each a CoAP device of its own on
127.0.0.1, serve their five sensors as observable resources (``sensor``: one number
per resource; ``telemetry``: one JSON body per device). A process of its own publishes
every device's sample once per tick, flat out or at ``--rate`` values/s; the bridge
runs here and produces to a fresh topic, which is deleted afterwards. Readings are
counted from the topic's offsets, so counting costs the bridge nothing.

CoAP observation carries a resource's latest state, not every change (RFC 7641): a
value replaced before its notification went out is never sent. The report counts those
as ``superseded``; they are not losses of the bridge. Results: ``<out>/coap_bridge.json``
and ``.md`` (default ``STATE_DIR/bench/coap_bridge``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import platform
import socket
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any, Literal

import yaml
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from benchmarks.results import write_results
from connectors.kafka import TopicSpec, client_config, ensure_topics
from twinflow.bridges import coap as bridge
from twinflow.settings import Settings, load_settings
from twinflow.sim.coap_server import PlantCoapServer
from twinflow.sim.samples import Sample
from twinflow.twin_model import load_twin_model

WARMUP_S = 3.0
DRAIN_S = 5.0
STEM = "coap_bridge"
Form = Literal["sensor", "telemetry"]


def _free_udp_ports(count: int) -> list[int]:
    # Below the ephemeral range: the bridge's own client socket takes a port from it.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    found: list[int] = []
    for port in range(max(1024, low - 12_000), low):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError("no free UDP ports below the ephemeral range")


def write_model(settings: Settings, folder: Path, devices: int, form: Form) -> Path:
    """A twin model of ``devices`` pumps of the configured plant, each its own device."""
    document = yaml.safe_load(settings.twin_model.read_text())
    pump = document["asset_types"]["pump"]
    pump["coap"] = {sensor: {"path": sensor} for sensor in pump["sensors"]}
    ports = _free_udp_ports(devices)
    document["entities"] = [
        {
            "id": f"pump-{index:04d}",
            "type": "pump",
            "site": "bench",
            "line": "coap",
            "coap": {"host": "127.0.0.1", "port": port}
            | ({"telemetry": "telemetry"} if form == "telemetry" else {}),
        }
        for index, port in enumerate(ports)
    ]
    path = folder / "plant.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _serve(
    model_file: Path,
    rate: float | None,
    gates: tuple[ProcessEvent, ProcessEvent, ProcessEvent, ProcessEvent],
    written: Synchronized[int],
) -> None:
    ready, go, pause, stop = gates
    logging.basicConfig(level=logging.WARNING)
    model = load_twin_model(model_file)
    sensors = {entity.id: list(model.sensors_of(entity.id)) for entity in model.entities}
    values_per_tick = sum(map(len, sensors.values()))

    async def publish() -> None:
        async with PlantCoapServer(model, list(sensors)) as server:
            last_ts = 0

            async def write(tick: int) -> None:
                nonlocal last_ts
                # Distinct timestamps (and so ETags) per tick, even faster than 1 ms.
                ts_ms = last_ts = max(time.time_ns() // 1_000_000, last_ts + 1)
                for entity_id, names in sensors.items():
                    values = {name: float((tick + index) % 100) for index, name in enumerate(names)}
                    await server.publish(Sample(entity_id, ts_ms, values))

            # Tick 0 is what the bridge finds when it registers.
            await write(0)
            ready.set()
            while not go.is_set():
                await asyncio.sleep(0.05)
            started, tick = time.monotonic(), 1
            while not pause.is_set():
                if rate is not None:
                    delay = started + tick * values_per_tick / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await write(tick)
                tick += 1
                with written.get_lock():
                    written.value += values_per_tick
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


def measure(
    settings: Settings, devices: int, form: Form, rate: float | None, duration_s: float
) -> dict[str, Any]:
    """Run servers and bridge for ``duration_s`` after a warm-up; return the figures."""
    topic = f"bench.coap.{uuid.uuid4().hex[:10]}"
    partitions = settings.topics.raw_partitions
    ensure_topics(settings.kafka, [TopicSpec(topic, partitions)])
    with tempfile.TemporaryDirectory() as folder:
        model_file = write_model(settings, Path(folder), devices, form)
        model = load_twin_model(model_file)
        bench = settings.model_copy(
            update={"topics": settings.topics.model_copy(update={"raw": topic})}
        )
        resources = sum(len(bridge.resources_of(model, entity)) for entity in model.entities)
        per_message = len(model.sensors_of(model.entities[0].id)) if form == "telemetry" else 1
        context = multiprocessing.get_context("spawn")
        ready, go, pause_server, stop_server = (context.Event() for _ in range(4))
        written = context.Value("q", 0)
        server = context.Process(
            target=_serve,
            args=(model_file, rate, (ready, go, pause_server, stop_server), written),
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
                raise RuntimeError("the CoAP servers did not start within 60 s")
            bridging.start()
            deadline = time.monotonic() + 60
            while (registered := _produced(consumer, topic, partitions)) < resources:
                if time.monotonic() > deadline or failures:
                    raise RuntimeError(
                        f"the bridge forwarded {registered} of {resources} first values"
                    )
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
            # What is still in flight arrives now; then every write is accounted for.
            time.sleep(DRAIN_S)
            total_written = written.value
            total_readings = (_produced(consumer, topic, partitions) - registered) * per_message
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
        "benchmark": "coap_bridge_throughput",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "form": form,
        "devices": devices,
        "resources": resources,
        "readings_per_s": round((produced_to - produced_from) * per_message / elapsed, 1),
        "messages_per_s": round((produced_to - produced_from) / elapsed, 1),
        "offered_values_per_s": round((offered_to - offered_from) / elapsed, 1),
        "target_rate": rate,
        "measured_s": round(elapsed, 2),
        "total_written": total_written,
        "total_forwarded": total_readings,
        "superseded": total_written - total_readings,
        "server_cpu_cores": round(server_cpu, 2),
        "bridge_cpu_cores": round(bridge_cpu, 2),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    rate = report["target_rate"]
    lines = [
        "# CoAP bridge throughput",
        "",
        f"{report['devices']} simulated pumps on 127.0.0.1, {report['resources']} observed "
        f"resources ({report['form']} form), server publishing "
        + ("flat out" if rate is None else f"{rate:,.0f} values/s")
        + f"; measured {report['measured_s']} s on {report['cpus']} CPUs, "
        f"Python {report['python']}, {report['at']}.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| readings/s into Kafka | {report['readings_per_s']:,.0f} |",
        f"| messages/s into Kafka | {report['messages_per_s']:,.0f} |",
        f"| values/s the server wrote | {report['offered_values_per_s']:,.0f} |",
        f"| values written (whole run) | {report['total_written']:,} |",
        f"| readings forwarded (whole run) | {report['total_forwarded']:,} |",
        f"| superseded before their notification | {report['superseded']:,} |",
        f"| server CPU (cores) | {report['server_cpu_cores']} |",
        f"| bridge CPU (cores) | {report['bridge_cpu_cores']} |",
        "",
        "Superseded values were replaced on their resource before the server sent their "
        "notification: CoAP observation delivers the latest state, so under load a server "
        "coalesces changes. The bridge forwards every notification it receives.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figure and write the JSON and Markdown reports."""
    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=20, help="simulated CoAP devices")
    parser.add_argument("--form", choices=["sensor", "telemetry"], default="sensor")
    parser.add_argument(
        "--rate", type=float, default=None, help="values/s the server writes (default: flat out)"
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured")
    parser.add_argument(
        "--out", type=Path, default=settings.state_dir / "bench" / "coap_bridge", help="folder"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    report = measure(settings, args.devices, args.form, args.rate, args.duration)
    data, text = write_results(args.out, STEM, report, markdown(report))
    print(
        f"CoAP -> Kafka: {report['readings_per_s']:,.0f} readings/s from {args.devices} "
        f"devices (server wrote {report['offered_values_per_s']:,.0f} values/s; "
        f"{report['superseded']:,} of {report['total_written']:,} superseded) -> {data}, {text}"
    )


if __name__ == "__main__":
    main()
