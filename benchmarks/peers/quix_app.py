"""Peer 2: the benchmark's pipeline written the way Quix Streams 3.x's docs write it.

Run with the interpreter of the peer's own venv (see :mod:`benchmarks.peers.quix_env`;
quixstreams 3.28 pins an older confluent-kafka than twinflow), by path::

    <quix venv>/bin/python benchmarks/peers/quix_app.py --spec spec.json [--state-dir DIR]

It imports only the stdlib, quixstreams, river and questdb, never twinflow. The spec, the
message format and the tables are the contract of :mod:`benchmarks.peers`.

One :class:`~quixstreams.Application` with one ``StreamingDataFrame`` over the raw topic:

1. **Input**: ``app.topic(...)`` with a ``timestamp_extractor`` returning the payload's
   ``ts`` (epoch ms), so every window below is in event time. Malformed JSON is handled
   by a **custom deserializer**: :class:`LenientJSONDeserializer` subclasses Quix's
   ``JSONDeserializer`` and turns a ``SerializationError`` into a marker value instead of
   raising. The bad message thus stays in the dataframe and is dead-lettered by the same
   branch as every other rejection, produced by the app's producer inside the checkpoint
   (an ``on_consumer_error`` callback could only drop it, or produce it outside the
   checkpoint with a producer of its own). Kafka keys are read as ``"str"``: the entity.
2. **Validation**: ``sdf.apply(check, expand=True)`` turns a message into one item per
   reading (a batched ``values`` dict expands to one reading per sensor) and one per
   rejection. Message-level rejections (``bad_json``, ``schema``, ``bad_form``,
   ``non_finite``, ``bad_timestamp``, ``entity_mismatch`` when the Kafka key is not the
   payload's ``entity_id``) reject the message; ``unknown_sensor`` and ``out_of_range``
   reject that reading only (twinflow's reason codes and granularity).
3. **Branches** (Quix's branching: several operations off one dataframe):
   rejections ``.filter(...).to_topic(deadletter_topic)`` as JSON dead letters with the
   reason; valid readings ``.sink(QuestDBSink)`` into ``{prefix}readings``, and
   ``.tumbling_window(duration_ms, grace_ms).reduce(...).final()`` per entity (the
   message key) into per-sensor count/mean/min/max/population std (Welford), emitted when
   the window closes.
4. **Scoring**: per closed window, the entity's River model
   ``MinMaxScaler | HalfSpaceTrees(n_trees=10, height=8, seed)`` scores, then learns, the
   features ``{sensor}_mean`` and ``{sensor}_std``. MinMaxScaler rather than
   StandardScaler because HalfSpaceTrees assumes features in [0, 1] (River's own
   example pairs the two). The window's rows go to ``{prefix}sensor_windows`` and one row
   per window (ts = window end, score, readings) to ``{prefix}twin_state``.
5. **Sinks**: :class:`QuestDBSink` is a ``quixstreams.sinks.BatchingSink`` subclass: Quix
   hands it the rows of one topic partition at each checkpoint (every 5 s by default),
   and ``write`` sends them with one ILP/HTTP ``Sender`` (``auto_flush=off``): a
   ``row()`` per item, one ``flush()`` per batch. A failed flush raises, the checkpoint
   is aborted and its offsets are not committed; the app stops.

Tables are created up front over QuestDB's ``/exec`` (WAL, ``DEDUP UPSERT KEYS``), so a
replayed checkpoint upserts the same rows. ``FIRST_CONSUME <epoch s>`` is printed on the
first message; ``app.run()`` stops cleanly on SIGINT/SIGTERM.

Why this is idiomatic Quix Streams: every step is the stock API for its job, with the
defaults (``at-least-once``, 5 s commit interval, RocksDB window state backed by
changelog topics, ``"key"`` closing strategy); a custom deserializer and a custom
``BatchingSink`` are the documented extension points for what Quix has no built-in for.

Where the River models live, honestly: in a process-local dict keyed by entity. Quix's
``State`` stores JSON (orjson), so a model would have to be pickled and base64-encoded
into it on every window, and it would be replayed through the changelog topic: too
costly for a benchmark and not what a Quix user would do. The models are therefore **not
recovered** after a restart (they start learning from scratch), unlike the window state,
which Quix recovers from its changelog topics.

What differs from twinflow: a window closes only when a newer reading of the *same
entity* arrives (Quix's ``"key"`` closing strategy), so an entity's last windows stay
open when it goes silent (twinflow closes idle entities' windows); late readings (their
window closed) are counted and skipped by the window but still written to ``readings``
(Quix calls ``on_late``); no dedup of repeated readings, no unit conversion, no quality
flags, no ``ts_too_old``/``ts_in_future`` checks, dead letters are not written to
QuestDB, and the work is per message and per reading (Quix's model), not per batch.
Each run uses its own consumer group, so Quix creates changelog topics
``changelog__<group>--<topic>--<store>`` that outlive the run.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from questdb import Sender, TimestampMicros, TimestampNanos
from quixstreams import Application, message_context
from quixstreams.models import TimestampType
from quixstreams.models.serializers import SerializationContext, SerializationError
from quixstreams.models.serializers.json import JSONDeserializer
from quixstreams.sinks import BatchingSink, SinkBatch
from river import anomaly, compose, preprocessing

log = logging.getLogger("quix_peer")

# Epoch milliseconds outside [1970, 2200) are certainly not reading times (as twinflow).
_MAX_EPOCH_MS = 7_258_118_400_000
_EXCERPT_CHARS = 512
_BAD_JSON = "__bad_json__"
"""Key of the marker value :class:`LenientJSONDeserializer` returns for malformed JSON."""

Row = dict[str, Any]
Ranges = dict[str, tuple[float, float]]

DEAD_LETTERS: Counter[str] = Counter()
"""Dead letters sent, by reason (logged at exit)."""


# --- Input -----------------------------------------------------------------------------


class LenientJSONDeserializer(JSONDeserializer):
    """Quix's JSON deserializer, except that malformed JSON becomes a marker value.

    ``{_BAD_JSON: detail, "payload": text}`` flows on like any message and is
    dead-lettered by the validation step, instead of failing the consumer.
    """

    def __call__(self, value: bytes, ctx: SerializationContext) -> Any:
        """The decoded JSON, or the marker for a payload that is not JSON."""
        try:
            return super().__call__(value, ctx)
        except SerializationError as exc:
            return {
                _BAD_JSON: str(exc),
                "payload": value[: _EXCERPT_CHARS * 4].decode("utf-8", "replace"),
                "payload_b64": base64.b64encode(value).decode(),
            }


def epoch_ms(ts: Any) -> int | None:
    """``ts`` (epoch ms, or RFC 3339 with an offset) as epoch ms; None if it is neither."""
    if type(ts) is int:  # not bool, not float
        return ts if 0 <= ts < _MAX_EPOCH_MS else None
    if isinstance(ts, str):
        try:
            parsed = datetime.fromisoformat(ts)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return int(parsed.timestamp() * 1000)
    return None


def event_time(value: Any, headers: Any, timestamp: int, timestamp_type: TimestampType) -> int:
    """The ``timestamp_extractor``: the payload's ``ts``, else Kafka's timestamp.

    Messages without a valid ``ts`` are dead-lettered before any window, so the
    fallback only stamps their dead letters.
    """
    if isinstance(value, dict):
        ts = epoch_ms(value.get("ts"))
        if ts is not None:
            return ts
    return timestamp


# --- Validation ------------------------------------------------------------------------


def dead_letter(
    reason: str, detail: str, value: Any, entity: str | None = None, sensor: str | None = None
) -> Row:
    """A dead letter: reason code, detail, where it came from and the payload."""
    DEAD_LETTERS[reason] += 1
    ctx = message_context()
    if isinstance(value, dict) and _BAD_JSON in value:
        excerpt, payload_b64 = value["payload"], value["payload_b64"]
    else:
        excerpt, payload_b64 = json.dumps(value)[:_EXCERPT_CHARS], None
    return {
        "reason": reason,
        "detail": detail[:1000],
        "source": {
            "kind": "kafka",
            "topic": ctx.topic,
            "partition": ctx.partition,
            "offset": ctx.offset,
        },
        "received_at": datetime.now(UTC).isoformat(),
        "payload_size": ctx.size,
        "payload_excerpt": excerpt,
        "payload_b64": payload_b64,
        "entity_id": entity,
        "sensor": sensor,
        "version": 1,
    }


def is_dead_letter(item: Row) -> bool:
    """True for the rejections ``check`` emits (readings have no ``reason``)."""
    return "reason" in item


def is_reading(item: Row) -> bool:
    """True for the valid readings ``check`` emits."""
    return "reason" not in item


def _is_number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def checker(ranges: Ranges) -> Callable[[Any, Any, int, Any], list[Row]]:
    """The validation step: a message to its valid readings and its dead letters."""

    def check(value: Any, key: Any, timestamp: int, headers: Any) -> list[Row]:
        if not isinstance(value, dict):
            return [dead_letter("schema", "payload is not a JSON object", value)]
        if _BAD_JSON in value:
            return [dead_letter("bad_json", value[_BAD_JSON], value)]
        entity = value.get("entity_id")
        if not isinstance(entity, str):
            return [dead_letter("schema", "entity_id must be a string", value)]
        if "ts" not in value or not isinstance(value["ts"], int | str):
            return [dead_letter("schema", "ts must be epoch ms or RFC 3339", value, entity)]
        ts = epoch_ms(value["ts"])
        if ts is None:
            return [dead_letter("bad_timestamp", f"ts {value['ts']!r}", value, entity)]
        if key is not None and key != entity:
            return [dead_letter("entity_mismatch", f"key {key!r}", value, entity)]
        values = value.get("values")
        has_single = "sensor" in value or "value" in value
        if has_single == (values is not None):
            detail = "needs either sensor+value or values, not both"
            return [dead_letter("bad_form", detail, value, entity)]
        if values is None:
            values = {value.get("sensor"): value.get("value")}
        if not isinstance(values, dict) or not values:
            return [dead_letter("bad_form", "values must be a non-empty object", value, entity)]
        for sensor, reading in values.items():
            if not isinstance(sensor, str) or not _is_number(reading):
                detail = f"{sensor!r}: {reading!r} is not a number"
                return [dead_letter("schema", detail, value, entity)]
            if not math.isfinite(reading):
                return [dead_letter("non_finite", f"{sensor} is {reading}", value, entity)]
        items: list[Row] = []
        for sensor, reading in values.items():
            limits = ranges.get(sensor)
            if limits is None:
                items.append(
                    dead_letter("unknown_sensor", f"sensor {sensor!r}", value, entity, sensor)
                )
            elif not limits[0] <= reading <= limits[1]:
                detail = f"{sensor}={reading:g} outside [{limits[0]:g}, {limits[1]:g}]"
                items.append(dead_letter("out_of_range", detail, value, entity, sensor))
            else:
                # float(): a JSON integer must still be a double for QuestDB and River.
                items.append(
                    {"entity": entity, "sensor": sensor, "ts": ts, "value": float(reading)}
                )
        return items

    return check


# --- Windows and scoring ---------------------------------------------------------------

# Window state per sensor: [count, mean, M2, min, max] (Welford), JSON-serialisable as
# Quix's window state must be.
WindowAgg = dict[str, list[float]]


def window_init(reading: Row) -> WindowAgg:
    """The ``reduce`` initializer: a window's state from its first reading."""
    value = reading["value"]
    return {reading["sensor"]: [1, value, 0.0, value, value]}


