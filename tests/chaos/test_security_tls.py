"""TLS on the local brokers and `twinflow serve`, against real, separate servers.

A second Kafka (SASL_SSL listener beside its SASL_PLAINTEXT one) and Mosquitto (TLS
listener beside its plain one) run with certificates from their own private CA, made by
`twinflow up`. Correctly configured clients make a round trip; a client trusting another
CA, a client that connects by a name the certificate does not list, and a plaintext
client on the TLS port are each refused within seconds, with a message naming the
setting to fix.
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient
from cryptography import x509

from connectors.kafka import (
    KafkaTlsError,
    TopicSpec,
    client_config,
    ensure_topics,
    reliable_producer,
)
from connectors.mqtt import MqttTlsError, check_tls
from tests.helpers import clean_env, free_ports, isolated_settings, twinflow_cli
from twinflow.services import manager
from twinflow.services.serve import ServeService
from twinflow.services.tls import certificate_names, ensure_certificates, tls_files
from twinflow.settings import KafkaSettings, MqttSettings, ServeSettings, Settings, TlsSettings
from twinflow.smoke import mqtt_round_trip

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

log = logging.getLogger("tests.chaos.tls")
USER = "twinflow-tls"
PASSWORD = f"tls-{uuid.uuid4().hex}"
FAST_S = 10.0
"""A refusal must come this fast: no client may sit out a connect timeout."""


def tls_row(fault: str, how: str, elapsed_s: float) -> dict[str, object]:
    """A chaos table row for TLS recipe 15: what was refused, how, how fast.

    A refusal moves no data: the data columns say n/a, as tests.helpers.refusal_row's do.
    """
    return {
        "fault": f"15. TLS: {fault}",
        "runs": 1,
        "lost": "n/a",
        "duplicates": "n/a",
        "mismatches": "n/a",
        "notes": f"refused: {how} after {elapsed_s:.1f} s",
    }


def _secured(base: Settings) -> Settings:
    """``base`` with a SASL_SSL Kafka listener and a TLS Mosquitto listener (validated)."""
    ssl_port, tls_port = free_ports(2)
    ca = tls_files(base.state_dir).ca
    kafka = KafkaSettings.model_validate(
        {
            **base.kafka.model_dump(),
            "security_protocol": "SASL_SSL",
            "sasl_username": USER,
            "sasl_password": PASSWORD,
            "ssl_port": ssl_port,
            "ssl_ca_file": ca,
        }
    )
    mqtt = MqttSettings.model_validate(
        {**base.mqtt.model_dump(), "tls_port": tls_port, "tls_ca_file": ca}
    )
    return base.model_copy(update={"kafka": kafka, "mqtt": mqtt})


@pytest.fixture(scope="module")
def brokers(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Kafka and Mosquitto of their own, with TLS listeners, up and healthy."""
    settings = _secured(isolated_settings(stack, tmp_path_factory.mktemp("tls") / "state"))
    try:
        manager.up(settings, ["kafka", "mosquitto"], log.info)
        yield settings
    finally:
        manager.down(settings, ["kafka", "mosquitto"], log.info)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA of another twinflow installation: valid, but not the brokers'."""
    files = tls_files(tmp_path_factory.mktemp("other-ca"))
    ensure_certificates(files)
    return files.ca


def _kafka(settings: Settings, **changes: object) -> KafkaSettings:
    return settings.kafka.model_copy(update=changes)


