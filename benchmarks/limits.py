"""The raw limits twinflow is measured against, on the same machine and the same data.

- ``kafka`` (limit A): consume the raw topic with confluent-kafka, batched, doing
  nothing with the messages. Once it has the whole workload it goes on consuming, and
  records each later message's create time (Kafka's) and its delay until consumed.
- ``questdb`` (limit B): write the workload's readings as ``readings`` rows (same table
  design as twinflow's) through the questdb client's dataframe path, 100,000 rows per
  flush. The rows are built before the clock starts. With ``--live`` it then sends
  rows stamped with the send time at a steady rate and measures when they become
  visible, as the harness does for the flows.

Both are subprocesses of ``twinflow bench`` (``--spec`` as for the peers, see
:mod:`benchmarks.peers`), so that their memory is measured like everyone else's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from questdb import Sender

from benchmarks.latency import LiveSchedule, VisibilityProbe
from benchmarks.workload import Expected, WorkloadConfig, messages
from connectors.questdb import QuestDBHttp, ensure_table
from connectors.questdb_sink import table_frame
from schemas.transport import CodedStrings
from twinflow.settings import QuestDBSettings
from twinflow.tables import tables

_FLUSH_ROWS = 100_000


class _Stop(Exception):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def consume(spec: dict[str, Any]) -> None:
    """Limit A: count the topic's messages as fast as confluent-kafka hands them over."""
    consumer = Consumer(
        {
            "bootstrap.servers": spec["bootstrap"],
            "group.id": f"{spec['table_prefix']}limit",
            "enable.auto.commit": False,
            "queued.min.messages": 200_000,
        }
    )
    metadata = consumer.list_topics(spec["topic"], timeout=30).topics[spec["topic"]]
    consumer.assign(
        [TopicPartition(spec["topic"], p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
    )
    expected = spec["expected_messages"]
    count = 0
    latencies: list[tuple[int, float]] = []
    """(create time, delay) in ms of each message after the workload."""
    try:
        while True:
            # A short timeout: consume() waits that long for a full batch, which would
            # add up to the timeout to every latency.
            batch = consumer.consume(num_messages=10_000, timeout=0.01)
            if not batch:
                continue
            if count == 0:
                print(f"FIRST_CONSUME {time.time()}", flush=True)
            before = count
            count += len(batch)
            if before < expected <= count:
                print(f"DONE {time.time()} {count}", flush=True)
            elif before >= expected:
                now_ms = time.time() * 1000
                latencies.extend((m.timestamp()[1], now_ms - m.timestamp()[1]) for m in batch)
    except _Stop:
        pass
    finally:
        consumer.close()
        if spec.get("latency_file"):
            Path(spec["latency_file"]).write_text(json.dumps(latencies))


def ingest(spec: dict[str, Any], live_rate: float, live_s: float) -> None:
    """Limit B: the workload's readings as rows, as fast as QuestDB takes them."""
    settings = QuestDBSettings.model_validate(spec["questdb"])
    table = tables(spec["table_prefix"]).readings
    ensure_table(QuestDBHttp(settings), table)
    frames = [
        table_frame(table, part).frame for part in _reading_columns(spec["workload"], _FLUSH_ROWS)
    ]
    with Sender.from_conf(settings.ilp_conf(auto_flush="off")) as sender:
        print(f"FIRST_CONSUME {time.time()}", flush=True)
        for frame in frames:
            sender.dataframe(frame, table_name=table.name, symbols=["entity", "sensor"], at="ts")
            sender.flush()
        print(f"DONE {time.time()} {sum(len(f) for f in frames)}", flush=True)
        if live_rate > 0:
            # A table of its own, so the live rows never add to the workload's count.
            table = replace(table, name=f"{table.name}_live")
            ensure_table(QuestDBHttp(settings), table)
            probe = VisibilityProbe(QuestDBHttp(settings), table.name)
            schedule = LiveSchedule(live_rate, live_s)
            probe.start(after_ms=int(time.time() * 1000))
            for due, count in schedule.slices():
                schedule.wait(due)
                now_ms = int(time.time() * 1000)
                frame = table_frame(
                    table,
                    {
                        "ts": np.full(count, now_ms) + np.arange(count) % 1000,
                        "entity": [f"live{i % 1000:04d}" for i in range(count)],
                        "sensor": ["flow"] * count,
                        "value": np.ones(count),
                        "flags": np.zeros(count, dtype=np.int64),
                    },
                ).frame
                sender.dataframe(
                    frame, table_name=table.name, symbols=["entity", "sensor"], at="ts"
                )
                sender.flush()
                schedule.sent(count)
            latency = probe.finish(schedule)
            print(f"LATENCY {json.dumps(latency)}", flush=True)


def _reading_columns(workload: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    """The valid readings of the workload, in produce order, ``rows`` at a time."""
    config = WorkloadConfig(**workload["config"])
    ranges = {name: high for name, (_low, high) in workload["ranges"].items()}
    columns: dict[str, list[Any]] = {"ts": [], "entity": [], "sensor": [], "value": []}
    decoder = msgspec.json.Decoder()
    for _entity, payload in messages(config, workload["start_ms"], Expected()):
        try:
            message = decoder.decode(payload)
        except msgspec.DecodeError:
            continue
        values = message.get("values") or {message["sensor"]: message["value"]}
        for sensor, value in values.items():
            if value <= ranges[sensor]:
                columns["ts"].append(message["ts"])
                columns["entity"].append(message["entity_id"])
                columns["sensor"].append(sensor)
                columns["value"].append(value)
    total = len(columns["ts"])
    # Entity and sensor coded, as twinflow writes them: QuestDB's fastest symbol columns.
    return [
        {
            **{name: columns[name][start : start + rows] for name in ("ts", "value")},
            **{
                name: CodedStrings.of(columns[name][start : start + rows])
                for name in ("entity", "sensor")
            },
            "flags": np.zeros(min(rows, total - start), dtype=np.int64),
        }
        for start in range(0, total, rows)
    ]


def main() -> None:
    """Command-line entry point (run by the harness)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("limit", choices=("kafka", "questdb"))
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--live-rate", type=float, default=0.0)
    parser.add_argument("--live-seconds", type=float, default=10.0)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.limit == "kafka":
        consume(spec)
    else:
        try:
            ingest(spec, args.live_rate, args.live_seconds)
        except _Stop:
            sys.exit(0)
        # Stay up until stopped, like the other variants, so memory is sampled alike.
        with contextlib.suppress(_Stop):
            signal.pause()


if __name__ == "__main__":
    main()
