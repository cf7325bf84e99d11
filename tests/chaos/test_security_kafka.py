"""Kafka SASL/SCRAM against a real, separate local broker.

The right credentials make a round trip; a wrong password makes `twinflow run` fail fast
with a clear message and no secret in its output; an anonymous client gets nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from connectors.kafka import (
    KafkaAuthError,
    KafkaSetupError,
    TopicSpec,
    client_config,
    ensure_topics,
    reliable_producer,
)
from tests.helpers import clean_env, free_ports, isolated_settings, refusal_row, twinflow_cli
from twinflow.errors import ServiceError
from twinflow.services import manager
from twinflow.settings import KafkaSettings, Settings

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

log = logging.getLogger("tests.chaos.kafka_security")
USER = "twinflow-test"
# Random per run, so "not in the output" cannot pass by luck.
PASSWORD = f"right-{uuid.uuid4().hex}"
WRONG_PASSWORD = f"wrong-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def sasl_broker(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A second Kafka (own state folder and ports) whose client listener is SASL/SCRAM."""
    base = isolated_settings(stack, tmp_path_factory.mktemp("kafka-sasl") / "state")
    settings = base.model_copy(
        update={
            "kafka": base.kafka.model_copy(
                update={
                    "security_protocol": "SASL_PLAINTEXT",
                    "sasl_username": USER,
                    "sasl_password": SecretStr(PASSWORD),
                }
            )
        }
    )
    try:
        manager.up(settings, ["kafka"], log.info)
        yield settings
    finally:
        manager.down(settings, ["kafka"], log.info)


def _with(kafka: KafkaSettings, **changes: object) -> KafkaSettings:
    return kafka.model_copy(update=changes)


def _read(
    kafka: KafkaSettings, topic: str, partitions: int, expected: int, timeout_s: float = 30
) -> list[bytes]:
    """Values of ``topic`` from the start, by assignment (no group coordinator to wait
    for on a fresh broker), until ``expected`` arrived or ``timeout_s`` passed."""
    consumer = Consumer(client_config(kafka, **{"group.id": f"sasl-{uuid.uuid4()}"}))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                assert message.error() is None, message.error()
                values.append(message.value() or b"")
    finally:
        consumer.close()
    return values


def test_right_credentials_round_trip(sasl_broker: Settings, unique: str) -> None:
    kafka = sasl_broker.kafka
    [row] = manager.status(sasl_broker, ["kafka"])
    assert row.state == manager.State.HEALTHY  # healthy() logs in too
    topic = f"sasl-{unique}"
    ensure_topics(kafka, [TopicSpec(topic, 2)])
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error)

    producer = reliable_producer(kafka)
    sent = [f"v{index}".encode() for index in range(100)]
    for index, value in enumerate(sent):
        producer.produce(topic, key=str(index % 7).encode(), value=value, on_delivery=delivered)
    assert producer.flush(30) == 0
    assert failures == []

    assert sorted(_read(kafka, topic, 2, expected=len(sent))) == sorted(sent)