def _mqtt(settings: Settings, **changes: object) -> MqttSettings:
    return settings.mqtt.model_copy(update=changes)


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `twinflow` process using ``settings``' brokers."""
    kafka, mqtt = settings.kafka, settings.mqtt
    values = {
        "state_dir": str(settings.state_dir),
        "lib_dir": str(settings.jar_dir),
        "kafka__port": str(kafka.port),
        "kafka__controller_port": str(kafka.controller_port),
        "kafka__ssl_port": str(kafka.ssl_port),
        "kafka__security_protocol": kafka.security_protocol,
        "kafka__sasl_username": USER,
        "kafka__sasl_password": PASSWORD,
        "kafka__ssl_ca_file": str(kafka.ssl_ca_file),
        "mqtt__port": str(mqtt.port),
        "mqtt__tls_port": str(mqtt.tls_port),
        "mqtt__tls_ca_file": str(mqtt.tls_ca_file),
    }
    return clean_env(**{**values, **extra})


def _read(kafka: KafkaSettings, topic: str, expected: int, timeout_s: float = 30) -> list[bytes]:
    consumer = Consumer(client_config(kafka, **{"group.id": f"tls-{uuid.uuid4()}"}))
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
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


# --- correctly configured clients ------------------------------------------------------


def test_brokers_are_healthy_on_both_listeners(brokers: Settings) -> None:
    rows = {row.name: row for row in manager.status(brokers, ["kafka", "mosquitto"])}
    assert {name: row.state for name, row in rows.items()} == {
        "kafka": manager.State.HEALTHY,
        "mosquitto": manager.State.HEALTHY,
    }
    assert f"mqtts://127.0.0.1:{brokers.mqtt.tls_port}" in rows["mosquitto"].endpoints
    assert any(f":{brokers.kafka.ssl_port} (SASL_SSL" in line for line in rows["kafka"].endpoints)
    files = tls_files(brokers.state_dir)
    for path in (files.ca, files.ca_key, files.chain, files.key, files.directory):
        mode = path.stat().st_mode & 0o777
        assert mode in (0o600, 0o700), (path, oct(mode))
    assert (brokers.state_dir / "kafka" / "keystore.pem").stat().st_mode & 0o777 == 0o600


def test_kafka_sasl_ssl_round_trip(brokers: Settings, unique: str) -> None:
    kafka = brokers.kafka
    assert kafka.bootstrap == f"127.0.0.1:{kafka.ssl_port}"
    topic = f"tls-{unique}"
    ensure_topics(kafka, [TopicSpec(topic, 1)])
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error)

    producer = reliable_producer(kafka)
    sent = [f"tls-{index}".encode() for index in range(50)]
    for value in sent:
        producer.produce(topic, value=value, on_delivery=delivered)
    assert producer.flush(30) == 0
    assert failures == []
    assert _read(kafka, topic, expected=len(sent)) == sent
    # The SASL_PLAINTEXT listener beside it serves the same topic.
    plain = _kafka(brokers, security_protocol="SASL_PLAINTEXT", ssl_ca_file=None)
    assert plain.bootstrap == f"127.0.0.1:{kafka.port}"
    assert _read(plain, topic, expected=len(sent)) == sent


def test_mqtt_tls_round_trip(brokers: Settings, unique: str) -> None:
    assert brokers.mqtt.client_port == brokers.mqtt.tls_port
    check_tls(brokers.mqtt)
    payload = f"over tls {unique}".encode()
    mqtt_round_trip(brokers, f"tls/{unique}", payload)
    # The plain listener beside it still serves plain clients.
    plain = _mqtt(brokers, tls_ca_file=None)
    mqtt_round_trip(brokers.model_copy(update={"mqtt": plain}), f"plain/{unique}", payload)


# --- another CA ---------------------------------------------------------------------------


