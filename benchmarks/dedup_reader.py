"""Whether a reader of ``readings`` sees a duplicate key after overlapping ingestion.

A second ``twinflow demo`` whose event time overlaps an earlier one rewrites the same
keys (the simulator's timestamps repeat). This replays that on a QuestDB of its own
(own ports and state folder, so it can be restarted): a first pass writes the earlier
run in time order, a second pass rewrites an overlapping span (same keys, new values)
in many small ILP/HTTP requests, out of order into partitions that already hold data,
while a reader polls

* the duplicate-key query a Grafana user runs (``GROUP BY entity, sensor, ts`` with
  ``c > 1``), over the whole table and with a ``WHERE`` on ``ts``;
* ``count()`` against the number of distinct keys written;
* ``wal_tables()`` (``writerTxn`` against ``sequencerTxn``).

It keeps polling for ``--hold`` seconds after the WAL is applied, restarts the server
and asks once more. Each scenario varies one thing: request size, how far out of order
the second pass goes, and QuestDB's parallel GROUP BY.

What it found with QuestDB 9.3.1: the stored rows never repeat a key (``count()``
equals the distinct keys, and the duplicate query's own rows are empty, at every poll),
but the duplicate query answers 1 at every poll, restart or not. That is QuestDB's
planner: a ``count()`` over a filtered ``GROUP BY`` subquery drops the group keys and
counts the whole table as one group (questdb/questdb#7201), so it answers 1 whenever
the table holds more rows than the threshold. ``dup_rows`` asks the same question in a
form the planner gets right.

    .venv/bin/python -m benchmarks.dedup_reader [--out DIR] [--runs N] [--hold S]

writes ``dedup_reader.json`` and ``.md`` under ``DIR`` (default
``STATE_DIR/bench/dedup-reader``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from questdb import Sender

from benchmarks.results import write_results
from connectors.questdb import QuestDBError, QuestDBHttp, TableSpec, ensure_table
from connectors.questdb_sink import table_frame
from twinflow.services import manager
from twinflow.services.process import port_is_free
from twinflow.settings import Settings, load_settings
from twinflow.tables import READINGS

log = logging.getLogger("benchmarks.dedup_reader")

T0_MS = 1_764_547_200_000 - 3_600_000
"""2025-12-01T00:00Z minus an hour: the first pass spans a day boundary (two partitions)."""
PARALLEL_GROUPBY_ENV = "QDB_CAIRO_SQL_PARALLEL_GROUPBY_ENABLED"
"""QuestDB reads any server.conf key from QDB_<KEY> in its own environment."""


@dataclass(frozen=True)
class Scenario:
    """One way of writing the overlap."""

    name: str
    entities: int = 20
    sensors: int = 6
    span_s: int = 7200
    """Event time each pass covers, one reading per sensor per second."""
    shift_s: int = 1800
    """The second pass starts this much later than the first: they overlap by the rest."""
    batch_rows: int = 2400
    """Rows per ILP/HTTP request (one WAL transaction each) in the second pass."""
    order: str = "time"
    """``time``: the second pass in event-time order (a demo); ``shuffled``: its
    requests in random order; ``reverse``: newest request first."""
    parallel_groupby: bool = True

    @property
    def keys_per_s(self) -> int:
        return self.entities * self.sensors


@dataclass
class Poll:
    """One look at the table by the reader, ``t`` seconds after the second pass began."""

    t: float
    dup_keys: int
    """The reader's query as written (``count()`` over the filtered group-by)."""
    dup_keys_where: int
    """The same with a ``WHERE`` on ``ts`` (the overlap) inside the subquery."""
    dup_rows: int
    """Keys with more than one row, listed (a form QuestDB 9.3.1 plans right)."""
    rows: int
    distinct_keys: int
    writer_txn: int
    sequencer_txn: int

    @property
    def applied(self) -> bool:
        return self.writer_txn == self.sequencer_txn


