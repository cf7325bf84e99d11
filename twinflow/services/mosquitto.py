"""Mosquitto from Debian's package, with its own config and persistence folder."""

from __future__ import annotations

import os
import pwd
import time

import paho.mqtt.client as mqtt

from connectors.mqtt import new_client
from twinflow.services.base import LocalService
from twinflow.services.process import port_accepts
from twinflow.services.provision import Progress, resolve_tool


class MosquittoService(LocalService):
    """An MQTT broker on loopback with persistence on."""

    name = "mosquitto"

    def ports(self) -> dict[str, int]:
        """The MQTT listener."""
        return {"mqtt.port": self.settings.mqtt.port}

    def endpoints(self) -> list[str]:
        """The broker URL."""
        return [f"mqtt://127.0.0.1:{self.settings.mqtt.port}"]

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
        return "\n".join(lines) + "\n"

    def prepare(self, progress: Progress) -> list[str]:
        """Install the Debian package if missing and write mosquitto.conf."""
        binary = resolve_tool("mosquitto", "mosquitto", progress)
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        config = self.home / "mosquitto.conf"
        config.write_text(self._config())
        return [binary, "-c", str(config.resolve())]

    def healthy(self) -> bool:
        """An MQTT CONNECT is acknowledged."""
        port = self.settings.mqtt.port
        if not port_accepts(port):
            return False
        client = new_client(self.settings.mqtt, client_id=f"twinflow-health-{os.getpid()}")
        try:
            client.connect(self.settings.mqtt.host, port, keepalive=10)
            deadline = time.monotonic() + 3
            while not client.is_connected() and time.monotonic() < deadline:
                client.loop(timeout=0.1)
            return client.is_connected()
        except (OSError, mqtt.WebsocketConnectionError):
            return False
        finally:
            client.disconnect()