def test_kafka_client_trusting_another_ca_is_refused(
    brokers: Settings, other_ca: Path, tmp_path: Path, chaos_table: list[dict[str, object]]
) -> None:
    # Unused ports for QuestDB: if Kafka let it through, `run` must not reach the session's.
    http, pg, ilp, min_http = free_ports(4)
    env = _env(
        brokers,
        kafka__ssl_ca_file=str(other_ca),
        questdb__http_port=str(http),
        questdb__pg_port=str(pg),
        questdb__ilp_tcp_port=str(ilp),
        questdb__min_http_port=str(min_http),
        flow__recovery="false",
        flow__recovery_dir=str(tmp_path / "recovery"),
    )
    started = time.monotonic()
    result = twinflow_cli(env, "run", timeout=60)  # a hang raises TimeoutExpired
    elapsed = time.monotonic() - started
    chaos_table.append(
        tls_row("twinflow run, Kafka SASL_SSL, another CA", f"exit {result.returncode}", elapsed)
    )
    assert result.returncode == 1, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    log.info("refusal: %s", message)
    assert f"TLS handshake with Kafka at bootstrap 127.0.0.1:{brokers.kafka.ssl_port}" in message
    assert f"TWINFLOW_KAFKA__SSL_CA_FILE ({other_ca})" in message, message[-3000:]
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr

    started = time.monotonic()
    with pytest.raises(KafkaTlsError, match="certificate"):
        ensure_topics(_kafka(brokers, ssl_ca_file=other_ca), [TopicSpec("never", 1)])
    assert time.monotonic() - started < FAST_S


def test_mqtt_client_trusting_another_ca_is_refused(
    brokers: Settings, other_ca: Path, chaos_table: list[dict[str, object]]
) -> None:
    env = _env(brokers, mqtt__tls_ca_file=str(other_ca))
    started = time.monotonic()
    result = twinflow_cli(env, "bridge", "mqtt", timeout=60)  # a hang raises TimeoutExpired
    elapsed = time.monotonic() - started
    chaos_table.append(
        tls_row(
            "twinflow bridge mqtt, Mosquitto TLS, another CA", f"exit {result.returncode}", elapsed
        )
    )
    assert result.returncode == 1, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    log.info("refusal: %s", message)
    assert f"MQTT broker 127.0.0.1:{brokers.mqtt.tls_port} refused by TLS" in message, message
    assert f"not signed by the CA in TWINFLOW_MQTT__TLS_CA_FILE ({other_ca})" in message
    assert "Traceback" not in result.stderr

    started = time.monotonic()
    with pytest.raises(MqttTlsError, match="TWINFLOW_MQTT__TLS_CA_FILE"):
        check_tls(_mqtt(brokers, tls_ca_file=other_ca))
    assert time.monotonic() - started < FAST_S


# --- plaintext on the TLS port -----------------------------------------------------------


def test_kafka_plaintext_client_on_the_tls_port_is_refused(
    brokers: Settings, unique: str, chaos_table: list[dict[str, object]]
) -> None:
    plain = _kafka(
        brokers,
        security_protocol="SASL_PLAINTEXT",
        bootstrap_servers=f"127.0.0.1:{brokers.kafka.ssl_port}",
    )
    started = time.monotonic()
    with pytest.raises(KafkaTlsError) as caught:
        ensure_topics(plain, [TopicSpec(f"plain-{unique}", 1)])
    elapsed = time.monotonic() - started
    chaos_table.append(
        tls_row("Kafka SASL_PLAINTEXT client on the SASL_SSL port", "KafkaTlsError", elapsed)
    )
    assert elapsed < FAST_S
    message = str(caught.value)
    log.info("refusal: %s", message)
    assert "the port is a TLS listener" in message
    assert "TWINFLOW_KAFKA__SECURITY_PROTOCOL=SASL_SSL" in message
    topics = AdminClient(client_config(brokers.kafka)).list_topics(timeout=10).topics
    assert f"plain-{unique}" not in topics


