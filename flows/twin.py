"""The twin dataflow: raw readings in; readings, windows, twin state, anomalies out.

::

    raw_in (batch per partition) -> twins (stateful, per partition) -+-> to_tables -+-> questdb
                                                                      +-> to_records -> kafka
    deadletters_in (batch per partition) -> deadletter_rows ----------------------+

Step ids are part of the recovery contract: renaming one orphans its snapshots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from connectors.kafka import KafkaRecord
from connectors.questdb import TableBatch
from flows.outputs import deadletter_batches, kafka_records, table_batches
from twinflow.detection import DetectorConfig
from twinflow.settings import Settings
from twinflow.tables import tables as table_specs
from twinflow.twin import InputMessage, PartitionTwins, StepOutput
from twinflow.twin_model import TwinModel

Batch = tuple[str, Sequence[InputMessage]]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def build_flow(
    settings: Settings,
    model: TwinModel,
    *,
    raw_source: Source[Batch],
    deadletter_source: Source[Batch],
    questdb_sink: Sink[TableBatch],
    kafka_sink: Sink[KafkaRecord],
    detector: DetectorConfig | None = None,
    clock: Callable[[], int] = _wall_ms,
) -> Dataflow:
    """The twin flow over the given connectors (tests pass testing ones)."""
    config = detector or DetectorConfig()
    topics = settings.topics
    tables = table_specs(settings.questdb.table_prefix)

    def step(
        state: PartitionTwins | None, messages: Sequence[InputMessage]
    ) -> tuple[PartitionTwins, StepOutput]:
        twins = state or PartitionTwins(model, settings.flow, config)
        return twins, twins.step(messages, clock())

    flow = Dataflow("twinflow")
    raw = op.input("raw_in", flow, raw_source)
    stepped = op.stateful_map("twins", raw, step)
    rows = op.flat_map("to_tables", stepped, lambda item: table_batches(item[1], tables))
    records = op.flat_map("to_records", stepped, lambda item: kafka_records(item[1], topics))
    letters = op.input("deadletters_in", flow, deadletter_source)
    letter_rows = op.flat_map(
        "deadletter_rows", letters, lambda item: deadletter_batches(item[1], tables)
    )
    op.output("questdb", op.merge("all_rows", rows, letter_rows), questdb_sink)
    op.output("kafka", records, kafka_sink)
    return flow
