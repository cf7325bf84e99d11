"""The dead-letter contract of ``twin.deadletter`` (deadletter.v1.schema.json).

A dead letter keeps what is needed to find, understand and replay a rejected message:
the reason code, a human detail, where it came from, and the payload itself (whole up
to ``FULL_PAYLOAD_LIMIT`` bytes, always with its size, hash and a printable excerpt).
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from typing import Literal

import msgspec

from schemas.raw import Reason

VERSION = 1
EXCERPT_CHARS = 512
FULL_PAYLOAD_LIMIT = 256 * 1024

SourceKind = Literal["mqtt", "opcua", "kafka", "modbus", "coap"]


class Source(msgspec.Struct, frozen=True, omit_defaults=True):
    """Where the rejected message came from."""

    kind: SourceKind
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    node: str | None = None
    device: str | None = None
    """Modbus: ``host:port/unit``; CoAP: ``host:port``."""
    address: str | None = None
    """Modbus: the register(s), e.g. ``holding 40-41``; CoAP: the resource's path."""


class DeadLetter(msgspec.Struct, frozen=True):
    """One rejected message."""

    reason: Reason
    detail: str
    source: Source
    received_at: datetime
    payload_size: int
    payload_sha256: str
    payload_excerpt: str
    payload_b64: str | None = None
    entity_id: str | None = None
    version: int = VERSION


def dead_letter(
    payload: bytes,
    reason: Reason,
    detail: str,
    source: Source,
    received_at: datetime,
    entity_id: str | None = None,
) -> DeadLetter:
    """Build the dead letter for ``payload``.

    >>> from datetime import UTC
    >>> letter = dead_letter(b"{oops", Reason.BAD_JSON, "truncated",
    ...     Source(kind="mqtt", topic="plant/a/b/c/telemetry"), datetime(2026, 1, 1, tzinfo=UTC))
    >>> letter.payload_excerpt, base64.b64decode(letter.payload_b64 or "")
    ('{oops', b'{oops')
    """
    return DeadLetter(
        reason=reason,
        detail=detail[:1000],
        source=source,
        received_at=received_at,
        payload_size=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_excerpt=payload[: EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS],
        payload_b64=(
            base64.b64encode(payload).decode() if len(payload) <= FULL_PAYLOAD_LIMIT else None
        ),
        entity_id=entity_id,
    )


_encoder = msgspec.json.Encoder()


def encode(letter: DeadLetter) -> bytes:
    """JSON bytes of a dead letter."""
    return _encoder.encode(letter)
