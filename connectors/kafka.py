"""Kafka clients: shared configuration, a producer that loses nothing, topic creation."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from twinflow.errors import TwinflowError
from twinflow.settings import KafkaSettings

# librdkafka reports every refused connection while a broker starts; route those lines
# through logging instead of stderr so they show only at DEBUG.
_librdkafka_log = logging.getLogger("twinflow.librdkafka")


class KafkaSetupError(TwinflowError):
    """A topic could not be created or exists with the wrong shape."""


class KafkaAuthError(KafkaSetupError):
    """The broker refused our SASL credentials; retrying cannot help."""


# Error codes that mean "these credentials (or this mechanism) are refused".
_AUTH_ERRORS = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})


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


class _ErrorWatch:
    """An ``error_cb`` that keeps the first authentication failure librdkafka reports."""

    def __init__(self) -> None:
        self.auth: KafkaError | None = None
        self.last: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        if error.code() != KafkaError._ALL_BROKERS_DOWN:  # says less than the one before
            self.last = error
        if self.auth is None and error.code() in _AUTH_ERRORS:
            self.auth = error


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
        if kafka.ssl_ca_file is not None:
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
            if errors.auth is not None:
                raise auth_error(kafka, errors.auth.str()) from None
            if time.monotonic() >= deadline:
                detail = errors.last.str() if errors.last is not None else failure.str()
                raise KafkaSetupError(
                    f"no answer from Kafka at bootstrap {kafka.bootstrap} ({detail}). Is it "
                    "running (twinflow status)? Does TWINFLOW_KAFKA__SECURITY_PROTOCOL "
                    f"({kafka.security_protocol}) match its listener?"
                ) from None
            time.sleep(0.1)


def ensure_topics(kafka: KafkaSettings, specs: Iterable[TopicSpec], timeout_s: float = 30) -> None:
    """Create missing topics; refuse an existing one with a different partition count.

    Raises :class:`KafkaAuthError` within about a second when the broker refuses the
    credentials, and :class:`KafkaSetupError` when it cannot be reached in ``timeout_s``.
    """
    errors = _ErrorWatch()
    admin = AdminClient(client_config(kafka, error_cb=errors))
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
    # a moment to appear in the broker's metadata.
    deadline = time.monotonic() + timeout_s
    topics = _metadata(admin, kafka, errors, deadline).topics
    while not wanted.keys() <= topics.keys():
        if time.monotonic() > deadline:
            absent = sorted(wanted.keys() - topics.keys())
            raise KafkaSetupError(f"topics {absent} did not appear within {timeout_s:g} s")
        time.sleep(0.1)
        topics = _metadata(admin, kafka, errors, deadline).topics
    for name, spec in wanted.items():
        actual = len(topics[name].partitions)
        if actual != spec.partitions:
            raise KafkaSetupError(
                f"topic {name} has {actual} partitions, twinflow expects {spec.partitions}; "
                "delete the topic or change the partition setting to match"
            )
