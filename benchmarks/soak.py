"""``make soak``: the whole pipeline for an hour at half the flow's measured maximum.

On a stack of its own (Kafka, QuestDB and Mosquitto on free ports, state under the run
folder, so the developer's services and other runs never notice), the soak starts as
real processes: the simulator (MQTT and OPC UA, at its live pace), both bridges, the
flow (``twinflow run``), ``twinflow serve``, and a producer of the throughput
benchmark's workload paced so that the whole input is half the flow's sustained maximum
(the newest ``twinflow bench`` report's one-worker variant, the layout the soak runs, in
a run of at least :data:`SUSTAINED_SNAPSHOTS` snapshot intervals; ``--rate``
overrides). The producer's twins leave their first seasonal bin in
their first window (:func:`benchmarks.workload.settled_start_ms`), so the hour measures
settled twins. Every ``--every`` seconds it samples the memory of every process, the
flow's consumer lag on the raw topic, QuestDB's WAL lag and the errors.

At the end the producers stop, the flow drains (lag 0, WAL applied), and what must be
in QuestDB is compared with what is: the producer knows each valid reading it sent
(:class:`benchmarks.workload.Expected`), the simulator writes its count in its ground
truth. It writes ``soak.json``, ``soak.md`` and ``soak.png`` to ``--out`` (default
``STATE_DIR/soak``), also when a process died: that is an error of the report.

Verdicts: memory flat (anonymous RSS of each process grows less than
:data:`RSS_GROWTH_LIMIT` per hour over the second half), lag bounded (the second half's
largest consumer and WAL lag no greater than the first half's plus a margin), no
errors, nothing lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from confluent_kafka import KafkaException, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.throughput import bench_env
from benchmarks.workload import (
    Expected,
    WorkloadConfig,
    messages,
    settled_start_ms,
    twin_model,
)
from connectors.kafka import reliable_producer
from connectors.kafka_source import watermarks_client
from connectors.questdb import QuestDBError, QuestDBHttp
from twinflow.errors import ConfigError, TwinflowError
from twinflow.runner import prepare_outputs
from twinflow.services import manager
from twinflow.services.process import cpu_seconds, log_tail, port_accepts, port_is_free
from twinflow.settings import (
    KafkaSettings,
    MetricsSettings,
    MqttSettings,
    OpcUaSettings,
    QuestDBSettings,
    ServeSettings,
    Settings,
    TopicSettings,
    load_settings,
)
from twinflow.twin_model import load_twin_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_EVERY_S = 5.0
RSS_GROWTH_LIMIT = 0.05
"""Largest growth per hour of a process's memory over the second half that is flat."""
LAG_MARGIN_S = 5.0
"""A lag is bounded when its second-half peak exceeds the first half's by at most this
many seconds of input (one sampling interval): a sample may land on a batch boundary."""
WAL_MARGIN_TXNS = 5
SUSTAINED_SNAPSHOTS = 4
"""Snapshot intervals a bench run must last for its rate to count as sustained: a
snapshot of ten thousand settled twins takes seconds, and a run of a few intervals
holds its share of them (within a quarter of one snapshot's cost)."""
SUSTAINED_BENCH = (
    'twinflow bench --variants "twinflow 1 worker" --entities 10000 --readings 12000000'
)
"""A bench whose one-worker run lasts several snapshot intervals (200 s of plant time)."""
SIM_RATE = 300.0
"""Readings/s of the simulator (a reading per sensor of the example plant per second);
the paced producer brings the rest."""
SENSORS = 6
DRAIN_STALL_S = 120.0
"""The drain gives up when QuestDB's counts stood still this long with input left..."""
DRAIN_TIMEOUT_S = 600.0
"""... or after this long, or the run's length if longer, whatever the progress."""
STILL_S = 30.0
"""Drained also when lag and WAL are 0 and QuestDB's counts stood still this long."""
STOP_TIMEOUT_S = 60.0
SERVERS = ("kafka", "questdb", "mosquitto")
EXPECTED_REASONS = frozenset({"bad_json", "out_of_range"})
"""Dead-letter reasons of the workload's malformed and out-of-range readings."""


# -- pure: series and verdicts -----------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Start, end and extremes of one sampled series."""

    start: float
    end: float
    min: float
    max: float
    mean: float


def summarize(values: Sequence[float]) -> Summary | None:
    """A series' summary (None when it has no sample).

    >>> summarize([3.0, 1.0, 5.0, 4.0])
    Summary(start=3.0, end=4.0, min=1.0, max=5.0, mean=3.25)
    """
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return Summary(
        float(array[0]),
        float(array[-1]),
        float(array.min()),
        float(array.max()),
        round(float(array.mean()), 3),
    )


