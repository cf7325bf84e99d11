"""MQTT client construction (paho-mqtt 2, MQTT v5)."""

from __future__ import annotations

import socket
import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from twinflow.errors import TwinflowError
from twinflow.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, MqttSettings

# CONNACK codes of a refused login, which retrying cannot fix: MQTT 5 "Bad User Name or
# Password" (0x86), "Not authorized" (0x87, Mosquitto's answer to a wrong password too)
# and "Bad authentication method" (0x8C); MQTT 3.1.1 return codes 4 and 5, the same two.
LOGIN_REFUSED = frozenset({0x86, 0x87, 0x8C, 4, 5})


_ENV = f"{ENV_PREFIX}MQTT{ENV_NESTED_DELIMITER}"


class MqttTlsError(TwinflowError):
    """The TLS handshake with the broker failed; retrying cannot help."""


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """The client TLS context of ``settings`` (which must have ``tls_ca_file``).

    It verifies the broker's certificate against ``tls_ca_file`` only, and its name
    against ``host``.
    """
    if settings.tls_ca_file is None:
        raise ValueError("tls_context needs settings with tls_ca_file")
    files = {"TLS_CA_FILE": settings.tls_ca_file, "TLS_CERT_FILE": settings.tls_cert_file}
    files["TLS_KEY_FILE"] = settings.tls_key_file
    for name, path in files.items():
        if path is not None and not path.is_file():
            raise MqttTlsError(
                f"{_ENV}{name}={path} is not an existing file; point it at the PEM file "
                "(twinflow up writes the local broker's CA to STATE_DIR/tls/ca.pem when "
                "mqtt.tls_port is set)"
            )
    try:
        context = ssl.create_default_context(cafile=str(settings.tls_ca_file))
        if settings.tls_cert_file is not None:
            context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    except ssl.SSLError as exc:
        raise MqttTlsError(
            f"cannot load the TLS files of {_ENV}TLS_CA_FILE / TLS_CERT_FILE / TLS_KEY_FILE: "
            f"{getattr(exc, 'reason', None) or exc}; they must be PEM"
        ) from None
    return context


def new_client(settings: MqttSettings, client_id: str) -> mqtt.Client:
    """An MQTT v5 client for ``settings``, credentials and TLS applied, not yet connected.

    Connect it to ``settings.host`` and ``settings.client_port``.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, password)
    if settings.tls:
        client.tls_set_context(tls_context(settings))
    return client


def tls_refusal(settings: MqttSettings, exc: OSError) -> str | None:
    """What to fix when connecting with ``settings`` raised ``exc``; None if not TLS's fault.

    >>> bad = ssl.SSLCertVerificationError(1, "certificate verify failed")
    >>> bad.verify_code, bad.verify_message = 20, "unable to get local issuer certificate"
    >>> print(tls_refusal(MqttSettings(tls_ca_file="/ca.pem", tls_port=8883), bad))
    ... # doctest: +NORMALIZE_WHITESPACE
    MQTT broker 127.0.0.1:8883 refused by TLS: its certificate is not signed by the CA in
    TWINFLOW_MQTT__TLS_CA_FILE (/ca.pem): unable to get local issuer certificate. Set it to
    the CA that signed the broker's certificate (the local broker's: STATE_DIR/tls/ca.pem).
    """
    where = f"MQTT broker {settings.host}:{settings.client_port} refused by TLS"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if exc.verify_code in _NAME_MISMATCH:
            return (
                f"{where}: its certificate is not issued for {settings.host!r} ({detail}). "
                f"Set {_ENV}HOST to a name in the certificate (for the local broker, one of "
                "TWINFLOW_TLS__SERVER_NAMES)."
            )
        return (
            f"{where}: its certificate is not signed by the CA in {_ENV}TLS_CA_FILE "
            f"({settings.tls_ca_file}): {detail}. Set it to the CA that signed the broker's "
            "certificate (the local broker's: STATE_DIR/tls/ca.pem)."
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"{where}: the TLS handshake failed ({getattr(exc, 'reason', None) or exc}). Is port "
            f"{settings.client_port} a TLS listener? Set {_ENV}TLS_PORT (or {_ENV}PORT) to "
            f"the broker's TLS port, or unset {_ENV}TLS_CA_FILE for a plain one."
        )
    return None


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})


def check_tls(settings: MqttSettings, timeout_s: float = 5.0) -> None:
    """Shake hands with the broker as ``settings``' clients will; raise what TLS refuses.

    paho retries a failed handshake of an asynchronous connect forever and tells
    nobody why; a client calls this first so a wrong CA or host name stops it at once.
    A broker that cannot be reached (yet) is left to the client's own retries.
    """
    if not settings.tls:
        return
    context = tls_context(settings)
    try:
        with (
            socket.create_connection((settings.host, settings.client_port), timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=settings.host),
        ):
            return
    except OSError as exc:
        refusal = tls_refusal(settings, exc)
        if refusal is not None:
            raise MqttTlsError(refusal) from None


def closed_before_connack_hint(settings: MqttSettings) -> str:
    """What to check when the broker hung up before answering CONNECT."""
    if settings.tls:
        return "the broker closed the connection before answering CONNECT"
    return (
        f"the broker closed the connection before answering CONNECT: if port "
        f"{settings.client_port} is a TLS listener, set {_ENV}TLS_CA_FILE (and "
        f"{_ENV}TLS_PORT) so twinflow's clients speak TLS"
    )


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