def test_secrets_stay_out_of_the_broker_files(sasl_broker: Settings) -> None:
    home = sasl_broker.state_dir / "kafka"
    for name in ("server.properties", "sasl.json"):
        assert (home / name).stat().st_mode & 0o777 == 0o600, name
    assert not (home / "format-scram.args").exists()
    assert "sasl.enabled.mechanisms=SCRAM-SHA-256" in (home / "server.properties").read_text()
    # The client's password was handed to the broker salted only: no file has it.
    for path in sasl_broker.state_dir.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_wrong_password_fails_twinflow_run_fast(
    sasl_broker: Settings, tmp_path: Path, chaos_table: list[dict[str, object]]
) -> None:
    kafka = sasl_broker.kafka
    # Unused ports for everything else: if Kafka let it through, `run` must not reach
    # the session's QuestDB either.
    http, pg, ilp, min_http, mqtt = free_ports(5)
    env = clean_env(
        state_dir=str(tmp_path / "state"),
        kafka__port=str(kafka.port),
        kafka__controller_port=str(kafka.controller_port),
        kafka__security_protocol="SASL_PLAINTEXT",
        kafka__sasl_username=USER,
        kafka__sasl_password=WRONG_PASSWORD,
        questdb__http_port=str(http),
        questdb__pg_port=str(pg),
        questdb__ilp_tcp_port=str(ilp),
        questdb__min_http_port=str(min_http),
        mqtt__port=str(mqtt),
        flow__recovery="false",
    )
    started = time.monotonic()
    result = twinflow_cli(env, "run", timeout=60)  # a hang raises TimeoutExpired
    elapsed = time.monotonic() - started
    chaos_table.append(
        refusal_row("twinflow run, Kafka SASL/SCRAM, wrong password", result.returncode, elapsed)
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert elapsed < 60
    message = " ".join(result.stderr.split())
    assert f"Kafka authentication failed for user '{USER}'" in message, message[-3000:]
    assert f"at bootstrap 127.0.0.1:{kafka.port}" in message
    assert "TWINFLOW_KAFKA__SASL_PASSWORD" in message
    assert "Traceback" not in result.stderr
    for secret in (WRONG_PASSWORD, PASSWORD):
        assert secret not in result.stdout + result.stderr

    shown = twinflow_cli(env, "config", timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert '"sasl_password": "**********"' in shown.stdout
    assert WRONG_PASSWORD not in shown.stdout + shown.stderr


def test_wrong_password_refused_in_process(sasl_broker: Settings, unique: str) -> None:
    wrong = _with(sasl_broker.kafka, sasl_password=SecretStr(WRONG_PASSWORD))
    started = time.monotonic()
    with pytest.raises(KafkaAuthError, match="authentication failed") as caught:
        ensure_topics(wrong, [TopicSpec(f"never-{unique}", 1)])
    assert time.monotonic() - started < 10  # not ensure_topics' 30 s timeout
    assert WRONG_PASSWORD not in str(caught.value)
    other_mechanism = _with(sasl_broker.kafka, sasl_mechanism="SCRAM-SHA-512")
    with pytest.raises(KafkaAuthError, match="Unsupported SASL mechanism"):
        ensure_topics(other_mechanism, [TopicSpec(f"never-{unique}", 1)])
    topics = AdminClient(client_config(sasl_broker.kafka)).list_topics(timeout=10).topics
    assert f"never-{unique}" not in topics


def test_anonymous_client_is_refused(sasl_broker: Settings, unique: str) -> None:
    anonymous = _with(
        sasl_broker.kafka, security_protocol="PLAINTEXT", sasl_username=None, sasl_password=None
    )
    assert "sasl.username" not in client_config(anonymous)
    with pytest.raises(KafkaException):
        AdminClient(client_config(anonymous)).list_topics(timeout=3)
    with pytest.raises(KafkaSetupError, match="SECURITY_PROTOCOL"):
        ensure_topics(anonymous, [TopicSpec(f"anon-{unique}", 1)], timeout_s=3)

    topic = f"sasl-anon-{unique}"
    ensure_topics(sasl_broker.kafka, [TopicSpec(topic, 1)])
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error)

    producer = Producer(client_config(anonymous, **{"message.timeout.ms": 3000}))
    producer.produce(topic, value=b"anonymous", on_delivery=delivered)
    producer.flush(10)
    assert len(failures) == 1
    assert _read(sasl_broker.kafka, topic, 1, expected=1, timeout_s=3) == []
    topics = AdminClient(client_config(sasl_broker.kafka)).list_topics(timeout=10).topics
    assert f"anon-{unique}" not in topics


def test_restart_keeps_the_users_and_refuses_other_ones(sasl_broker: Settings, unique: str) -> None:
    """Last in this module: it restarts the broker. SCRAM users live in the formatted
    storage, so a restart keeps them, and settings that no longer match are refused
    before the broker starts rather than by every client afterwards."""
    topic = f"sasl-restart-{unique}"
    ensure_topics(sasl_broker.kafka, [TopicSpec(topic, 1)])
    manager.down(sasl_broker, ["kafka"], log.info)
    changed = sasl_broker.model_copy(
        update={"kafka": _with(sasl_broker.kafka, sasl_password=SecretStr(WRONG_PASSWORD))}
    )
    with pytest.raises(ServiceError, match="do not match them") as caught:
        manager.up(changed, ["kafka"], log.info)
    assert WRONG_PASSWORD not in str(caught.value)
    assert manager.status(sasl_broker, ["kafka"])[0].state == manager.State.STOPPED

    assert manager.up(sasl_broker, ["kafka"], log.info) == ["kafka"]
    topics = AdminClient(client_config(sasl_broker.kafka)).list_topics(timeout=10).topics
    assert topic in topics