def window_add(agg: WindowAgg, reading: Row) -> WindowAgg:
    """The ``reduce`` reducer: fold one reading into its sensor's running stats."""
    value = reading["value"]
    stats = agg.get(reading["sensor"])
    if stats is None:
        agg[reading["sensor"]] = [1, value, 0.0, value, value]
        return agg
    count = stats[0] + 1
    delta = value - stats[1]
    mean = stats[1] + delta / count
    stats[0], stats[1] = count, mean
    stats[2] += delta * (value - mean)
    if value < stats[3]:
        stats[3] = value
    if value > stats[4]:
        stats[4] = value
    return agg


class WindowScorer:
    """Scores closed windows with a River model per entity (process-local, not recovered)."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._models: dict[str, compose.Pipeline] = {}

    def _model(self, entity: str) -> compose.Pipeline:
        model = self._models.get(entity)
        if model is None:
            model = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(
                n_trees=10, height=8, seed=self._seed
            )
            self._models[entity] = model
        return model

    def __call__(self, window: Row, key: Any, timestamp: int, headers: Any) -> Row:
        """A closed window (``{start, end, value}``) to its stats and the entity's score."""
        sensors = {}
        features: dict[str, float] = {}
        for sensor, (count, mean, m2, low, high) in window["value"].items():
            std = math.sqrt(m2 / count)  # population std, as twinflow's
            sensors[sensor] = {
                "count": int(count),
                "mean": mean,
                "min": low,
                "max": high,
                "std": std,
            }
            features[f"{sensor}_mean"] = mean
            features[f"{sensor}_std"] = std
        model = self._model(key)
        score = float(model.score_one(features))
        model.learn_one(features)
        return {
            "entity": key,
            "start": window["start"],
            "end": window["end"],
            "sensors": sensors,
            "score": score,
            "readings": sum(stats["count"] for stats in sensors.values()),
        }


