"""Dead letters of an unknown entity, replayed once the twin model knows it.

Real Kafka, real QuestDB, the real flow (``twinflow run`` in its own process), each
test with topics and tables of its own.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
import yaml
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from connectors.kafka import TopicSpec, client_config, ensure_topics, reliable_producer
from connectors.questdb import QuestDBError, QuestDBHttp
from tests.helpers import clean_env, wait_for_wal
from twinflow.deadletters import ReplayReport, replay_dead_letters
from twinflow.settings import Settings
from twinflow.twin_model import TwinModel, load_twin_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
log = logging.getLogger("tests.deadletter_replay")

STRANGER = "pump-x"
"""The entity the first model lacks and the fixed one adds."""
MESSAGES = 40
"""Batched messages of the stranger, one a second, two sensors each; the last one has
a pressure out of range, which only the flow (reading by reading) refuses."""
READINGS = 2 * MESSAGES - 1
BAD_JSON = b'{"entity_id": "pump-x", "ts": '
WINDOW_MS = 10_000


@dataclass(frozen=True)
class Names:
    """One test's topics, tables and files."""

    suffix: str
    workdir: Path

    def topic(self, name: str) -> str:
        return f"replay.{name}.{self.suffix}"

    @property
    def prefix(self) -> str:
        return f"replay_{self.suffix}_"

    def table(self, name: str) -> str:
        return f"{self.prefix}{name}"


@pytest.fixture
def names(unique: str, tmp_path: Path) -> Names:
    return Names(unique, tmp_path)


def _model_file(path: Path, suffix: str, *, with_stranger: bool) -> Path:
    entities = [{"id": "pump-a", "type": "pump", "site": "s1", "line": "l1"}]
    if with_stranger:
        entities.append({"id": STRANGER, "type": "pump", "site": "s1", "line": "l1"})
    document = {
        "version": 1,
        "mqtt_topic_prefix": f"replay{suffix}",
        "asset_types": {
            "pump": {
                "sensors": {
                    "flow": {
                        "unit": "m3/h",
                        "range": [0, 400],
                        "max_rate": 100,
                        "stuck_after_s": 30,
                    },
                    "discharge_pressure": {
                        "unit": "bar",
                        "range": [0, 25],
                        "max_rate": 10,
                        "stuck_after_s": 30,
                    },
                }
            }
        },
        "entities": entities,
    }
    path.write_text(yaml.safe_dump(document))
    return path


def _stranger_messages(start_ms: int) -> tuple[list[bytes], set[tuple[str, str, int]]]:
    """The stranger's messages and the (entity, sensor, ts) of their valid readings."""
    payloads, keys = [], set()
    for i in range(MESSAGES):
        ts = start_ms + i * 1000
        pressure = 99.0 if i == MESSAGES - 1 else 5.0 + 0.01 * i
        values = {"flow": 100.0 + 0.5 * i, "discharge_pressure": pressure}
        payloads.append(msgspec.json.encode({"entity_id": STRANGER, "ts": ts, "values": values}))
        keys.add((STRANGER, "flow", ts))
        if pressure <= 25:
            keys.add((STRANGER, "discharge_pressure", ts))
    assert len(keys) == READINGS
    return payloads, keys


def _produce(stack: Settings, topic: str, payloads: list[bytes]) -> None:
    ensure_topics(stack.kafka, [TopicSpec(topic, stack.topics.raw_partitions)])
    producer = reliable_producer(stack.kafka)
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error)

    for payload in payloads:
        producer.produce(topic, payload, STRANGER.encode(), on_delivery=delivered)
    assert producer.flush(30) == 0 and not failures, failures


def _flow_env(
    stack: Settings, names: Names, model: Path, raw: str, deadletter: str, recovery: str
) -> dict[str, str]:
    return clean_env(
        twin_model=str(model),
        state_dir=str(stack.state_dir),
        topics__raw=raw,
        topics__deadletter=deadletter,
        topics__state=names.topic("state"),
        topics__anomalies=names.topic("anomalies"),
        topics__late=names.topic("late"),
        topics__alarms=names.topic("alarms"),
        topics__feedback=names.topic("feedback"),
        topics__commands=names.topic("commands"),
        questdb__table_prefix=names.prefix,
        flow__recovery_dir=str(names.workdir / recovery),
        flow__snapshot_interval_s="1",
        # The stranger's last windows close soon after its last message.
        flow__idle_close_s="3",
    )


