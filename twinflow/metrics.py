"""Prometheus metrics of the flow and the bridges, and the endpoint that serves them.

Every metric is named ``twinflow_*`` and documented in the README ("Metrics"). They
live in ``prometheus_client``'s process-wide registry, which also carries the
``process_*`` metrics (CPU, memory, open files); worker threads of one process share
the counters. Metric objects are never part of Bytewax state: recovery snapshots only
per-entity state, and a restarted process counts from zero, as Prometheus expects of
counters.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.outputs import AlarmEvent
from schemas.raw import Reason
from twinflow import allocator
from twinflow.errors import ConfigError
from twinflow.settings import MetricsSettings, env_name

log = logging.getLogger("twinflow.metrics")

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LAG_SECONDS = (0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 900, 3600, 86_400)

# The flow (`twinflow run`), in the order data moves through its steps.
messages_consumed = Counter(
    "twinflow_messages_consumed",
    "Kafka messages read by the flow's sources (steps raw_in, deadletters_in)",
    ["topic"],
)
kafka_fetch_queue = Gauge(
    "twinflow_kafka_fetch_queue_bytes",
    "Bytes of messages the flow's Kafka client fetched ahead of the flow and holds",
    ["topic", "partition"],
)
consumer_lag = Gauge(
    "twinflow_kafka_consumer_lag",
    "Messages in a partition the flow has not read yet (high watermark - next offset)",
    ["topic", "partition"],
)
readings_accepted = Counter(
    "twinflow_readings_accepted",
    "Readings the twins step accepted into windows and the readings table (flagged included)",
)
readings_flagged = Counter(
    "twinflow_readings_flagged",
    "Accepted readings carrying a quality flag (spike, stuck, bad quality, ...)",
)
late_readings = Counter(
    "twinflow_late_readings",
    "Readings behind their entity's allowed lateness, sent to twin.late",
)
dead_letters = Counter(
    "twinflow_dead_letters",
    "Messages and readings the flow sent to twin.deadletter, by reason code",
    ["reason"],
)
windows_closed = Counter("twinflow_windows_closed", "Sensor windows closed and emitted")
window_close_lag = Histogram(
    "twinflow_window_close_lag_seconds",
    "Wall time at a window's close minus its end (event time); for a replay of old data "
    "this is the data's age",
    buckets=_LAG_SECONDS,
)
anomalies = Counter("twinflow_anomalies", "Windows scored above their entity's threshold")
alarms = Counter(
    "twinflow_alarms",
    "Alarm transitions sent to twin.alarms, by event (raised, cleared, rebaselined, "
    "acknowledged, confirmed, rejected)",
    ["event"],
)
verdicts = Counter(
    "twinflow_verdicts",
    "Operator verdicts (twin.feedback) taken by the partition holding the alarm's entity: "
    "applied (changed the alarm) or ignored (ended alarm, another alarm, a repeat)",
    ["outcome"],
)
setpoint_changes = Counter(
    "twinflow_setpoint_changes",
    "Changes of a setpoint's desired or reported value or status, by the status after it",
    ["status"],
)
step_seconds = Histogram(
    "twinflow_step_seconds",
    "Duration of one call of a flow step on one batch",
    ["step"],
    buckets=_SECONDS,
)
questdb_rows = Counter(
    "twinflow_questdb_rows_written", "Rows QuestDB acknowledged, by table", ["table"]
)
questdb_flush_seconds = Histogram(
    "twinflow_questdb_flush_seconds",
    "Duration of one ILP/HTTP flush (one write batch, every table in one request)",
    buckets=_SECONDS,
)
kafka_records = Counter(
    "twinflow_kafka_records_produced",
    "Output records Kafka acknowledged, by topic",
    ["topic"],
)
kafka_delivery_seconds = Histogram(
    "twinflow_kafka_delivery_seconds",
    "Time to produce one write batch and receive every delivery report",
    buckets=_SECONDS,
)
sink_failures = Counter(
    "twinflow_sink_failures",
    "Write batches a sink could not deliver; each one stops the flow for a replay",
    ["sink"],
)
sink_waiting = Gauge(
    "twinflow_sink_waiting",
    "1 while a sink waits out its server's outage (the flow reads nothing meanwhile)",
    ["sink"],
)
sink_retries = Counter(
    "twinflow_sink_retries",
    "Write attempts a sink repeated while its server was unavailable",
    ["sink"],
)
# Zero series to graph rather than none, so "no errors" reads as 0 and not as no data.
for _reason in Reason:
    dead_letters.labels(_reason.value)
for _sink in ("questdb", "kafka"):
    sink_failures.labels(_sink)
    sink_waiting.labels(_sink)
    sink_retries.labels(_sink)
for _event in AlarmEvent:
    alarms.labels(_event.value)

# The bridges (`twinflow bridge mqtt|opcua`).
bridge_received = Counter(
    "twinflow_bridge_messages_received",
    "MQTT messages or OPC UA value changes a bridge received",
    ["bridge"],
)
bridge_forwarded = Counter(
    "twinflow_bridge_messages_forwarded",
    "Messages Kafka acknowledged on the raw topic",
    ["bridge"],
)
bridge_dead_letters = Counter(
    "twinflow_bridge_dead_letters",
    "Messages a bridge sent to twin.deadletter (acknowledged), by reason code",
    ["bridge", "reason"],
)
bridge_skipped = Counter(
    "twinflow_bridge_values_skipped",
    "OPC UA value changes not forwarded: no usable value (bad status), or a repeat of "
    "the value already sent (a new subscription's initial values)",
    ["bridge", "why"],
)
bridge_connected = Gauge(
    "twinflow_bridge_connected",
    "1 while the bridge holds its MQTT session or OPC UA subscription, else 0",
    ["bridge"],
)
bridge_reconnects = Counter(
    "twinflow_bridge_reconnects",
    "Connections a bridge lost and set up again",
    ["bridge"],
)
bridge_gaps = Counter(
    "twinflow_bridge_gaps",
    "Outages of a polled device that ended: the device answered again after failing",
    ["bridge"],
)
bridge_polls_missed = Counter(
    "twinflow_bridge_polls_missed",
    "Polls a device's outage cost (counted when the device answers again)",
    ["bridge"],
)


# Every process: where its memory is, to tell what it keeps from what its allocators keep.
class _AllocatorCollector(Collector):
    """Reads each allocator once per scrape (the gauges of one allocator come from one read)."""

    def collect(self) -> Iterator[Metric]:
        heap, arenas = allocator.heap(), allocator.python_arenas()
        for name, documentation, value in (
            (
                "twinflow_python_allocated_blocks",
                "Memory blocks the Python interpreter holds (objects and their buffers)",
                sys.getallocatedblocks(),
            ),
            (
                "twinflow_malloc_in_use_bytes",
                "Bytes the C allocator (glibc) has handed out: large Python objects and "
                "buffers, the Kafka client's, Bytewax's (0 without glibc)",
                heap.in_use if heap else 0,
            ),
            (
                "twinflow_malloc_free_bytes",
                "Bytes freed and kept by the C allocator for reuse; a trim returns their "
                "pages to the system but they stay counted here (0 without glibc)",
                heap.free if heap else 0,
            ),
            (
                "twinflow_pymalloc_arena_bytes",
                "Bytes of the arenas of Python's small-object allocator; an arena goes back "
                "to the system only when all of it is free (0 under PYTHONMALLOC=malloc)",
                arenas.mapped if arenas else 0,
            ),
            (
                "twinflow_pymalloc_arena_highwater_bytes",
                "The most bytes those arenas have had at once",
                arenas.highwater if arenas else 0,
            ),
            (
                "twinflow_pymalloc_block_bytes",
                "Bytes of those arenas that live objects use",
                arenas.in_blocks if arenas else 0,
            ),
        ):
            yield GaugeMetricFamily(name, documentation, value=value)


REGISTRY.register(_AllocatorCollector())
malloc_trim_seconds = Histogram(
    "twinflow_malloc_trim_seconds",
    "Duration of one return of freed memory to the system (flow.malloc_trim_s)",
    buckets=_SECONDS,
)

# The twin API (`twinflow serve`).
serve_requests = Counter(
    "twinflow_serve_requests",
    "API requests answered, by route template and HTTP status",
    ["route", "status"],
)
serve_request_seconds = Histogram(
    "twinflow_serve_request_seconds",
    "Time from a request's arrival to its answer's start, by route template",
    ["route"],
    buckets=_SECONDS,
)
serve_sse_clients = Gauge("twinflow_serve_sse_clients", "Open Server-Sent Event streams")
serve_records = Counter(
    "twinflow_serve_records_read",
    "Records of twin.state and twin.alarms the live view read, by topic",
    ["topic"],
)
serve_caught_up = Gauge(
    "twinflow_serve_caught_up",
    "1 once the live view has read its topics up to where they ended at start",
)


@contextmanager
def serving(settings: MetricsSettings, port: int, setting: str) -> Iterator[str | None]:
    """Serve ``/metrics`` on ``settings.host:port`` while the block runs; yield its URL.

    ``setting`` names the port's setting for the error when the port is taken. Yields
    None, serving nothing, when metrics are off.
    """
    if not settings.enabled:
        yield None
        return
    try:
        server, thread = start_http_server(port, addr=settings.host)
    except OSError as exc:
        raise ConfigError(
            f"metrics.{setting}: cannot serve metrics on {settings.host}:{port} ({exc}). "
            f"Set {env_name(('metrics', setting))} to a free port, or "
            f"{env_name(('metrics', 'enabled'))}=false"
        ) from None
    url = f"http://{settings.host}:{port}/metrics"
    log.info("metrics at %s", url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
