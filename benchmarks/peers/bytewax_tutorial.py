"""Peer 1: the benchmark's pipeline written the way Bytewax's docs and examples write it.

Run as ``python -m benchmarks.peers.bytewax_tutorial --spec spec.json`` (the contract,
the spec's fields and the tables are in :mod:`benchmarks.peers`). One Bytewax 0.21
dataflow, each step built from what a reader of Bytewax's guide would reach for:

1. **Input**: ``bytewax.connectors.kafka.operators.input`` on the raw topic from the
   beginning with ``tail=True``, the way the Kafka guide (``docs/guide/concepts/kafka.md``)
   recommends for typical use; consumer errors are inspected and crash the flow
   (``op.inspect(...).then(op.raises, ...)``, as in ``examples/confluent_serde.py``).
   One item per Kafka message.
2. **Parsing**: ``json.loads`` per message in an ``op.filter_map``, ``op.flat_map`` to
   expand a batched message into one reading per sensor, ``op.filter`` against the
   sensor ranges of the spec. Dropped messages and readings are counted by reason and
   logged (at DEBUG each, and their totals at exit).
3. **Anomaly score**: ``op.stateful_map`` keyed by entity with a River model as the
   state, the pattern of ``examples/anomaly_detector.py`` and
   ``examples/redpanda_anomaly_detection.py`` (and the use the ``stateful_map``
   docstring names first): ``MinMaxScaler | HalfSpaceTrees``, ``score_one`` then
   ``learn_one`` per reading.
4. **Readings**: one QuestDB row per scored reading through a custom ``DynamicSink``
   (``bytewax.outputs``, as the custom-connectors guide directs) whose per-worker
   partition owns a ``questdb.Sender`` over ILP/HTTP and, for each batch Bytewax hands
   it, calls ``Sender.row`` per item and ``flush`` once.
5. **Windows**: ``bytewax.operators.windowing.fold_window`` keyed by ``entity:sensor``
   with an ``EventClock`` and an epoch-aligned ``TumblingWindower``, the accumulator a
   plain list of values (``builder=list``, ``merger=list.__add__``, as in
   ``examples/confluent_serde.py``). The window's open/close times come from joining the
   ``down`` and ``meta`` streams on ``key:window_id``, as the v0.19 -> v0.20 migration
   guide shows; the stats (count, mean, min, max, population std) are computed with
   :mod:`statistics` when the window closes, and written by the same kind of sink.
   Late items (``WindowOut.late``) are ignored, as the windowing guide does; the late
   readings themselves still reach ``readings`` because step 4 comes first.

Why this is a fair peer: every step uses the stock operator or connector for its job,
with default settings (Kafka batch size, ``ordered=True`` windows), and one sender per
worker with one flush per batch is the natural way to use QuestDB's client; nothing is
done per message that a tutorial would batch, and nothing is batched that a tutorial
would not.

What it deliberately does not do (twinflow does, and the benchmark measures that
difference): recovery (it runs without a recovery store), dead-lettering the dropped
messages to Kafka, decoding with a typed schema (msgspec), batching messages into
columnar frames, deduplicating readings, or any tuning beyond the defaults.

One default matters a lot and is kept on purpose, because a tutorial reader would not
know to change it: even without recovery, Bytewax 0.21 ``copy.deepcopy``-s the state of
every key a stateful step touched at the close of each epoch (10 s by default). A
trained ``HalfSpaceTrees`` of this size takes about 0.25 s to deep-copy, so with many
entities these copies, not the scoring, bound the throughput; and since the event clock's
watermark also advances with wall time, a flow that falls that far behind sees readings
as late and its windows come out partial.

The QuestDB client 6 deprecates ``questdb.ingress``; ``questdb.Sender`` is the same
class.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, NoReturn, TypeVar

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow
from bytewax.errors import BytewaxRuntimeError
from bytewax.operators import windowing as win
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.run import cli_main
from confluent_kafka import OFFSET_BEGINNING
from questdb import Sender, TimestampNanos
from river import anomaly, compose, preprocessing

log = logging.getLogger("benchmarks.peers.bytewax_tutorial")

X = TypeVar("X")

# Bytewax has no "first item" hook, and with several workers the parse step runs in
# several threads: a lock that is taken once and never released lets exactly one of
# them print the line, and costs every later message one failed non-blocking acquire.
_FIRST_CONSUME = threading.Lock()


class DropCounter:
    """Dropped messages and readings by reason (worker threads share it, hence the lock)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def drop(self, reason: str, what: object) -> None:
        """Count one dropped item under ``reason``."""
        with self._lock:
            self._counts[reason] += 1
        log.debug("dropped (%s): %.200r", reason, what)

    def totals(self) -> dict[str, int]:
        """The counts so far."""
        with self._lock:
            return dict(self._counts)