@contextmanager
def _flow(env: dict[str, str], log_file: Path) -> Iterator[None]:
    """``twinflow run`` in its own process, stopped with SIGINT as a user would."""
    with log_file.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "twinflow", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield
        assert process.poll() is None, f"the flow stopped: {log_file.read_text()[-3000:]}"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()  # by PID: never leave the flow behind a failed assert
                process.wait()


def _count(sql: QuestDBHttp, query: str) -> int:
    try:
        count: int = sql.exec(query).rows[0][0]
    except QuestDBError:  # the flow creates its tables as it starts
        return -1
    return count


def _wait_for(what: str, done: Callable[[], bool], log_file: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout_s:g} s; flow log:\n{_tail(log_file)}")
        time.sleep(0.5)


def _tail(log_file: Path) -> str:
    return log_file.read_text(errors="replace")[-3000:] if log_file.exists() else "(no log)"


def _letters(sql: QuestDBHttp, names: Names, reason: str) -> int:
    return _count(
        sql, f"SELECT count() FROM '{names.table('deadletters')}' WHERE reason = '{reason}'"
    )


def _readings(sql: QuestDBHttp, names: Names) -> list[tuple[str, str, int]]:
    """Every row of the readings table as (entity, sensor, ts in ms)."""
    rows = sql.exec(
        f"SELECT entity, sensor, cast(ts AS LONG) FROM '{names.table('readings')}'"
    ).rows
    return [(entity, sensor, micros // 1000) for entity, sensor, micros in rows]


def _end_offsets(stack: Settings, topic: str) -> int:
    """The sum of the topic's high watermarks: how many messages it ever held."""
    consumer = Consumer(client_config(stack.kafka, **{"group.id": "test-replay-watermarks"}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()


def _settings_for(stack: Settings, raw: str, deadletter: str) -> Settings:
    return stack.model_copy(
        update={"topics": stack.topics.model_copy(update={"raw": raw, "deadletter": deadletter})}
    )


def _replay(settings: Settings, model: TwinModel, *, dry_run: bool = False) -> ReplayReport:
    report = replay_dead_letters(
        settings, model, reasons=None, since=None, dry_run=dry_run, progress=log.info
    )
    log.info("replay report: %s", report.as_dict())
    return report


def _dead_lettered_stranger(
    stack: Settings, names: Names, raw: str, recovery: str
) -> set[tuple[str, str, int]]:
    """Send the stranger's messages to ``raw`` and run the flow with a model that lacks
    it, until each message is a dead letter; return the readings it should have given."""
    # An hour back, at a second of its own, so no other run's rows are near.
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(
        hours=1, seconds=random.randrange(3600)
    )
    payloads, expected = _stranger_messages(int(start.timestamp() * 1000))
    _produce(stack, raw, [BAD_JSON, *payloads])
    model = _model_file(names.workdir / "without.yaml", names.suffix, with_stranger=False)
    sql = QuestDBHttp(stack.questdb)
    log_file = names.workdir / "flow-without.log"
    env = _flow_env(stack, names, model, raw, names.topic("deadletter"), recovery)
    with _flow(env, log_file):
        _wait_for(
            f"{MESSAGES} unknown_entity letters",
            lambda: (
                _letters(sql, names, "unknown_entity") == MESSAGES
                and _letters(sql, names, "bad_json") == 1
            ),
            log_file,
        )
        time.sleep(3)  # a snapshot or two past the last message
    assert _count(sql, f"SELECT count() FROM '{names.table('readings')}'") == 0
    return expected


def test_replayed_letters_land_once_and_a_second_replay_adds_no_row(
    stack: Settings, names: Names
) -> None:
    sql = QuestDBHttp(stack.questdb)
    deadletter, raw_after = names.topic("deadletter"), names.topic("raw-after")
    expected = _dead_lettered_stranger(stack, names, names.topic("raw"), "recovery-without")
    fixed = _model_file(names.workdir / "with.yaml", names.suffix, with_stranger=True)
    model = load_twin_model(fixed)
    # The fixed flow reads a raw topic of its own, so every reading it writes comes
    # from the replay (its twin of the first topic would hold the originals too).
    settings = _settings_for(stack, raw_after, deadletter)

    dry = _replay(settings, model, dry_run=True)
    assert dry.dry_run and dry.resent == MESSAGES
    assert _end_offsets(stack, raw_after) == 0, "a dry run sent something"

    first = _replay(settings, model)
    assert not first.dry_run
    assert (first.letters_read, first.matching, first.resent) == (MESSAGES + 1,) * 2 + (MESSAGES,)
    assert {reason: refused.count for reason, refused in first.still_refused.items()} == {
        "bad_json": 1
    }
    assert (first.unreadable, first.not_kept_whole, first.repeats_skipped) == (0, 0, 0)
    assert _end_offsets(stack, raw_after) == MESSAGES

    log_file = names.workdir / "flow-with.log"
    env = _flow_env(stack, names, fixed, raw_after, deadletter, "recovery-with")
    # Per sensor: the last message's pressure is refused, so when that message opens a
    # window of its own (one start second in ten), the pressure has one window fewer.
    windows = len({(sensor, ts // WINDOW_MS) for _entity, sensor, ts in expected})
    with _flow(env, log_file):
        _wait_for(
            f"{READINGS} readings",
            lambda: _count(sql, f"SELECT count() FROM '{names.table('readings')}'") == READINGS,
            log_file,
        )
        got = _readings(sql, names)
        assert len(got) == len(set(got)) and set(got) == expected
        # Once the stranger's windows have all closed, a replayed reading is late: the
        # path where the flow no longer holds it to drop it as a repeat.
        _wait_for(
            f"{windows} closed sensor windows",
            lambda: (
                _count(sql, f"SELECT count() FROM '{names.table('sensor_windows')}'") == windows
            ),
            log_file,
        )
        _wait_for(
            "the first replay's out_of_range letter",
            lambda: _letters(sql, names, "out_of_range") == 1,
            log_file,
        )

        second = _replay(settings, model)
        # The flow's out_of_range letter of the first replay is read too: same payload.
        assert (second.letters_read, second.resent, second.repeats_skipped) == (
            MESSAGES + 2,
            MESSAGES,
            1,
        )
        assert _end_offsets(stack, raw_after) == 2 * MESSAGES
        # The out-of-range message is the stranger's last, in one partition: its second
        # letter means the flow has stepped through the whole second replay.
        _wait_for(
            "the second replay's out_of_range letter",
            lambda: _letters(sql, names, "out_of_range") == 2,
            log_file,
        )
        wait_for_wal(sql, [names.table("readings")])
        again = _readings(sql, names)
    assert len(again) == READINGS
    assert sorted(again) == sorted(got)


def test_a_flow_restarted_with_the_fixed_model_takes_the_replay(
    stack: Settings, names: Names
) -> None:
    sql = QuestDBHttp(stack.questdb)
    raw, deadletter = names.topic("raw"), names.topic("deadletter")
    _dead_lettered_stranger(stack, names, raw, "recovery")
    fixed = _model_file(names.workdir / "with.yaml", names.suffix, with_stranger=True)
    report = _replay(_settings_for(stack, raw, deadletter), load_twin_model(fixed))
    assert report.resent == MESSAGES

    # The operator's way: the same topic, the flow restarted on its store, new model.
    log_file = names.workdir / "flow-restarted.log"
    env = _flow_env(stack, names, fixed, raw, deadletter, "recovery")
    with _flow(env, log_file):
        _wait_for(
            "the replayed messages, taken or refused",
            lambda: (
                _count(sql, f"SELECT count() FROM '{names.table('readings')}'") == READINGS
                or _letters(sql, names, "unknown_entity") == 2 * MESSAGES
            ),
            log_file,
        )
    assert _count(sql, f"SELECT count() FROM '{names.table('readings')}'") == READINGS
