"""The chaos tier's machinery: one seeded workload, flow runs under a supervisor, checks.

A recipe runs ``twinflow run`` over the workload while it injects a fault, then compares
what landed in QuestDB with the golden run (the same workload, no fault). The flow runs
as a real process; the supervisor restarts it when it exits, like a service manager
would, so "crashes and recovers" is a valid way to survive a fault and "loses data" is
not.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.throughput import produce_workload, twinflow_env
from benchmarks.workload import Expected, WorkloadConfig, twin_model
from connectors.questdb import QuestDBError, QuestDBHttp
from tests.helpers import consume_all, snapshot_epoch, wait_for_wal
from twinflow.settings import Settings
from twinflow.tables import Tables, tables

WORKLOAD = WorkloadConfig(
    entities=50,
    sensors=6,
    readings=102_000,
    malformed_share=0.003,
    out_of_range_share=0.003,
    late_share=0.003,
    seed=7,
)
"""N >= 100 k readings with unique identities, a few hundred known-bad."""
PARTITIONS = 4
FLOW_SETTINGS = {
    # Small batches and frequent snapshots: a kill lands mid-stream, between snapshots.
    "TWINFLOW_FLOW__BATCH_SIZE": "200",
    "TWINFLOW_FLOW__SNAPSHOT_INTERVAL_S": "1",
    # The last window of every entity closes by idleness; wait for that, not longer.
    "TWINFLOW_FLOW__IDLE_CLOSE_S": "6",
    "TWINFLOW_FLOW__STALE_AFTER_S": "3600",
}
ROW_TABLES = ("sensor_windows", "twin_state", "anomalies", "alarms", "forecasts")
"""Tables whose rows must equal the golden run's, row for row."""
OUTPUT_TOPICS = ("state", "anomalies", "alarms")
"""Kafka output topics (settings.topics fields) whose messages carry a ``msg_id``."""
_POLL_S = 0.25


@dataclass(frozen=True)
class Workload:
    """The workload as produced to one Kafka cluster."""

    settings: Settings
    topic: str
    model: Path
    start_ms: int
    expected: Expected

    @property
    def dead_letters(self) -> int:
        """M: the known-bad messages and readings, one dead letter each."""
        return self.expected.malformed_messages + self.expected.out_of_range_readings


def produce(settings: Settings, work: Path, start_ms: int | None = None) -> Workload:
    """Produce the chaos workload to a fresh topic of ``settings``' Kafka.

    Give ``start_ms`` to reproduce another workload exactly (on another cluster).
    """
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.yaml"
    model.write_text(yaml.safe_dump(twin_model(WORKLOAD), sort_keys=False))
    topic = f"chaos.raw.{uuid.uuid4().hex[:8]}"
    expected = Expected()
    start_ms = produce_workload(
        settings.kafka, topic, PARTITIONS, WORKLOAD, expected, lambda _line: None, start_ms
    )
    return Workload(settings, topic, model, start_ms, expected)


@dataclass
class Outcome:
    """What a run left in QuestDB, and how it compares with what it must be."""

    readings: int
    distinct_readings: int
    duplicates: dict[str, int]
    dead_letters: int
    bad_values: dict[str, int]
    rows: dict[str, list[tuple[Any, ...]]]
    outputs: dict[str, dict[str, list[bytes]]]
    """Per output topic: the payloads of every copy of each ``msg_id``."""

    def output_copies(self, golden: Outcome) -> dict[str, dict[str, int]]:
        """Per output topic: messages, replayed copies, and how ``msg_id`` dedupe fares.

        ``copies``: messages beyond the first of their ``msg_id``; ``conflicts``: ids
        whose copies differ (dedupe by id would be wrong); ``missing``/``extra``: ids
        golden has and this run has not, and the other way round.
        """
        found = {}
        for topic, by_id in self.outputs.items():
            expected = golden.outputs[topic]
            found[topic] = {
                "messages": sum(len(copies) for copies in by_id.values()),
                "copies": sum(len(copies) - 1 for copies in by_id.values()),
                "conflicts": sum(1 for copies in by_id.values() if len(set(copies)) > 1),
                "missing": len(expected.keys() - by_id.keys()),
                "extra": len(by_id.keys() - expected.keys()),
            }
        return found

    def problems(self, workload: Workload, golden: Outcome | None) -> dict[str, int]:
        """Readings lost, duplicates, mismatches vs golden, wrong dead letters, bad values."""
        mismatches = 0
        if golden is not None:
            for table, rows in self.rows.items():
                mismatches += len(set(rows) ^ set(golden.rows[table]))
        return {
            "lost": workload.expected.valid_readings - self.distinct_readings,
            "duplicates": sum(self.duplicates.values()),
            "mismatches": mismatches,
            "dead_letters_off": abs(self.dead_letters - workload.dead_letters),
            "bad_values": sum(self.bad_values.values()),
        }


