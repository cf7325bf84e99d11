"""TLS settings: off by default, misconfiguration refused by name, what they turn on."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from pydantic import SecretStr

from connectors.kafka import (
    KafkaTlsError,
    TopicSpec,
    _ErrorWatch,
    client_config,
    ensure_topics,
    tls_error,
)
from connectors.mqtt import MqttTlsError, closed_before_connack_hint, new_client, tls_refusal
from twinflow.errors import ConfigError
from twinflow.serve.server import tls_options, url
from twinflow.services.kafka import KafkaService
from twinflow.services.mosquitto import MosquittoService
from twinflow.services.tls import tls_files
from twinflow.settings import KafkaSettings, MqttSettings, Settings, load_settings

PASSWORD = "tls-unit-pa55"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TWINFLOW_"):
            monkeypatch.delenv(name)


def _kafka(**changes: object) -> KafkaSettings:
    values: dict[str, object] = {
        "port": 19092,
        "security_protocol": "SASL_SSL",
        "sasl_username": "alice",
        "sasl_password": SecretStr(PASSWORD),
        "ssl_port": 19094,
        "ssl_ca_file": Path("/state/tls/ca.pem"),
        **changes,
    }
    return KafkaSettings.model_validate(values)


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(f"TWINFLOW_{name.upper()}", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return " ".join(str(caught.value).split())


# --- defaults -----------------------------------------------------------------------


def test_tls_is_off_by_default(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    assert settings.kafka.ssl_port is None and not settings.kafka.tls
    assert settings.mqtt.tls_port is None and not settings.mqtt.tls
    assert settings.serve.ssl_certfile is None and settings.serve.scheme == "http"
    assert settings.tls.server_names == ("localhost", "127.0.0.1")
    assert not {"kafka.ssl_port", "mqtt.tls_port"} & settings.local_ports().keys()
    assert set(client_config(settings.kafka)) == {"bootstrap.servers", "logger"}
    assert url(settings).startswith("http://")
    assert tls_options(settings) == (None, None)
    assert "listener" in MosquittoService(settings)._config()
    assert "certfile" not in MosquittoService(settings)._config()
    assert "ssl." not in KafkaService(settings)._server_properties()
    assert not (tmp_path / "tls").exists()


# --- Kafka ------------------------------------------------------------------------------


def test_sasl_ssl_clients_of_the_local_broker_use_its_tls_port() -> None:
    kafka = _kafka()
    assert kafka.bootstrap == "127.0.0.1:19094"
    config = client_config(kafka)
    assert config["security.protocol"] == "SASL_SSL"
    assert config["ssl.ca.location"] == "/state/tls/ca.pem"
    assert config["bootstrap.servers"] == "127.0.0.1:19094"
    # The plain listener stays for SASL_PLAINTEXT clients.
    plain = _kafka(security_protocol="SASL_PLAINTEXT", ssl_ca_file=None)
    assert plain.bootstrap == "127.0.0.1:19092"
    assert "ssl.ca.location" not in client_config(plain)


def test_tls_port_needs_scram_users(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, kafka__ssl_port="19094")
    assert "kafka (env TWINFLOW_KAFKA)" in message
    assert "TWINFLOW_KAFKA__SSL_PORT (a SASL_SSL listener) needs SCRAM users" in message
    assert "TWINFLOW_KAFKA__SECURITY_PROTOCOL=SASL_SSL" in message


def test_local_sasl_ssl_needs_the_local_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(
        monkeypatch,
        kafka__ssl_port="19094",
        kafka__security_protocol="SASL_SSL",
        kafka__sasl_username="alice",
        kafka__sasl_password=PASSWORD,
    )
    assert "set TWINFLOW_KAFKA__SSL_CA_FILE to STATE_DIR/tls/ca.pem" in message
    assert PASSWORD not in message
    # A remote TLS broker may use the system's CAs.
    remote = _kafka(ssl_ca_file=None, bootstrap_servers="kafka.example:9093")
    assert remote.bootstrap == "kafka.example:9093"


def test_tls_port_must_be_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="SSL_PORT must differ from TWINFLOW_KAFKA__PORT"):
        _kafka(ssl_port=19092)
    message = _error(
        monkeypatch,
        kafka__ssl_port="9000",
        kafka__security_protocol="SASL_PLAINTEXT",
        kafka__sasl_username="alice",
        kafka__sasl_password=PASSWORD,
    )
    assert "questdb.http_port and kafka.ssl_port are both set to port 9000" in message


def test_local_broker_gets_a_sasl_ssl_listener_beside_the_plain_one(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, kafka=_kafka())
    service = KafkaService(settings)
    assert service.ports() == {
        "kafka.port": 19092,
        "kafka.controller_port": 9093,
        "kafka.ssl_port": 19094,
    }
    properties = dict(
        line.split("=", 1) for line in service._server_properties("broker-pw").splitlines()
    )
    assert properties["listeners"] == (
        "SASL_PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:9093,SASL_SSL://127.0.0.1:19094"
    )
    assert properties["advertised.listeners"].endswith(",SASL_SSL://127.0.0.1:19094")
    assert properties["inter.broker.listener.name"] == "SASL_PLAINTEXT"
    assert properties["listener.security.protocol.map"].endswith(",SASL_SSL:SASL_SSL")
    assert properties["ssl.keystore.type"] == "PEM"
    assert properties["ssl.truststore.location"] == str(tls_files(settings.state_dir).ca)
    assert "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config" in properties
    assert [line for line in service.endpoints() if "SASL_SSL" in line] == [
        "bootstrap 127.0.0.1:19094 (SASL_SSL SCRAM-SHA-256, alice)"
    ]


def test_local_keystore_holds_key_and_chain_privately(tmp_path: Path) -> None:
    service = KafkaService(Settings(state_dir=tmp_path, kafka=_kafka()))
    service.home.mkdir(parents=True)
    said: list[str] = []
    service._write_keystore(said.append)
    keystore = service.home / "keystore.pem"
    assert keystore.stat().st_mode & 0o777 == 0o600
    text = keystore.read_text()
    assert text.startswith("-----BEGIN PRIVATE KEY-----")
    assert text.count("BEGIN CERTIFICATE") == 2
    assert said and "localhost, 127.0.0.1" in said[0]
    service._write_keystore(said.append)
    assert len(said) == 1  # the certificate is reused


def test_a_missing_kafka_ca_file_is_named_before_any_connection(tmp_path: Path) -> None:
    missing = _kafka(ssl_ca_file=tmp_path / "ca.pem")
    with pytest.raises(KafkaTlsError, match=r"TWINFLOW_KAFKA__SSL_CA_FILE=.*ca\.pem is not"):
        ensure_topics(missing, [TopicSpec("never", 1)], timeout_s=1)


def test_kafka_tls_errors_name_the_setting_to_fix() -> None:
    kafka = _kafka()
    unknown_ca = str(
        tls_error(kafka, "SSL handshake failed: certificate verify failed: broker certificate")
    )
    assert "TLS handshake with Kafka at bootstrap 127.0.0.1:19094 failed" in unknown_ca
    assert "TWINFLOW_KAFKA__SSL_CA_FILE (/state/tls/ca.pem)" in unknown_ca
    mismatch = str(tls_error(kafka, "SSL handshake failed: Hostname mismatch"))
    assert "TWINFLOW_TLS__SERVER_NAMES" in mismatch
    plain = _kafka(security_protocol="SASL_PLAINTEXT", bootstrap_servers="127.0.0.1:19094")
    dropped = str(tls_error(plain, "Disconnected (connecting to a SSL listener?)"))
    assert "the port is a TLS listener" in dropped
    assert "TWINFLOW_KAFKA__SECURITY_PROTOCOL=SASL_SSL" in dropped
    assert isinstance(tls_error(kafka, "x"), KafkaTlsError)


def test_error_watch_takes_repeatedly_dropped_first_requests_as_a_tls_port() -> None:
    watch = _ErrorWatch()
    line = (
        "sasl_plaintext://127.0.0.1:19094/bootstrap: Disconnected: connection closed by "
        "peer: receive 0 after POLLIN (after 9ms in state APIVERSION_QUERY)"
    )
    for _ in range(2):  # a broker going down can drop a request or two
        watch.log(3, "%s [%s] %s", "FAIL", "rdkafka#producer-1", line)
        assert watch.refusal(_kafka()) is None
    watch.log(3, "%s [%s] %s", "FAIL", "rdkafka#producer-1", line)
    assert isinstance(watch.refusal(_kafka()), KafkaTlsError)


def test_error_watch_takes_a_refused_certificate_at_once() -> None:
    watch = _ErrorWatch()
    watch(KafkaError(KafkaError._TRANSPORT, "1/1 brokers are down"))
    assert watch.refusal(_kafka()) is None
    refused = (
        "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: "
        "broker certificate could not be verified"
    )
    watch(KafkaError(KafkaError._TRANSPORT, refused))
    refusal = watch.refusal(_kafka())
    assert isinstance(refusal, KafkaTlsError)
    assert "TWINFLOW_KAFKA__SSL_CA_FILE" in str(refusal)


# --- MQTT -------------------------------------------------------------------------------


def test_mqtt_tls_clients_use_the_tls_port() -> None:
    settings = MqttSettings(port=11883, tls_port=18883, tls_ca_file=Path("/ca.pem"))
    assert settings.client_port == 18883
    assert MqttSettings(port=11883, tls_port=18883).client_port == 11883
    remote = MqttSettings(host="broker.example", port=8883, tls_ca_file=Path("/ca.pem"))
    assert remote.client_port == 8883


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"mqtt__tls_cert_file": "/c.pem"}, "set both or neither of TWINFLOW_MQTT__TLS_CERT_FILE"),
        (
            {"mqtt__tls_cert_file": "/c.pem", "mqtt__tls_key_file": "/k.pem"},
            "TWINFLOW_MQTT__TLS_CERT_FILE is only sent over TLS: set TWINFLOW_MQTT__TLS_CA_FILE",
        ),
        ({"mqtt__tls_port": "1883"}, "TWINFLOW_MQTT__TLS_PORT must differ"),
        ({"mqtt__tls_port": "9092"}, "kafka.port and mqtt.tls_port are both set to port 9092"),
    ],
)
def test_mqtt_tls_misconfiguration_is_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: str
) -> None:
    assert words in _error(monkeypatch, **env)


def test_local_mosquitto_gets_a_tls_listener(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, mqtt=MqttSettings(port=11883, tls_port=18883))
    service = MosquittoService(settings)
    assert service.ports() == {"mqtt.port": 11883, "mqtt.tls_port": 18883}
    assert service.endpoints() == ["mqtt://127.0.0.1:11883", "mqtts://127.0.0.1:18883"]
    lines = service._config().splitlines()
    files = tls_files(settings.state_dir)
    tls = lines[lines.index("listener 18883 127.0.0.1") :]
    assert f"certfile {files.chain}" in tls and f"keyfile {files.key}" in tls
    assert "listener 11883 127.0.0.1" in lines[: lines.index("listener 18883 127.0.0.1")]


def test_mqtt_client_with_a_missing_ca_names_the_setting(tmp_path: Path) -> None:
    missing = MqttSettings(tls_ca_file=tmp_path / "nope.pem")
    with pytest.raises(MqttTlsError, match=r"TWINFLOW_MQTT__TLS_CA_FILE=.*nope\.pem is not"):
        new_client(missing, "c")


def test_mqtt_tls_refusals_say_what_to_fix() -> None:
    settings = MqttSettings(tls_port=18883, tls_ca_file=Path("/ca.pem"))
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_code, mismatch.verify_message = 64, "IP address mismatch"
    text = tls_refusal(settings, mismatch) or ""
    assert "not issued for '127.0.0.1'" in text and "TWINFLOW_MQTT__HOST" in text
    wrong_port = ssl.SSLError(1, "wrong version number")
    assert "Is port 18883 a TLS listener?" in (tls_refusal(settings, wrong_port) or "")
    assert tls_refusal(settings, ConnectionRefusedError(111, "refused")) is None
    plain = MqttSettings(port=18883)
    assert "set TWINFLOW_MQTT__TLS_CA_FILE" in closed_before_connack_hint(plain)


# --- serve ------------------------------------------------------------------------------


def test_serve_https_needs_certificate_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, serve__ssl_certfile="/srv/server.pem")
    assert "set both or neither of TWINFLOW_SERVE__SSL_CERTFILE and" in message


def test_serve_https_with_the_local_certificate(tmp_path: Path) -> None:
    files = tls_files(tmp_path.resolve())
    settings = load_settings(
        state_dir=tmp_path, serve={"ssl_certfile": files.chain, "ssl_keyfile": files.key}
    )
    assert url(settings) == "https://127.0.0.1:8080/"
    assert tls_options(settings) == (str(files.chain), str(files.key))  # made on demand
    assert files.chain.read_text().count("BEGIN CERTIFICATE") == 2


def test_serve_with_missing_certificate_names_the_setting(tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path,
        serve={"ssl_certfile": tmp_path / "a.pem", "ssl_keyfile": tmp_path / "a.key"},
    )
    with pytest.raises(ConfigError, match=r"TWINFLOW_SERVE__SSL_CERTFILE=.*a\.pem is not"):
        tls_options(settings)


def test_server_names_are_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINFLOW_TLS__SERVER_NAMES", '["broker.example", "10.0.0.7"]')
    assert load_settings().tls.server_names == ("broker.example", "10.0.0.7")
    message = _error(monkeypatch, tls__server_names='["a b"]')
    assert "'a b' is not a host name or IP address" in message
