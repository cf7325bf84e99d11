"""Mosquitto from Debian's package, with its own config and persistence folder."""

from __future__ import annotations

import os
import pwd
import time

import paho.mqtt.client as mqtt

from connectors.mqtt import MqttTlsError, new_client
from twinflow.services.base import LocalService
from twinflow.services.process import port_accepts
from twinflow.services.provision import Progress, resolve_tool
from twinflow.services.tls import local_certificates, tls_files
from twinflow.settings import MqttSettings


class MosquittoService(LocalService):
    """An MQTT broker on loopback with persistence on."""

    name = "mosquitto"

    def ports(self) -> dict[str, int]:
        """The MQTT listener, and the TLS one when it is configured."""
        mqtt_settings = self.settings.mqtt
        ports = {"mqtt.port": mqtt_settings.port}
        if mqtt_settings.tls_port is not None:
            ports["mqtt.tls_port"] = mqtt_settings.tls_port
        return ports

    def endpoints(self) -> list[str]:
        """The broker URLs."""
        mqtt_settings = self.settings.mqtt
        urls = [f"mqtt://127.0.0.1:{mqtt_settings.port}"]
        if mqtt_settings.tls_port is not None:
            urls.append(f"mqtts://127.0.0.1:{mqtt_settings.tls_port}")
        return urls

    def _config(self) -> str:
        mqtt_settings = self.settings.mqtt
        data_dir = (self.home / "data").resolve()
        lines = [
            # Mosquitto drops root privileges to this user; keep ours so it can write the
            # private state folder.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            f"listener {mqtt_settings.port} 127.0.0.1",
            # With a password file every client must log in; the ACL then limits topics.
            f"allow_anonymous {'true' if mqtt_settings.password_file is None else 'false'}",
            "persistence true",
            f"persistence_location {data_dir}/",
            "autosave_interval 10",
            f"max_queued_messages {mqtt_settings.max_queued_messages}",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages false",
        ]
        if mqtt_settings.password_file is not None:
            lines.append(f"password_file {mqtt_settings.password_file.resolve()}")
        if mqtt_settings.acl_file is not None:
            lines.append(f"acl_file {mqtt_settings.acl_file.resolve()}")
        if mqtt_settings.tls_port is not None:
            # Logins and the ACL above are global (no per_listener_settings): the TLS
            # listener refuses the same clients the plain one does.
            files = tls_files(self.settings.state_dir.resolve())
            lines += [
                f"listener {mqtt_settings.tls_port} 127.0.0.1",
                f"cafile {files.ca}",
                f"certfile {files.chain}",
                f"keyfile {files.key}",
                "tls_version tlsv1.2",
            ]
        return "\n".join(lines) + "\n"

    def prepare(self, progress: Progress) -> list[str]:
        """Install the Debian package if missing and write mosquitto.conf."""
        binary = resolve_tool("mosquitto", "mosquitto", progress)
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        if self.settings.mqtt.tls_port is not None:
            local_certificates(self.settings.state_dir, self.settings.tls.server_names, progress)
        config = self.home / "mosquitto.conf"
        config.write_text(self._config())
        return [binary, "-c", str(config.resolve())]

    def healthy(self) -> bool:
        """An MQTT CONNECT is acknowledged on every listener (over TLS on the TLS one)."""
        mqtt_settings = self.settings.mqtt
        plain = mqtt_settings.model_copy(
            update={"tls_ca_file": None, "tls_cert_file": None, "tls_key_file": None}
        )
        if not _connack(plain, mqtt_settings.port):
            return False
        if mqtt_settings.tls_port is None:
            return True
        # Trust exactly the local CA; the host name is the clients' business
        # (tls.server_names), the listener's health is not.
        secured = mqtt_settings.model_copy(
            update={"tls_ca_file": tls_files(self.settings.state_dir).ca}
        )
        return _connack(secured, mqtt_settings.tls_port)


def _connack(mqtt_settings: MqttSettings, port: int) -> bool:
    if not port_accepts(port):
        return False
    try:
        client = new_client(mqtt_settings, client_id=f"twinflow-health-{os.getpid()}")
    except MqttTlsError:  # the CA file is not written yet
        return False
    if mqtt_settings.tls:
        client.tls_insecure_set(True)
    try:
        client.connect(mqtt_settings.host, port, keepalive=10)
        deadline = time.monotonic() + 3
        while not client.is_connected() and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        return client.is_connected()
    except (OSError, mqtt.WebsocketConnectionError):
        return False
    finally:
        client.disconnect()
