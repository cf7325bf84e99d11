"""The QuestDB and Kafka sinks inside real Bytewax flows, against the real services."""

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import bytewax.operators as op
import numpy as np
import pandas as pd
import pytest
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage
from bytewax.dataflow import Dataflow
from bytewax.outputs import Sink
from bytewax.testing import TestingSource, cluster_main, run_main
from confluent_kafka.admin import AdminClient
from prometheus_client import REGISTRY

from connectors.kafka import KafkaRecord, TopicSpec, client_config, ensure_topics
from connectors.kafka_sink import KafkaOutputSink, KafkaSinkError
from connectors.questdb import QuestDBHttp, TableBatch, TableSpec, ensure_table
from connectors.questdb_sink import QuestDBSink, QuestDBSinkError, table_frame
from schemas.outputs import COUNTS
from tests.helpers import cause_of, consume_all, free_ports, wait_for_wal
from tests.relay import TcpRelay
from twinflow.settings import Settings
from twinflow.tables import ANOMALIES, READINGS, TWIN_STATE

pytestmark = pytest.mark.integration

T0_MS = 1_700_000_000_000
GIVE_UP_S = 60.0
"""Longer than any of these tests waits: a sink that gives up here did not fail fast."""


def _flow(items: list[Any], sink: Sink[Any], *, spread: bool = False) -> Dataflow:
    flow = Dataflow("sink_test")
    stream = op.input("in", flow, TestingSource(items))
    if spread:  # TestingSource feeds one worker; hand items to all of them
        stream = op.redistribute("spread", stream)
    op.output("out", stream, sink)
    return flow


def _run(flow: Dataflow, workers: int = 1) -> None:
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)


# --- QuestDB -------------------------------------------------------------------------


@pytest.fixture
def tables(stack: Settings, unique: str) -> Iterator[dict[str, TableSpec]]:
    """readings, twin_state and anomalies under unique names; dropped afterwards."""
    sql = QuestDBHttp(stack.questdb)
    specs = {
        spec.name: dataclasses.replace(spec, name=f"test_{unique}_{spec.name}")
        for spec in (READINGS, TWIN_STATE, ANOMALIES)
    }
    for spec in specs.values():
        ensure_table(sql, spec)
    yield specs
    for spec in specs.values():
        sql.exec(f'DROP TABLE IF EXISTS "{spec.name}"')