def growth_per_hour(
    times_s: Sequence[float], values: Sequence[float], from_s: float
) -> float | None:
    """Least-squares slope of the samples at or after ``from_s``, per hour, as a share.

    The share is of the samples' mean; None with fewer than 3 such samples or a zero mean.

    >>> growth_per_hour([0, 1800, 3600], [100, 101, 102], 0)
    0.019...
    >>> growth_per_hour([0, 10], [1, 2], 0) is None
    True
    """
    t = np.asarray(times_s, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    keep = t >= from_s
    if keep.sum() < 3 or not v[keep].mean():
        return None
    slope = np.polyfit(t[keep], v[keep], 1)[0]
    return float(slope * 3600 / v[keep].mean())


def is_flat(growth: float | None, limit: float = RSS_GROWTH_LIMIT) -> bool:
    """Whether a growth per hour is flat; unknown (too few samples) is not.

    >>> is_flat(0.01), is_flat(-0.2), is_flat(0.08), is_flat(None)
    (True, True, False, False)
    """
    return growth is not None and growth < limit


@dataclass(frozen=True)
class Bound:
    """A lag's peak in each half of the run, and whether the second stays within the first."""

    first_max: float
    second_max: float
    margin: float
    bounded: bool


def bounded(
    times_s: Sequence[float], values: Sequence[float], split_s: float, margin: float
) -> Bound:
    """Compare the peak after ``split_s`` with the peak before it plus ``margin``.

    >>> bounded([0, 1, 2, 3], [5, 9, 8, 10], 2, margin=1)
    Bound(first_max=9.0, second_max=10.0, margin=1, bounded=True)
    >>> bounded([0, 1, 2, 3], [5, 9, 8, 30], 2, margin=1).bounded
    False
    """
    t = np.asarray(times_s, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    first, second = v[t < split_s], v[t >= split_s]
    first_max = float(first.max()) if len(first) else 0.0
    second_max = float(second.max()) if len(second) else 0.0
    return Bound(
        first_max, second_max, margin, bool(len(second)) and second_max <= first_max + margin
    )


def max_rate(report: dict[str, Any], min_seconds: float) -> float | None:
    """The correct one-worker, one-process twinflow rate of a ``twinflow bench`` report.

    The soak runs that layout; a layout with more workers has more of the machine's
    cores. Only runs of at least ``min_seconds`` count: a run shorter than a few
    snapshot intervals may hold no snapshot at all, and measures a rate the flow cannot
    sustain (see :data:`SUSTAINED_SNAPSHOTS`).

    >>> max_rate({"results": [
    ...     {"kind": "twinflow", "workers": 1, "processes": 1, "readings_per_s": 80_000,
    ...      "seconds": 150, "correct": True},
    ...     {"kind": "twinflow", "workers": 1, "processes": 1, "readings_per_s": 99_000,
    ...      "seconds": 20, "correct": True},
    ...     {"kind": "twinflow", "workers": 1, "processes": 1, "readings_per_s": 90_000,
    ...      "seconds": 150, "correct": False},
    ...     {"kind": "twinflow", "workers": 2, "processes": 1, "readings_per_s": 95_000,
    ...      "seconds": 150, "correct": True},
    ...     {"kind": "twinflow", "workers": 1, "processes": 2, "readings_per_s": 99_000,
    ...      "seconds": 150, "correct": True},
    ...     {"kind": "peer-quix", "workers": 1, "processes": 1, "readings_per_s": 9_000,
    ...      "seconds": 150, "correct": True}]}, min_seconds=120)
    80000.0
    >>> max_rate({"results": []}, min_seconds=120) is None
    True
    """
    rates = [
        float(r["readings_per_s"])
        for r in report.get("results", ())
        if r.get("kind") == "twinflow"
        and r.get("workers") == 1
        and r.get("processes") == 1
        and r.get("correct")
        and r.get("readings_per_s")
        and r.get("seconds", 0) >= min_seconds
    ]
    return max(rates, default=None)


def split_rate(total: float, sim_rate: float = SIM_RATE) -> tuple[float, int]:
    """The simulator's share of ``total`` readings/s and the producer's entities.

    The producer sends one tick of every entity's :data:`SENSORS` readings a second, so
    its rate comes in steps of six; the simulator takes at most a quarter.

    >>> split_rate(41_000)
    (300.0, 6783)
    >>> split_rate(600)
    (150.0, 75)
    """
    sim = min(sim_rate, total / 4)
    return sim, max(1, round((total - sim) / SENSORS))


def verdicts(doc: dict[str, Any]) -> dict[str, Any]:
    """The run's verdicts from its samples, errors and counts (see the module doc)."""
    samples = doc["samples"]
    times = [s["t"] for s in samples]
    config = doc["config"]
    split = config.get("load_from_s", 0.0) + config["seconds"] / 2
    memory = {}
    for name in doc["processes"]:
        points = [(s["t"], s["anon_mib"][name]) for s in samples if name in s["anon_mib"]]
        growth = growth_per_hour([t for t, _ in points], [v for _, v in points], split)
        memory[name] = {"growth_per_hour": growth, "flat": is_flat(growth)}
    messages_per_s = config["total_rate"] / config["readings_per_message"]
    lag = bounded(times, [s["lag"] for s in samples], split, messages_per_s * LAG_MARGIN_S)
    wal = bounded(times, [s["wal_lag"] for s in samples], split, WAL_MARGIN_TXNS)
    return {
        "memory_flat": all(m["flat"] for m in memory.values()) and bool(memory),
        "memory": memory,
        "lag_bounded": lag.bounded,
        "lag": asdict(lag),
        "wal_bounded": wal.bounded,
        "wal": asdict(wal),
        "errors": len(doc["errors"]),
        "lost": doc["counts"]["lost"],
        "passed": (
            all(m["flat"] for m in memory.values())
            and lag.bounded
            and wal.bounded
            and not doc["errors"]
            and doc["counts"]["lost"] == 0
        ),
    }


# -- the soak's own stack ----------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range: a restarting client never takes them."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    rng = np.random.default_rng()
    for port in rng.permutation(np.arange(max(1024, low - 12_000), low)):
        if port_is_free(int(port)):
            ports.append(int(port))
        if len(ports) == count:
            return ports
    raise TwinflowError("no free ports on 127.0.0.1 below the ephemeral range")


def soak_settings(base: Settings, state_dir: Path, model: Path) -> Settings:
    """The soak stack: own ports and state, the base's jars and tools, default security."""
    (kafka, controller, http, pg, ilp, min_http, mqtt, opcua, *metric, serve) = _free_ports(14)
    return base.model_copy(
        update={
            "state_dir": state_dir,
            "lib_dir": base.jar_dir,
            "twin_model": model,
            "kafka": KafkaSettings(port=kafka, controller_port=controller),
            "questdb": QuestDBSettings(
                http_port=http, pg_port=pg, ilp_tcp_port=ilp, min_http_port=min_http
            ),
            "mqtt": MqttSettings(port=mqtt),
            "opcua": OpcUaSettings(endpoint=f"opc.tcp://127.0.0.1:{opcua}/twinflow/"),
            "topics": TopicSettings(),
            "metrics": MetricsSettings(
                flow_port=metric[0],
                mqtt_bridge_port=metric[1],
                opcua_bridge_port=metric[2],
                serve_port=metric[3],
                prometheus_port=metric[4],
            ),
            "serve": ServeSettings(port=serve),
        }
    )


def child_env(settings: Settings, model: Path) -> dict[str, str]:
    """The environment of a twinflow process on the soak stack, with ``model``."""
    env = bench_env(settings, model)
    env.update(
        {
            f"TWINFLOW_{name.upper().replace('.', '__')}": str(port)
            for name, port in settings.local_ports().items()
        }
    )
    metrics = settings.metrics
    env.update(
        TWINFLOW_LIB_DIR=str(settings.jar_dir),
        TWINFLOW_OPCUA__ENDPOINT=settings.opcua.endpoint,
        TWINFLOW_METRICS__FLOW_PORT=str(metrics.flow_port),
        TWINFLOW_METRICS__MQTT_BRIDGE_PORT=str(metrics.mqtt_bridge_port),
        TWINFLOW_METRICS__OPCUA_BRIDGE_PORT=str(metrics.opcua_bridge_port),
        TWINFLOW_METRICS__SERVE_PORT=str(metrics.serve_port),
        TWINFLOW_SERVE__PORT=str(settings.serve.port),
    )
    return env


def merged_model(plant: Path, config: WorkloadConfig, path: Path) -> int:
    """Write the plant's model plus the workload's machines to ``path``.

    Returns the number of plant entities: listed first, ``simulate --entities N`` plays them.
    """
    document = yaml.safe_load(plant.read_text())
    workload = twin_model(config)
    document["asset_types"].update(workload["asset_types"])
    plant_entities = len(document["entities"])
    document["entities"].extend(workload["entities"])
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return plant_entities


# -- processes ---------------------------------------------------------------------------


@dataclass
class Child:
    """One process the soak started."""

    name: str
    argv: list[str]
    log: Path
    finishes: bool = False
    """It ends by itself (the simulator, the producer) and must end with 0."""
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    stopped: bool = False

    def start(self, env: dict[str, str]) -> None:
        """Start it, output to its log; its own session keeps Ctrl-C for the soak."""
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        """Its PID while it runs."""
        return self.proc.pid if self.proc is not None and self.exit_code is None else None

    def poll(self) -> int | None:
        """Its exit code once it ended."""
        if self.proc is not None and self.exit_code is None:
            self.exit_code = self.proc.poll()
        return self.exit_code

    def stop(self) -> None:
        """SIGINT, then SIGKILL after :data:`STOP_TIMEOUT_S`, by its PID."""
        self.stopped = True
        if self.proc is None or self.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.exit_code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()


def memory(pid: int) -> tuple[float, float] | None:
    """RSS and anonymous RSS of a process in MiB (None when it is gone).

    Anonymous memory is what the process itself holds; the rest of RSS is file pages
    (QuestDB maps its column files), which the kernel reclaims at will.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = {
        line.split(":")[0]: int(line.split()[1]) / 1024
        for line in status.splitlines()
        if line.startswith(("VmRSS:", "RssAnon:"))
    }
    return (fields["VmRSS"], fields["RssAnon"]) if "VmRSS" in fields else None


def rates_by_half(
    times: Sequence[float], totals: Sequence[float | None], split: float, end: float
) -> tuple[float | None, float | None]:
    """Mean rate of a cumulative counter before and after ``split`` (to ``end``).

    >>> rates_by_half([0, 10, 20, 30], [0, 5, 10, 40], 10, 30)
    (0.5, 1.75)
    """
    points = [(t, v) for t, v in zip(times, totals, strict=True) if v is not None and t <= end]

    def rate(lo: float, hi: float) -> float | None:
        inside = [(t, v) for t, v in points if lo <= t <= hi]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    return rate(float("-inf"), split), rate(split, end)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
    """The samples of a /metrics endpoint on 127.0.0.1 (None when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    except OSError:
        return None
    return {
        (item.name, frozenset(item.labels.items())): item.value
        for family in text_string_to_metric_families(body)
        for item in family.samples
    }


def row_counters(body: str) -> dict[str, float]:
    r"""The ``*rows*_total`` counters of a Prometheus text page, read line by line.

    QuestDB's page has gauges whose value is ``null``, which a strict parser refuses.

    >>> row_counters("# TYPE a counter\nquestdb_rows_total 5\nquestdb_x null\n")
    {'questdb_rows_total': 5.0}
    """
    found = {}
    for line in body.splitlines():
        name, _, value = line.partition(" ")
        if "rows" in name and name.endswith("_total"):
            with contextlib.suppress(ValueError):
                found[name] = float(value)
    return found


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of a metric's samples whose labels include ``labels``.

    >>> total({("a", frozenset({("r", "x")})): 2.0, ("a", frozenset({("r", "y")})): 3.0}, "a")
    5.0
    """
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


FLOW_MEMORY = {
    "malloc in use MiB": ("twinflow_malloc_in_use_bytes", 2**-20),
    "malloc free MiB": ("twinflow_malloc_free_bytes", 2**-20),
    "pymalloc arenas MiB": ("twinflow_pymalloc_arena_bytes", 2**-20),
    "pymalloc in blocks MiB": ("twinflow_pymalloc_block_bytes", 2**-20),
    "Kafka fetch queues MiB": ("twinflow_kafka_fetch_queue_bytes", 2**-20),
    "Python blocks (k)": ("twinflow_python_allocated_blocks", 1e-3),
}
"""Where the flow's memory is, from its own gauges: what it holds, what its two
allocators keep (malloc; pymalloc, which has Python's small objects), what its Kafka
client fetched ahead."""


def flow_memory(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> dict[str, float]:
    """The flow's memory gauges in the report's units (those it exports).

    >>> flow_memory({("twinflow_malloc_free_bytes", frozenset()): 3 * 2**20})
    {'malloc free MiB': 3.0}
    """
    found = {}
    for label, (name, scale) in FLOW_MEMORY.items():
        if any(n == name for n, _ in samples):
            found[label] = round(total(samples, name) * scale, 1)
    return found


# -- the paced producer (its own process) ------------------------------------------------


def produce(spec_file: Path) -> int:
    """Send the workload at its rate, one tick a second; keep ``status`` up to date."""
    spec = json.loads(spec_file.read_text())
    kafka = KafkaSettings(port=spec["kafka_port"])
    config = WorkloadConfig(**spec["workload"])
    status = Path(spec["status"])
    expected = Expected()
    producer = reliable_producer(kafka, **{"linger.ms": 20})
    failures: list[str] = []

    def report(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    def write(done: bool) -> None:
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps({"done": done, "failures": failures[:5], **asdict(expected)}))
        tmp.replace(status)

    rate = config.entities * config.sensors
    window_ms = int(config.window_s * 1000)
    # The first window lies in the seasonal bin before the present one, then the clock
    # jumps to wall time (on a window boundary, as the window counts need): the twins
    # leave their first bin at once, so the whole hour measures settled twins wherever
    # the wall clock stands. Paced from now: no burst to catch up.
    now_ms = int(time.time() * 1000) // window_ms * window_ms
    start_ms = settled_start_ms(now_ms, config.window_s)
    jump_ms = now_ms - start_ms
    started = time.monotonic()
    next_status = 0.0
    for count, (key, payload) in enumerate(messages(config, start_ms, expected, jump_ms), start=1):
        while True:
            try:
                producer.produce(spec["topic"], payload, key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        if count % 200 == 0:
            producer.poll(0)
            # Event time follows wall time: tick k is due k seconds after the start.
            delay = started + expected.readings / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() >= next_status:
                write(False)
                next_status = time.monotonic() + 1
    left = producer.flush(120)
    if left:
        failures.append(f"{left} messages not delivered within 120 s")
    write(True)
    return 1 if failures else 0


# -- the run -----------------------------------------------------------------------------


@dataclass
class Options:
    """What the soak was asked for."""

    minutes: float = 60.0
    rate: float | None = None
    out: Path | None = None
    every_s: float = SAMPLE_EVERY_S
    keep_data: bool = False


@dataclass
class Soak:
    """One soak run: its stack, processes, samples and errors."""

    settings: Settings
    work: Path
    options: Options
    say: Callable[[str], None]
    children: dict[str, Child] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0
    load_from: float = 0.0
    interrupted: bool = False

    def error(self, kind: str, detail: str, **extra: Any) -> None:
        """Record an error once (same kind and detail)."""
        if any(e["kind"] == kind and e["detail"] == detail for e in self.errors):
            return
        entry = {"t": round(time.monotonic() - self.t0, 1), "kind": kind, "detail": detail, **extra}
        self.errors.append(entry)
        self.say(f"ERROR {kind}: {detail}")

    def start(self, child: Child, env: dict[str, str]) -> None:
        """Start a child and remember it."""
        child.start(env)
        self.children[child.name] = child
        self.say(f"{child.name}: started (pid {child.pid})")

    def check_exits(self) -> None:
        """A child that ended on its own with an error, or too early, is an error."""
        for child in self.children.values():
            code = child.poll()
            if code is None or child.stopped:
                continue
            if child.finishes and code == 0:
                continue
            self.error(
                "exit", f"{child.name} exited with code {code}", log_tail=log_tail(child.log, 20)
            )
            child.stopped = True

    def server_pids(self) -> dict[str, int]:
        """The servers of the soak stack that run, by name."""
        found = {}
        for service in manager.services(self.settings, SERVERS):
            pid = service.pid_file.live_pid()
            if pid is not None:
                found[service.name] = pid
        return found

    def wait_metric(self, port: int, name: str, timeout_s: float, **labels: str) -> bool:
        """Wait until a metric of the endpoint on ``port`` is positive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            samples = scrape(port)
            if samples and total(samples, name, **labels) > 0:
                return True
            self.check_exits()
            time.sleep(0.5)
        return False


class Sampler:
    """Takes one sample of every series."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        settings = soak.settings
        self.sql = QuestDBHttp(settings.questdb, timeout_s=20)
        self.marks = watermarks_client(settings.kafka)
        self.topic = settings.topics.raw
        self.partitions = settings.topics.raw_partitions
        self.last_flow: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

    def close(self) -> None:
        """Release the Kafka client."""
        self.marks.close()

    def high_watermarks(self) -> int | None:
        """Messages in the raw topic (sum of its partitions' high watermarks)."""
        highs = 0
        try:
            for partition in range(self.partitions):
                marks = self.marks.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=10, cached=False
                )
                if marks is None:
                    return None
                highs += marks[1]
        except KafkaException:
            return None
        return highs

    def wal_lag(self) -> int | None:
        """Transactions QuestDB has sequenced but not yet applied, over every table."""
        try:
            rows = self.sql.exec(
                "SELECT name, suspended, writerTxn, sequencerTxn FROM wal_tables()"
            ).rows
        except QuestDBError:
            return None
        for name, suspended, *_ in rows:
            if suspended:
                self.soak.error("wal", f"QuestDB suspended the WAL of table {name}")
        return sum(int(sequencer) - int(writer) for _n, _s, writer, sequencer in rows)

    def take(self) -> dict[str, Any]:
        """One sample: memory, lag, WAL lag, counts and errors so far."""
        soak = self.soak
        soak.check_exits()
        pids = {n: c.pid for n, c in soak.children.items() if c.pid is not None}
        pids.update(soak.server_pids())
        rss, anon, cpu = {}, {}, {}
        for name, pid in pids.items():
            found = memory(pid)
            if found is not None:
                rss[name], anon[name] = round(found[0], 1), round(found[1], 1)
            used = cpu_seconds(pid)
            if used is not None:
                cpu[name] = used
        metrics = soak.settings.metrics
        flow = scrape(metrics.flow_port)
        if flow is not None:
            self.last_flow = flow
        else:
            flow = self.last_flow
        consumed = total(flow, "twinflow_messages_consumed_total", topic=self.topic)
        highs = self.high_watermarks()
        sample: dict[str, Any] = {
            "t": round(time.monotonic() - soak.t0, 1),
            "rss_mib": rss,
            "anon_mib": anon,
            "cpu_s": cpu,
            "flow_step_s": {
                dict(labels)["step"]: value
                for (name, labels), value in flow.items()
                if name == "twinflow_step_seconds_sum"
            },
            "questdb_rows": self.questdb_rows(),
            "lag": max(0, highs - int(consumed)) if highs is not None else None,
            "wal_lag": self.wal_lag(),
            "flow_memory": flow_memory(flow),
            "accepted": total(flow, "twinflow_readings_accepted_total"),
            "produced": _status(soak.work / "producer-status.json").get("readings", 0),
        }
        self.check_metrics(flow)
        serve = soak.children.get("serve")
        if serve is not None and serve.pid is not None and not _serve_healthy(soak.settings):
            soak.error("serve", "twinflow serve did not answer /api/v1/health within 10 s")
        return sample

    def questdb_rows(self) -> dict[str, float]:
        """QuestDB's row counters (rows committed, rows physically written, ...)."""
        url = f"http://127.0.0.1:{self.soak.settings.questdb.min_http_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read().decode()
        except OSError:
            return {}
        return row_counters(body)

    def check_metrics(self, flow: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> None:
        """Sink failures, unexpected dead letters (flow and bridges) are errors."""
        soak = self.soak
        failures = total(flow, "twinflow_sink_failures_total")
        if failures:
            soak.error("flow", f"{failures:.0f} write batches a sink could not deliver")
        for (name, labels), value in flow.items():
            reason = dict(labels).get("reason")
            if name == "twinflow_dead_letters_total" and value and reason not in EXPECTED_REASONS:
                soak.error("flow", f"{value:.0f} dead letters of reason {reason}")
        for bridge in ("mqtt_bridge_port", "opcua_bridge_port"):
            samples = scrape(getattr(soak.settings.metrics, bridge)) or {}
            letters = total(samples, "twinflow_bridge_dead_letters_total")
            if letters:
                soak.error("bridge", f"{bridge.split('_')[0]} bridge: {letters:.0f} dead letters")


def _status(path: Path) -> dict[str, Any]:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return dict(json.loads(path.read_text()))
    return {}


def _serve_healthy(settings: Settings) -> bool:
    url = f"http://127.0.0.1:{settings.serve.port}/api/v1/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def default_rate(state_dir: Path, snapshot_interval_s: float) -> float:
    """Half the flow's sustained maximum from the newest ``twinflow bench`` report."""
    report = state_dir / "bench" / "throughput" / "throughput.json"
    min_seconds = SUSTAINED_SNAPSHOTS * snapshot_interval_s
    measure = (
        f"run `{SUSTAINED_BENCH}` (a one-worker run of at least {min_seconds:.0f} s, "
        f"{SUSTAINED_SNAPSHOTS} snapshot intervals) to measure the flow's sustained "
        "maximum, or give the soak's total rate with --rate READINGS_PER_S"
    )
    if not report.exists():
        raise ConfigError(f"no throughput report at {report}: {measure}")
    best = max_rate(json.loads(report.read_text()), min_seconds)
    if best is None:
        raise ConfigError(
            f"{report} has no correct one-worker twinflow run of at least "
            f"{min_seconds:.0f} s: {measure}"
        )
    return best / 2


@dataclass(frozen=True)
class Plan:
    """What one soak runs: its length, rates, workload and models."""

    seconds: int
    total_rate: float
    sim_rate: float
    workload: WorkloadConfig
    plant_model: Path
    flow_model: Path
    plant: tuple[str, ...]
    """The plant's entities, which the simulator plays; the flow's model adds the machines."""


def make_plan(base: Settings, options: Options, work: Path) -> Plan:
    """Rates and models of a run; the flow's model is written to ``work``."""
    total_rate = (
        options.rate
        if options.rate is not None
        else default_rate(base.state_dir, base.flow.snapshot_interval_s)
    )
    if total_rate < 8 or options.minutes <= 0:
        raise ConfigError("--rate must be at least 8 readings/s and --minutes positive")
    seconds = round(options.minutes * 60)
    sim_rate, entities = split_rate(total_rate)
    workload = WorkloadConfig(
        entities=entities, sensors=SENSORS, readings=entities * SENSORS * seconds
    )
    flow_model = work / "model.yaml"
    merged_model(base.twin_model, workload, flow_model)
    plant = tuple(e.id for e in load_twin_model(base.twin_model).entities)
    return Plan(seconds, total_rate, sim_rate, workload, base.twin_model, flow_model, plant)


def start_pipeline(soak: Soak, plan: Plan) -> None:
    """Flow, serve and MQTT bridge first, then the simulator, its OPC UA bridge, the producer."""
    settings, work = soak.settings, soak.work
    flow_env = child_env(settings, plan.flow_model)
    plant_env = child_env(settings, plan.plant_model)
    twinflow = [sys.executable, "-m", "twinflow"]
    soak.start(Child("flow", [*twinflow, "run"], work / "flow.log"), flow_env)
    soak.start(Child("serve", [*twinflow, "serve"], work / "serve.log"), flow_env)
    bridge = [*twinflow, "bridge", "mqtt"]
    soak.start(Child("mqtt bridge", bridge, work / "mqtt-bridge.log"), plant_env)
    # The bridge's persistent session must exist before the first reading is published.
    port = settings.metrics.mqtt_bridge_port
    if not soak.wait_metric(port, "twinflow_bridge_connected", 60, bridge="mqtt"):
        soak.error("start", "the MQTT bridge did not connect within 60 s")
    # serve starts while everything else does; its health counts from the first sample.
    deadline = time.monotonic() + 60
    while not (serving := _serve_healthy(settings)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not serving:
        soak.error("start", "twinflow serve did not answer /api/v1/health within 60 s")
    simulate = [
        *twinflow,
        *("simulate", "--mqtt", "--opcua", "--speed", "1"),
        *("--fault-share", "0", "--data-faults", "0"),
        *("--duration", str(plan.seconds), "--rate", f"{plan.sim_rate:g}"),
        *("--entities", str(len(plan.plant)), "--ground-truth", str(work / "sim-truth.json")),
    ]
    soak.start(Child("simulator", simulate, work / "simulator.log", finishes=True), plant_env)
    deadline = time.monotonic() + 60
    while not port_accepts(settings.opcua.port) and time.monotonic() < deadline:
        time.sleep(0.2)
    bridge = [*twinflow, "bridge", "opcua"]
    soak.start(Child("opcua bridge", bridge, work / "opcua-bridge.log"), plant_env)
    spec = work / "producer.json"
    spec.write_text(
        json.dumps(
            {
                "kafka_port": settings.kafka.port,
                "topic": settings.topics.raw,
                "workload": asdict(plan.workload),
                "status": str(work / "producer-status.json"),
            }
        )
    )
    producer = [sys.executable, "-m", "benchmarks.soak", "--produce", str(spec)]
    soak.start(Child("producer", producer, work / "producer.log", finishes=True), flow_env)


def sample_load(soak: Soak, sampler: Sampler, seconds: float) -> None:
    """Sample until the load's time is up and the simulator and producer have ended."""
    soak.load_from = time.monotonic()
    end = soak.load_from + seconds
    next_say = 0.0
    while time.monotonic() < end or any(
        soak.children[n].poll() is None for n in ("simulator", "producer")
    ):
        due = time.monotonic() + soak.options.every_s
        soak.samples.append(sampler.take())
        if time.monotonic() >= next_say:
            soak.say(_progress(soak.samples[-1], soak.errors))
            next_say = time.monotonic() + 60
        if time.monotonic() > end + 300:
            soak.error("stop", "the simulator or producer ran 5 min past the end")
            return
        time.sleep(max(0.0, due - time.monotonic()))


def run_soak(base: Settings, options: Options, say: Callable[[str], None]) -> Path:
    """Run the soak; write soak.json, soak.md and soak.png; return the .md's path."""
    out = options.out or base.state_dir / "soak"
    work = out / f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}"  # noqa: DTZ005
    work.mkdir(parents=True, exist_ok=True)
    run = make_plan(base, options, work)
    settings = soak_settings(base, work / "stack", run.flow_model)
    soak = Soak(settings, work, options, say)
    entities = run.workload.entities
    say(
        f"soak: {options.minutes:g} min at {run.total_rate:,.0f} readings/s (simulator "
        f"{run.sim_rate:g}, producer {entities * SENSORS:,} = {entities:,} machines x "
        f"{SENSORS}); run folder {work}"
    )
    counts: dict[str, Any] = {"lost": None}
    sampler: Sampler | None = None
    started_servers: list[str] = []
    try:
        started_servers = manager.up(settings, list(SERVERS), say)
        prepare_outputs(settings)
        soak.t0 = time.monotonic()
        sampler = Sampler(soak)
        start_pipeline(soak, run)
        try:
            sample_load(soak, sampler, run.seconds)
        except KeyboardInterrupt:
            soak.interrupted = True
            soak.error("interrupted", "stopped (Ctrl-C or SIGTERM) before the end")
        for name in ("producer", "simulator"):
            soak.children[name].stop()
        soak.check_exits()
        counts = drain(soak, sampler, list(run.plant), run.seconds)
    except KeyboardInterrupt:
        soak.interrupted = True
        soak.error("interrupted", "stopped (Ctrl-C or SIGTERM)")
    except Exception as exc:
        # Whatever stopped the run is its first error; the report is still written.
        soak.error("run", f"{type(exc).__name__}: {exc}")
    finally:
        if sampler is not None:
            sampler.close()
        for child in reversed(list(soak.children.values())):
            child.stop()
        manager.down(settings, started_servers, say)
        if not options.keep_data:
            for data in ("kafka/data", "questdb/db", "recovery"):
                shutil.rmtree(settings.state_dir / data, ignore_errors=True)
    doc = document(soak, run, counts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(doc, indent=2))
    (out / "soak.md").write_text(markdown(doc))
    chart(doc, out / "soak.png")
    return out / "soak.md"


def document(soak: Soak, run: Plan, counts: dict[str, Any]) -> dict[str, Any]:
    """The report's data: configuration, samples, errors, counts and verdicts."""
    load_from = soak.load_from - soak.t0 if soak.load_from else 0.0
    doc = {
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": {
            "minutes": soak.options.minutes,
            "seconds": run.seconds,
            "total_rate": run.total_rate,
            "simulator_rate": run.sim_rate,
            "producer_entities": run.workload.entities,
            "sensors": SENSORS,
            "readings_per_message": SENSORS,
            "every_s": soak.options.every_s,
            "run_folder": str(soak.work),
            "interrupted": soak.interrupted,
            "load_from_s": round(load_from, 1),
        },
        "processes": sorted({n for s in soak.samples for n in s["anon_mib"]}),
        "exits": {n: c.exit_code for n, c in soak.children.items()},
        "samples": soak.samples,
        "errors": soak.errors,
        "counts": counts,
    }
    doc["verdicts"] = verdicts(doc)
    return doc


def _progress(sample: dict[str, Any], errors: list[dict[str, Any]]) -> str:
    return (
        f"  t={sample['t']:.0f}s lag {sample['lag']} messages, WAL lag {sample['wal_lag']}, "
        f"produced {sample['produced']:,}, accepted {sample['accepted']:,.0f}, "
        f"flow RSS {sample['rss_mib'].get('flow', 0):.0f} MiB, errors {len(errors)}"
    )


def drain(soak: Soak, sampler: Sampler, plant: list[str], seconds: float) -> dict[str, Any]:
    """Wait until the flow has taken everything in; count what reached QuestDB.

    A flow that fell behind catches up here: the wait goes on while it makes progress.
    """
    produced = _status(soak.work / "producer-status.json")
    truth = _status(soak.work / "sim-truth.json").get("counts", {})
    if not produced.get("done"):
        soak.error("producer", "the producer did not finish; its counts are partial")
    if not truth:
        soak.error("simulator", "the simulator wrote no ground truth")
    expected_workload = int(produced.get("valid_readings", 0))
    expected_sim = int(truth.get("valid_readings", 0))
    quoted = ", ".join(f"'{entity}'" for entity in plant)
    started = time.monotonic()
    deadline = started + max(DRAIN_TIMEOUT_S, seconds)
    next_say = started + 60
    last: tuple[int, int] | None = None
    still_since = time.monotonic()
    rows, sim_rows = 0, 0
    drained = False
    while True:
        sample = sampler.take()
        soak.samples.append(sample)
        with contextlib.suppress(QuestDBError, IndexError):
            rows = int(sampler.sql.exec("SELECT count() FROM readings").rows[0][0])
            query = f"SELECT count() FROM readings WHERE entity IN ({quoted})"  # noqa: S608
            sim_rows = int(sampler.sql.exec(query).rows[0][0])
        if (rows, sim_rows) != last:
            last, still_since = (rows, sim_rows), time.monotonic()
        quiet = sample["lag"] == 0 and sample["wal_lag"] == 0
        complete = rows - sim_rows >= expected_workload and sim_rows >= expected_sim
        if quiet and (complete or time.monotonic() - still_since > STILL_S):
            drained = True
            break
        stalled = time.monotonic() - still_since > DRAIN_STALL_S
        if time.monotonic() > deadline or stalled:
            soak.error(
                "drain",
                f"not drained after {time.monotonic() - started:.0f} s"
                f"{f' (no progress for {DRAIN_STALL_S:.0f} s)' if stalled else ''}: "
                f"lag {sample['lag']} messages, WAL lag {sample['wal_lag']}, "
                f"{rows - sim_rows:,} of {expected_workload:,} workload readings and "
                f"{sim_rows:,} of {expected_sim:,} simulator readings in QuestDB",
            )
            break
        if time.monotonic() >= next_say:
            soak.say(f"draining: {_progress(sample, soak.errors)}")
            next_say = time.monotonic() + 60
        time.sleep(soak.options.every_s)
    flow = sampler.last_flow
    letters = int(
        sum(total(flow, "twinflow_dead_letters_total", reason=r) for r in EXPECTED_REASONS)
    )
    expected_letters = int(produced.get("malformed_messages", 0)) + int(
        produced.get("out_of_range_readings", 0)
    )
    if letters != expected_letters:
        soak.error("flow", f"{letters} dead letters of the workload, expected {expected_letters}")
    lost_workload = expected_workload - (rows - sim_rows)
    lost_sim = expected_sim - sim_rows
    return {
        "drained": drained,
        "drain_s": round(time.monotonic() - started, 1),
        "workload_valid_readings": expected_workload,
        "workload_rows": rows - sim_rows,
        "workload_dead_letters": letters,
        "workload_expected_dead_letters": expected_letters,
        "simulator_valid_readings": expected_sim,
        "simulator_rows": sim_rows,
        "lost_workload": lost_workload,
        "lost_simulator": lost_sim,
        "lost": max(0, lost_workload) + max(0, lost_sim),
        "extra_rows": max(0, -lost_workload) + max(0, -lost_sim),
    }


# -- the report --------------------------------------------------------------------------


def _series(doc: dict[str, Any]) -> dict[str, list[float]]:
    samples = doc["samples"]
    found: dict[str, list[float]] = {}
    for name in doc["processes"]:
        found[f"RSS MiB: {name}"] = [s["rss_mib"][name] for s in samples if name in s["rss_mib"]]
        found[f"anon RSS MiB: {name}"] = [
            s["anon_mib"][name] for s in samples if name in s["anon_mib"]
        ]
    for label in FLOW_MEMORY:
        found[f"flow {label}"] = [
            s["flow_memory"][label] for s in samples if label in s.get("flow_memory", {})
        ]
    found["consumer lag (messages)"] = [s["lag"] for s in samples if s["lag"] is not None]
    found["WAL lag (txns)"] = [s["wal_lag"] for s in samples if s["wal_lag"] is not None]
    return found


def markdown(doc: dict[str, Any]) -> str:
    """The report: verdicts, the series' table, counts and errors."""
    config, v, counts = doc["config"], doc["verdicts"], doc["counts"]
    yes = {True: "yes", False: "**no**"}
    lines = [
        "# twinflow soak",
        "",
        f"{doc['created']}: {config['minutes']:g} min at {config['total_rate']:,.0f} readings/s "
        f"(simulator {config['simulator_rate']:g} over MQTT and OPC UA, producer "
        f"{config['producer_entities']:,} machines x {config['sensors']} sensors a second); "
        f"a sample every {config['every_s']:g} s. Run folder: {config['run_folder']}.",
        "",
        "| verdict | rule | result |",
        "|---|---|---|",
        f"| memory flat | anonymous RSS of every process grows < {RSS_GROWTH_LIMIT:.0%}/h over "
        f"the second half | {yes[v['memory_flat']]} |",
        f"| lag bounded | second-half peak <= first-half peak + {LAG_MARGIN_S:g} s of input "
        f"({v['lag']['second_max']:,.0f} vs {v['lag']['first_max']:,.0f} + "
        f"{v['lag']['margin']:,.0f} messages) | {yes[v['lag_bounded']]} |",
        f"| WAL lag bounded | second-half peak <= first-half peak + {WAL_MARGIN_TXNS} txns "
        f"({v['wal']['second_max']:,.0f} vs {v['wal']['first_max']:,.0f}) "
        f"| {yes[v['wal_bounded']]} |",
        f"| errors | none | {v['errors']} |",
        f"| lost | valid readings produced and not in QuestDB after the drain | {v['lost']} |",
        "",
        f"**{'PASSED' if v['passed'] else 'FAILED'}**",
        *_caveats(doc),
        "",
        "| series | start | end | min | max | mean | growth/h (2nd half) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in _series(doc).items():
        s = summarize(values)
        if s is None:
            continue
        growth = ""
        if name.startswith("anon"):
            g = v["memory"].get(name.split(": ", 1)[1], {}).get("growth_per_hour")
            growth = "-" if g is None else f"{g:+.1%}"
        elif name.removeprefix("flow ") in FLOW_MEMORY:
            g = _flow_memory_growth(doc, name.removeprefix("flow "))
            growth = "-" if g is None else f"{g:+.1%} (info)"
        lines.append(
            f"| {name} | {s.start:,.1f} | {s.end:,.1f} | {s.min:,.1f} | {s.max:,.1f} "
            f"| {s.mean:,.1f} | {growth} |"
        )
    lines += _rates_table(doc)
    lines += ["", "## Counts", "", "| count | value |", "|---|---:|"]
    lines += [f"| {key} | {value} |" for key, value in counts.items()]
    lines += ["", "## Errors", ""]
    lines += [f"- t={e['t']} s {e['kind']}: {e['detail']}" for e in doc["errors"]] or ["none"]
    lines.append("")
    return "\n".join(lines)


def _flow_memory_growth(doc: dict[str, Any], label: str) -> float | None:
    """A flow memory gauge's growth per hour over the second half (not a verdict)."""
    config = doc["config"]
    split = config.get("load_from_s", 0.0) + config["seconds"] / 2
    points = [
        (s["t"], s["flow_memory"][label])
        for s in doc["samples"]
        if label in s.get("flow_memory", {})
    ]
    return growth_per_hour([t for t, _ in points], [v for _, v in points], split)


def _rates_table(doc: dict[str, Any]) -> list[str]:
    """CPU per process, the flow's time per step and QuestDB's row counters, by half."""
    samples, config = doc["samples"], doc["config"]
    load_from = config.get("load_from_s", 0.0)
    split, end = load_from + config["seconds"] / 2, load_from + config["seconds"]
    times = [s["t"] for s in samples]
    rows = []
    for key, label, unit in (
        ("cpu_s", "CPU", "cores"),
        ("flow_step_s", "flow step", "s/s"),
        ("questdb_rows", "QuestDB", "/s"),
    ):
        names = sorted({n for s in samples for n in s.get(key, {})})
        for name in names:
            first, second = rates_by_half(
                times, [s.get(key, {}).get(name) for s in samples], split, end
            )
            if first is None or second is None:
                continue
            change = f"{second / first - 1:+.0%}" if first else "-"
            rows.append(f"| {label}: {name} ({unit}) | {first:,.3g} | {second:,.3g} | {change} |")
    if not rows:
        return []
    return [
        "",
        "## Where the time went",
        "",
        "Mean rates over each half of the load (cumulative counters sampled every "
        f"{config['every_s']:g} s): CPU cores used per process, seconds per second the "
        "flow spent in each step, QuestDB's row counters.",
        "",
        "| rate | first half | second half | change |",
        "|---|---:|---:|---:|",
        *rows,
    ]


def _caveats(doc: dict[str, Any]) -> list[str]:
    """What makes a verdict of this run weaker than it reads."""
    notes = []
    if doc["config"]["minutes"] < 30:
        notes.append(
            f"A {doc['config']['minutes']:g}-min run ends before the processes' warm-up does: "
            "its memory verdict extrapolates minutes to an hour and is indicative only."
        )
    if doc["counts"].get("drained") is False:
        notes.append(
            "The flow did not drain: readings still in Kafka count as lost, and the lag "
            "verdict compares a backlog, not a steady state."
        )
    return ["", *(f"Note: {note}" for note in notes)] if notes else []


def chart(doc: dict[str, Any], path: Path) -> None:
    """Six panels over time: RSS, consumer lag, WAL lag, readings/s, CPU, flow memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = doc["samples"]
    minutes = np.array([s["t"] / 60 for s in samples])
    fig, axes = plt.subplots(6, 1, figsize=(10, 18), sharex=True)
    for name in doc["processes"]:
        points = [(s["t"] / 60, s["rss_mib"][name]) for s in samples if name in s["rss_mib"]]
        axes[0].plot([t for t, _ in points], [m for _, m in points], label=name)
    axes[0].set_ylabel("RSS MiB")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=3)
    for ax, key, label in (
        (axes[1], "lag", "consumer lag (messages)"),
        (axes[2], "wal_lag", "WAL lag (txns)"),
    ):
        ax.plot(minutes, [np.nan if s[key] is None else s[key] for s in samples])
        ax.set_ylabel(label)
    for key, label in (("produced", "workload produced"), ("accepted", "flow accepted")):
        counts = np.array([s[key] for s in samples], dtype=np.float64)
        dt = np.diff(minutes * 60)
        rates = np.diff(counts) / np.where(dt > 0, dt, np.nan)
        axes[3].plot(minutes[1:], np.clip(rates, 0, None), label=label)
    load_end = (doc["config"].get("load_from_s", 0.0) + doc["config"]["seconds"]) / 60
    for ax in axes:
        ax.axvline(load_end, color="grey", linestyle=":", linewidth=1)
    axes[3].text(
        load_end,
        0.95,
        " load ends",
        fontsize=7,
        color="grey",
        va="top",
        transform=axes[3].get_xaxis_transform(),
        clip_on=True,
    )
    axes[3].set_ylabel("readings/s")
    axes[3].legend(fontsize=7)
    for name in doc["processes"]:
        points = [(s["t"], s["cpu_s"][name]) for s in samples if name in s.get("cpu_s", {})]
        if len(points) > 1:
            t, used = np.array(points, dtype=np.float64).T
            dt = np.diff(t)
            axes[4].plot(t[1:] / 60, np.diff(used) / np.where(dt > 0, dt, np.nan), label=name)
    axes[4].set_ylabel("CPU cores")
    axes[4].legend(fontsize=7, ncol=3)
    flow = [s for s in samples if "flow" in s["anon_mib"]]
    axes[5].plot(
        [s["t"] / 60 for s in flow], [s["anon_mib"]["flow"] for s in flow], label="anon RSS"
    )
    for label in FLOW_MEMORY:
        if label.endswith("MiB"):
            points = [
                (s["t"] / 60, s["flow_memory"][label])
                for s in flow
                if label in s.get("flow_memory", {})
            ]
            axes[5].plot([t for t, _ in points], [m for _, m in points], label=label)
    axes[5].set_ylabel("flow memory MiB")
    axes[5].legend(fontsize=7, ncol=2)
    axes[5].set_xlabel("minutes")
    verdict = "PASSED" if doc["verdicts"]["passed"] else "FAILED"
    axes[0].set_title(
        f"twinflow soak: {doc['config']['minutes']:g} min at "
        f"{doc['config']['total_rate']:,.0f} readings/s, {verdict}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.soak --minutes 60 [--rate R] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the run")
    parser.add_argument(
        "--rate", type=float, help="total readings/s (default: half the bench maximum)"
    )
    parser.add_argument("--out", type=Path, help="report folder (default: STATE_DIR/soak)")
    parser.add_argument(
        "--every", type=float, default=SAMPLE_EVERY_S, help="seconds between samples"
    )
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the stack's Kafka, QuestDB, recovery data"
    )
    parser.add_argument("--produce", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.produce is not None:
        return produce(args.produce)

    def say(message: str) -> None:
        print(f"{datetime.now():%H:%M:%S} {message}", flush=True)  # noqa: DTZ005

    # A soak started in the background (``nohup … &``) ignores SIGINT; ``kill PID`` must
    # still stop its processes and write the report, as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        settings = load_settings()
        options = Options(args.minutes, args.rate, args.out, args.every, args.keep_data)
        report = run_soak(settings, options, say)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    print(report.read_text())
    say(f"report: {report} (+ soak.json, soak.png)")
    verdict = json.loads(report.with_suffix(".json").read_text())["verdicts"]
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
