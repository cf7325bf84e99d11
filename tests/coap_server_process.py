"""A PlantCoapServer in a process of its own, publishing deterministic samples.

    python -m tests.coap_server_process --model plant.yaml --entities pump-001,motor-001
        [--period-ms 50]

The CoAP maps of the twin model say where it serves. Once serving, it prints
``ready <start_ms>``; tick ``k`` then publishes every entity at
``ts = start_ms + k * period_ms`` (paced to the wall clock) with :func:`value_at` for each
sensor (canonical units). A line ``pause`` on stdin stops the publishing (the server
keeps answering with the last values), ``resume`` restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
from pathlib import Path

from twinflow.sim.coap_server import PlantCoapServer
from twinflow.sim.samples import Sample
from twinflow.twin_model import load_twin_model

TICKS = 1000
"""Values repeat after this many ticks; a test run is shorter."""
STEP = 0.005


def value_at(entity_index: int, sensor_index: int, tick: int) -> float:
    """The canonical value of sensor ``sensor_index`` of entity ``entity_index`` at ``tick``.

    Distinct for every tick below :data:`TICKS`, and inside every example-plant range.
    """
    return round(10 + sensor_index + entity_index * 0.5 + (tick % TICKS) * STEP, 6)


def tick_of(entity_index: int, sensor_index: int, value: float) -> int:
    """The tick (modulo :data:`TICKS`) whose :func:`value_at` is ``value`` (canonical)."""
    return round((value - 10 - sensor_index - entity_index * 0.5) / STEP)


def _follow_commands(paused: threading.Event) -> None:
    for line in sys.stdin:
        if line.strip() == "pause":
            paused.set()
        elif line.strip() == "resume":
            paused.clear()


async def serve(model_file: Path, entity_ids: list[str], period_ms: int) -> None:
    model = load_twin_model(model_file)
    sensors = {entity_id: list(model.sensors_of(entity_id)) for entity_id in entity_ids}
    paused = threading.Event()
    threading.Thread(target=_follow_commands, args=(paused,), daemon=True).start()
    async with PlantCoapServer(model, entity_ids) as server:
        start_ms = time.time_ns() // 1_000_000
        print(f"ready {start_ms}", flush=True)
        tick = 0
        while True:
            ts_ms = start_ms + tick * period_ms
            delay = ts_ms / 1000 - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not paused.is_set():
                for entity_index, entity_id in enumerate(entity_ids):
                    values = {
                        sensor: value_at(entity_index, sensor_index, tick)
                        for sensor_index, sensor in enumerate(sensors[entity_id])
                    }
                    await server.publish(Sample(entity_id, ts_ms, values))
            tick += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="twin model file")
    parser.add_argument("--entities", required=True, help="comma-separated entity ids")
    parser.add_argument("--period-ms", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.model, args.entities.split(","), args.period_ms))


if __name__ == "__main__":
    main()