DROPPED = DropCounter()


@dataclass(frozen=True)
class Reading:
    """One sensor reading of one entity; ``ts_ms`` is epoch milliseconds."""

    entity: str
    sensor: str
    ts_ms: int
    value: float


class ScoredReading(NamedTuple):
    """A reading and its anomaly score from the entity's model."""

    reading: Reading
    score: float


# --- Parsing ---------------------------------------------------------------------------


def decode(msg: KafkaSourceMessage[bytes | None, bytes | None]) -> dict[str, Any] | None:
    """The message's JSON object, or None (and a counted drop) if it is not one."""
    if not _FIRST_CONSUME.locked() and _FIRST_CONSUME.acquire(blocking=False):
        print(f"FIRST_CONSUME {time.time()}", flush=True)
    try:
        payload = json.loads(msg.value or b"")
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        DROPPED.drop("bad_json", msg.value)
        return None
    if not isinstance(payload, dict):
        DROPPED.drop("bad_form", payload)
        return None
    return payload


def expand(payload: dict[str, Any]) -> list[Reading]:
    """One reading per sensor of a single or batched message; malformed parts dropped."""
    entity, ts = payload.get("entity_id"), payload.get("ts")
    # bool is an int subclass, and True is no timestamp.
    if not isinstance(entity, str) or not isinstance(ts, int) or isinstance(ts, bool):
        DROPPED.drop("bad_form", payload)
        return []
    values = payload.get("values")
    if values is None:
        values = {payload.get("sensor"): payload.get("value")}
    if not isinstance(values, dict):
        DROPPED.drop("bad_form", payload)
        return []
    readings = []
    for sensor, value in values.items():
        if not isinstance(sensor, str):
            DROPPED.drop("bad_form", payload)
        elif not isinstance(value, int | float) or isinstance(value, bool):
            DROPPED.drop("not_a_number", payload)
        else:
            # float(): a JSON integer must still land in the DOUBLE column as a double.
            readings.append(Reading(entity, sensor, ts, float(value)))
    return readings


def in_range(sensors: dict[str, tuple[float, float]]) -> Callable[[Reading], bool]:
    """A filter keeping readings of known sensors within their valid range."""

    def check(reading: Reading) -> bool:
        limits = sensors.get(reading.sensor)
        if limits is None:
            DROPPED.drop("unknown_sensor", reading)
            return False
        low, high = limits
        # A NaN (json.loads accepts it) fails both comparisons, so it is dropped here too.
        if not low <= reading.value <= high:
            DROPPED.drop("out_of_range", reading)
            return False
        return True

    return check


# --- Anomaly score ---------------------------------------------------------------------


def anomaly_scorer(
    seed: int,
) -> Callable[[compose.Pipeline | None, Reading], tuple[compose.Pipeline, ScoredReading]]:
    """A ``stateful_map`` mapper: the entity's River model scores, then learns, a reading."""

    def score(
        model: compose.Pipeline | None, reading: Reading
    ) -> tuple[compose.Pipeline, ScoredReading]:
        if model is None:  # the entity's first reading
            model = compose.Pipeline(
                preprocessing.MinMaxScaler(),
                anomaly.HalfSpaceTrees(n_trees=10, height=8, seed=seed),
            )
        features = {reading.sensor: reading.value}
        scored = ScoredReading(reading, float(model.score_one(features)))
        model.learn_one(features)
        return model, scored

    return score


# --- Windows ---------------------------------------------------------------------------


