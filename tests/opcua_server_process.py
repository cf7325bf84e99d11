"""A PlantOpcUaServer in a process of its own, publishing deterministic samples.

    python -m tests.opcua_server_process --entities pump-001,motor-001 --period-ms 50

OPC UA settings come from the environment (``TWINFLOW_OPCUA__*``), as for twinflow.
Once serving, it prints ``ready <start_ms>``; tick ``k`` then publishes every entity at
``ts = start_ms + k * period_ms`` (paced to the wall clock) with :func:`value_at` for
each sensor, except the sensors :func:`dropped_at` names, which get BadNoCommunication.
A line ``pause`` on stdin stops the writes (ticks go on, unwritten), ``resume`` restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time

from twinflow.settings import load_settings
from twinflow.sim.opcua_server import PlantOpcUaServer
from twinflow.sim.samples import Sample
from twinflow.twin_model import load_twin_model

# Sensor 1 of every entity never changes: a stuck sensor still reports every tick.
STUCK_SENSOR_INDEX = 1
STUCK_VALUE = 42.0
# Sensor 0 of the first entity drops out on every tick ending in 3.
DROPOUT_EVERY = 10
DROPOUT_TICK = 3


def value_at(entity_index: int, sensor_index: int, tick: int) -> float:
    """The value sensor ``sensor_index`` of entity ``entity_index`` has at ``tick``."""
    if sensor_index == STUCK_SENSOR_INDEX:
        return STUCK_VALUE
    return ((tick * 7 + sensor_index * 13 + entity_index * 31) % 1000) / 10


def dropped_at(entity_index: int, sensor_index: int, tick: int) -> bool:
    """Whether that sensor is in a dropout at ``tick``."""
    return entity_index == 0 and sensor_index == 0 and tick % DROPOUT_EVERY == DROPOUT_TICK


def sample_at(
    entity_index: int, entity_id: str, sensors: list[str], tick: int, ts_ms: int
) -> Sample:
    values = {}
    dropped = []
    for sensor_index, sensor in enumerate(sensors):
        if dropped_at(entity_index, sensor_index, tick):
            dropped.append(sensor)
        else:
            values[sensor] = value_at(entity_index, sensor_index, tick)
    return Sample(entity_id=entity_id, ts_ms=ts_ms, values=values, dropped=tuple(dropped))


def _follow_commands(paused: threading.Event) -> None:
    for line in sys.stdin:
        if line.strip() == "pause":
            paused.set()
        elif line.strip() == "resume":
            paused.clear()


async def serve(entity_ids: list[str], period_ms: int) -> None:
    settings = load_settings()
    model = load_twin_model(settings.twin_model)
    sensors = {entity_id: list(model.sensors_of(entity_id)) for entity_id in entity_ids}
    paused = threading.Event()
    threading.Thread(target=_follow_commands, args=(paused,), daemon=True).start()
    async with PlantOpcUaServer(settings.opcua, model, entity_ids) as server:
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
                    sample = sample_at(entity_index, entity_id, sensors[entity_id], tick, ts_ms)
                    await server.publish(sample)
            tick += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", required=True, help="comma-separated entity ids")
    parser.add_argument("--period-ms", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.entities.split(","), args.period_ms))


if __name__ == "__main__":
    main()