def sensor_rows(scored: Row) -> list[Row]:
    """One ``sensor_windows`` row per sensor of a scored window."""
    common = {"entity": scored["entity"], "start": scored["start"], "end": scored["end"]}
    return [common | {"sensor": sensor} | stats for sensor, stats in scored["sensors"].items()]


class LateCounter:
    """The windows' ``on_late`` callback: counts late readings instead of logging each."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args: Any, **kwargs: Any) -> bool:
        """Count one late reading; False tells Quix not to log it."""
        self.count += 1
        return False


# --- QuestDB ---------------------------------------------------------------------------

RowWriter = Callable[[Sender, Any], None]


class QuestDBSink(BatchingSink):
    """Rows to QuestDB over ILP/HTTP: one sender, a ``row()`` per item, one flush per batch."""

    def __init__(self, questdb_http: str, write_row: RowWriter) -> None:
        super().__init__()
        self._conf = f"http::addr={questdb_http};auto_flush=off;"
        self._write_row = write_row

    def write(self, batch: SinkBatch) -> None:
        """Send one topic partition's rows of a checkpoint."""
        with Sender.from_conf(self._conf) as sender:
            for item in batch:
                self._write_row(sender, item.value)
            sender.flush()


def readings_writer(table: str) -> RowWriter:
    """A reading as a row of ``table``."""

    def write(sender: Sender, reading: Row) -> None:
        sender.row(
            table,
            symbols={"entity": reading["entity"], "sensor": reading["sensor"]},
            columns={"value": reading["value"]},
            at=TimestampNanos(reading["ts"] * 1_000_000),
        )

    return write