def reading_time(scored: ScoredReading) -> datetime:
    """The reading's event time, as the aware UTC datetime ``EventClock`` requires."""
    return datetime.fromtimestamp(scored.reading.ts_ms / 1000, tz=UTC)


def collect_value(values: list[float], scored: ScoredReading) -> list[float]:
    """Fold a reading's value into its window's list."""
    values.append(scored.reading.value)
    return values


def with_window_id(key_id_obj: tuple[str, tuple[int, X]]) -> tuple[str, X]:
    """Re-key a windowing output by ``key:window_id`` so ``down`` can join ``meta``."""
    key, (window_id, obj) = key_id_obj
    return f"{key}:{window_id}", obj


@dataclass(frozen=True)
class WindowStats:
    """The statistics of one (entity, sensor, window)."""

    entity: str
    sensor: str
    meta: win.WindowMetadata
    count: int
    mean: float
    min: float
    max: float
    std: float


def window_stats(
    joined: tuple[str, tuple[list[float], win.WindowMetadata]],
) -> WindowStats:
    """Summarise a closed window's values (population std, like twinflow's)."""
    key_window, (values, meta) = joined
    key, _window_id = key_window.rsplit(":", 1)
    entity, sensor = key.rsplit(":", 1)  # sensor names have no colon; entity ids may
    return WindowStats(
        entity,
        sensor,
        meta,
        len(values),
        statistics.fmean(values),
        min(values),
        max(values),
        statistics.pstdev(values),
    )


# --- QuestDB ---------------------------------------------------------------------------


class QuestDBSink(DynamicSink[X]):
    """Rows to QuestDB over ILP/HTTP: a sender per worker, one flush per batch.

    ``write_row`` turns an item into one ``Sender.row`` call, so one sink class serves
    both tables.
    """

    def __init__(self, questdb_http: str, write_row: Callable[[Sender, X], None]) -> None:
        self._conf = f"http::addr={questdb_http};auto_flush=off;"
        self._write_row = write_row

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> StatelessSinkPartition[X]:
        """A partition with its own sender."""
        sender = Sender.from_conf(self._conf)
        sender.establish()  # type: ignore[no-untyped-call]
        return _QuestDBPartition(sender, self._write_row)


class _QuestDBPartition(StatelessSinkPartition[X]):
    def __init__(self, sender: Sender, write_row: Callable[[Sender, X], None]) -> None:
        self._sender = sender
        self._write_row = write_row

    def write_batch(self, items: list[X]) -> None:
        for item in items:
            self._write_row(self._sender, item)
        # A failed flush raises and stops the flow: without recovery there is nothing
        # that could replay the batch, and a benchmark must not count lost rows.
        self._sender.flush()

    def close(self) -> None:
        self._sender.close()


def readings_writer(table: str) -> Callable[[Sender, ScoredReading], None]:
    """Write a scored reading as a row of ``table``."""

    def write(sender: Sender, scored: ScoredReading) -> None:
        reading = scored.reading
        sender.row(
            table,
            symbols={"entity": reading.entity, "sensor": reading.sensor},
            columns={"value": reading.value, "score": scored.score},
            at=TimestampNanos(reading.ts_ms * 1_000_000),
        )

    return write


def windows_writer(table: str) -> Callable[[Sender, WindowStats], None]:
    """Write a window's statistics as a row of ``table``, at the window's start."""

    def write(sender: Sender, stats: WindowStats) -> None:
        sender.row(
            table,
            symbols={"entity": stats.entity, "sensor": stats.sensor},
            columns={
                "window_end": stats.meta.close_time,
                "count": stats.count,
                "mean": stats.mean,
                "min": stats.min,
                "max": stats.max,
                "std": stats.std,
            },
            at=stats.meta.open_time,
        )

    return write


