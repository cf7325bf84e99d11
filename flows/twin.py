"""The twin dataflow: raw readings and the back channel in; twin facts out.

Out go readings, windows, twin state, anomalies, alarms and setpoint changes::

    twins (a raw partition, the back channel, its twins) -+-> to_tables -------+-> questdb
                                                          +-> to_records -> kafka
    deadletters_in (batch per partition) -> deadletter_rows -------------------+

Nothing crosses workers: each raw partition is read and stepped where it is read
(:mod:`flows.partition`), and the sinks write on every worker. The back channel
(operator verdicts, commands, delivery results) is optional: without it the twins take
raw messages as they come.

Step ids are part of the recovery contract: renaming one orphans its snapshots.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, Source
from bytewax.outputs import Sink

from connectors.kafka import KafkaRecord
from connectors.questdb import TableBatch
from flows.outputs import deadletter_batches, kafka_records, table_batches
from flows.partition import Batch, ControlItem, TwinsSource
from schemas.transport import ControlBatch, InputMessage
from twinflow import metrics
from twinflow.detection import DetectorConfig
from twinflow.settings import Settings
from twinflow.tables import Tables
from twinflow.tables import tables as table_specs
from twinflow.twin import PartitionTwins, StepOutput
from twinflow.twin_model import TwinModel

_In = TypeVar("_In")
_Out = TypeVar("_Out")
_Target = TypeVar("_Target")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def observe(out: StepOutput, now_ms: int) -> None:
    """Count what one call of the twins step produced."""
    accepted = len(out.readings)
    if accepted:
        metrics.readings_accepted.inc(accepted)
        flagged = int(np.count_nonzero(out.readings.flags))
        if flagged:
            metrics.readings_flagged.inc(flagged)
    if out.late:
        metrics.late_readings.inc(len(out.late))
    for reason, count in Counter(letter.reason.value for letter in out.dead_letters).items():
        metrics.dead_letters.labels(reason).inc(count)
    if out.windows:
        metrics.windows_closed.inc(len(out.windows))
        # Each window is one observation; its lag depends only on its end, and the
        # windows of one step share a few ends.
        for end_ms, count in Counter(window.window_end_ms for window in out.windows).items():
            lag_s = max(0.0, (now_ms - end_ms) / 1000)
            for _ in range(count):
                metrics.window_close_lag.observe(lag_s)
    if out.anomalies:
        metrics.anomalies.inc(len(out.anomalies))
    for event, count in Counter(alarm.event.value for alarm in out.alarms).items():
        metrics.alarms.labels(event).inc(count)
    for outcome, count in out.verdicts.items():
        metrics.verdicts.labels(outcome).inc(count)
    for status, count in Counter(
        str(change.state.status or "none") for change in out.setpoints
    ).items():
        metrics.setpoint_changes.labels(status).inc(count)


def timed(
    step_id: str, convert: Callable[[_In, _Target], list[_Out]], target: _Target
) -> Callable[[_In], list[_Out]]:
    """A flat_map mapper: ``convert`` of the item, its duration observed."""
    duration = metrics.step_seconds.labels(step_id)

    def mapper(item: _In) -> list[_Out]:
        with duration.time():
            return convert(item, target)

    return mapper


def _letter_rows(item: Batch, tables: Tables) -> list[TableBatch]:
    return deadletter_batches(item[1], tables)


def build_flow(
    settings: Settings,
    model: TwinModel,
    *,
    raw_source: FixedPartitionedSource[Batch, Any],
    deadletter_source: Source[Batch],
    questdb_sink: Sink[TableBatch],
    kafka_sink: Sink[KafkaRecord],
    control_source: FixedPartitionedSource[ControlItem, Any] | None = None,
    detector: DetectorConfig | None = None,
    clock: Callable[[], int] = _wall_ms,
) -> Dataflow:
    """The twin flow over the given connectors (tests pass testing ones).

    ``detector`` defaults to the settings' (``settings.detection``, the rest
    ``DetectorConfig``'s defaults).
    """
    config = detector or settings.detection.detector_config()
    topics = settings.topics
    tables = table_specs(settings.questdb.table_prefix)
    back_channel = control_source is not None

    def start(restored: PartitionTwins | None) -> PartitionTwins:
        if restored is None:
            return PartitionTwins(model, settings.flow, config, back_channel=back_channel)
        if restored.model is not model:
            # Run on with this start's model and settings, not the snapshot's.
            restored.adopt(model, settings.flow)
        return restored

    def step(twins: PartitionTwins, messages: Sequence[InputMessage] | ControlBatch) -> StepOutput:
        now_ms = clock()
        with metrics.step_seconds.labels("twins").time():
            out = twins.step(messages, now_ms)
        observe(out, now_ms)
        return out

    flow = Dataflow("twinflow")
    stepped = op.input("twins", flow, TwinsSource(raw_source, control_source, start, step))
    rows = op.flat_map("to_tables", stepped, timed("to_tables", table_batches, tables))
    records = op.flat_map("to_records", stepped, timed("to_records", kafka_records, topics))
    letters = op.input("deadletters_in", flow, deadletter_source)
    letter_rows = op.flat_map(
        "deadletter_rows", letters, timed("deadletter_rows", _letter_rows, tables)
    )
    op.output("questdb", op.merge("all_rows", rows, letter_rows), questdb_sink)
    op.output("kafka", records, kafka_sink)
    return flow
