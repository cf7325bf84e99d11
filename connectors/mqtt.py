"""MQTT client construction (paho-mqtt 2, MQTT v5)."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from twinflow.settings import MqttSettings

# CONNACK codes of a refused login, which retrying cannot fix: MQTT 5 "Bad User Name or
# Password" (0x86), "Not authorized" (0x87, Mosquitto's answer to a wrong password too)
# and "Bad authentication method" (0x8C); MQTT 3.1.1 return codes 4 and 5, the same two.
LOGIN_REFUSED = frozenset({0x86, 0x87, 0x8C, 4, 5})


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


def message_expiry(seconds: int) -> Properties:
    """PUBLISH properties that let the broker drop the message after ``seconds`` (>= 1).

    A broker holding it for an offline subscriber throws it away when it expires
    instead of handing a stale command to a machine that comes back later.
    """
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.MessageExpiryInterval = max(1, seconds)
    return properties


def login_refused(reason: ReasonCode | int) -> bool:
    """Whether a CONNACK ``reason`` says the broker refused the client's credentials.

    >>> login_refused(ReasonCode(PacketTypes.CONNACK, "Not authorized"))
    True
    >>> login_refused(ReasonCode(PacketTypes.CONNACK, "Server unavailable"))
    False
    >>> login_refused(4)
    True
    """
    if isinstance(reason, ReasonCode):
        return reason.packetType == PacketTypes.CONNACK and reason.value in LOGIN_REFUSED
    return reason in LOGIN_REFUSED


def login_hint(settings: MqttSettings) -> str:
    """What to fix when the broker refuses a login; never the password itself."""
    if settings.username is None:
        return (
            "it connected anonymously and the broker wants a login: set "
            "TWINFLOW_MQTT__USERNAME and TWINFLOW_MQTT__PASSWORD"
        )
    return (
        f"check TWINFLOW_MQTT__USERNAME (now {settings.username!r}) and "
        "TWINFLOW_MQTT__PASSWORD against the broker's users (Mosquitto: its password_file)"
    )
