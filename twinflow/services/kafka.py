"""Apache Kafka in KRaft mode (one combined broker+controller node) from Maven jars."""

from __future__ import annotations

import base64
import subprocess
import uuid

from confluent_kafka.admin import AdminClient

from connectors.kafka import client_config
from twinflow.errors import ServiceError
from twinflow.services.base import LocalService
from twinflow.services.process import port_accepts
from twinflow.services.provision import (
    INFRA_DIR,
    Progress,
    resolve_jars,
    resolve_java,
    resolve_tool,
)

NODE_ID = 1


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding.

    >>> len(new_cluster_id())
    22
    """
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class KafkaService(LocalService):
    """A single-node Kafka for development, tests and benchmarks."""

    name = "kafka"

    def ports(self) -> dict[str, int]:
        """Client and controller listeners."""
        kafka = self.settings.kafka
        return {"kafka.port": kafka.port, "kafka.controller_port": kafka.controller_port}

    def endpoints(self) -> list[str]:
        """The bootstrap address."""
        return [f"bootstrap 127.0.0.1:{self.settings.kafka.port}"]

    def _server_properties(self) -> str:
        kafka = self.settings.kafka
        data_dir = (self.home / "data").resolve()
        properties = {
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
        return "".join(f"{key}={value}\n" for key, value in properties.items())

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
        config = self.home / "server.properties"
        config.write_text(self._server_properties())
        classpath = f"{lib.resolve()}/*"
        java_argv = [
            java,
            "-Xms128m",
            f"-Xmx{self.settings.kafka.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={INFRA_DIR / 'kafka' / 'log4j2.yaml'}",
            "-cp",
            classpath,
        ]
        if not (self.home / "data" / "meta.properties").exists():
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
            result = subprocess.run(format_argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise ServiceError(
                    f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}"
                )
        return [*java_argv, "kafka.Kafka", str(config)]

    def healthy(self) -> bool:
        """A metadata request is answered with this broker in it."""
        if not port_accepts(self.settings.kafka.port):
            return False
        admin = AdminClient(client_config(self.settings.kafka))
        try:
            metadata = admin.list_topics(timeout=3)
        except Exception:  # any failure means "not healthy yet"
            return False
        return bool(metadata.brokers)