def windows_writer(table: str) -> RowWriter:
    """One sensor's window stats as a row of ``table``, at the window's start."""

    def write(sender: Sender, row: Row) -> None:
        sender.row(
            table,
            symbols={"entity": row["entity"], "sensor": row["sensor"]},
            columns={
                "window_end": TimestampMicros(row["end"] * 1000),
                "count": row["count"],
                "mean": row["mean"],
                "min": row["min"],
                "max": row["max"],
                "std": row["std"],
            },
            at=TimestampNanos(row["start"] * 1_000_000),
        )

    return write


def state_writer(table: str) -> RowWriter:
    """A scored window as the entity's ``twin_state`` row, at the window's end."""

    def write(sender: Sender, scored: Row) -> None:
        sender.row(
            table,
            symbols={"entity": scored["entity"]},
            columns={"anomaly_score": scored["score"], "readings": scored["readings"]},
            at=TimestampNanos(scored["end"] * 1_000_000),
        )

    return write


TABLES = {
    "readings": ("sensor SYMBOL, value DOUBLE", "ts, entity, sensor"),
    "sensor_windows": (
        "sensor SYMBOL, window_end TIMESTAMP, count LONG, "
        "mean DOUBLE, min DOUBLE, max DOUBLE, std DOUBLE",
        "ts, entity, sensor",
    ),
    "twin_state": ("anomaly_score DOUBLE, readings LONG", "ts, entity"),
}


