"""Kafka clients: shared configuration, a producer that loses nothing, topic creation."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic, TopicMetadata

from twinflow.errors import TwinflowError
from twinflow.settings import KafkaSettings

# librdkafka reports every refused connection while a broker starts; route those lines
# through logging instead of stderr so they show only at DEBUG.
_librdkafka_log = logging.getLogger("twinflow.librdkafka")


class KafkaSetupError(TwinflowError):
    """A topic could not be created or exists with the wrong shape."""


class KafkaAuthError(KafkaSetupError):
    """The broker refused our SASL credentials; retrying cannot help."""


class KafkaTlsError(KafkaAuthError):
    """The TLS handshake with the broker failed (CA, host name or protocol).

    Retrying cannot help.
    """


# Error codes that mean "these credentials (or this mechanism) are refused".
_AUTH_ERRORS = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})
# librdkafka's words (in error_cb and its log) for connections a TLS mismatch ends. A
# refused certificate is final; a dropped connection can also be a broker going down,
# but a TLS mismatch drops every attempt, so it must repeat.
_CERTIFICATE_REFUSED = ("certificate verify failed", "could not be verified")
_TLS_DROPPED = ("SSL handshake failed", "in state APIVERSION_QUERY")
_TLS_DROPPED_REPEATS = 3
_BROKER_PREFIX = re.compile(r"^\S+://\S+: ")
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})


def auth_error(kafka: KafkaSettings, reason: str) -> KafkaAuthError:
    """The error to raise when the broker refuses to authenticate ``kafka``'s client."""
    if kafka.sasl:
        who = f"user {kafka.sasl_username!r} ({kafka.security_protocol} {kafka.sasl_mechanism})"
        fix = (
            "Fix TWINFLOW_KAFKA__SASL_USERNAME and TWINFLOW_KAFKA__SASL_PASSWORD (and "
            "TWINFLOW_KAFKA__SASL_MECHANISM) to match a user the broker knows"
        )
    else:
        who = f"an unauthenticated client ({kafka.security_protocol})"
        fix = (
            "Set TWINFLOW_KAFKA__SECURITY_PROTOCOL to the broker's listener protocol and "
            "TWINFLOW_KAFKA__SASL_USERNAME / TWINFLOW_KAFKA__SASL_PASSWORD"
        )
    return KafkaAuthError(
        f"Kafka authentication failed for {who} at bootstrap {kafka.bootstrap}: {reason}. {fix}."
    )


def tls_error(kafka: KafkaSettings, reason: str) -> KafkaTlsError:
    """The error to raise when the TLS handshake of ``kafka``'s client failed."""
    env = "TWINFLOW_KAFKA__"
    where = f"Kafka at bootstrap {kafka.bootstrap}"
    if not kafka.tls:
        return KafkaTlsError(
            f"{where} dropped the connection of a {kafka.security_protocol} client: the port "
            f"is a TLS listener ({reason}). Set {env}SECURITY_PROTOCOL=SASL_SSL and "
            f"{env}SSL_CA_FILE (the local broker's SASL_SSL port is {env}SSL_PORT)."
        )
    ca = kafka.ssl_ca_file or "the system's CAs"
    refused = _verify_failure(kafka)
    if refused is not None:
        reason = f"{reason} ({refused.verify_message})"
    if (refused is not None and refused.verify_code in _NAME_MISMATCH) or (
        refused is None and "mismatch" in reason.lower()
    ):
        fix = (
            f"The broker's certificate does not name the host in the bootstrap address: "
            f"connect by a name it is issued for ({env}BOOTSTRAP_SERVERS; for the local "
            "broker, one of TWINFLOW_TLS__SERVER_NAMES)"
        )
    elif refused is not None or any(words in reason for words in _CERTIFICATE_REFUSED):
        fix = (
            f"The broker's certificate is not signed by a CA in {env}SSL_CA_FILE ({ca}): set "
            "it to the CA that signed it (the local broker's: STATE_DIR/tls/ca.pem)"
        )
    else:
        fix = (
            f"Is it a TLS listener? {env}SECURITY_PROTOCOL is SASL_SSL; a plain listener "
            f"needs SASL_PLAINTEXT, and the local broker's SASL_SSL port is {env}SSL_PORT"
        )
    return KafkaTlsError(f"TLS handshake with {where} failed: {reason}. {fix}.")


