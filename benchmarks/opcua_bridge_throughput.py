"""Readings per second through simulator OPC UA server -> OPC UA bridge -> Kafka.

    .venv/bin/python -m benchmarks.opcua_bridge_throughput [--rate VALUES_PER_S] [--out FILE]

Needs the local services (``twinflow up``). The server writes every variable of the
plant once per tick, flat out or at ``--rate`` values/s; the run is
:mod:`benchmarks.bridge_bench`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import sys
from datetime import UTC, datetime
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from benchmarks.bridge_bench import Gates, run, write_ticks
from twinflow.bridges import opcua as bridge
from twinflow.settings import OpcUaSettings, Settings, load_settings
from twinflow.sim.opcua_server import PlantOpcUaServer
from twinflow.twin_model import load_twin_model


def _serve(
    opcua: OpcUaSettings,
    model_file: Path,
    rate: float | None,
    gates: Gates,
    written: Synchronized[int],
) -> None:
    logging.basicConfig(level=logging.WARNING)
    model = load_twin_model(model_file)
    sensors = {entity.id: list(model.sensors_of(entity.id)) for entity in model.entities}

    async def publish() -> None:
        async with PlantOpcUaServer(opcua, model, list(sensors)) as server:
            await write_ticks(server.publish, sensors, rate, gates, written, modulo=1000)

    asyncio.run(publish())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure(settings: Settings, rate: float | None, duration_s: float) -> dict[str, Any]:
    """Run server and bridge for ``duration_s`` after a warm-up; return the figures."""
    model = load_twin_model(settings.twin_model)
    opcua = settings.opcua.model_copy(
        update={"endpoint": f"opc.tcp://127.0.0.1:{_free_port()}/twinflow/"}
    )
    variables = sum(len(model.sensors_of(entity.id)) for entity in model.entities)
    measured = run(
        settings,
        "opcua",
        model,
        bridge.run,
        _serve,
        (opcua, settings.twin_model, rate),
        first_values=variables,
        duration_s=duration_s,
        settings_update={"opcua": opcua},
    )
    return {
        "benchmark": "opcua_bridge_throughput",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "readings_per_s": round(measured.produced / measured.elapsed_s, 1),
        "offered_values_per_s": round(measured.written / measured.elapsed_s, 1),
        "target_rate": rate,
        "measured_s": round(measured.elapsed_s, 2),
        "total_written": measured.total_written,
        "total_produced": measured.total_produced,
        "lost": measured.total_written - measured.total_produced,
        "server_cpu_cores": measured.server_cpu_cores,
        "bridge_cpu_cores": measured.bridge_cpu_cores,
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
