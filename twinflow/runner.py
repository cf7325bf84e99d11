"""``twinflow run``: prepare topics, tables and the recovery store, then run the flow."""

from __future__ import annotations

import logging
import signal
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import (
    InconsistentPartitionsError,
    MissingPartitionsError,
    NoPartitionsError,
    RecoveryConfig,
)
from bytewax.run import cli_main

from connectors.control_source import BackChannelSource
from connectors.kafka import ensure_topics
from connectors.kafka_sink import KafkaOutputSink
from connectors.kafka_source import KafkaBatchSource
from connectors.questdb import QuestDBHttp, ensure_table
from connectors.questdb_sink import QuestDBSink
from flows.twin import build_flow
from twinflow import allocator, metrics
from twinflow.errors import TwinflowError, caused_by
from twinflow.recovery_store import PARTITIONS, holds_partitions, prepare_store
from twinflow.settings import Settings
from twinflow.tables import tables
from twinflow.topics import control_topics, ingest_topics, output_topics
from twinflow.twin import IncompatibleSnapshotError
from twinflow.twin_model import TwinModel

log = logging.getLogger("twinflow.run")


def prepare_outputs(settings: Settings) -> None:
    """Create the flow's topics and tables; extend older tables, refuse mismatched ones."""
    topics = settings.topics
    ensure_topics(
        settings.kafka,
        [*ingest_topics(topics), *output_topics(topics), *control_topics(topics)],
    )
    sql = QuestDBHttp(settings.questdb)
    for spec in tables(settings.questdb.table_prefix).all():
        ensure_table(sql, spec)


def recovery_config(settings: Settings, process_id: int | None = None) -> RecoveryConfig | None:
    """The recovery store of process ``process_id`` (None: the only process), ready.

    None when recovery is off. :mod:`twinflow.recovery_store` describes its layout.
    """
    if not settings.flow.recovery:
        log.warning("recovery is off: a restart reprocesses the topic from the beginning")
        return None
    store = _store(settings)
    prepare_store(store, process_id)
    return RecoveryConfig(str(store))


def run_flow(
    settings: Settings,
    model: TwinModel,
    *,
    workers: int = 1,
    process_id: int | None = None,
    addresses: list[str] | None = None,
) -> None:
    """Run the twin flow until interrupted (or a sink fails, then raise)."""
    # Started in the background by a non-interactive shell (`twinflow run &`, a CI
    # runner), a process inherits SIGINT ignored and Python installs no KeyboardInterrupt
    # handler: Ctrl-C, and the SIGINT `twinflow demo` stops its flow with, would do
    # nothing. A flow stops on SIGINT however it was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    port = settings.metrics.flow_process_port(process_id)
    with (
        metrics.serving(settings.metrics, port, "flow_port"),
        allocator.trimming(settings.flow.malloc_trim_s, metrics.malloc_trim_seconds.observe),
    ):
        # Before anything else: a store this twinflow cannot read stops it at once.
        recovery = recovery_config(settings, process_id)
        prepare_outputs(settings)
        flow = build_flow(
            settings,
            model,
            raw_source=KafkaBatchSource(
                settings.kafka, settings.topics.raw, settings.flow.batch_size
            ),
            deadletter_source=KafkaBatchSource(
                settings.kafka, settings.topics.deadletter, settings.flow.batch_size
            ),
            control_source=BackChannelSource(
                settings.kafka,
                settings.topics.raw,
                settings.topics.feedback,
                settings.topics.commands,
                settings.flow.back_channel_margin_s,
            ),
            questdb_sink=QuestDBSink(settings.questdb, give_up_s=settings.flow.sink_give_up_s),
            kafka_sink=KafkaOutputSink(settings.kafka, give_up_s=settings.flow.sink_give_up_s),
        )
        try:
            cli_main(
                flow,
                workers_per_process=workers,
                process_id=process_id,
                addresses=addresses,
                epoch_interval=timedelta(seconds=settings.flow.snapshot_interval_s),
                recovery_config=recovery,
            )
        except (MissingPartitionsError, InconsistentPartitionsError, NoPartitionsError) as exc:
            raise TwinflowError(_damaged(settings, process_id, exc)) from None
        except Exception as exc:
            if caused_by(exc, KeyboardInterrupt) is not None:
                # Bytewax turns SIGINT into its own error, after a panic message its Rust
                # side prints: a stop that was asked for, not a failure to report.
                log.info("stopped on SIGINT; a restart resumes from the last snapshot")
                return
            # Bytewax wraps what a step raised; the twins raise this when resuming.
            incompatible = caused_by(exc, IncompatibleSnapshotError)
            if incompatible is None:
                raise
            raise TwinflowError(f"the recovery store {_store(settings)}: {incompatible}") from None


def _store(settings: Settings) -> Path:
    return settings.flow.recovery_dir or settings.state_dir / "recovery"


def _damaged(settings: Settings, process_id: int | None, exc: Exception) -> str:
    store = _store(settings)
    if process_id is None:
        where = f"the recovery store {store} is damaged ({exc})."
    else:
        keeper = "this process's" if holds_partitions(process_id) else "process 0's"
        where = (
            f"the cluster's recovery partitions are incomplete ({exc}); this is process "
            f"{process_id}, its store is {store}. In a cluster, process 0's store keeps all "
            f"{PARTITIONS} partitions and the others keep none: put the missing "
            f"part-N.sqlite3 files (each with its -wal and -shm files, all processes "
            f"stopped) into {keeper} store."
        )
    return (
        f"{where} Restore the partitions from a backup, or move the store away (in a "
        "cluster: every process's store) to start over from the beginning of the topics "
        "(outputs are idempotent, so reprocessing rewrites the same rows)."
    )