def create_tables(questdb_http: str, prefix: str) -> None:
    """Create both tables (WAL, dedup on ``ts, entity, sensor``) over ``/exec``."""
    ddl = {
        "readings": "value DOUBLE, score DOUBLE",
        "sensor_windows": (
            "window_end TIMESTAMP, count LONG, mean DOUBLE, min DOUBLE, max DOUBLE, std DOUBLE"
        ),
    }
    for name, columns in ddl.items():
        query = (
            f'CREATE TABLE IF NOT EXISTS "{prefix}{name}" '
            f"(ts TIMESTAMP, entity SYMBOL, sensor SYMBOL, {columns}) "
            "TIMESTAMP(ts) PARTITION BY DAY WAL DEDUP UPSERT KEYS(ts, entity, sensor)"
        )
        url = f"http://{questdb_http}/exec?" + urllib.parse.urlencode({"query": query})
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            # QuestDB explains a rejected statement in the body; the status alone does not.
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"QuestDB rejected {query!r}: {detail}") from exc


# --- The dataflow ----------------------------------------------------------------------


def build_flow(spec: dict[str, Any]) -> Dataflow:
    """The peer's dataflow for a benchmark spec."""
    prefix = spec["table_prefix"]
    sensors = {name: (float(low), float(high)) for name, (low, high) in spec["sensors"].items()}
    flow = Dataflow("bytewax_tutorial_peer")

    kinp = kop.input(
        "kafka_in",
        flow,
        brokers=[spec["bootstrap"]],
        topics=[spec["topic"]],
        tail=True,
        starting_offset=OFFSET_BEGINNING,
    )
    op.inspect("inspect_kafka_errors", kinp.errs).then(op.raises, "kafka_error")

    payloads = op.filter_map("decode", kinp.oks, decode)
    readings = op.flat_map("expand", payloads, expand)
    valid = op.filter("in_range", readings, in_range(sensors))

    by_entity = op.key_on("key_entity", valid, lambda reading: reading.entity)
    scored = op.key_rm(
        "drop_entity_key",
        op.stateful_map("anomaly_score", by_entity, anomaly_scorer(spec["seed"])),
    )
    op.output(
        "readings_out",
        scored,
        QuestDBSink(spec["questdb_http"], readings_writer(f"{prefix}readings")),
    )

    by_sensor = op.key_on(
        "key_entity_sensor", scored, lambda s: f"{s.reading.entity}:{s.reading.sensor}"
    )
    windows = win.fold_window(
        "window_values",
        by_sensor,
        win.EventClock(
            ts_getter=reading_time,
            wait_for_system_duration=timedelta(seconds=spec["lateness_s"]),
        ),
        win.TumblingWindower(
            length=timedelta(seconds=spec["window_s"]),
            align_to=datetime(1970, 1, 1, tzinfo=UTC),
        ),
        builder=list,
        folder=collect_value,
        merger=list.__add__,
    )
    joined = op.join(
        "join_window_meta",
        op.map("key_values_by_window", windows.down, with_window_id),
        op.map("key_meta_by_window", windows.meta, with_window_id),
    )
    op.output(
        "windows_out",
        op.map("window_stats", joined, window_stats),
        QuestDBSink(spec["questdb_http"], windows_writer(f"{prefix}sensor_windows")),
    )
    return flow


# Set by the signal handler: after it, any error the flow stops with is the stop itself.
_STOP_REQUESTED = threading.Event()


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    # Bytewax stops on KeyboardInterrupt. SIGTERM raises it too, and SIGINT gets this
    # handler explicitly because a process started in the background of a shell
    # inherits SIGINT ignored, and Python then installs no handler for it.
    _STOP_REQUESTED.set()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the peer until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--spec", type=Path, required=True, help="the benchmark's spec JSON")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)

    create_tables(spec["questdb_http"], spec["table_prefix"])
    flow = build_flow(spec)
    try:
        # Bytewax ships cli_main's stub untyped.
        cli_main(flow, workers_per_process=spec.get("workers", 1))  # type: ignore[no-untyped-call]
    except KeyboardInterrupt:
        log.info("interrupted, stopping")
    except BytewaxRuntimeError:
        # With one worker, Bytewax runs the flow on the main thread, where Python runs
        # signal handlers: a signal that lands while a step's Python code runs raises
        # KeyboardInterrupt inside that step (or interrupts its system call, e.g. the
        # sink's flush), and Bytewax reports that as the step's error. After a stop
        # request that is the stop, not a failure.
        if not _STOP_REQUESTED.is_set():
            raise
        log.info("interrupted, stopping")
    log.info("dropped: %s", DROPPED.totals() or "nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