class FlowRun:
    """``twinflow run`` over a workload with its own outputs and recovery store."""

    def __init__(self, workload: Workload, work: Path, name: str, settings: Settings | None = None):
        self.workload = workload
        self.settings = settings or workload.settings
        self.name = name
        self.prefix = f"chaos_{name}_{uuid.uuid4().hex[:6]}_"
        self.tables: Tables = tables(self.prefix)
        self.work = work / self.prefix.rstrip("_")
        self.work.mkdir(parents=True, exist_ok=True)
        self.recovery_dir = self.work / "recovery"
        self.env = twinflow_env(
            self.settings,
            WORKLOAD,
            model=workload.model,
            raw_topic=workload.topic,
            partitions=PARTITIONS,
            prefix=self.prefix,
            recovery_dir=self.recovery_dir,
        )
        self.env.update(FLOW_SETTINGS)
        # Its own alarms topic too (twinflow_env predates it), not the shared default.
        self.env.setdefault("TWINFLOW_TOPICS__ALARMS", f"chaos.alarms.{self.prefix}")
        self.sql = QuestDBHttp(self.settings.questdb, timeout_s=10)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[int] = []
        self.logs: list[Path] = []

    # -- the process ---------------------------------------------------------------------

    def start(self, workers: int = 1) -> None:
        """Start the flow (again); each start writes its own log."""
        log = self.work / f"run-{self.starts}.log"
        self.logs.append(log)
        self.starts += 1
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "twinflow", "run", "-w", str(workers)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def running(self) -> bool:
        """Whether the current process is alive; an exit is recorded once."""
        if self.process is None:
            return False
        code = self.process.poll()
        if code is None:
            return True
        self.exits.append(code)
        self.process = None
        return False

    def kill(self) -> None:
        """SIGKILL, by PID: no shutdown, no last snapshot."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
        self.running()

    def stop(self) -> None:
        """Ctrl-C, then SIGKILL if it does not stop within 30 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.running()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the newest log."""
        if not self.logs or not self.logs[-1].exists():
            return "(no log)"
        return self.logs[-1].read_text(errors="replace")[-chars:]

    def wait_for_log(self, needle: str, timeout_s: float = 120) -> None:
        """Until the current start's log has ``needle``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.logs and needle in self.logs[-1].read_text(errors="replace"):
                return
            if not self.running():
                raise AssertionError(f"flow exited before {needle!r}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not logged after {timeout_s} s:\n{self.log_tail()}")

    def snapshot_epoch(self) -> int:
        """Newest epoch with a snapshot in the recovery store (0 before the first)."""
        return snapshot_epoch(self.recovery_dir)

    def wait_for_snapshot(self, timeout_s: float = 60) -> None:
        """Until an epoch newer than the store's newest so far is snapshotted."""
        before = self.snapshot_epoch()
        deadline = time.monotonic() + timeout_s
        while self.snapshot_epoch() <= before:
            if not self.running():
                raise AssertionError(f"flow exited before a snapshot:\n{self.log_tail()}")
            assert time.monotonic() < deadline, f"no snapshot in {timeout_s} s"
            time.sleep(0.02)

    # -- progress and results ------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Rows so far per table (0 while a table or QuestDB is missing)."""
        found = {}
        for key in ("readings", "sensor_windows", "deadletters"):
            table = getattr(self.tables, key).name
            try:
                found[key] = int(self.sql.exec(f'SELECT count() FROM "{table}"').rows[0][0])
            except (QuestDBError, OSError):
                found[key] = 0
        return found

    def complete(self) -> bool:
        """Everything the workload owes is in QuestDB (possibly more, if duplicated)."""
        expected = self.workload.expected
        counts = self.counts()
        return (
            counts["readings"] >= expected.valid_readings
            and counts["sensor_windows"] >= expected.all_windows
            and counts["deadletters"] >= self.workload.dead_letters
        )

    def supervise(
        self,
        timeout_s: float = 300,
        *,
        workers: int = 1,
        fault: Callable[[FlowRun], None] | None = None,
        restart: bool = True,
    ) -> None:
        """Run until complete: restart the flow whenever it exits, like systemd would.

        ``fault`` is called once per poll while the flow runs; it may kill things.
        """
        deadline = time.monotonic() + timeout_s
        if self.process is None:
            self.start(workers)
        while not self.complete():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: incomplete after {timeout_s} s: {self.counts()}, "
                    f"expected readings {self.workload.expected.valid_readings}, windows "
                    f"{self.workload.expected.all_windows}, dead letters "
                    f"{self.workload.dead_letters}; exits {self.exits}\n{self.log_tail()}"
                )
            if not self.running():
                assert restart, f"flow exited ({self.exits[-1]}):\n{self.log_tail()}"
                time.sleep(1.0)
                self.start(workers)
            elif fault is not None:
                fault(self)
            time.sleep(_POLL_S)

    def outcome(self) -> Outcome:
        """What landed, once every table's WAL is applied."""
        specs = self.tables.all()
        wait_for_wal(self.sql, [spec.name for spec in specs], timeout_s=60)
        readings = self.tables.readings.name
        duplicates = {}
        for spec in specs:
            keys = ", ".join(spec.dedup_keys)
            total = self._one(f'SELECT count() FROM "{spec.name}"')
            distinct = self._one(f'SELECT count() FROM (SELECT DISTINCT {keys} FROM "{spec.name}")')
            duplicates[spec.name] = total - distinct
        start, end = self.workload.start_ms * 1000, (self.workload.expected.last_ts_ms + 1) * 1000
        windows = self.tables.sensor_windows.name
        # QuestDB reads NaN and +-Inf doubles back as null: IS NULL catches all three.
        bad_values = {
            "readings: NaN/Inf value or timestamp outside the workload": self._one(
                f'SELECT count() FROM "{readings}" WHERE value IS NULL '
                f"OR ts < {start} OR ts >= {end}"
            ),
            "windows: NaN/Inf feature or timestamp outside the workload": self._one(
                f'SELECT count() FROM "{windows}" WHERE mean IS NULL OR min IS NULL '
                f"OR max IS NULL OR std IS NULL OR ts < {start} "
                f"OR window_end > {end + int(WORKLOAD.window_s * 1e6)}"
            ),
        }
        rows = {
            key: [
                tuple(_canonical(value) for value in row)
                for row in self.sql.exec(
                    f'SELECT * FROM "{getattr(self.tables, key).name}" ORDER BY ts, entity'
                ).rows
            ]
            for key in ROW_TABLES
        }
        return Outcome(
            outputs={topic: self._messages_by_id(topic) for topic in OUTPUT_TOPICS},
            readings=self._one(f'SELECT count() FROM "{readings}"'),
            distinct_readings=self._one(
                f'SELECT count() FROM (SELECT DISTINCT ts, entity, sensor FROM "{readings}")'
            ),
            duplicates=duplicates,
            dead_letters=self._one(f'SELECT count() FROM "{self.tables.deadletters.name}"'),
            bad_values=bad_values,
            rows=rows,
        )

    def _messages_by_id(self, topic: str) -> dict[str, list[bytes]]:
        name = self.env[f"TWINFLOW_TOPICS__{topic.upper()}"]
        by_id: dict[str, list[bytes]] = {}
        for message in consume_all(self.settings.kafka, name, idle_s=3):
            payload = message.value() or b""
            by_id.setdefault(json.loads(payload)["msg_id"], []).append(payload)
        return by_id

    def _one(self, sql: str) -> int:
        return int(self.sql.exec(sql).rows[0][0])

    def drop(self) -> None:
        """Drop this run's tables."""
        for spec in self.tables.all():
            with contextlib.suppress(QuestDBError, OSError):
                self.sql.exec(f'DROP TABLE IF EXISTS "{spec.name}"')


