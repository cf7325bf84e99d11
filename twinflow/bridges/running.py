"""How the asyncio bridges (OPC UA, Modbus, CoAP) run.

Metrics up, topics there, then forward until stopped and make sure Kafka confirmed
everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

from connectors.kafka import TopicSpec, ensure_topics
from twinflow import metrics
from twinflow.settings import Settings


class Forwarding(Protocol):
    """A bridge: forwards until its stop is set; ``finish`` waits for Kafka's answers."""

    async def forward(self) -> None: ...

    def finish(self) -> None: ...


def run_bridge(
    settings: Settings,
    port_setting: str,
    topics: Sequence[TopicSpec],
    make: Callable[[], Forwarding],
    delivery_error: type[Exception],
) -> None:
    """Serve the bridge's metrics on ``metrics.<port_setting>``, then run what ``make`` builds.

    Whatever stops it, what was received is still flushed to Kafka; if forwarding
    failed, that failure is the one raised, not a delivery error of the flush after it.
    """
    port = getattr(settings.metrics, port_setting)
    with metrics.serving(settings.metrics, port, port_setting):
        ensure_topics(settings.kafka, topics)
        bridge = make()
        try:
            asyncio.run(bridge.forward())
        except BaseException:
            with contextlib.suppress(delivery_error):
                bridge.finish()
            raise
        bridge.finish()