@dataclass
class Outcome:
    scenario: Scenario
    expected_keys: int
    write_s: float = 0.0
    applied_at_s: float | None = None
    polls: list[Poll] = dataclasses.field(default_factory=list)
    after_restart: Poll | None = None
    partitions_after: int = 0

    def anomalies(self, *, applied_only: bool) -> list[Poll]:
        """Polls whose duplicate query answered non-zero."""
        return [p for p in self.polls if (p.applied or not applied_only) and p.dup_keys]

    def real_duplicates(self) -> list[Poll]:
        """Polls that saw a key stored twice: listed, or more rows than keys."""
        return [p for p in self.polls if p.dup_rows or p.rows != p.distinct_keys]

    def summary(self) -> dict[str, Any]:
        applied = self.anomalies(applied_only=True)
        during = self.anomalies(applied_only=False)
        return {
            "scenario": dataclasses.asdict(self.scenario),
            "expected_keys": self.expected_keys,
            "write_s": round(self.write_s, 2),
            "wal_applied_at_s": self.applied_at_s,
            "polls": len(self.polls),
            "polls_applied": sum(p.applied for p in self.polls),
            "anomalous_polls": len(during),
            "anomalous_polls_wal_applied": len(applied),
            "anomaly_first_last_s": (
                [round(applied[0].t, 2), round(applied[-1].t, 2)] if applied else None
            ),
            "polls_with_real_duplicates": len(self.real_duplicates()),
            "max_dup_keys": max((p.dup_keys for p in self.polls), default=0),
            "max_dup_keys_where": max((p.dup_keys_where for p in self.polls), default=0),
            "max_dup_rows": max((p.dup_rows for p in self.polls), default=0),
            "max_rows_over_keys": max((p.rows - p.distinct_keys for p in self.polls), default=0),
            "final": dataclasses.asdict(self.polls[-1]) if self.polls else None,
            "after_restart": dataclasses.asdict(self.after_restart) if self.after_restart else None,
            "partitions_after": self.partitions_after,
        }


def _groups(table: str, where: str = "") -> str:
    return f'SELECT entity, sensor, ts, count() c FROM "{table}"{where} GROUP BY entity, sensor, ts'  # noqa: S608


def dup_query(table: str, where: str = "") -> str:
    """The reader's duplicate-key query: how many keys have more than one row."""
    return f"SELECT count() FROM ({_groups(table, where)}) WHERE c > 1"  # noqa: S608


def dup_rows_query(table: str, where: str = "") -> str:
    """The keys with more than one row themselves (at most 100)."""
    return f"SELECT * FROM ({_groups(table, where)}) WHERE c > 1 LIMIT 100"  # noqa: S608


def extra_rows_query(table: str) -> str:
    """Rows beyond one per key (0: no key is stored twice), in one query QuestDB plans right."""
    return f"SELECT sum(c) - count() FROM ({_groups(table)})"  # noqa: S608


def _wal_query(table: str, columns: str) -> str:
    return f"SELECT {columns} FROM wal_tables() WHERE name = '{table}'"  # noqa: S608


def look(sql: QuestDBHttp, table: str, t: float, where: str) -> Poll:
    """Everything the reader asks, in one poll."""
    # The WAL first: "applied" then holds for everything read after it.
    wal = sql.exec(_wal_query(table, "writerTxn, sequencerTxn")).rows[0]
    dup = sql.exec(dup_query(table)).rows[0][0]
    dup_where = sql.exec(dup_query(table, where)).rows[0][0]
    dup_rows = len(sql.exec(dup_rows_query(table)).rows)
    # Keys and rows from one query, so from one snapshot of the table.
    keys, rows = sql.exec(f"SELECT count(), sum(c) FROM ({_groups(table)})").rows[0]  # noqa: S608
    return Poll(t, dup, dup_where, dup_rows, int(rows or 0), keys, int(wal[0]), int(wal[1]))