def _verify_failure(kafka: KafkaSettings) -> ssl.SSLCertVerificationError | None:
    """Why Python's TLS refuses the first bootstrap broker's certificate, if it does.

    librdkafka says only "certificate verify failed"; OpenSSL's own reason tells a
    wrong CA from a wrong host name.
    """
    host, _, port = kafka.bootstrap.split(",")[0].rpartition(":")
    try:
        context = ssl.create_default_context(
            cafile=str(kafka.ssl_ca_file) if kafka.ssl_ca_file else None
        )
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname=host.strip("[]")),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        return exc
    except (OSError, ValueError):
        return None


class _ErrorWatch:
    """An ``error_cb`` and ``logger`` keeping the first authentication or TLS failure."""

    def __init__(self) -> None:
        self.auth: KafkaError | None = None
        self.tls: str | None = None
        self.last: KafkaError | None = None
        self._dropped = 0

    def __call__(self, error: KafkaError) -> None:
        if error.code() != KafkaError._ALL_BROKERS_DOWN:  # says less than the one before
            self.last = error
        if self.auth is None and error.code() in _AUTH_ERRORS:
            self.auth = error
        self._check_tls(error.str(), final=error.code() == KafkaError._SSL)

    def log(self, level: int, message: str, *args: object) -> None:
        """Pass a librdkafka log line on, and read it for TLS failures.

        librdkafka reports a connection dropped during its first request only here.
        """
        _librdkafka_log.log(level, message, *args)
        self._check_tls(str(args[-1]) if args else message)  # the line, without its tags

    def _check_tls(self, text: str, final: bool = False) -> None:
        if self.tls is not None:
            return
        # "sasl_ssl://host:port/bootstrap: SSL handshake failed: ..., verify that
        # ssl.ca.location ...": the broker is named by the caller, the librdkafka
        # setting would mislead.
        reason = _BROKER_PREFIX.sub("", text).split(", verify that ssl.ca.location")[0]
        if final or any(words in text for words in _CERTIFICATE_REFUSED):
            self.tls = reason
        elif any(words in text for words in _TLS_DROPPED):
            self._dropped += 1
            if self._dropped >= _TLS_DROPPED_REPEATS:
                self.tls = reason

    def refusal(self, kafka: KafkaSettings) -> KafkaAuthError | None:
        """The error to raise for what was seen so far, if retrying cannot help."""
        if self.auth is not None:
            return auth_error(kafka, self.auth.str())
        if self.tls is not None:
            return tls_error(kafka, self.tls)
        return None


def client_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """Base confluent-kafka configuration for ``kafka``, plus librdkafka ``overrides``.

    With SASL it holds the password in clear text: never log it.
    """
    config: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap, "logger": _librdkafka_log}
    if kafka.sasl:
        config["security.protocol"] = kafka.security_protocol
        config["sasl.mechanisms"] = kafka.sasl_mechanism
        config["sasl.username"] = kafka.sasl_username
        config["sasl.password"] = (
            kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
        )
    if kafka.tls and kafka.ssl_ca_file is not None:
        config["ssl.ca.location"] = str(kafka.ssl_ca_file)
    return {**config, **overrides}