def create_tables(questdb_http: str, prefix: str) -> None:
    """Create the peer's tables (WAL, dedup keys) over QuestDB's ``/exec``."""
    for name, (columns, keys) in TABLES.items():
        query = (
            f'CREATE TABLE IF NOT EXISTS "{prefix}{name}" '
            f"(ts TIMESTAMP, entity SYMBOL, {columns}) "
            f"TIMESTAMP(ts) PARTITION BY DAY WAL DEDUP UPSERT KEYS({keys})"
        )
        url = f"http://{questdb_http}/exec?" + urllib.parse.urlencode({"query": query})
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"QuestDB rejected {query!r}: {detail}") from exc


# --- The application -------------------------------------------------------------------


class FirstConsume:
    """Prints ``FIRST_CONSUME <epoch s>`` on the first message, once."""

    def __init__(self) -> None:
        self.done = False

    def __call__(self, value: Any) -> None:
        """The ``sdf.update`` callback."""
        if not self.done:
            self.done = True
            print(f"FIRST_CONSUME {time.time()}", flush=True)


def build_app(spec: dict[str, Any], state_dir: Path) -> tuple[Application, LateCounter]:
    """The Quix application for a benchmark spec (and its late-reading counter)."""
    prefix: str = spec["table_prefix"]
    questdb: str = spec["questdb_http"]
    ranges: Ranges = {
        name: (float(low), float(high)) for name, (low, high) in spec["sensors"].items()
    }
    app = Application(
        broker_address=spec["bootstrap"],
        consumer_group=f"quix-peer-{prefix.rstrip('_')}",
        auto_offset_reset="earliest",
        state_dir=state_dir,
    )
    raw = app.topic(
        spec["topic"],
        key_deserializer="str",
        value_deserializer=LenientJSONDeserializer(),
        timestamp_extractor=event_time,
    )
    deadletters = app.topic(spec["deadletter_topic"], key_serializer="str", value_serializer="json")

    sdf = app.dataframe(raw)
    sdf = sdf.update(FirstConsume())
    items = sdf.apply(checker(ranges), metadata=True, expand=True)

    items.filter(is_dead_letter).to_topic(deadletters)

    readings = items.filter(is_reading)
    readings.sink(QuestDBSink(questdb, readings_writer(f"{prefix}readings")))

    late = LateCounter()
    windows = (
        readings.tumbling_window(
            duration_ms=int(spec["window_s"] * 1000),
            grace_ms=int(spec["lateness_s"] * 1000),
            on_late=late,
        )
        .reduce(reducer=window_add, initializer=window_init)
        .final()
    )
    scored = windows.apply(WindowScorer(int(spec["seed"])), metadata=True)
    scored.apply(sensor_rows, expand=True).sink(
        QuestDBSink(questdb, windows_writer(f"{prefix}sensor_windows"))
    )
    scored.sink(QuestDBSink(questdb, state_writer(f"{prefix}twin_state")))
    return app, late


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--spec", type=Path, required=True, help="the benchmark's spec JSON")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="Quix's RocksDB state directory (default: a temporary one, removed at exit)",
    )
    return parser.parse_args(argv)


def _spec_summary(spec: dict[str, Any]) -> Iterator[str]:
    for field in ("topic", "deadletter_topic", "table_prefix", "window_s", "lateness_s"):
        yield f"{field}={spec[field]}"


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the peer until SIGINT or SIGTERM, then exit the process (status 0)."""
    args = _parse_args(argv)
    spec: dict[str, Any] = json.loads(args.spec.read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log.info("spec: %s", " ".join(_spec_summary(spec)))
    create_tables(spec["questdb_http"], spec["table_prefix"])
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="quix-peer-state-"))
    try:
        app, late = build_app(spec, state_dir)
        app.run()
        log.info(
            "stopped; dead letters by reason: %s; late readings skipped by the windows: %d",
            dict(DEAD_LETTERS),
            late.count,
        )
    finally:
        if args.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    # Everything is flushed and committed by now. Skip the interpreter's teardown: its
    # final garbage collection walks every River tree node (10 trees of 511 nodes per
    # entity, in reference cycles), which took 11-18 s with 1000 entities.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
