"""What a partition's recovery snapshot costs, by the number of entities it holds.

One partition's twins step through the benchmark workload (no services: the step
alone, as the flow calls it), then the snapshot the flow takes at every epoch's end is
taken and restored a few times. Reports time (median) and size per entity count.

    .venv/bin/python -m benchmarks.snapshots [--entities 1000,10000] [--ticks 120]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.results import write_results
from benchmarks.workload import Expected, WorkloadConfig, messages, twin_model
from flows.partition import pickled, restored
from schemas.transport import InputMessage
from twinflow.settings import load_settings
from twinflow.twin import PartitionTwins
from twinflow.twin_model import TwinModel

REPEATS = 5
BATCH = 500
"""Messages per step, as a Kafka batch would bring them."""


def _twins_after(config: WorkloadConfig) -> PartitionTwins:
    settings = load_settings()
    model = TwinModel.model_validate(twin_model(config))
    twins = PartitionTwins(model, settings.flow, settings.detection.detector_config())
    window_ms = int(config.window_s * 1000)
    start_ms = (int(time.time() * 1000) - 86_400_000) // window_ms * window_ms
    batch: list[InputMessage] = []
    clock = start_ms
    for offset, (_entity, payload) in enumerate(messages(config, start_ms, Expected())):
        batch.append(InputMessage("bench", 0, offset, start_ms + offset, payload))
        if len(batch) == BATCH:
            clock += 1000
            twins.step(batch, clock)
            batch = []
    if batch:
        twins.step(batch, clock + 1000)
    return twins


def measure(entities: int, ticks: int) -> dict[str, float | int]:
    """Snapshot and restore of one partition holding ``entities`` twins."""
    config = WorkloadConfig(entities=entities, readings=entities * 6 * ticks, seed=3)
    stepped_at = time.perf_counter()
    twins = _twins_after(config)
    step_s = time.perf_counter() - stepped_at
    takes, restores, size = [], [], 0
    for _ in range(REPEATS):
        began = time.perf_counter()
        snapshot = pickled(twins)
        takes.append(time.perf_counter() - began)
        size = len(snapshot.data)
        began = time.perf_counter()
        restored(snapshot)
        restores.append(time.perf_counter() - began)
    return {
        "entities": entities,
        "readings_stepped": config.readings,
        "step_s": round(step_s, 2),
        "snapshot_ms": round(statistics.median(takes) * 1000, 1),
        "restore_ms": round(statistics.median(restores) * 1000, 1),
        "snapshot_bytes": size,
        "bytes_per_entity": round(size / entities),
    }


def markdown(rows: list[dict[str, float | int]]) -> str:
    """The results as a Markdown table."""
    lines = [
        "# Recovery snapshot of one partition",
        "",
        f"Median of {REPEATS} snapshots (one pickle of the partition's twins) after "
        "stepping the benchmark workload; no services involved.",
        "",
        "| entities | readings stepped | snapshot ms | restore ms | size MiB | bytes/entity |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['entities']:,} | {row['readings_stepped']:,} | {row['snapshot_ms']} | "
            f"{row['restore_ms']} | {int(row['snapshot_bytes']) / 2**20:.1f} | "
            f"{row['bytes_per_entity']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", default="1000,10000", help="comma-separated counts")
    parser.add_argument("--ticks", type=int, default=30, help="seconds of plant time stepped")
    parser.add_argument("--out", type=Path, default=Path(".twinflow/bench/snapshots"))
    args = parser.parse_args()
    rows = [measure(int(n), args.ticks) for n in args.entities.split(",")]
    json_file, md_file = write_results(args.out, "snapshots", rows, markdown(rows))
    print(markdown(rows))
    print(f"wrote {json_file} and {md_file}")


if __name__ == "__main__":
    main()
