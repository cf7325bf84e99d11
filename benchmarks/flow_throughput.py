"""Twin flow throughput: readings/s from Kafka to rows visible in QuestDB.

Pre-produces a seeded workload of the example plant to a fresh raw topic (batched
payloads, as gateways send them), then starts ``twinflow run`` (recovery on, all
outputs) and times it until every reading is visible in QuestDB, sampling the flow's
peak RSS. Needs the local services (``twinflow up``).

Run: ``.venv/bin/python -m benchmarks.flow_throughput [--readings N] [--workers W]``.
Writes JSON and Markdown to ``--out`` (default: STATE_DIR/bench/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from connectors.kafka import TopicSpec, ensure_topics, reliable_producer
from connectors.questdb import QuestDBError, QuestDBHttp
from twinflow.services.process import rss_bytes
from twinflow.settings import Settings, load_settings
from twinflow.sim.faults import FaultPlan
from twinflow.sim.messages import DataFaultPlan, MessageEncoder
from twinflow.sim.scenario import Scenario, ScenarioConfig
from twinflow.twin_model import load_twin_model


def produce_workload(settings: Settings, topic: str, readings: int, seed: int) -> int:
    """Produce about ``readings`` readings (one hour of the plant); return the exact count."""
    model = load_twin_model(settings.twin_model)
    duration_s = 3600.0
    start_ms = int((time.time() - duration_s - 600) * 1000)
    scenario = Scenario(
        model,
        # No sensor faults: their spikes may leave the valid range and become dead
        # letters, and the count of readings to wait for must be exact.
        ScenarioConfig(
            start_ms=start_ms,
            duration_s=duration_s,
            rate=readings / duration_s,
            seed=seed,
            faults=FaultPlan(process_fault_share=0.3, sensor_fault_share=0.0),
        ),
    )
    quiet = DataFaultPlan(
        batched_share=1.0, duplicate=0, out_of_order=0, late=0, malformed=0, unknown_entity=0
    )
    encoder = MessageEncoder(model, quiet, seed)
    ensure_topics(settings.kafka, [TopicSpec(topic, settings.topics.raw_partitions)])
    producer = reliable_producer(settings.kafka, **{"linger.ms": 20, "batch.size": 1_000_000})
    count = 0
    for emission in encoder.emissions(scenario.samples(), scenario.tick_ms):
        while True:
            try:
                producer.produce(topic, emission.payload, emission.entity_id)
                break
            except BufferError:
                producer.poll(0.1)
        count += emission.readings
    if producer.flush(120):
        raise RuntimeError("workload not fully produced")
    return count


def _readings_visible(sql: QuestDBHttp, table: str) -> int:
    try:
        return int(sql.exec(f"SELECT count() FROM '{table}'").rows[0][0])  # noqa: S608
    except QuestDBError:
        return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Produce, run the flow, time it."""
    settings = load_settings()
    suffix = uuid.uuid4().hex[:8]
    raw = f"bench.flow.raw.{suffix}"
    print(f"producing {args.readings} readings to {raw} …", flush=True)
    expected = produce_workload(settings, raw, args.readings, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="twinflow-flow-bench-"))
    prefix = f"bench_{suffix}_"
    env = {key: value for key, value in os.environ.items() if not key.startswith("TWINFLOW_")}
    env.update(
        TWINFLOW_STATE_DIR=str(settings.state_dir),
        TWINFLOW_TOPICS__RAW=raw,
        TWINFLOW_TOPICS__DEADLETTER=f"bench.flow.deadletter.{suffix}",
        TWINFLOW_TOPICS__STATE=f"bench.flow.state.{suffix}",
        TWINFLOW_TOPICS__ANOMALIES=f"bench.flow.anomalies.{suffix}",
        TWINFLOW_TOPICS__LATE=f"bench.flow.late.{suffix}",
        TWINFLOW_QUESTDB__TABLE_PREFIX=prefix,
        TWINFLOW_FLOW__RECOVERY_DIR=str(workdir / "recovery"),
    )
    sql = QuestDBHttp(settings.questdb)
    log = workdir / "flow.log"
    with log.open("w") as out:
        flow = subprocess.Popen(
            [sys.executable, "-m", "twinflow", "run", "-w", str(args.workers)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    started = time.monotonic()
    peak_rss = 0
    first_row_at = None
    visible = 0
    try:
        while visible < expected:
            if flow.poll() is not None:
                raise RuntimeError(f"the flow exited early; see {log}")
            if time.monotonic() - started > args.timeout:
                raise RuntimeError(f"only {visible} of {expected} rows after {args.timeout} s")
            peak_rss = max(peak_rss, rss_bytes(flow.pid) or 0)
            visible = _readings_visible(sql, f"{prefix}readings")
            if visible and first_row_at is None:
                first_row_at = time.monotonic()
            time.sleep(0.25)
        finished = time.monotonic()
    finally:
        if flow.poll() is None:
            os.kill(flow.pid, signal.SIGINT)
            flow.wait(60)
    elapsed = finished - started
    result = {
        "readings": expected,
        "workers": args.workers,
        "elapsed_s": round(elapsed, 2),
        "readings_per_s": round(expected / elapsed),
        "readings_per_s_after_first_row": round(expected / (finished - (first_row_at or started))),
        "peak_rss_mib": round(peak_rss / 2**20),
        "entities": len(load_twin_model(settings.twin_model).entities),
    }
    for table in ("readings", "sensor_windows", "twin_state", "anomalies", "deadletters"):
        with contextlib.suppress(QuestDBError):
            sql.exec(f"DROP TABLE '{prefix}{table}'")
    return result


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    out = args.out or load_settings().state_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "flow_throughput.json").write_text(json.dumps(result, indent=2))
    (out / "flow_throughput.md").write_text(
        "# Twin flow throughput\n\n| readings | workers | seconds | readings/s | peak RSS MiB |\n"
        "|---|---|---|---|---|\n"
        f"| {result['readings']} | {result['workers']} | {result['elapsed_s']} | "
        f"{result['readings_per_s']} | {result['peak_rss_mib']} |\n"
    )


if __name__ == "__main__":
    main()