def frames(scenario: Scenario, start_s: int, value_offset: float) -> list[Any]:
    """A pass from ``start_s`` on, cut into ``batch_rows`` requests in event-time order."""
    per_request = max(1, scenario.batch_rows // scenario.keys_per_s)
    entities = np.repeat([f"pump-{e:03d}" for e in range(scenario.entities)], scenario.sensors)
    sensors = np.tile([f"s{k}" for k in range(scenario.sensors)], scenario.entities)
    out = []
    for first in range(start_s, start_s + scenario.span_s, per_request):
        seconds = np.arange(first, min(first + per_request, start_s + scenario.span_s))
        n = len(seconds) * scenario.keys_per_s
        out.append(
            table_frame(
                dataclasses.replace(READINGS, name="x"),
                {
                    "ts": np.repeat(T0_MS + seconds * 1000, scenario.keys_per_s),
                    "entity": np.tile(entities, len(seconds)),
                    "sensor": np.tile(sensors, len(seconds)),
                    "value": np.arange(n) * 0.5 + value_offset,
                    "flags": np.zeros(n, dtype=np.int64),
                },
            ).frame
        )
    return out


def write(settings: Settings, table: TableSpec, batches: list[Any]) -> None:
    """One ILP/HTTP request (one WAL transaction) per frame, as the sink does."""
    conf = settings.questdb.ilp_conf(auto_flush="off")
    with Sender.from_conf(conf) as sender:
        for frame in batches:
            sender.dataframe(frame, table_name=table.name, symbols=["entity", "sensor"], at="ts")
            sender.flush()


def wal_applied(sql: QuestDBHttp, table: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        writer, seq, suspended = sql.exec(
            _wal_query(table, "writerTxn, sequencerTxn, suspended")
        ).rows[0]
        if suspended:
            raise QuestDBError(f"table {table} is suspended")
        if writer == seq:
            return
        if time.monotonic() > deadline:
            raise QuestDBError(f"WAL of {table} not applied after {timeout_s} s")
        time.sleep(0.1)


def run_scenario(
    settings: Settings, scenario: Scenario, hold_s: float, restart: bool, seed: int = 0
) -> Outcome:
    """Both passes with the reader polling; then ``hold_s`` more, and a restart."""
    sql = QuestDBHttp(settings.questdb, timeout_s=120)
    table = dataclasses.replace(READINGS, name=f"dedup_{uuid.uuid4().hex[:10]}_readings")
    ensure_table(sql, table)
    expected = (scenario.span_s + scenario.shift_s) * scenario.keys_per_s
    outcome = Outcome(scenario, expected)
    write(settings, table, frames(scenario, 0, 0.0))
    wal_applied(sql, table.name)

    second = frames(scenario, scenario.shift_s, 1_000_000.0)
    if scenario.order == "reverse":
        second.reverse()
    elif scenario.order == "shuffled":
        np.random.default_rng(seed).shuffle(second)
    lo = T0_MS + scenario.shift_s * 1000
    hi = T0_MS + scenario.span_s * 1000
    where = f" WHERE ts >= cast({lo * 1000} as timestamp) AND ts < cast({hi * 1000} as timestamp)"
    stop = threading.Event()
    started = time.monotonic()

    def poll() -> None:
        reader = QuestDBHttp(settings.questdb, timeout_s=120)
        while not stop.is_set():
            outcome.polls.append(look(reader, table.name, time.monotonic() - started, where))

    reader = threading.Thread(target=poll, name="dedup-reader", daemon=True)
    reader.start()
    write(settings, table, second)
    outcome.write_s = time.monotonic() - started
    wal_applied(sql, table.name)
    outcome.applied_at_s = round(time.monotonic() - started, 2)
    time.sleep(hold_s)
    stop.set()
    reader.join()
    outcome.partitions_after = len(sql.exec(f'SHOW PARTITIONS FROM "{table.name}"').rows)
    if restart:
        manager.down(settings, ["questdb"], log.info)
        manager.up(settings, ["questdb"], log.info)
        outcome.after_restart = look(sql, table.name, time.monotonic() - started, where)
    sql.exec(f'DROP TABLE "{table.name}"')
    return outcome


def _free_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range: a reconnecting client never takes them."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = np.random.default_rng().permutation(np.arange(max(1024, low - 12_000), low))
    ports = [int(port) for port in candidates[: count * 20] if port_is_free(int(port))]
    if len(ports) < count:
        raise QuestDBError("no free ports on 127.0.0.1 below the ephemeral range")
    return ports[:count]


@contextmanager
def own_questdb(base: Settings, state_dir: Path, parallel_groupby: bool) -> Iterator[Settings]:
    """A QuestDB of its own for these runs, stopped afterwards."""
    http, pg, ilp, min_http = _free_ports(4)
    ports = {"http_port": http, "pg_port": pg, "ilp_tcp_port": ilp, "min_http_port": min_http}
    settings = base.model_copy(
        update={
            "state_dir": state_dir,
            "lib_dir": base.jar_dir,
            "questdb": base.questdb.model_copy(update={**ports, "heap": "512m"}),
        }
    )
    previous = os.environ.get(PARALLEL_GROUPBY_ENV)
    os.environ[PARALLEL_GROUPBY_ENV] = "true" if parallel_groupby else "false"
    try:
        manager.up(settings, ["questdb"], log.info)
        yield settings
    finally:
        manager.down(settings, ["questdb"], log.info)
        if previous is None:
            os.environ.pop(PARALLEL_GROUPBY_ENV, None)
        else:
            os.environ[PARALLEL_GROUPBY_ENV] = previous


SCENARIOS = (
    Scenario("demo-like: 2,400-row requests in time order"),
    Scenario("small requests: 240 rows", batch_rows=240),
    Scenario("large requests: 24,000 rows", batch_rows=24_000),
    Scenario("requests shuffled (deep out of order)", order="shuffled"),
    Scenario("requests newest first", order="reverse"),
    Scenario("parallel GROUP BY off", parallel_groupby=False),
)


def markdown(outcomes: list[Outcome], hold_s: float) -> str:
    lines = [
        "# QuestDB: duplicate keys seen by a reader after overlapping ingestion",
        "",
        f"Polls continue {hold_s:.0f} s after the WAL is applied; then a restart.",
        "",
        "| scenario | keys | write s | polls (WAL applied) | query said dup (applied) "
        "| dup keys listed / rows-keys | after restart | partitions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        s = o.summary()
        restart = o.after_restart
        after = "-" if restart is None else f"query {restart.dup_keys}, listed {restart.dup_rows}"
        lines.append(
            f"| {o.scenario.name} | {o.expected_keys} | {s['write_s']} "
            f"| {s['polls']} ({s['polls_applied']}) | {s['anomalous_polls']} "
            f"({s['anomalous_polls_wal_applied']}) "
            f"| {s['max_dup_rows']} / {s['max_rows_over_keys']} "
            f"| {after} "
            f"| {o.partitions_after} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the results")
    parser.add_argument("--runs", type=int, default=1, help="runs of each scenario")
    parser.add_argument(
        "--hold", type=float, default=70.0, help="polling after the WAL is applied (s)"
    )
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = load_settings()
    out = args.out or base.state_dir / "bench" / "dedup-reader"
    outcomes: list[Outcome] = []
    chosen = [s for s in SCENARIOS if args.only in s.name]
    for parallel in sorted({s.parallel_groupby for s in chosen}, reverse=True):
        with (
            tempfile.TemporaryDirectory(prefix="dedup-reader-") as tmp,
            own_questdb(base, Path(tmp) / "state", parallel) as settings,
        ):
            for scenario in (s for s in chosen if s.parallel_groupby == parallel):
                for run in range(args.runs):
                    outcome = run_scenario(settings, scenario, args.hold, True, seed=run)
                    log.info("%s run %d: %s", scenario.name, run, outcome.summary())
                    outcomes.append(outcome)
    results = [o.summary() for o in outcomes]
    paths = write_results(out, "dedup_reader", results, markdown(outcomes, args.hold))
    print(markdown(outcomes, args.hold))
    print("written to", *paths)


if __name__ == "__main__":
    main()
