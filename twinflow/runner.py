"""``twinflow run``: prepare topics, tables and the recovery store, then run the flow."""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import (
    InconsistentPartitionsError,
    MissingPartitionsError,
    NoPartitionsError,
    RecoveryConfig,
    init_db_dir,
)
from bytewax.run import cli_main

from connectors.control_source import BackChannelSource
from connectors.kafka import ensure_topics
from connectors.kafka_sink import KafkaOutputSink
from connectors.kafka_source import KafkaBatchSource
from connectors.questdb import QuestDBHttp, ensure_table
from connectors.questdb_sink import QuestDBSink
from flows.twin import build_flow
from twinflow.errors import ConfigError, TwinflowError, caused_by
from twinflow.metrics import serving
from twinflow.settings import Settings
from twinflow.tables import tables
from twinflow.topics import control_topics, ingest_topics, output_topics
from twinflow.twin import IncompatibleSnapshotError
from twinflow.twin_model import TwinModel

log = logging.getLogger("twinflow.run")
RECOVERY_PARTITIONS = 4
"""Recovery partitions created in a new store; any worker count can share them."""


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


def recovery_config(settings: Settings) -> RecoveryConfig | None:
    """The recovery store (created private on first use), or None when recovery is off."""
    if not settings.flow.recovery:
        log.warning("recovery is off: a restart reprocesses the topic from the beginning")
        return None
    store = settings.flow.recovery_dir or settings.state_dir / "recovery"
    if not store.exists():
        _create_store(store)
    elif store.stat().st_mode & 0o077:
        raise ConfigError(
            f"recovery store {store} is readable by others; its snapshots are pickles. "
            f"Run chmod 700 {store}"
        )
    return RecoveryConfig(str(store))


def _create_store(store: Path) -> None:
    """Create the store whole, or take the one another process of the cluster made.

    The processes of a cluster start together and each finds no store: each builds one
    beside it and renames it into place, which only the first rename does.
    """
    store.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{store.name}-", dir=store.parent))
    try:  # mkdtemp makes it private (0700): snapshots are pickles
        init_db_dir(building, RECOVERY_PARTITIONS)
        building.rename(store)
    except OSError:
        if not store.is_dir():
            raise
        log.info("recovery store %s was created by another process", store)
    else:
        log.info("created recovery store %s (%d partitions)", store, RECOVERY_PARTITIONS)
    finally:
        shutil.rmtree(building, ignore_errors=True)


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
    with serving(settings.metrics, port, "flow_port"):
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
            questdb_sink=QuestDBSink(settings.questdb),
            kafka_sink=KafkaOutputSink(settings.kafka),
        )
        recovery = recovery_config(settings)
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
            raise TwinflowError(
                f"the recovery store {_store(settings)} is damaged ({exc}). Restore it from "
                "a backup, or move it away to start over from the beginning of the topics "
                "(outputs are idempotent, so reprocessing rewrites the same rows)."
            ) from None
        except Exception as exc:
            # Bytewax wraps what a step raised; the twins raise this when resuming.
            incompatible = caused_by(exc, IncompatibleSnapshotError)
            if incompatible is None:
                raise
            raise TwinflowError(f"the recovery store {_store(settings)}: {incompatible}") from None


def _store(settings: Settings) -> Path:
    return settings.flow.recovery_dir or settings.state_dir / "recovery"
