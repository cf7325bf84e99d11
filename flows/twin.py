"""The twin dataflow: raw readings and the back channel in; twin facts out.

Out go readings, windows, twin state, anomalies, alarms and setpoint changes::

    raw_in (per partition) -+-> twins (stateful, per raw partition) -+-> to_tables -+-> questdb
    control_in (to every) --+                                        +-> to_records -> kafka
    deadletters_in (batch per partition) -> deadletter_rows -------------------------+

``control_in`` (operator verdicts, commands, delivery results) is optional: without it
the twins take raw messages as they come.

Step ids are part of the recovery contract: renaming one orphans its snapshots.
"""

from __future__ import annotations

import pickle
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.outputs import Sink

from connectors.kafka import KafkaRecord
from connectors.questdb import TableBatch
from flows.outputs import deadletter_batches, kafka_records, table_batches
from schemas.transport import ControlBatch, InputMessage
from twinflow import metrics
from twinflow.detection import DetectorConfig
from twinflow.settings import Settings
from twinflow.tables import tables as table_specs
from twinflow.twin import START_OVER, IncompatibleSnapshotError, PartitionTwins, StepOutput
from twinflow.twin_model import TwinModel

Batch = tuple[str, Sequence[InputMessage]]
ControlItem = tuple[str, ControlBatch]
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


@dataclass(frozen=True, slots=True)
class PickledTwins:
    """A snapshot of a partition's twins: one pickle, taken when the epoch closed."""

    data: bytes


class TwinsCell:
    """The ``twins`` step's state: the live twins, whose copy is their pickle.

    Bytewax snapshots a ``stateful_map`` state by deep-copying it at every epoch and
    pickling the copy later. Pickling the twins once instead gives the same frozen
    snapshot for less than half the pause (at 1,000 entities a deep copy took 0.32 s,
    a pickle 0.24 s), and every reading in the worker waits out that pause.
    """

    __slots__ = ("twins",)

    def __init__(self, twins: PartitionTwins) -> None:
        self.twins = twins

    def __deepcopy__(self, memo: dict[int, Any]) -> PickledTwins:
        with metrics.step_seconds.labels("twins_snapshot").time():
            return PickledTwins(pickle.dumps(self.twins, protocol=pickle.HIGHEST_PROTOCOL))


def restored(state: TwinsCell | PickledTwins | PartitionTwins) -> PartitionTwins:
    """The twins held by a ``twins`` state, live or resumed from a snapshot.

    A store written before snapshots were pickles holds the twins themselves.
    """
    if isinstance(state, TwinsCell):
        return state.twins
    if isinstance(state, PickledTwins):
        try:
            twins = pickle.loads(state.data)  # noqa: S301 - the flow's own recovery store
        except (pickle.UnpicklingError, AttributeError, ImportError) as exc:
            raise IncompatibleSnapshotError(
                f"the recovery snapshot holds twin state this twinflow cannot read ({exc}). "
                f"{START_OVER}"
            ) from exc
        if not isinstance(twins, PartitionTwins):
            raise IncompatibleSnapshotError(
                f"the recovery snapshot holds a {type(twins).__name__}, not twins. {START_OVER}"
            )
        return twins
    return state


def timed(
    step_id: str, convert: Callable[[_In, _Target], list[_Out]], target: _Target
) -> Callable[[tuple[str, _In]], list[_Out]]:
    """A flat_map mapper: ``convert`` of the item's value, its duration observed."""
    duration = metrics.step_seconds.labels(step_id)

    def mapper(item: tuple[str, _In]) -> list[_Out]:
        with duration.time():
            return convert(item[1], target)

    return mapper


def build_flow(
    settings: Settings,
    model: TwinModel,
    *,
    raw_source: Source[Batch],
    deadletter_source: Source[Batch],
    questdb_sink: Sink[TableBatch],
    kafka_sink: Sink[KafkaRecord],
    control_source: Source[ControlItem] | None = None,
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

    def step(
        state: TwinsCell | PickledTwins | PartitionTwins | None,
        messages: Sequence[InputMessage] | ControlBatch,
    ) -> tuple[TwinsCell, StepOutput]:
        if state is None:
            twins = PartitionTwins(model, settings.flow, config, back_channel=back_channel)
        else:
            twins = restored(state)
            if twins.model is not model:
                # Restored from a snapshot: run on with this start's model and settings.
                twins.adopt(model, settings.flow)
        now_ms = clock()
        with metrics.step_seconds.labels("twins").time():
            out = twins.step(messages, now_ms)
        observe(out, now_ms)
        return state if isinstance(state, TwinsCell) else TwinsCell(twins), out

    flow = Dataflow("twinflow")
    raw = op.input("raw_in", flow, raw_source)
    inputs = cast(Stream[tuple[str, Sequence[InputMessage] | ControlBatch]], raw)
    if control_source is not None:
        inputs = op.merge("raw_and_control", raw, op.input("control_in", flow, control_source))
    stepped = op.stateful_map("twins", inputs, step)
    rows = op.flat_map("to_tables", stepped, timed("to_tables", table_batches, tables))
    records = op.flat_map("to_records", stepped, timed("to_records", kafka_records, topics))
    letters = op.input("deadletters_in", flow, deadletter_source)
    letter_rows = op.flat_map(
        "deadletter_rows", letters, timed("deadletter_rows", deadletter_batches, tables)
    )
    op.output("questdb", op.merge("all_rows", rows, letter_rows), questdb_sink)
    op.output("kafka", records, kafka_sink)
    return flow