def test_mqtt_plaintext_client_on_the_tls_port_is_refused(
    brokers: Settings, chaos_table: list[dict[str, object]]
) -> None:
    # The simulator as a user would point it at the TLS port without TLS settings.
    env = _env(brokers, mqtt__port=str(brokers.mqtt.tls_port))
    for name in ("TWINFLOW_MQTT__TLS_PORT", "TWINFLOW_MQTT__TLS_CA_FILE"):
        del env[name]
    started = time.monotonic()
    result = twinflow_cli(
        env, "simulate", "--mqtt", "--entities", "1", "--duration", "5", "--max-speed", timeout=60
    )
    elapsed = time.monotonic() - started
    chaos_table.append(
        tls_row(
            "twinflow simulate, plain MQTT on the TLS port", f"exit {result.returncode}", elapsed
        )
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    log.info("refusal: %s", message)
    assert "closed the connection before answering CONNECT" in message, message[-3000:]
    assert "set TWINFLOW_MQTT__TLS_CA_FILE" in message
    assert "Traceback" not in result.stderr


# --- twinflow serve over HTTPS ------------------------------------------------------------


_TOPICS = ("raw", "deadletter", "state", "anomalies", "late", "alarms", "feedback", "commands")


def test_serve_over_https(brokers: Settings, stack: Settings, tmp_path: Path) -> None:
    files = tls_files(brokers.state_dir)
    (port,) = free_ports(1)
    suffix = uuid.uuid4().hex[:8]
    env = _env(
        brokers,
        serve__port=str(port),
        serve__ssl_certfile=str(files.chain),
        serve__ssl_keyfile=str(files.key),
        questdb__http_port=str(stack.questdb.http_port),
        questdb__pg_port=str(stack.questdb.pg_port),
        **{f"topics__{name}": f"tls.{name}.{suffix}" for name in _TOPICS},
    )
    serve = ServeSettings(port=port, ssl_certfile=files.chain, ssl_keyfile=files.key)
    served = brokers.model_copy(update={"serve": serve})
    log_file = tmp_path / "serve.log"
    with log_file.open("a") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "twinflow", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        health = ServeService(served)
        deadline = time.monotonic() + 90
        while not health.healthy():
            assert server.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.5)
        url = f"https://127.0.0.1:{port}/api/v1/health"
        trusting = ssl.create_default_context(cafile=str(files.ca))
        with urllib.request.urlopen(url, timeout=10, context=trusting) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context())
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


# --- a name the certificate does not list (last: it restarts the brokers) -----------------


def test_a_name_outside_the_certificate_is_refused(
    brokers: Settings, unique: str, chaos_table: list[dict[str, object]]
) -> None:
    """The brokers come back with a certificate issued for another name only; clients
    that connect to 127.0.0.1 trust its CA but refuse the name."""
    manager.down(brokers, ["kafka", "mosquitto"], log.info)
    renamed = brokers.model_copy(update={"tls": TlsSettings(server_names=("broker.invalid",))})
    manager.up(renamed, ["kafka", "mosquitto"], log.info)  # healthy: health checks skip names
    leaf, _ca = x509.load_pem_x509_certificates(tls_files(renamed.state_dir).chain.read_bytes())
    assert certificate_names(leaf) == ("broker.invalid",)

    started = time.monotonic()
    with pytest.raises(KafkaTlsError) as kafka_refusal:
        ensure_topics(renamed.kafka, [TopicSpec(f"renamed-{unique}", 1)])
    elapsed = time.monotonic() - started
    chaos_table.append(
        tls_row("Kafka SASL_SSL, host not in the certificate", "KafkaTlsError", elapsed)
    )
    assert elapsed < FAST_S
    log.info("refusal: %s", kafka_refusal.value)
    assert "TWINFLOW_TLS__SERVER_NAMES" in str(kafka_refusal.value)

    started = time.monotonic()
    with pytest.raises(MqttTlsError) as mqtt_refusal:
        check_tls(renamed.mqtt)
    elapsed = time.monotonic() - started
    chaos_table.append(
        tls_row("Mosquitto TLS, host not in the certificate", "MqttTlsError", elapsed)
    )
    assert elapsed < FAST_S
    message = str(mqtt_refusal.value)
    log.info("refusal: %s", message)
    assert "not issued for '127.0.0.1'" in message and "TWINFLOW_MQTT__HOST" in message
