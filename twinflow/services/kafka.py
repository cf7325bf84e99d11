"""Apache Kafka in KRaft mode (one combined broker+controller node) from Maven jars."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import subprocess
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from connectors.kafka import client_config
from twinflow.errors import ServiceError
from twinflow.services.base import LocalService
from twinflow.services.process import port_accepts
from twinflow.services.provision import (
    INFRA_DIR,
    Progress,
    heap_options,
    resolve_jars,
    resolve_java,
    resolve_tool,
)
from twinflow.services.tls import local_certificates, tls_files
from twinflow.settings import KafkaSettings

NODE_ID = 1
SASL_LISTENER = "SASL_PLAINTEXT"
TLS_LISTENER = "SASL_SSL"
BROKER_USER = "twinflow-broker"
"""The local broker's own SCRAM user (inter-broker listener); its password is random."""
SCRAM_ITERATIONS = 8192
_SCRAM_HASH = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
# Characters StorageTool's --add-scram parser and the JAAS line pass through unharmed.
_SCRAM_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,255}$")


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding.

    >>> len(new_cluster_id())
    22
    """
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scram_stored_key(mechanism: str, password: str, salt: bytes, iterations: int) -> bytes:
    """RFC 5802 StoredKey: what a SCRAM server keeps to check a password.

    >>> len(scram_stored_key("SCRAM-SHA-512", "pencil", b"salt", 4096))
    64
    """
    name = _SCRAM_HASH[mechanism]
    salted = hashlib.pbkdf2_hmac(name, password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", name).digest()
    return hashlib.new(name, client_key).digest()


def scram_argument(mechanism: str, user: str, password: str, salt: bytes, iterations: int) -> str:
    """A StorageTool ``--add-scram`` value carrying the salted password, not the password.

    >>> scram_argument("SCRAM-SHA-256", "alice", "pw", b"salt", 4096)[:57]
    'SCRAM-SHA-256=[name=alice,iterations=4096,salt="c2FsdA=="'
    """
    salted = hashlib.pbkdf2_hmac(_SCRAM_HASH[mechanism], password.encode(), salt, iterations)
    return (
        f'{mechanism}=[name={user},iterations={iterations},salt="{_b64(salt)}",'
        f'saltedpassword="{_b64(salted)}"]'
    )


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (mode 0600 from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode otherwise
        file.write(text)


class KafkaService(LocalService):
    """A single-node Kafka for development, tests and benchmarks."""

    name = "kafka"

    def ports(self) -> dict[str, int]:
        """Client and controller listeners, and the SASL_SSL one when it is configured."""
        kafka = self.settings.kafka
        ports = {"kafka.port": kafka.port, "kafka.controller_port": kafka.controller_port}
        if kafka.ssl_port is not None:
            ports["kafka.ssl_port"] = kafka.ssl_port
        return ports

    def endpoints(self) -> list[str]:
        """The bootstrap addresses (and how clients authenticate)."""
        kafka = self.settings.kafka
        if not kafka.sasl:
            return [f"bootstrap 127.0.0.1:{kafka.port}"]
        login = f"{kafka.sasl_mechanism}, {kafka.sasl_username}"
        addresses = [f"bootstrap 127.0.0.1:{kafka.port} ({SASL_LISTENER} {login})"]
        if kafka.ssl_port is not None:
            addresses.append(f"bootstrap 127.0.0.1:{kafka.ssl_port} ({TLS_LISTENER} {login})")
        return addresses

    @property
    def _keystore(self) -> Path:
        # Kafka's PEM key store: the server key and its chain in one file (mode 0600).
        return self.home / "keystore.pem"

    @property
    def _sasl_file(self) -> Path:
        # The broker user's password and the client user's StoredKey (mode 0600).
        return self.home / "sasl.json"

    def _server_properties(self, broker_password: str | None = None) -> str:
        kafka = self.settings.kafka
        data_dir = (self.home / "data").resolve()
        properties: dict[str, Any] = {
            "process.roles": "broker,controller",
            "node.id": NODE_ID,
            # Static voters (not a formatted dynamic quorum) keep the ports changeable.
            "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{kafka.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{kafka.port},CONTROLLER://127.0.0.1:{kafka.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{kafka.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data_dir),
            "num.partitions": kafka.default_partitions,
            # Topics are created up front by twinflow; a typo must not create a topic.
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
        }
        if broker_password is not None:
            properties.update(self._sasl_properties(broker_password))
        return "".join(f"{key}={value}\n" for key, value in properties.items())

    def _sasl_properties(self, broker_password: str) -> dict[str, Any]:
        """Listener settings for SASL/SCRAM clients.

        The client listener becomes SASL_PLAINTEXT/SCRAM; the controller stays loopback
        PLAINTEXT; inter-broker traffic goes through the SASL listener as BROKER_USER.
        """
        kafka = self.settings.kafka
        mechanism = kafka.sasl_mechanism
        login = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{BROKER_USER}" password="{broker_password}";'
        )
        properties: dict[str, Any] = {
            "listeners": (
                f"{SASL_LISTENER}://127.0.0.1:{kafka.port},"
                f"CONTROLLER://127.0.0.1:{kafka.controller_port}"
            ),
            "advertised.listeners": f"{SASL_LISTENER}://127.0.0.1:{kafka.port}",
            "inter.broker.listener.name": SASL_LISTENER,
            "listener.security.protocol.map": (
                f"{SASL_LISTENER}:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": mechanism,
            "sasl.mechanism.inter.broker.protocol": mechanism,
            f"listener.name.{SASL_LISTENER.lower()}.{mechanism.lower()}.sasl.jaas.config": login,
        }
        if kafka.ssl_port is not None:
            properties.update(self._tls_properties(properties, login))
        return properties

    def _tls_properties(self, sasl: dict[str, Any], login: str) -> dict[str, Any]:
        """A SASL_SSL listener on ssl_port beside the SASL_PLAINTEXT one.

        Inter-broker traffic stays on the loopback SASL_PLAINTEXT listener, so the broker
        never checks its own certificate's names (tls.server_names may not list
        127.0.0.1).
        """
        kafka = self.settings.kafka
        files = tls_files(self.settings.state_dir.resolve())
        mechanism = kafka.sasl_mechanism.lower()
        listener = f"{TLS_LISTENER}://127.0.0.1:{kafka.ssl_port}"
        return {
            "listeners": f"{sasl['listeners']},{listener}",
            "advertised.listeners": f"{sasl['advertised.listeners']},{listener}",
            "listener.security.protocol.map": (
                f"{sasl['listener.security.protocol.map']},{TLS_LISTENER}:SASL_SSL"
            ),
            f"listener.name.{TLS_LISTENER.lower()}.{mechanism}.sasl.jaas.config": login,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self._keystore.resolve()),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(files.ca),
            "ssl.client.auth": "none",
            "ssl.enabled.protocols": "TLSv1.3,TLSv1.2",
        }

    def _write_keystore(self, progress: Progress) -> None:
        files = local_certificates(
            self.settings.state_dir, self.settings.tls.server_names, progress
        )
        text = files.key.read_text() + files.chain.read_text()
        write_private(self._keystore, text)

    def _sasl_credentials(self, formatted: bool) -> tuple[str, list[str]]:
        """The broker user's password and the ``--add-scram`` arguments for a format.

        A new storage gets fresh credentials. A formatted one keeps those it was formatted
        with (SCRAM users live in the metadata log); settings that no longer match them
        are refused here, before the broker starts and every client fails to log in.
        """
        kafka = self.settings.kafka
        user = kafka.sasl_username or ""
        password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else ""
        if kafka.security_protocol == "SASL_SSL" and kafka.ssl_port is None:
            raise ServiceError(
                f"the local broker runs PLAINTEXT or SASL_PLAINTEXT, not "
                f"{kafka.security_protocol}, unless it has a TLS listener: set "
                "TWINFLOW_KAFKA__SSL_PORT for a SASL_SSL listener beside kafka.port, or point "
                "TWINFLOW_KAFKA__BOOTSTRAP_SERVERS at a TLS broker and do not start the local one"
            )
        if not _SCRAM_NAME.match(user) or user == BROKER_USER:
            raise ServiceError(
                f"TWINFLOW_KAFKA__SASL_USERNAME {user!r} cannot be a user of the local broker: "
                f"use letters, digits and . _ @ - only, and not {BROKER_USER!r}"
            )
        mechanism = kafka.sasl_mechanism
        if formatted:
            return self._check_formatted_credentials(mechanism, user, password), []
        broker_password = secrets.token_urlsafe(32)
        salt, broker_salt = secrets.token_bytes(16), secrets.token_bytes(16)
        record = {
            "mechanism": mechanism,
            "broker_password": broker_password,
            "user": user,
            "salt": _b64(salt),
            "iterations": SCRAM_ITERATIONS,
            "stored_key": _b64(scram_stored_key(mechanism, password, salt, SCRAM_ITERATIONS)),
        }
        write_private(self._sasl_file, json.dumps(record, indent=2) + "\n")
        scram = [
            scram_argument(mechanism, user, password, salt, SCRAM_ITERATIONS),
            scram_argument(mechanism, BROKER_USER, broker_password, broker_salt, SCRAM_ITERATIONS),
        ]
        return broker_password, [arg for value in scram for arg in ("--add-scram", value)]

    def _check_formatted_credentials(self, mechanism: str, user: str, password: str) -> str:
        data_dir = self.home / "data"
        reformat = (
            f"Set TWINFLOW_KAFKA__SASL_USERNAME, TWINFLOW_KAFKA__SASL_PASSWORD and "
            f"TWINFLOW_KAFKA__SASL_MECHANISM back to the values the storage was formatted "
            f"with, or stop Kafka and delete {data_dir} to format it anew (this deletes "
            f"every topic)."
        )
        try:
            record = json.loads(self._sasl_file.read_text())
            salt, stored_key = base64.b64decode(record["salt"]), record["stored_key"]
            formatted_for = (str(record["mechanism"]), str(record["user"]))
            iterations, broker_password = int(record["iterations"]), str(record["broker_password"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ServiceError(
                f"the local Kafka storage {data_dir} was formatted without the SASL users "
                f"twinflow records in {self._sasl_file} (formatted for PLAINTEXT?), so "
                f"SASL_PLAINTEXT clients cannot log in. {reformat}"
            ) from None
        stored = scram_stored_key(mechanism, password, salt, iterations)
        if formatted_for != (mechanism, user) or not hmac.compare_digest(
            stored, base64.b64decode(stored_key)
        ):
            raise ServiceError(
                f"the local Kafka storage {data_dir} holds SCRAM credentials for "
                f"{formatted_for[0]} user {formatted_for[1]!r}; the settings ({mechanism}, "
                f"user {user!r} and its password) do not match them. {reformat}"
            )
        return broker_password

    def prepare(self, progress: Progress) -> list[str]:
        """Fetch the jars, write server.properties, format the storage once."""
        java = resolve_java(self.settings.services.java, progress)
        lib = self.settings.jar_dir / "kafka"
        resolve_jars(
            resolve_tool(self.settings.services.maven, "TWINFLOW_SERVICES__MAVEN", progress),
            INFRA_DIR / "maven" / "kafka" / "pom.xml",
            lib,
            progress,
        )
        self.home.mkdir(parents=True, exist_ok=True)
        formatted = (self.home / "data" / "meta.properties").exists()
        broker_password: str | None = None
        add_scram: list[str] = []
        if self.settings.kafka.sasl:
            broker_password, add_scram = self._sasl_credentials(formatted)
        if self.settings.kafka.ssl_port is not None:
            self._write_keystore(progress)
        config = self.home / "server.properties"
        write_private(config, self._server_properties(broker_password))
        classpath = f"{lib.resolve()}/*"
        java_argv = [
            java,
            *heap_options(self.settings.kafka.heap),
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={INFRA_DIR / 'kafka' / 'log4j2.yaml'}",
            "-cp",
            classpath,
        ]
        if not formatted:
            progress("formatting Kafka storage (first run only)")
            format_argv = [
                *java_argv,
                "kafka.tools.StorageTool",
                "format",
                # One argument: an id starting with "-" (1 in 64) would read as an option.
                f"--cluster-id={new_cluster_id()}",
                "--config",
                str(config),
            ]
            # SCRAM users go in an argument file (argparse's @file), never on a command
            # line other local users can read in /proc.
            scram_file = self.home / "format-scram.args"
            if add_scram:
                write_private(scram_file, "".join(f"{arg}\n" for arg in add_scram))
                format_argv.append(f"@{scram_file}")
            try:
                result = subprocess.run(format_argv, capture_output=True, text=True, check=False)
            finally:
                scram_file.unlink(missing_ok=True)
            if result.returncode != 0:
                raise ServiceError(
                    f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}"
                )
        return [*java_argv, "kafka.Kafka", str(config)]

    def healthy(self) -> bool:
        """Every client listener answers a metadata request with this broker in it.

        The SASL_SSL one is asked over TLS.
        """
        kafka = self.settings.kafka
        if kafka.ssl_port is None:
            return _answers(kafka.port, kafka)
        plain = kafka.model_copy(update={"security_protocol": SASL_LISTENER})
        if not _answers(kafka.port, plain):
            return False
        secured = kafka.model_copy(
            update={
                "security_protocol": TLS_LISTENER,
                "bootstrap_servers": f"127.0.0.1:{kafka.ssl_port}",
                "ssl_ca_file": tls_files(self.settings.state_dir).ca,
            }
        )
        # Trust exactly the local CA; the host name is the clients' business
        # (tls.server_names), the listener's health is not.
        return _answers(
            kafka.ssl_port, secured, **{"ssl.endpoint.identification.algorithm": "none"}
        )


def _answers(port: int, kafka: KafkaSettings, **overrides: Any) -> bool:
    if not port_accepts(port):
        return False
    try:
        admin = AdminClient(client_config(kafka, **overrides))
        metadata = admin.list_topics(timeout=3)
    except Exception:  # any failure means "not healthy yet"
        return False
    return bool(metadata.brokers)