def _canonical(value: Any) -> Any:
    # JSON gives floats back exactly; NaN must compare equal to itself to be a match.
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


def kill_points(seed: int, count: int) -> list[float]:
    """Seconds after the first batch to SIGKILL at, one per restart (seeded)."""
    rng = random.Random(seed)
    return [round(rng.uniform(0.2, 2.5), 2) for _ in range(count)]


@dataclass
class ChaosRow:
    """One line of the chaos table."""

    fault: str
    runs: int
    lost: int = 0
    duplicates: int = 0
    mismatches: int = 0
    notes: list[str] = field(default_factory=list)


def judge(
    chaos_table: list[dict[str, object]],
    row: ChaosRow,
    run: FlowRun,
    golden: Outcome,
    outcome: Outcome | None = None,
) -> dict[str, int]:
    """Compare a finished run with golden, add its row to the chaos table, return problems.

    ``outcome``: the run's, when the caller has read it already (reading it again costs
    every table and output topic).
    """
    outcome = outcome or run.outcome()
    problems = outcome.problems(run.workload, golden)
    row.lost, row.duplicates, row.mismatches = (
        problems["lost"],
        problems["duplicates"],
        problems["mismatches"],
    )
    if problems["dead_letters_off"]:
        row.notes.append(f"dead letters off by {problems['dead_letters_off']}")
    if problems["bad_values"]:
        row.notes.append(f"bad values {outcome.bad_values}")
    chaos_table.append(vars(row) | {"notes": "; ".join(row.notes)})
    return problems
