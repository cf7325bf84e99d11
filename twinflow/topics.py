"""The Kafka topics twinflow creates up front (auto-creation is off on its brokers)."""

from __future__ import annotations

from connectors.kafka import TopicSpec
from twinflow.settings import TopicSettings


def ingest_topics(topics: TopicSettings) -> list[TopicSpec]:
    """What a bridge writes to: raw readings and dead letters."""
    return [TopicSpec(topics.raw, topics.raw_partitions), TopicSpec(topics.deadletter, 1)]


def output_topics(topics: TopicSettings) -> list[TopicSpec]:
    """What the twin flow writes to. twin.state is compacted: the latest state per entity."""
    return [
        TopicSpec(topics.state, topics.raw_partitions, {"cleanup.policy": "compact"}),
        TopicSpec(topics.anomalies, topics.raw_partitions),
        TopicSpec(topics.alarms, topics.raw_partitions),
        TopicSpec(topics.late, topics.raw_partitions),
        TopicSpec(topics.deadletter, 1),
    ]


CONTROL_TOPIC_CONFIG = {"message.timestamp.type": "LogAppendTime"}
"""The broker stamps back-channel messages: the flow orders them against ``twin.raw`` by
that time, so it must not go backwards within the topic (see schemas.control)."""


def control_topics(topics: TopicSettings) -> list[TopicSpec]:
    """The back channel: operator feedback and setpoint commands, one partition each."""
    return [
        TopicSpec(topics.feedback, 1, CONTROL_TOPIC_CONFIG),
        TopicSpec(topics.commands, 1, CONTROL_TOPIC_CONFIG),
    ]
