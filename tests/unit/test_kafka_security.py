"""Kafka SASL/SCRAM: settings validation, client configuration, local broker config."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from pydantic import SecretStr

from connectors.kafka import KafkaAuthError, _ErrorWatch, auth_error, client_config
from twinflow.errors import ConfigError, ServiceError
from twinflow.services.kafka import (
    BROKER_USER,
    KafkaService,
    scram_argument,
    scram_stored_key,
)
from twinflow.settings import KafkaSettings, Settings, load_settings

PASSWORD = "pa55-w0rd-unit"


def _sasl(**changes: object) -> KafkaSettings:
    values: dict[str, object] = {
        "port": 19092,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_username": "alice",
        "sasl_password": SecretStr(PASSWORD),
        **changes,
    }
    return KafkaSettings.model_validate(values)


@pytest.fixture
def clean_kafka_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "TWINFLOW_CONFIG",
        "TWINFLOW_KAFKA__SECURITY_PROTOCOL",
        "TWINFLOW_KAFKA__SASL_MECHANISM",
        "TWINFLOW_KAFKA__SASL_USERNAME",
        "TWINFLOW_KAFKA__SASL_PASSWORD",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- settings -------------------------------------------------------------------------


def test_plaintext_is_the_default(clean_kafka_env: pytest.MonkeyPatch) -> None:
    kafka = load_settings().kafka
    assert kafka.security_protocol == "PLAINTEXT"
    assert not kafka.sasl
    assert kafka.sasl_username is None and kafka.sasl_password is None


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_sasl_without_credentials_fails_naming_both_variables(
    clean_kafka_env: pytest.MonkeyPatch, protocol: str
) -> None:
    clean_kafka_env.setenv("TWINFLOW_KAFKA__SECURITY_PROTOCOL", protocol)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert f"{protocol} needs a SCRAM user: set TWINFLOW_KAFKA__SASL_USERNAME" in message
    assert f"{protocol} needs a SCRAM password: set TWINFLOW_KAFKA__SASL_PASSWORD" in message


def test_missing_user_error_does_not_show_the_password(
    clean_kafka_env: pytest.MonkeyPatch,
) -> None:
    clean_kafka_env.setenv("TWINFLOW_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_kafka_env.setenv("TWINFLOW_KAFKA__SASL_PASSWORD", PASSWORD)
    with pytest.raises(ConfigError, match="TWINFLOW_KAFKA__SASL_USERNAME") as caught:
        load_settings()
    assert PASSWORD not in str(caught.value)
    assert "TWINFLOW_KAFKA__SASL_PASSWORD" not in str(caught.value)


def test_empty_password_is_refused(clean_kafka_env: pytest.MonkeyPatch) -> None:
    clean_kafka_env.setenv("TWINFLOW_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_kafka_env.setenv("TWINFLOW_KAFKA__SASL_USERNAME", "alice")
    clean_kafka_env.setenv("TWINFLOW_KAFKA__SASL_PASSWORD", "")
    with pytest.raises(ConfigError, match=r"kafka\.sasl_password .*SCRAM password"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("TWINFLOW_KAFKA__SECURITY_PROTOCOL", "SSL"),
        ("TWINFLOW_KAFKA__SASL_MECHANISM", "PLAIN"),
    ],
)
def test_unsupported_choices_are_refused(
    clean_kafka_env: pytest.MonkeyPatch, env: str, value: str
) -> None:
    clean_kafka_env.setenv(env, value)
    with pytest.raises(ConfigError, match=env):
        load_settings()


def test_kafka_password_is_masked(clean_kafka_env: pytest.MonkeyPatch) -> None:
    clean_kafka_env.setenv("TWINFLOW_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_kafka_env.setenv("TWINFLOW_KAFKA__SASL_USERNAME", "alice")
    clean_kafka_env.setenv("TWINFLOW_KAFKA__SASL_PASSWORD", PASSWORD)
    settings = load_settings()
    assert settings.masked()["kafka"]["sasl_password"] == "**********"
    assert settings.masked()["kafka"]["sasl_username"] == "alice"
    assert PASSWORD not in repr(settings.masked()) + repr(settings) + str(settings)


# --- client configuration -------------------------------------------------------------


def test_plaintext_client_config_is_unchanged() -> None:
    config = client_config(KafkaSettings(port=19092), acks="all")
    assert set(config) == {"bootstrap.servers", "logger", "acks"}
    assert config["bootstrap.servers"] == "127.0.0.1:19092"


def test_sasl_client_config() -> None:
    config = client_config(_sasl(sasl_mechanism="SCRAM-SHA-512"), **{"group.id": "g"})
    assert config["security.protocol"] == "SASL_PLAINTEXT"
    assert config["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "alice"
    assert config["sasl.password"] == PASSWORD
    assert config["group.id"] == "g"
    assert "ssl.ca.location" not in config


def test_sasl_ssl_client_config_uses_the_ca_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    config = client_config(
        _sasl(security_protocol="SASL_SSL", bootstrap_servers="kafka:9093", ssl_ca_file=ca)
    )
    assert config["security.protocol"] == "SASL_SSL"
    assert config["ssl.ca.location"] == str(ca)
    assert config["bootstrap.servers"] == "kafka:9093"


def test_auth_error_names_user_bootstrap_and_settings() -> None:
    error = auth_error(_sasl(), "SASL authentication error: invalid credentials")
    assert isinstance(error, KafkaAuthError)
    message = str(error)
    assert "authentication failed for user 'alice'" in message
    assert "at bootstrap 127.0.0.1:19092" in message
    assert "TWINFLOW_KAFKA__SASL_PASSWORD" in message
    assert PASSWORD not in message


def test_error_watch_keeps_the_first_authentication_failure() -> None:
    watch = _ErrorWatch()
    watch(KafkaError(KafkaError._TRANSPORT, "connection refused"))
    assert watch.auth is None
    watch(KafkaError(KafkaError._AUTHENTICATION, "first"))
    watch(KafkaError(KafkaError._AUTHENTICATION, "second"))
    watch(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert watch.auth is not None and watch.auth.str() == "first"
    assert watch.last is not None and watch.last.str() == "second"


# --- local broker ---------------------------------------------------------------------


def _service(tmp_path: Path, kafka: KafkaSettings) -> KafkaService:
    service = KafkaService(Settings(state_dir=tmp_path / "state", kafka=kafka))
    service.home.mkdir(parents=True)
    return service


def test_plaintext_broker_properties_have_no_sasl(tmp_path: Path) -> None:
    text = _service(tmp_path, KafkaSettings(port=19092))._server_properties()
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:9093\n" in text
    assert "sasl" not in text


def test_sasl_broker_properties(tmp_path: Path) -> None:
    text = _service(tmp_path, _sasl())._server_properties("broker-pw")
    lines = dict(line.split("=", 1) for line in text.splitlines())
    assert lines["listeners"] == "SASL_PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:9093"
    assert lines["advertised.listeners"] == "SASL_PLAINTEXT://127.0.0.1:19092"
    assert lines["listener.security.protocol.map"] == (
        "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT"
    )
    assert lines["inter.broker.listener.name"] == "SASL_PLAINTEXT"
    assert lines["sasl.enabled.mechanisms"] == "SCRAM-SHA-256"
    jaas = lines["listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config"]
    assert f'username="{BROKER_USER}" password="broker-pw";' in jaas
    assert PASSWORD not in text  # the client's password never reaches the broker's files


def test_scram_argument_carries_the_salted_password_only() -> None:
    argument = scram_argument("SCRAM-SHA-256", "alice", PASSWORD, b"0123456789abcdef", 8192)
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), b"0123456789abcdef", 8192)
    assert argument == (
        'SCRAM-SHA-256=[name=alice,iterations=8192,salt="MDEyMzQ1Njc4OWFiY2RlZg==",'
        f'saltedpassword="{base64.b64encode(salted).decode()}"]'
    )
    assert PASSWORD not in argument


def test_new_storage_gets_credentials_in_a_private_file(tmp_path: Path) -> None:
    service = _service(tmp_path, _sasl())
    broker_password, arguments = service._sasl_credentials(formatted=False)
    assert arguments[0::2] == ["--add-scram", "--add-scram"]
    assert arguments[1].startswith("SCRAM-SHA-256=[name=alice,")
    assert arguments[3].startswith(f"SCRAM-SHA-256=[name={BROKER_USER},")
    assert PASSWORD not in " ".join(arguments) and broker_password not in " ".join(arguments)
    record_file = service.home / "sasl.json"
    assert record_file.stat().st_mode & 0o777 == 0o600
    assert PASSWORD not in record_file.read_text()
    assert json.loads(record_file.read_text())["user"] == "alice"
    # A restart with the same settings reuses the broker's password and formats nothing.
    assert service._sasl_credentials(formatted=True) == (broker_password, [])


@pytest.mark.parametrize(
    "changes",
    [
        {"sasl_password": SecretStr("another-one")},
        {"sasl_username": "bob"},
        {"sasl_mechanism": "SCRAM-SHA-512"},
    ],
)
def test_formatted_storage_refuses_other_credentials(
    tmp_path: Path, changes: dict[str, object]
) -> None:
    _service(tmp_path, _sasl())._sasl_credentials(formatted=False)
    changed = KafkaService(Settings(state_dir=tmp_path / "state", kafka=_sasl(**changes)))
    with pytest.raises(ServiceError, match="TWINFLOW_KAFKA__SASL_PASSWORD") as caught:
        changed._sasl_credentials(formatted=True)
    assert "delete" in str(caught.value) and "another-one" not in str(caught.value)


def test_storage_formatted_without_sasl_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="formatted without the SASL users"):
        _service(tmp_path, _sasl())._sasl_credentials(formatted=True)


def test_local_broker_does_not_run_sasl_ssl(tmp_path: Path) -> None:
    service = _service(tmp_path, _sasl(security_protocol="SASL_SSL"))
    with pytest.raises(ServiceError, match="PLAINTEXT or SASL_PLAINTEXT, not SASL_SSL"):
        service._sasl_credentials(formatted=False)


@pytest.mark.parametrize("user", ["a,b", "x=y", 'q"', BROKER_USER])
def test_local_broker_refuses_usernames_it_cannot_store(tmp_path: Path, user: str) -> None:
    with pytest.raises(ServiceError, match="TWINFLOW_KAFKA__SASL_USERNAME"):
        _service(tmp_path, _sasl(sasl_username=user))._sasl_credentials(formatted=False)


def test_stored_key_depends_on_every_input() -> None:
    key = scram_stored_key("SCRAM-SHA-256", PASSWORD, b"salt", 4096)
    assert len(key) == 32
    assert key != scram_stored_key("SCRAM-SHA-256", PASSWORD + "x", b"salt", 4096)
    assert key != scram_stored_key("SCRAM-SHA-256", PASSWORD, b"salT", 4096)
    assert key != scram_stored_key("SCRAM-SHA-256", PASSWORD, b"salt", 4097)
