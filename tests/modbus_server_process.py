"""A PlantModbusServer in a process of its own, publishing deterministic samples.

    python -m tests.modbus_server_process --model plant.yaml --entities pump-1,pump-2 \
        --period-ms 50 --drop level

Serves the Modbus devices the twin model gives those entities. It publishes tick 0,
prints ``ready <start_ms>``, then publishes tick ``k`` at ``start_ms + k * period_ms``
(paced to the wall clock): :func:`value_at` for each sensor, except that the first
entity's ``--drop`` sensor is dropped on the ticks :func:`dropped_at` names (a float32
register then reads NaN).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path

from twinflow.sim.modbus_server import PlantModbusServer
from twinflow.sim.samples import Sample
from twinflow.twin_model import load_twin_model

# The dropping sensor drops out on the ticks ending in 3 and 4: as long as a test's poll
# interval (100 ms at 50-ms ticks), so polls of any phase see dropouts.
DROPOUT_EVERY = 10
DROPOUT_TICKS = (3, 4)


def value_at(entity_index: int, sensor_index: int, tick: int) -> float:
    """The canonical value of sensor ``sensor_index`` of entity ``entity_index`` at ``tick``.

    Within [-20, 80), negative ones included, and different from one tick to the next.
    """
    return ((tick * 7 + sensor_index * 13 + entity_index * 31) % 1000) / 10 - 20


def dropped_at(tick: int) -> bool:
    """Whether the dropping sensor is in a dropout at ``tick``."""
    return tick % DROPOUT_EVERY in DROPOUT_TICKS


def sample_at(
    entity_index: int, entity_id: str, sensors: list[str], tick: int, ts_ms: int, drop: str | None
) -> Sample:
    values = {}
    dropped = []
    for sensor_index, sensor in enumerate(sensors):
        if entity_index == 0 and sensor == drop and dropped_at(tick):
            dropped.append(sensor)
        else:
            values[sensor] = value_at(entity_index, sensor_index, tick)
    return Sample(entity_id=entity_id, ts_ms=ts_ms, values=values, dropped=tuple(dropped))


async def serve(model_file: Path, entity_ids: list[str], period_ms: int, drop: str | None) -> None:
    model = load_twin_model(model_file)
    sensors = {entity_id: list(model.sensors_of(entity_id)) for entity_id in entity_ids}
    async with PlantModbusServer(model, entity_ids) as server:
        start_ms = time.time_ns() // 1_000_000
        tick = 0
        while True:
            ts_ms = start_ms + tick * period_ms
            delay = ts_ms / 1000 - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for entity_index, entity_id in enumerate(entity_ids):
                await server.publish(
                    sample_at(entity_index, entity_id, sensors[entity_id], tick, ts_ms, drop)
                )
            if tick == 0:
                print(f"ready {start_ms}", flush=True)
            tick += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="twin model file")
    parser.add_argument("--entities", required=True, help="comma-separated entity ids")
    parser.add_argument("--period-ms", type=int, default=100)
    parser.add_argument("--drop", help="a sensor of the first entity that drops out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.model, args.entities.split(","), args.period_ms, args.drop))


if __name__ == "__main__":
    main()
