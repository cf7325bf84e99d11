"""Kafka client configuration shared by every producer, consumer and admin client."""

from __future__ import annotations

import logging
from typing import Any

from twinflow.settings import KafkaSettings

# librdkafka reports every refused connection while a broker starts; route those lines
# through logging instead of stderr so they show only at DEBUG.
_librdkafka_log = logging.getLogger("twinflow.librdkafka")


def client_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """Base confluent-kafka configuration for ``kafka``, plus librdkafka ``overrides``."""
    return {"bootstrap.servers": kafka.bootstrap, "logger": _librdkafka_log, **overrides}