def _readings(spec: TableSpec, start: int, count: int) -> TableBatch:
    i = np.arange(start, start + count)
    return table_frame(
        spec,
        {
            "ts": T0_MS + (i // 8) * 100,
            "entity": [f"pump-{k % 5}" for k in i // 8],
            "sensor": [f"s{k % 8}" for k in i],
            "value": i * 0.5,
            "flags": i % 3,
        },
    )


def _twin_state(spec: TableSpec, count: int) -> TableBatch:
    i = np.arange(count)
    columns: dict[str, Any] = {
        "ts": T0_MS + i * 1000,
        "entity": [f"pump-{k % 5}" for k in i],
        "status": np.where(i % 2 == 0, "OK", "DEGRADED"),
        "health": 1.0 - i / 100,
        "anomaly_score": i / 10,
        "threshold": np.full(count, 0.9),
    }
    for name in COUNTS:
        columns[name] = i
    columns["active_alarms"] = [f"pump-{k % 5}@{k}" if k % 3 == 0 else "" for k in i]
    near = i % 4 == 0  # a quarter of the machines head for a limit
    columns["limit_sensor"] = [("vibration_rms" if n else None) for n in near]
    hours = [float(k + 1) if n else None for k, n in zip(i.tolist(), near.tolist(), strict=True)]
    columns["time_to_limit_s"] = [h and 3600.0 * h for h in hours]
    columns["time_to_limit_low_s"] = [h and 1800.0 * h for h in hours]
    return table_frame(spec, columns)


def _anomalies(spec: TableSpec, count: int) -> TableBatch:
    i = np.arange(count)
    return table_frame(
        spec,
        {
            "ts": T0_MS + i * 10_000,
            "entity": [f"pump-{k}" for k in i],
            "window_end": T0_MS + (i + 1) * 10_000,
            "score": 0.95 + i / 1000,
            "threshold": np.full(count, 0.9),
            "model": ["hst"] * count,
            "top_sensors": ["s1,s2"] * count,
            "explanation": [None if k == 0 else f"s1 high ({k})" for k in i],
        },
    )


def _counts(sql: QuestDBHttp, specs: dict[str, TableSpec]) -> dict[str, int]:
    return {
        key: sql.exec(f'SELECT count() FROM "{spec.name}"').rows[0][0]
        for key, spec in specs.items()
    }


def test_questdb_sink_writes_several_tables_and_a_replay_adds_nothing(
    stack: Settings, tables: dict[str, TableSpec]
) -> None:
    sql = QuestDBHttp(stack.questdb)
    readings, state, anomalies = tables["readings"], tables["twin_state"], tables["anomalies"]
    batches = [
        _readings(readings, 0, 600),
        _twin_state(state, 40),
        _readings(readings, 600, 400),
        _anomalies(anomalies, 6),
    ]

    _run(_flow(batches, QuestDBSink(stack.questdb, give_up_s=GIVE_UP_S)))
    first = wait_for_wal(sql, [spec.name for spec in tables.values()])
    assert _counts(sql, tables) == {"readings": 1000, "twin_state": 40, "anomalies": 6}

    # Replay everything on two workers (as recovery would after a crash), plus 16 new
    # readings: the replayed rows upsert onto themselves, only the new rows add up.
    replay = [*batches, _readings(readings, 1000, 16)]
    _run(_flow(replay, QuestDBSink(stack.questdb, give_up_s=GIVE_UP_S), spread=True), workers=2)
    second = wait_for_wal(sql, [spec.name for spec in tables.values()])
    assert all(second[name] > first[name] for name in first), (first, second)
    assert _counts(sql, tables) == {"readings": 1016, "twin_state": 40, "anomalies": 6}

    # Values, timestamps, symbols and nulls arrive as written.
    row = sql.exec(
        f"SELECT count_distinct(entity), count_distinct(sensor), sum(value), sum(flags), "
        f'min(ts), max(ts) FROM "{readings.name}"'
    ).rows[0]
    i = np.arange(1016)
    assert row[:4] == (5, 8, float((i * 0.5).sum()), int((i % 3).sum()))
    assert (row[4], row[5]) == ("2023-11-14T22:13:20.000000Z", "2023-11-14T22:13:32.600000Z")
    anomaly_rows = sql.exec(
        f'SELECT entity, window_end, model, top_sensors, explanation FROM "{anomalies.name}" '
        "ORDER BY ts LIMIT 2"
    ).rows
    assert anomaly_rows == (
        ("pump-0", "2023-11-14T22:13:30.000000Z", "hst", "s1,s2", None),
        ("pump-1", "2023-11-14T22:13:40.000000Z", "hst", "s1,s2", "s1 high (1)"),
    )
    # Column types are still the spec's (entity, sensor, status, model: SYMBOL) and no
    # column was added. (QuestDB would also take ILP strings into a SYMBOL column, so
    # this cannot tell tags from fields; the sink sends the SYMBOL columns as tags.)
    for spec in tables.values():
        kinds = dict(sql.exec(f"SELECT \"column\", type FROM table_columns('{spec.name}')").rows)
        assert kinds == dict(spec.columns), spec.name


def test_questdb_sink_raises_when_questdb_rejects_a_batch(
    stack: Settings, tables: dict[str, TableSpec]
) -> None:
    sql = QuestDBHttp(stack.questdb)
    readings = tables["readings"]
    good = _readings(readings, 0, 10)
    # A string in the DOUBLE column: QuestDB refuses the line, the sink must not hide it.
    bad_frame = good.frame.copy()
    bad_frame["value"] = pd.array(["not a number"] * 10, dtype="string")
    with pytest.raises(Exception) as raised:
        _run(
            _flow(
                [TableBatch(readings, bad_frame)], QuestDBSink(stack.questdb, give_up_s=GIVE_UP_S)
            )
        )
    error = cause_of(raised.value, QuestDBSinkError)
    message = str(error)
    assert f"10 rows ({readings.name}: 10)" in message
    assert "cast error" in message
    assert "DOUBLE" in message
    wait_for_wal(sql, [readings.name])
    assert _counts(sql, {"readings": readings}) == {"readings": 0}


def test_questdb_sink_raises_when_questdb_is_unreachable(
    stack: Settings, tables: dict[str, TableSpec]
) -> None:
    closed = stack.questdb.model_copy(update={"http_port": free_ports(1)[0]})
    batches = [_readings(tables["readings"], 0, 5)]
    # At start the sender asks the server for its ILP version: the flow cannot start.
    with pytest.raises(Exception) as raised:
        _run(_flow(batches, QuestDBSink(closed, give_up_s=GIVE_UP_S)))
    assert "cannot reach QuestDB" in str(cause_of(raised.value, QuestDBSinkError))
    # With the version pinned nothing is sent before the first flush, which then fails
    # and is retried until the sink gives up.
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        sink = QuestDBSink(closed, give_up_s=2, protocol_version=2, retry_timeout=0)
        _run(_flow(batches, sink))
    message = str(cause_of(raised.value, QuestDBSinkError))
    assert "QuestDB did not take 5 rows" in message
    assert "unavailable for 2 s" in message and "TWINFLOW_FLOW__SINK_GIVE_UP_S" in message
    assert 2 <= time.monotonic() - started < 15


class _OutageDuring:
    """A map step that takes the relay down at a chosen item and brings it back later."""

    def __init__(self, relay_port: int, target_port: int, at_item: int, down_s: float) -> None:
        self.relay = TcpRelay(relay_port, target_port).__enter__()
        self._ports = (relay_port, target_port)
        self._at_item, self._down_s = at_item, down_s
        self._seen = 0
        self.down_at: float | None = None
        self.back_at: float | None = None

    def __call__(self, item: TableBatch) -> TableBatch:
        self._seen += 1
        if self._seen == self._at_item:
            self.relay.__exit__()
            self.down_at = time.monotonic()
            threading.Timer(self._down_s, self._back).start()
        return item

    def _back(self) -> None:
        self.relay = TcpRelay(*self._ports).__enter__()
        self.back_at = time.monotonic()


def test_questdb_sink_waits_out_an_outage_and_writes_every_row_once(
    stack: Settings, tables: dict[str, TableSpec]
) -> None:
    readings = tables["readings"]
    port = free_ports(1)[0]
    relayed = stack.questdb.model_copy(update={"http_port": port})
    batches = [_readings(readings, 10 * k, 10) for k in range(4)]
    outage = _OutageDuring(port, stack.questdb.http_port, at_item=2, down_s=3)
    retries_before = _sample("twinflow_sink_retries_total", sink="questdb")
    flow = Dataflow("sink_outage")
    stream = op.map("outage", op.input("in", flow, TestingSource(batches)), outage)
    op.output("out", stream, QuestDBSink(relayed, give_up_s=60))
    try:
        run_main(flow)
        finished = time.monotonic()
    finally:
        outage.relay.__exit__()
    assert outage.down_at is not None and outage.back_at is not None
    # The rows after the outage began were written only once QuestDB was back.
    assert finished >= outage.back_at
    assert _sample("twinflow_sink_retries_total", sink="questdb") > retries_before
    assert _sample("twinflow_sink_waiting", sink="questdb") == 0
    sql = QuestDBHttp(stack.questdb)
    wait_for_wal(sql, [readings.name])
    assert _counts(sql, {"readings": readings}) == {"readings": 40}


# --- Kafka ---------------------------------------------------------------------------


def _messages_in(stack: Settings, topic: str) -> int:
    """Messages in ``topic``; 0 when it does not exist."""
    topics = AdminClient(client_config(stack.kafka)).list_topics(timeout=10).topics
    return len(consume_all(stack.kafka, topic, idle_s=1)) if topic in topics else 0


def _missing_topic(stack: Settings, name: str) -> None:
    topics = AdminClient(client_config(stack.kafka)).list_topics(timeout=10).topics
    assert name not in topics, "auto-creation must be off on the test broker"


def _sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, f"no sample {name} {labels}"
    return value


def test_kafka_sink_delivers_keyed_records_from_two_workers(stack: Settings, unique: str) -> None:
    state, events = f"test.sink.state.{unique}", f"test.sink.events.{unique}"
    ensure_topics(stack.kafka, [TopicSpec(state, 3), TopicSpec(events, 1)])
    records = [
        KafkaRecord(state if i % 3 else events, f"pump-{i % 7}".encode(), f"v{i}".encode())
        for i in range(300)
    ]
    records.append(KafkaRecord(events, None, b"no key"))

    _run(_flow(records, KafkaOutputSink(stack.kafka, give_up_s=GIVE_UP_S), spread=True), workers=2)

    for topic in (state, events):
        sent = Counter((r.key, r.value) for r in records if r.topic == topic)
        got = consume_all(stack.kafka, topic, expected=sent.total())
        assert Counter((m.key(), m.value()) for m in got) == sent
        # The key decides the partition: one partition per key.
        partitions: dict[bytes | None, set[int]] = {}
        for message in got:
            partitions.setdefault(message.key(), set()).add(message.partition())
        assert all(len(parts) == 1 for key, parts in partitions.items() if key is not None)


@pytest.mark.chaos
def test_kafka_sink_raises_when_a_delivery_fails(
    stack: Settings, unique: str, chaos_table: list[dict[str, object]]
) -> None:
    good, typo = f"test.sink.ok.{unique}", f"test.sink.typo.{unique}"
    ensure_topics(stack.kafka, [TopicSpec(good, 1)])
    sink = KafkaOutputSink(stack.kafka, give_up_s=GIVE_UP_S, overrides={"message.timeout.ms": 2000})
    records = [KafkaRecord(good, b"k", b"fine"), KafkaRecord(typo, b"k", b"lost?")]

    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        _run(_flow(records, sink))
    assert time.monotonic() - started < 20
    message = str(cause_of(raised.value, KafkaSinkError))
    assert f"topic {typo!r}" in message
    assert "Unknown topic" in message or "timed out" in message, message
    _missing_topic(stack, typo)
    delivered = [m.value() for m in consume_all(stack.kafka, good, expected=1)]
    # A record is lost when it is neither delivered nor named in the error that stops
    # the flow (recovery replays what the error names).
    named = 1 if f"topic {typo!r}" in message else 0
    row = {
        "fault": "7. Kafka output delivery fails: twinflow's sink",
        "runs": 1,
        "lost": len(records) - len(delivered) - named,
        "duplicates": len(delivered) - len(set(delivered)),
        "mismatches": len(set(delivered) - {b"fine"}),
        "notes": "the flow stops with the topic named, so recovery retries the batch",
    }
    chaos_table.append(row)
    assert row["lost"] == row["duplicates"] == row["mismatches"] == 0, row


def test_kafka_sink_raises_when_reports_do_not_arrive_in_time(stack: Settings, unique: str) -> None:
    typo = f"test.sink.slow.{unique}"
    # librdkafka would retry for 60 s; the write batch gives up after 1 s and says so.
    sink = KafkaOutputSink(
        stack.kafka,
        give_up_s=GIVE_UP_S,
        flush_timeout_s=1,
        overrides={"message.timeout.ms": 60_000},
    )
    with pytest.raises(Exception) as raised:
        _run(_flow([KafkaRecord(typo, None, b"x")], sink))
    message = str(cause_of(raised.value, KafkaSinkError))
    assert "1 of 1 messages to [" in message
    assert "got no delivery report within 1 s" in message
    assert typo in message


@pytest.mark.chaos
def test_stock_bytewax_kafka_sink_loses_the_same_failure_silently(
    stack: Settings, unique: str, chaos_table: list[dict[str, object]]
) -> None:
    """Negative control: why connectors.kafka_sink exists (Bytewax 0.21.1 KafkaSink)."""
    typo = f"test.sink.stock.{unique}"
    stock = KafkaSink(
        brokers=[stack.kafka.bootstrap], topic=None, add_config={"message.timeout.ms": "2000"}
    )
    # The flow finishes normally although its only message was never delivered.
    _run(_flow([KafkaSinkMessage(b"k", b"lost", topic=typo)], stock))
    _missing_topic(stack, typo)  # so the message is nowhere
    chaos_table.append(
        {
            "fault": "7. (negative control) the same failure, stock Bytewax KafkaSink",
            "runs": 1,
            "lost": 1 - _messages_in(stack, typo),
            "duplicates": 0,
            "mismatches": 0,
            "notes": "the flow ends normally; the message is gone without a word",
        }
    )
