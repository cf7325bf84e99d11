"""``twinflow bench``: twinflow against its peers and the raw limits, side by side.

One run, on the local services (``twinflow up``) and one pre-produced workload
(:mod:`benchmarks.workload`), measures every variant as a subprocess reading the same
raw topic from its beginning:

- **limit A** raw Kafka consume and **limit B** raw QuestDB ingest (:mod:`benchmarks.limits`);
- **twinflow**, the full flow (``twinflow run``: recovery on, every output), with 1 and 2
  worker threads and as 2 processes of 1 worker;
- **peer 1**, a tutorial-style Bytewax flow, and **peer 2**, the same job in Quix Streams
  (:mod:`benchmarks.peers`).

Throughput is readings per second from the variant's first consumed message to the
moment every expected output is visible in QuestDB (limit A: consumed). A variant whose
outputs do not match what the workload must produce (readings, windows, dead letters)
is marked wrong and never ranked. Latency is measured separately for each variant on a
fresh topic under a steady load (:mod:`benchmarks.latency`); memory is the peak RSS of
the variant's processes, sampled every 0.25 s.

Writes ``throughput.json``, ``throughput.md`` and ``throughput.png`` to ``--out``
(default ``STATE_DIR/bench/throughput``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import yaml
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from benchmarks.latency import LiveSchedule, VisibilityProbe, percentiles
from benchmarks.peers.quix_env import ensure_quix_python
from benchmarks.workload import (
    Expected,
    WorkloadConfig,
    messages,
    sensor_ranges,
    settled_start_ms,
    twin_model,
)
from connectors.kafka import TopicSpec, client_config, ensure_topics, reliable_producer
from connectors.questdb import QuestDBError, QuestDBHttp
from twinflow.services.process import rss_bytes
from twinflow.settings import KafkaSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
_POLL_S = 0.25
_TWINFLOW_STARTED = re.compile(r"^(\S+ \S+) INFO twinflow\.source\.kafka .*: first batch")


@dataclass(frozen=True)
class Variant:
    """One thing to measure."""

    name: str
    kind: str
    """limit-kafka, limit-questdb, twinflow, peer-bytewax or peer-quix."""
    workers: int = 1
    processes: int = 1

    @property
    def slug(self) -> str:
        """A name fit for topics and tables."""
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


VARIANTS = (
    Variant("limit A: Kafka consume", "limit-kafka"),
    Variant("limit B: QuestDB ingest", "limit-questdb"),
    Variant("twinflow 1 worker", "twinflow"),
    Variant("twinflow 2 workers", "twinflow", workers=2),
    Variant("twinflow 2 processes x 1", "twinflow", processes=2),
    Variant("peer 1: tutorial Bytewax", "peer-bytewax"),
    Variant("peer 2: Quix Streams", "peer-quix"),
)
BASELINE = "twinflow 1 worker"


@dataclass(frozen=True)
class BenchOptions:
    """What ``twinflow bench`` was asked for."""

    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    partitions: int = 4
    variants: tuple[str, ...] = tuple(v.name for v in VARIANTS)
    latency_rate: float = 3000.0
    latency_seconds: float = 10.0
    timeout_s: float = 600.0
    """Per variant: a slower one is reported as incomplete, with its rate so far."""
    out: Path | None = None
    profile: bool = True
    """Profile a second twinflow run with py-spy when it misses 100,000 readings/s."""


@dataclass
class Result:
    """One variant's figures and verdict."""

    variant: str
    kind: str
    workers: int
    processes: int
    readings: int = 0
    seconds: float | None = None
    readings_per_s: float | None = None
    peak_rss_mib: float = 0.0
    latency: dict[str, float | int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    incomplete: bool = False
    """It did not finish within the time limit; its rate is over what it wrote."""

    @property
    def correct(self) -> bool:
        """Whether its outputs matched what the workload must produce."""
        return not self.problems and self.readings_per_s is not None


def verdict(kind: str, expected: Expected, counts: dict[str, int]) -> list[str]:
    """What is wrong with a variant's outputs (empty: nothing).

    >>> e = Expected(messages=10, valid_readings=50, closed_windows=4, all_windows=6,
    ...              malformed_messages=1, out_of_range_readings=2)
    >>> verdict("twinflow", e, {"readings": 50, "sensor_windows": 5, "deadletters": 3})
    []
    >>> verdict("peer-bytewax", e, {"readings": 49, "sensor_windows": 3})
    ['readings: 49 rows, expected 50', 'sensor_windows: 3 rows, expected 4..6']
    >>> verdict("limit-kafka", e, {"messages": 11})
    ['messages: 11 consumed, expected 10']
    """
    if kind == "limit-kafka":
        got = counts.get("messages", 0)
        return (
            []
            if got == expected.messages
            else [f"messages: {got} consumed, expected {expected.messages}"]
        )
    problems = []
    if counts.get("readings", 0) != expected.valid_readings:
        problems.append(
            f"readings: {counts.get('readings', 0)} rows, expected {expected.valid_readings}"
        )
    if kind == "limit-questdb":
        return problems
    windows = counts.get("sensor_windows", 0)
    if not expected.closed_windows <= windows <= expected.all_windows:
        problems.append(
            f"sensor_windows: {windows} rows, "
            f"expected {expected.closed_windows}..{expected.all_windows}"
        )
    if kind == "twinflow":
        letters = expected.malformed_messages + expected.out_of_range_readings
        if counts.get("deadletters", 0) != letters:
            problems.append(f"deadletters: {counts.get('deadletters', 0)} rows, expected {letters}")
    return problems


def _complete(kind: str, expected: Expected, counts: dict[str, int]) -> bool:
    """Whether a variant has produced at least everything it must (it may still be wrong)."""
    if kind == "limit-kafka":
        return counts.get("messages", 0) >= expected.messages
    if counts.get("readings", 0) < expected.valid_readings:
        return False
    if kind == "limit-questdb":
        return True
    if counts.get("sensor_windows", 0) < expected.closed_windows:
        return False
    letters = expected.malformed_messages + expected.out_of_range_readings
    return kind != "twinflow" or counts.get("deadletters", 0) >= letters


class Bench:
    """One benchmark run: its workload, topics, tables and results."""

    def __init__(
        self, settings: Settings, options: BenchOptions, say: Callable[[str], None]
    ) -> None:
        self.settings = settings
        self.options = options
        self.say = say
        self.suffix = uuid.uuid4().hex[:8]
        self.out = options.out or settings.state_dir / "bench" / "throughput"
        self.work = self.out / f"run-{self.suffix}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.sql = QuestDBHttp(settings.questdb)
        self.model_path = self.work / "model.yaml"
        self.model_path.write_text(yaml.safe_dump(twin_model(options.workload), sort_keys=False))
        self.topic = f"bench.raw.{self.suffix}"
        self.expected = Expected()
        self.start_ms = 0

    # -- workload ------------------------------------------------------------------------

    def produce(self) -> float:
        """Produce the workload once; return the seconds it took."""
        started = time.monotonic()
        self.start_ms = produce_workload(
            self.settings.kafka,
            self.topic,
            self.options.partitions,
            self.options.workload,
            self.expected,
            self.say,
        )
        return time.monotonic() - started

    # -- variants ------------------------------------------------------------------------

    def spec(self, variant: Variant, topic: str, prefix: str, **extra: Any) -> Path:
        """The spec file a variant's processes read (see benchmarks.peers)."""
        config = self.options.workload
        spec = {
            "bootstrap": self.settings.kafka.bootstrap,
            "topic": topic,
            "deadletter_topic": f"bench.deadletter.{self.suffix}.{variant.slug}",
            "questdb_http": f"{self.settings.questdb.host}:{self.settings.questdb.http_port}",
            "questdb": {
                "host": self.settings.questdb.host,
                "http_port": self.settings.questdb.http_port,
            },
            "table_prefix": prefix,
            "window_s": config.window_s,
            "lateness_s": config.lateness_s,
            "sensors": {name: list(bounds) for name, bounds in sensor_ranges(config).items()},
            "seed": config.seed,
            "workers": variant.workers,
            "expected_messages": self.expected.messages,
            "workload": {
                "config": asdict(config),
                "start_ms": self.start_ms,
                "ranges": sensor_ranges(config),
            },
            **extra,
        }
        path = self.work / f"{prefix}spec.json"
        path.write_text(json.dumps(spec, indent=2))
        return path

    def commands(
        self, variant: Variant, spec: Path, prefix: str, topic: str
    ) -> list[tuple[list[str], dict[str, str]]]:
        """The processes of a variant: argv and environment of each."""
        python = sys.executable
        env = {key: value for key, value in os.environ.items() if not key.startswith("TWINFLOW_")}
        env["PYTHONPATH"] = str(ROOT)
        if variant.kind == "limit-kafka":
            return [([python, "-m", "benchmarks.limits", "kafka", "--spec", str(spec)], env)]
        if variant.kind == "limit-questdb":
            live = [
                "--live-rate",
                str(self.options.latency_rate),
                "--live-seconds",
                str(self.options.latency_seconds),
            ]
            return [
                ([python, "-m", "benchmarks.limits", "questdb", "--spec", str(spec), *live], env)
            ]
        if variant.kind == "peer-bytewax":
            return [([python, "-m", "benchmarks.peers.bytewax_tutorial", "--spec", str(spec)], env)]
        if variant.kind == "peer-quix":
            quix = ensure_quix_python(self.settings.state_dir)
            return [
                (
                    [
                        str(quix),
                        str(ROOT / "benchmarks" / "peers" / "quix_app.py"),
                        "--spec",
                        str(spec),
                    ],
                    env,
                )
            ]
        flow_env = twinflow_env(
            self.settings,
            self.options.workload,
            model=self.model_path,
            raw_topic=topic,
            partitions=self.options.partitions,
            prefix=prefix,
            recovery_dir=self.work / f"{prefix}recovery",
        )
        run = [python, "-m", "twinflow", "run", "-w", str(variant.workers)]
        if variant.processes == 1:
            return [(run, flow_env)]
        addresses = ";".join(f"127.0.0.1:{_free_port()}" for _ in range(variant.processes))
        return [([*run, "-i", str(i), "-a", addresses], flow_env) for i in range(variant.processes)]

    def counts(self, variant: Variant, prefix: str, logs: list[Path]) -> dict[str, int]:
        """What a variant has produced so far."""
        if variant.kind == "limit-kafka":
            done = _marker(logs, "DONE")
            return {"messages": int(done[1]) if done else 0}
        tables = ["readings"]
        if variant.kind != "limit-questdb":
            tables.append("sensor_windows")
        if variant.kind == "twinflow":
            tables.append("deadletters")
        return {table: self._rows(f"{prefix}{table}") for table in tables}

    def _rows(self, table: str) -> int:
        try:
            return int(self.sql.exec(f"SELECT count() FROM '{table}'").rows[0][0])  # noqa: S608
        except QuestDBError:
            return 0

    def measure(self, variant: Variant, profile: Path | None = None) -> Result:
        """Throughput of one variant on the workload, then its latency.

        With ``profile``, py-spy samples the variant's first process from its first
        consumed message to the end and writes collapsed stacks there; no latency run.
        """
        result = Result(
            variant.name, variant.kind, variant.workers, variant.processes, self.expected.readings
        )
        prefix = f"bench_{self.suffix}_{variant.slug}_{'profiled_' if profile else ''}"
        spec = self.spec(variant, self.topic, prefix)
        run = _Processes(
            self.commands(variant, spec, prefix, self.topic), self.work / f"{prefix}log"
        )
        started = time.monotonic()
        last_say = 0.0
        profiler: subprocess.Popen[bytes] | None = None
        try:
            while True:
                if profile and profiler is None and _first_consume(variant, run.logs):
                    profiler = _py_spy(run.procs[0].pid, profile)
                result.peak_rss_mib = max(result.peak_rss_mib, run.rss_mib())
                if run.exited():
                    result.problems.append(f"exited early (code {run.exited()}); see {run.logs[0]}")
                    return result
                counts = self.counts(variant, prefix, run.logs)
                if _complete(variant.kind, self.expected, counts):
                    done_at = time.time()
                    break
                if time.monotonic() - started > self.options.timeout_s:
                    # Too slow to finish: its rate over what it did write is still a
                    # measurement, reported as incomplete and never as correct.
                    first = _first_consume(variant, run.logs)
                    done = counts.get("readings", counts.get("messages", 0))
                    result.counts = counts
                    result.incomplete = True
                    result.problems.append(
                        f"incomplete: {done:,} of {self.expected.valid_readings:,} readings "
                        f"after {self.options.timeout_s:.0f} s"
                    )
                    if first is not None:
                        result.seconds = round(time.time() - first, 2)
                        result.readings_per_s = round(done / result.seconds)
                    return result
                if time.monotonic() - last_say > 2:
                    last_say = time.monotonic()
                    done = counts.get("readings", counts.get("messages", 0))
                    share = done / max(self.expected.valid_readings, 1)
                    self.say(
                        f"  {variant.name}: {counts} ({share:.0%}), "
                        f"RSS {result.peak_rss_mib:.0f} MiB"
                    )
                time.sleep(_POLL_S)
            first = _first_consume(variant, run.logs)
            # Late duplicates would show up now, not before: look once more.
            time.sleep(2.0)
            result.counts = self.counts(variant, prefix, run.logs)
            result.problems.extend(verdict(variant.kind, self.expected, result.counts))
            if first is None:
                result.problems.append("never reported its first consumed message")
            else:
                # The end is seen one poll late at worst: a run shorter than a poll (a
                # smoke workload in one fetch) is timed as one poll, never as zero.
                result.seconds = round(max(done_at - first, _POLL_S), 2)
                result.readings_per_s = round(self.expected.readings / result.seconds)
            if variant.kind == "limit-questdb":
                result.latency = _latency_line(run, self.options.latency_seconds + 120)
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
            result.peak_rss_mib = max(result.peak_rss_mib, run.rss_mib())
            run.stop()
            self._drop(prefix)
        # Latency means something only under a load the variant keeps up with.
        sustains = (result.readings_per_s or 0) >= 2 * self.options.latency_rate
        if variant.kind != "limit-questdb" and profile is None and sustains:
            result.latency = self.latency(variant)
        return result

    def latency(self, variant: Variant) -> dict[str, float | int]:
        """Latency under a steady load, on a fresh topic and fresh tables."""
        prefix = f"bench_{self.suffix}_{variant.slug}_live_"
        topic = f"bench.live.{self.suffix}.{variant.slug}"
        ensure_topics(self.settings.kafka, [TopicSpec(topic, self.options.partitions)])
        latency_file = self.work / f"{prefix}latency.json"
        spec = self.spec(
            variant, topic, prefix, expected_messages=0, latency_file=str(latency_file)
        )
        run = _Processes(self.commands(variant, spec, prefix, topic), self.work / f"{prefix}log")
        producer = reliable_producer(self.settings.kafka, **{"linger.ms": 1})
        try:
            # Warm up over two windows and their lateness, so that the measured load
            # finds every entity's windows closing and its model built: steady state,
            # not the cold start of 1,000 models.
            config = self.options.workload
            warm_s = 2 * (config.window_s + config.lateness_s)
            warm = self._live(producer, topic, LiveSchedule(self.options.latency_rate, warm_s))
            probe = VisibilityProbe(self.sql, f"{prefix}readings")
            if variant.kind != "limit-kafka":
                deadline = time.monotonic() + 180
                while (
                    probe.count() < warm.total and time.monotonic() < deadline and not run.exited()
                ):
                    time.sleep(_POLL_S)
            measured_from_ms = int(time.time() * 1000)
            probe.start(after_ms=measured_from_ms)
            schedule = self._live(
                producer,
                topic,
                LiveSchedule(self.options.latency_rate, self.options.latency_seconds),
            )
            if variant.kind == "limit-kafka":
                time.sleep(2.0)
                run.stop()
                pairs = json.loads(latency_file.read_text()) if latency_file.exists() else []
                delays = [delay for sent, delay in pairs if sent >= measured_from_ms]
                return {"readings": len(delays), **percentiles(delays)}
            return probe.finish(schedule)
        finally:
            run.stop()
            self._drop(prefix)

    def _live(self, producer: Any, topic: str, schedule: LiveSchedule) -> LiveSchedule:
        """Send batched readings stamped with the send time, at the schedule's rate."""
        config = self.options.workload
        names = config.sensor_names
        entities = config.entity_ids()
        encode = msgspec.json.encode
        sent = 0
        for due, count in schedule.slices():
            schedule.wait(due)
            now_ms = int(time.time() * 1000)
            messages_due = max(1, count // len(names))
            for _ in range(messages_due):
                entity = entities[sent % len(entities)]
                # One message per entity and millisecond: the readings' identity stays unique.
                ts = now_ms + sent // len(entities)
                values = dict.fromkeys(names, 1.0)
                producer.produce(
                    topic, encode({"entity_id": entity, "ts": ts, "values": values}), entity
                )
                sent += 1
            producer.poll(0)
            schedule.sent(messages_due * len(names))
        producer.flush(30)
        return schedule

    def delete_topics(self) -> None:
        """Delete every topic this run created (they hold millions of readings)."""
        admin = AdminClient(client_config(self.settings.kafka))
        mine = [t for t in admin.list_topics(timeout=30).topics if self.suffix in t]
        if mine:
            for future in admin.delete_topics(mine, operation_timeout=30).values():
                with contextlib.suppress(KafkaException):
                    future.result()

    def _drop(self, prefix: str) -> None:
        tables = ("readings", "readings_live", "sensor_windows", "twin_state", "anomalies")
        for table in (*tables, "alarms", "deadletters"):
            with contextlib.suppress(QuestDBError):
                self.sql.exec(f"DROP TABLE IF EXISTS '{prefix}{table}'")


def produce_workload(
    kafka: KafkaSettings,
    topic: str,
    partitions: int,
    config: WorkloadConfig,
    expected: Expected,
    say: Callable[[str], None],
    start_ms: int | None = None,
) -> int:
    """Create ``topic`` and produce the workload to it; return its start time (ms).

    The start is by default an hour and the workload's length ago or a little more:
    old enough to be history, young enough for the flow's max_age check, and one window
    before a seasonal bin boundary, so the twins measured are settled ones
    (:func:`benchmarks.workload.settled_start_ms`).
    """
    if start_ms is None:
        now_ms = int(time.time() * 1000)
        start_ms = settled_start_ms(now_ms - config.ticks * 1000 - 3_600_000, config.window_s)
    ensure_topics(kafka, [TopicSpec(topic, partitions)])
    producer = reliable_producer(kafka, **{"linger.ms": 20, "batch.size": 1_000_000})
    failures: list[str] = []

    def report(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    next_report = time.monotonic() + 2
    for produced, (key, payload) in enumerate(messages(config, start_ms, expected), start=1):
        while True:
            try:
                producer.produce(topic, payload, key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        if time.monotonic() > next_report:
            say(f"  produced {produced:,} messages")
            next_report = time.monotonic() + 2
    if producer.flush(120) or failures:
        raise RuntimeError(f"the workload was not fully produced: {failures[:3]}")
    return start_ms


def bench_env(settings: Settings, model: Path) -> dict[str, str]:
    """A twinflow process's environment: the local services, the benchmark's model.

    Nothing inherited from TWINFLOW_*: a developer's settings must not leak in.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("TWINFLOW_")}
    env.update(
        PYTHONPATH=str(ROOT),
        TWINFLOW_STATE_DIR=str(settings.state_dir),
        TWINFLOW_TWIN_MODEL=str(model),
        TWINFLOW_KAFKA__PORT=str(settings.kafka.port),
        TWINFLOW_QUESTDB__HTTP_PORT=str(settings.questdb.http_port),
    )
    return env


def twinflow_env(
    settings: Settings,
    config: WorkloadConfig,
    *,
    model: Path,
    raw_topic: str,
    partitions: int,
    prefix: str,
    recovery_dir: Path,
) -> dict[str, str]:
    """The environment of a ``twinflow run`` over the workload: own outputs, own store."""
    env = bench_env(settings, model)
    env.update(
        TWINFLOW_TOPICS__RAW=raw_topic,
        TWINFLOW_TOPICS__DEADLETTER=f"bench.deadletter.{prefix}",
        TWINFLOW_TOPICS__STATE=f"bench.state.{prefix}",
        TWINFLOW_TOPICS__ANOMALIES=f"bench.anomalies.{prefix}",
        TWINFLOW_TOPICS__LATE=f"bench.late.{prefix}",
        TWINFLOW_TOPICS__ALARMS=f"bench.alarms.{prefix}",
        # The back channel goes with the input: runs over the same raw topic share it.
        TWINFLOW_TOPICS__FEEDBACK=f"{raw_topic}.feedback",
        TWINFLOW_TOPICS__COMMANDS=f"{raw_topic}.commands",
        TWINFLOW_TOPICS__RAW_PARTITIONS=str(partitions),
        TWINFLOW_QUESTDB__TABLE_PREFIX=prefix,
        TWINFLOW_FLOW__RECOVERY_DIR=str(recovery_dir),
        TWINFLOW_FLOW__WINDOW_S=str(config.window_s),
        TWINFLOW_FLOW__ALLOWED_LATENESS_S=str(config.lateness_s),
    )
    return env


class _Processes:
    """A variant's processes, their logs, their memory."""

    def __init__(self, commands: list[tuple[list[str], dict[str, str]]], log_stem: Path) -> None:
        self.logs = [log_stem.with_name(f"{log_stem.name}{i}.txt") for i in range(len(commands))]
        self.procs = []
        for (argv, env), log in zip(commands, self.logs, strict=True):
            with log.open("w") as out:
                self.procs.append(
                    subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
                )

    def rss_mib(self) -> float:
        return sum(rss_bytes(p.pid) or 0 for p in self.procs) / 2**20

    def exited(self) -> int | None:
        for proc in self.procs:
            code = proc.poll()
            if code is not None:
                return code if code != 0 else -1
        return None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _marker(logs: list[Path], name: str) -> list[str] | None:
    for log in logs:
        with contextlib.suppress(FileNotFoundError):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith(f"{name} "):
                    return line.split()[1:]
    return None


def _first_consume(variant: Variant, logs: list[Path]) -> float | None:
    """When the variant had its first message (earliest over its processes)."""
    if variant.kind != "twinflow":
        marker = _marker(logs, "FIRST_CONSUME")
        return float(marker[0]) if marker else None
    times = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            match = _TWINFLOW_STARTED.match(line)
            if match:
                # logging's asctime: local time, milliseconds after a comma.
                times.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())  # noqa: DTZ007
    return min(times) if times else None


def _py_spy_path() -> Path:
    return Path(sys.executable).with_name("py-spy")


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample a process until interrupted; collapsed stacks go to ``out``."""
    argv = [str(_py_spy_path()), "record", "-p", str(pid), "-r", "100", "-f", "raw", "-o", str(out)]
    return subprocess.Popen(
        [*argv, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def hot_spots(collapsed: Path, top: int = 18) -> list[tuple[str, float]]:
    """Share of samples inside each of the project's functions (inclusive), largest first.

    Only frames of twinflow's own code, and Bytewax's snapshot copy, are named: the
    rest is the framework and the libraries they call.
    """
    inside: dict[str, int] = {}
    total = 0
    project = re.compile(r"^(\S+) \(.*?/?((?:twinflow|connectors|flows|schemas)/[^:]+):\d+\)$")
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        names = set()
        for frame in stack.split(";"):
            match = project.match(frame)
            if match:
                names.add(f"{match.group(1)} ({match.group(2)})")
            elif frame.startswith("deepcopy ("):
                names.add("recovery snapshot: deepcopy of the state")
        for name in names:
            inside[name] = inside.get(name, 0) + samples
    ranked = sorted(inside.items(), key=lambda item: -item[1])
    skip = ("main (", "run (", "run_flow (", "<module> (")
    return [
        (name, round(samples / total, 3)) for name, samples in ranked if not name.startswith(skip)
    ][:top]


def _latency_line(run: _Processes, timeout_s: float) -> dict[str, float | int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not run.exited():
        marker = _marker(run.logs, "LATENCY")
        if marker:
            return dict(json.loads(" ".join(marker)))
        time.sleep(_POLL_S)
    return {}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_bench(settings: Settings, options: BenchOptions, say: Callable[[str], None]) -> Path:
    """Produce the workload, measure every selected variant, write the report; return its path."""
    known = {v.name: v for v in VARIANTS}
    unknown = [name for name in options.variants if name not in known]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(known)}")
    bench = Bench(settings, options, say)
    config = options.workload
    say(
        f"producing {config.readings:,} readings ({config.entities} entities x {config.sensors} "
        f"sensors, {'batched' if config.batched else 'single'} payloads) to {bench.topic} "
        f"({options.partitions} partitions)"
    )
    results = []
    spots: list[tuple[str, float]] = []
    try:
        produce_s = bench.produce()
        say(f"produced {bench.expected.messages:,} messages in {produce_s:.1f} s")
        for name in options.variants:
            say(f"measuring {name}")
            result = bench.measure(known[name])
            results.append(result)
            rate = (
                f"{result.readings_per_s:,.0f} readings/s" if result.readings_per_s else "no rate"
            )
            verdict_text = "; ".join(result.problems) or "outputs correct"
            if result.problems and not result.incomplete:
                verdict_text = "WRONG: " + verdict_text
            say(f"  {name}: {rate}, peak RSS {result.peak_rss_mib:.0f} MiB, {verdict_text}")
        baseline = next((r for r in results if r.variant == BASELINE), None)
        missed = baseline is not None and (baseline.readings_per_s or 0) < 100_000
        if options.profile and missed and _py_spy_path().exists():
            say(f"profiling {BASELINE} (it missed 100,000 readings/s)")
            profile = bench.work / "twinflow-profile.txt"
            bench.measure(known[BASELINE], profile=profile)
            if profile.exists():
                spots = hot_spots(profile)
    finally:
        bench.delete_topics()
    document = {
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "workload": asdict(config),
        "partitions": options.partitions,
        "latency_load_readings_per_s": options.latency_rate,
        "expected": asdict(bench.expected),
        "produce_seconds": round(produce_s, 1),
        "results": [asdict(r) | {"correct": r.correct} for r in results],
        "profile": {"variant": BASELINE, "inclusive_share": dict(spots)} if spots else None,
    }
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "throughput.json").write_text(json.dumps(document, indent=2))
    (bench.out / "throughput.md").write_text(markdown(document))
    chart(document, bench.out / "throughput.png")
    return bench.out / "throughput.md"


def _ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def markdown(document: dict[str, Any]) -> str:
    """The report: the table, then the targets."""
    results = document["results"]
    expected, workload = document["expected"], document["workload"]
    by_name = {r["variant"]: r for r in results if r["correct"] or r["incomplete"]}
    baseline = by_name.get(BASELINE, {}).get("readings_per_s")
    limits = [by_name[v.name]["readings_per_s"] for v in VARIANTS[:2] if v.name in by_name]
    limit = min(limits) if len(limits) == 2 else None
    payloads = "batched" if workload["batched"] else "single"
    machine = document["machine"]
    lines = [
        "# twinflow throughput benchmark",
        "",
        f"{document['created']}, {machine['cpus']} CPUs, Python {machine['python']}; "
        "Kafka and QuestDB on the same machine.",
        "",
        f"Workload: {expected['readings']:,} readings ({workload['entities']} entities x "
        f"{workload['sensors']} sensors, {payloads} payloads, {document['partitions']} "
        f"partitions); {expected['dead_letter_readings']:,} bad and "
        f"{expected['late_readings']:,} late readings. Throughput: first consumed message to "
        "every output visible in QuestDB. Latency: send to visible in QuestDB at a steady "
        f"{document['latency_load_readings_per_s']:,.0f} readings/s.",
        "",
        "| variant | readings/s | vs twinflow 1 worker | vs min(limit A, B) "
        "| p50 ms | p99 ms | peak RSS MiB | outputs |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rate = r["readings_per_s"] if r["correct"] or r["incomplete"] else None
        latency = r["latency"] or {}
        outputs = "correct" if r["correct"] else "; ".join(r["problems"])
        if not r["correct"] and not r["incomplete"]:
            outputs = "WRONG: " + outputs
        shown = f"{rate:,.0f}" + (" (so far)" if r["incomplete"] else "") if rate else "-"
        lines.append(
            f"| {r['variant']} | {shown} | {_ratio(rate, baseline)} | {_ratio(rate, limit)} "
            f"| {latency.get('p50_ms', '-')} | {latency.get('p99_ms', '-')} "
            f"| {r['peak_rss_mib']:.0f} | {outputs} |"
        )
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for label, value, met in _targets(by_name, baseline, limit):
        shown = "-" if value is None else (f"{value:,.0f}" if value > 100 else f"{value:.2f}")
        lines.append(f"| {label} | {shown} | {'yes' if met else '**no**'} |")
    if document.get("profile"):
        lines += [
            "",
            f"## Where {document['profile']['variant']} spends its time",
            "",
            "py-spy, 100 samples/s over a second run of the same workload; share of samples "
            "inside each function (inclusive, so nested ones overlap).",
            "",
            "| function | share |",
            "|---|---:|",
        ]
        for name, share in document["profile"]["inclusive_share"].items():
            lines.append(f"| {name} | {share:.0%} |")
    lines.append("")
    return "\n".join(lines)


def _targets(
    by_name: dict[str, dict[str, Any]], baseline: float | None, limit: float | None
) -> list[tuple[str, float | None, bool]]:
    twinflows = [r["readings_per_s"] for n, r in by_name.items() if n.startswith("twinflow")]
    best = max(twinflows, default=None)
    targets = [
        ("twinflow >= 100,000 readings/s (1 worker)", baseline, (baseline or 0) >= 100_000),
        ("twinflow >= 100,000 readings/s (best layout)", best, (best or 0) >= 100_000),
    ]
    for peer, factor in (("peer 1: tutorial Bytewax", 5), ("peer 2: Quix Streams", 3)):
        peer_rate = by_name.get(peer, {}).get("readings_per_s")
        ratio = baseline / peer_rate if baseline and peer_rate else None
        targets.append((f"twinflow >= {factor}x {peer}", ratio, (ratio or 0) >= factor))
    limit_b = by_name.get("limit B: QuestDB ingest", {}).get("readings_per_s")
    for label, rate, wanted in (("1 worker", baseline, 0.30), ("best layout", best, 0.35)):
        of_b = rate / limit_b if rate and limit_b else None
        targets.append((f"twinflow {label} >= {wanted:.2f} x limit B", of_b, (of_b or 0) >= wanted))
    two = by_name.get("twinflow 2 workers", {}).get("readings_per_s")
    more = two / baseline if two and baseline else None
    targets.append(("twinflow 2 workers >= 1 worker", more, (more or 0) >= 1))
    p99 = (by_name.get(BASELINE, {}).get("latency") or {}).get("p99_ms")
    targets.append(("twinflow 1 worker p99 latency <= 300 ms", p99, p99 is not None and p99 <= 300))
    share = baseline / limit if baseline and limit else None
    targets.append(("twinflow >= 50 % of min(limit A, limit B)", share, (share or 0) >= 0.5))
    return targets


def chart(document: dict[str, Any], path: Path) -> None:
    """Readings/s per variant, limits in grey, wrong variants left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in document["results"] if r["correct"] or r["incomplete"]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    names = [r["variant"] + (" (incomplete)" if r["incomplete"] else "") for r in rows]
    rates = [r["readings_per_s"] for r in rows]
    colours = [
        "#999999"
        if r["kind"].startswith("limit")
        else "#1f77b4"
        if r["kind"] == "twinflow"
        else "#ff7f0e"
        for r in rows
    ]
    ax.barh(names, rates, color=colours)
    for y, rate in enumerate(rates):
        ax.text(rate, y, f" {rate:,.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    # Limits and peers are orders of magnitude apart.
    ax.set_xscale("log")
    ax.set_xlabel("readings/s (first consume to last row visible)")
    ax.set_title(
        f"{document['expected']['readings']:,} readings, {document['machine']['cpus']} CPUs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
