"""Readings per second through simulated CoAP devices -> CoAP bridge -> Kafka.

    .venv/bin/python -m benchmarks.coap_bridge_throughput [--devices N] [--form sensor|telemetry]
        [--rate VALUES_PER_S] [--duration S] [--out FOLDER]

Needs the local services (``twinflow up``). N pumps, each a CoAP device of its own on
127.0.0.1, serve their five sensors as observable resources (``sensor``: one number
per resource; ``telemetry``: one JSON body per device). The server process publishes
every device's sample once per tick, flat out or at ``--rate`` values/s; the run is
:mod:`benchmarks.bridge_bench`'s.

CoAP observation carries a resource's latest state, not every change (RFC 7641): a
value replaced before its notification went out is never sent. The report counts those
as ``superseded``; they are not losses of the bridge. Results: ``<out>/coap_bridge.json``
and ``.md`` (default ``STATE_DIR/bench/coap_bridge``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import socket
import tempfile
from datetime import UTC, datetime
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any, Literal

import yaml

from benchmarks.bridge_bench import Gates, run, write_ticks
from benchmarks.results import write_results
from twinflow.bridges import coap as bridge
from twinflow.settings import Settings, load_settings
from twinflow.sim.coap_server import PlantCoapServer
from twinflow.twin_model import load_twin_model

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


def _serve(model_file: Path, rate: float | None, gates: Gates, written: Synchronized[int]) -> None:
    logging.basicConfig(level=logging.WARNING)
    model = load_twin_model(model_file)
    sensors = {entity.id: list(model.sensors_of(entity.id)) for entity in model.entities}

    async def publish() -> None:
        async with PlantCoapServer(model, list(sensors)) as server:
            await write_ticks(server.publish, sensors, rate, gates, written, modulo=100)

    asyncio.run(publish())


def measure(
    settings: Settings, devices: int, form: Form, rate: float | None, duration_s: float
) -> dict[str, Any]:
    """Run servers and bridge for ``duration_s`` after a warm-up; return the figures."""
    with tempfile.TemporaryDirectory() as folder:
        model_file = write_model(settings, Path(folder), devices, form)
        model = load_twin_model(model_file)
        resources = sum(len(bridge.resources_of(model, entity)) for entity in model.entities)
        per_message = len(model.sensors_of(model.entities[0].id)) if form == "telemetry" else 1
        measured = run(
            settings,
            "coap",
            model,
            bridge.run,
            _serve,
            (model_file, rate),
            first_values=resources,
            duration_s=duration_s,
        )
    total_readings = measured.total_produced * per_message
    return {
        "benchmark": "coap_bridge_throughput",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "form": form,
        "devices": devices,
        "resources": resources,
        "readings_per_s": round(measured.produced * per_message / measured.elapsed_s, 1),
        "messages_per_s": round(measured.produced / measured.elapsed_s, 1),
        "offered_values_per_s": round(measured.written / measured.elapsed_s, 1),
        "target_rate": rate,
        "measured_s": round(measured.elapsed_s, 2),
        "total_written": measured.total_written,
        "total_forwarded": total_readings,
        "superseded": measured.total_written - total_readings,
        "server_cpu_cores": measured.server_cpu_cores,
        "bridge_cpu_cores": measured.bridge_cpu_cores,
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
