"""MQTT client construction (paho-mqtt 2, MQTT v5)."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from twinflow.settings import MqttSettings


def new_client(settings: MqttSettings, client_id: str) -> mqtt.Client:
    """An MQTT v5 client for ``settings``, credentials applied, not yet connected."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, password)
    return client


def session_properties(session_expiry_s: int, receive_maximum: int | None = None) -> Properties:
    """CONNECT properties of a persistent MQTT v5 session."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    return properties
