"""Readings per second through simulated Modbus devices -> Modbus bridge -> Kafka.

    .venv/bin/python -m benchmarks.modbus_bridge_throughput [--devices N] [--sensors S]
        [--servers K] [--poll-interval SECONDS] [--duration SECONDS] [--out DIR]

Needs the local services (``twinflow up``). N devices of S sensors each (half float32
holding registers, half int16 input registers in tenths, so one poll is two reads) sit
behind K Modbus TCP servers on loopback, in a process of their own that writes new
values every 50 ms; the bridge polls each device every ``--poll-interval`` (the run is
:mod:`benchmarks.bridge_bench`'s). The figure is what the bridge forwards;
``polls_per_s`` against ``target_polls_per_s`` says whether it kept up (a poll that
overruns its interval is followed at once, so an overloaded bridge polls slower, it
does not queue).

Writes ``modbus_bridge_throughput.json`` and ``.md`` under STATE_DIR/bench/modbus_bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bridge_bench import Gates, run
from benchmarks.results import write_results
from twinflow.bridges import modbus as bridge
from twinflow.bridges.modbus_codec import polled_devices
from twinflow.settings import Settings, load_settings
from twinflow.sim.modbus_server import PlantModbusServer
from twinflow.sim.samples import Sample
from twinflow.twin_model import TwinModel, load_twin_model

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


def _serve(model_file: Path, gates: Gates, _written: Synchronized[int]) -> None:
    # Devices change every tick from the start, whatever the gates say: a poll reads
    # what is there, so the bridge's rate is its own, not the server's.
    logging.basicConfig(level=logging.WARNING)
    model = load_twin_model(model_file)
    sensors = {entity.id: list(model.sensors_of(entity.id)) for entity in model.entities}

    async def publish() -> None:
        async with PlantModbusServer(model, list(sensors)) as server:
            tick = 0
            started = time.monotonic()
            while not gates.stop.is_set():
                ts_ms = time.time_ns() // 1_000_000
                for entity_id, names in sensors.items():
                    values = {name: float((tick + i) % 1000) for i, name in enumerate(names)}
                    await server.publish(Sample(entity_id, ts_ms, values))
                if tick == 0:
                    gates.ready.set()
                tick += 1
                await asyncio.sleep(max(0.0, started + tick * TICK_S - time.monotonic()))

    asyncio.run(publish())


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
    measured = run(
        settings,
        "modbus",
        model,
        bridge.run,
        _serve,
        (model_file,),
        first_values=devices * sensors,
        duration_s=duration_s,
        settings_update={
            "metrics": settings.metrics.model_copy(update={"modbus_bridge_port": metrics_port})
        },
    )
    elapsed = measured.elapsed_s
    readings_per_s = measured.produced / elapsed
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
        "server_cpu_cores": measured.server_cpu_cores,
        "bridge_cpu_cores": measured.bridge_cpu_cores,
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