def reliable_producer(kafka: KafkaSettings, **overrides: Any) -> Producer:
    """An idempotent producer with acks=all: no loss, no duplicates from its own retries.

    Callers must still check every delivery report: librdkafka gives up on a message
    after ``message.timeout.ms`` and says so only there.
    """
    config = client_config(
        kafka,
        **{
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000,
            **overrides,
        },
    )
    return Producer(config)


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """One message for a Kafka sink."""

    topic: str
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class TopicSpec:
    """A topic twinflow creates up front."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def _metadata(
    admin: AdminClient, kafka: KafkaSettings, errors: _ErrorWatch, deadline: float
) -> ClusterMetadata:
    """Cluster metadata, asked for in short slices so a refused login ends the wait at once.

    librdkafka retries a failed SASL handshake forever and reports it only to error_cb.
    """
    while True:
        try:
            return admin.list_topics(timeout=max(0.1, min(0.5, deadline - time.monotonic())))
        except KafkaException as exc:
            failure: KafkaError = exc.args[0]
            admin.poll(0)  # serves error_cb
            if failure.code() in _AUTH_ERRORS:
                raise auth_error(kafka, failure.str()) from None
            if failure.code() == KafkaError._SSL:
                raise tls_error(kafka, failure.str()) from None
            refusal = errors.refusal(kafka)
            if refusal is not None:
                raise refusal from None
            if time.monotonic() >= deadline:
                detail = errors.last.str() if errors.last is not None else failure.str()
                raise KafkaSetupError(
                    f"no answer from Kafka at bootstrap {kafka.bootstrap} ({detail}). Is it "
                    "running (twinflow status)? Does TWINFLOW_KAFKA__SECURITY_PROTOCOL "
                    f"({kafka.security_protocol}) match its listener?"
                ) from None
            time.sleep(0.1)


def _led(topic: TopicMetadata | None) -> bool:
    """Whether a topic is in the metadata with a leader for each of its partitions."""
    return (
        topic is not None
        and topic.error is None
        and bool(topic.partitions)
        and all(partition.leader >= 0 for partition in topic.partitions.values())
    )


def ensure_topics(kafka: KafkaSettings, specs: Iterable[TopicSpec], timeout_s: float = 30) -> None:
    """Create missing topics; refuse an existing one with a different partition count.

    Raises :class:`KafkaAuthError` within about a second when the broker refuses the
    credentials (:class:`KafkaTlsError` when the TLS handshake fails), and
    :class:`KafkaSetupError` when it cannot be reached in ``timeout_s``.
    """
    if kafka.tls and kafka.ssl_ca_file is not None and not kafka.ssl_ca_file.is_file():
        # librdkafka would refuse to create the client, naming its own option.
        raise KafkaTlsError(
            f"TWINFLOW_KAFKA__SSL_CA_FILE={kafka.ssl_ca_file} is not an existing file; point "
            "it at the PEM CA of the broker's certificate (twinflow up writes the local "
            "broker's to STATE_DIR/tls/ca.pem when kafka.ssl_port is set)"
        )
    errors = _ErrorWatch()
    admin = AdminClient(client_config(kafka, error_cb=errors, logger=errors))
    wanted = {spec.name: spec for spec in specs}
    existing = _metadata(admin, kafka, errors, time.monotonic() + timeout_s).topics
    missing = [spec for name, spec in wanted.items() if name not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=-1,
                    config=spec.config,
                )
                for spec in missing
            ],
            operation_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                if exc.args[0].code() in _AUTH_ERRORS:
                    raise auth_error(kafka, exc.args[0].str()) from None
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise KafkaSetupError(f"cannot create topic {name}: {exc}") from None
    # A topic just created (here, or by a bridge and a flow starting together) can take
    # a moment to appear in the broker's metadata, and its partitions a moment more to
    # have a leader there. A client that looks it up in that gap may not see a partition
    # until its next metadata refresh, minutes later: a flow started then stalled.
    deadline = time.monotonic() + timeout_s
    topics = _metadata(admin, kafka, errors, deadline).topics
    while unready := sorted(name for name in wanted if not _led(topics.get(name))):
        if time.monotonic() > deadline:
            raise KafkaSetupError(
                f"topics {unready} did not appear with a leader for every partition "
                f"within {timeout_s:g} s"
            )
        time.sleep(0.1)
        topics = _metadata(admin, kafka, errors, deadline).topics
    for name, spec in wanted.items():
        actual = len(topics[name].partitions)
        if actual != spec.partitions:
            raise KafkaSetupError(
                f"topic {name} has {actual} partitions, twinflow expects {spec.partitions}; "
                "delete the topic or change the partition setting to match"
            )


_UNAVAILABLE = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
    }
)


def broker_unavailable(error: KafkaError) -> bool:
    """Whether an error is for want of a broker (down, restarting, no leader yet).

    Waiting and trying again can cure it, unlike a refusal.
    """
    return not error.fatal() and (error.code() in _UNAVAILABLE or error.retriable())
