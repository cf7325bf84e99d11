"""Running ``twinflow run`` as a process over test topics, and reading what it wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from connectors.kafka import TopicSpec, ensure_topics, reliable_producer
from connectors.questdb import QuestDBError, QuestDBHttp
from tests.helpers import clean_env
from twinflow.settings import Settings
from twinflow.topics import control_topics

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "infra" / "twin-model" / "example-plant.yaml"


@dataclass
class FlowProcess:
    """One ``twinflow run`` over the shared input topics, with its own outputs."""

    name: str
    env: dict[str, str]
    recovery: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "twinflow", "run"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def flow_process(stack: Settings, topics: dict[str, str], workdir: Path, name: str) -> FlowProcess:
    """A flow over ``topics`` (raw, deadletter, feedback, commands) with its own outputs
    and recovery store; windows close on data only."""
    recovery = workdir / f"recovery-{name}"
    env = clean_env(
        twin_model=str(MODEL),
        state_dir=str(stack.state_dir),
        topics__raw=topics["raw"],
        topics__deadletter=topics["deadletter"],
        topics__feedback=topics["feedback"],
        topics__commands=topics["commands"],
        topics__state=f"{topics['raw']}.state.{name}",
        topics__anomalies=f"{topics['raw']}.anomalies.{name}",
        topics__late=f"{topics['raw']}.late.{name}",
        topics__alarms=f"{topics['raw']}.alarms.{name}",
        questdb__table_prefix=f"{topics['raw'].replace('.', '_')}_{name}_",
        flow__recovery_dir=str(recovery),
        flow__snapshot_interval_s="1",
        # Windows close on data only: idleness is system time, the one thing a replay
        # cannot repeat.
        flow__idle_close_s="600",
        flow__stale_after_s="3600",
    )
    return FlowProcess(name, env, recovery, workdir / f"{name}.log")


def produce(settings: Settings, topic: str, payloads: list[bytes]) -> None:
    """pump-001's payloads to ``topic``, in order."""
    producer = reliable_producer(settings.kafka)
    for payload in payloads:
        producer.produce(topic, value=payload, key=b"pump-001")
    assert producer.flush(30) == 0


def table_rows(sql: QuestDBHttp, table: str, columns: str) -> list[tuple[object, ...]]:
    """``columns`` of ``table`` by time ([] while the table does not exist yet)."""
    try:
        return [tuple(row) for row in sql.exec(f'SELECT {columns} FROM "{table}" ORDER BY ts').rows]
    except QuestDBError:
        return []


def wait_until(
    check: Callable[[], bool], flow: FlowProcess, what: str, timeout_s: float = 180
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert flow.running(), f"{flow.name} exited:\n{flow.tail()}"
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s:\n{flow.tail()}"
        time.sleep(0.5)


def create_topics(stack: Settings, topics: dict[str, str]) -> None:
    """The input topics of :func:`flow_process`, as the services would have them."""
    ensure_topics(
        stack.kafka,
        [TopicSpec(topics["raw"], stack.topics.raw_partitions), TopicSpec(topics["deadletter"], 1)],
    )
    ensure_topics(
        stack.kafka,
        control_topics(
            stack.topics.model_copy(
                update={"feedback": topics["feedback"], "commands": topics["commands"]}
            )
        ),
    )
