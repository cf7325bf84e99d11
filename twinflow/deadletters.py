"""``twinflow deadletters replay``: re-inject dead letters into ``twin.raw`` after a fix.

Once the cause of a rejection is fixed (an entity added to the twin model, a contract
widened), the letters that kept their payload whole can go through the pipeline again.
The replay reads ``twin.deadletter`` from its beginning to the end it had when the run
started, so letters produced meanwhile, its own consequences included, wait for the
next run. Each payload is checked first against the current contract and twin model
with the rules the bridge or the flow applies to a message as a whole; what would be
refused again is only counted. Rules about single readings (range, sensor, unit) stay
the flow's: a message passing the whole-message rules is re-sent and the flow decides
reading by reading, as it did the first time.

A re-sent message keeps its original payload bytes and carries its letter's
``received_at`` as Kafka timestamp: the flow judges a reading's time against its
message's Kafka time, and a replay days later must not turn every letter older than
``flow.max_age_s`` into ``ts_too_old``. The flow drops a reading it still holds in an
open window and the ``readings`` table upserts on ``(ts, entity, sensor)``, so
replaying twice adds no row. (A reading whose window has closed comes back as late:
the flow rewrites its row and counts it again in the twin's counts and on twin.late.)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from connectors.kafka import client_config, ensure_topics, reliable_producer
from schemas.deadletter import DeadLetter
from schemas.raw import Reason, SchemaError, decode_raw
from twinflow.bridges.routing import Forward, Reject, route
from twinflow.errors import ConfigError, TwinflowError
from twinflow.settings import FlowSettings, Settings
from twinflow.topics import ingest_topics
from twinflow.twin_model import TwinModel

REPLAY_GROUP = "twinflow-deadletter-replay"
"""librdkafka wants a group id; the replay assigns partitions itself and never commits."""
READ_STALL_S = 30.0
"""How long reading may make no progress before the replay gives up."""
PROGRESS_EVERY_S = 2.0
REPLAYED_FROM = "replayed_from"
"""Header naming the letter a re-sent message came from (``topic/partition/offset``)."""

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_letters = msgspec.json.Decoder(DeadLetter)


class ReplayError(TwinflowError):
    """The dead-letter topic could not be read to its end."""


class ReplayDeliveryError(ReplayError):
    """Kafka did not confirm a re-sent message."""


def parse_since(text: str, now: datetime) -> datetime:
    """The start of ``--since``: RFC 3339 with an offset, or a duration back from ``now``.

    >>> now = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    >>> parse_since("90m", now).isoformat(), parse_since("1d", now).isoformat()
    ('2026-01-02T10:30:00+00:00', '2026-01-01T12:00:00+00:00')
    >>> parse_since("2026-01-02T09:00:00+02:00", now).isoformat()
    '2026-01-02T07:00:00+00:00'
    """
    text = text.strip()
    duration = _DURATION.match(text)
    if duration is not None:
        return now - timedelta(seconds=int(duration[1]) * _SECONDS[duration[2]])
    try:
        since = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--since {text!r} is neither a duration (30m, 2h, 1d: s, m, h, d or w) nor an "
            "RFC 3339 time such as 2026-01-02T09:00:00Z"
        ) from None
    if since.tzinfo is None:
        raise ConfigError(f"--since {text!r} needs an offset (Z or +01:00): whose local time?")
    return since.astimezone(UTC)


def recheck(
    letter: DeadLetter, payload: bytes, model: TwinModel, flow: FlowSettings
) -> Forward | Reject:
    """What the pipeline would now do with a letter's whole message.

    A letter from MQTT goes through the bridge's own decision (its topic must belong to
    the entity the payload names); every message then meets the flow's whole-message
    rules: the raw contract, a known entity, and the time checks against the message's
    Kafka time, which a replay sets to ``received_at``. Those time checks mirror
    ``PartitionTwins._decode``.
    """
    if letter.source.kind == "mqtt" and letter.source.topic is not None:
        routed = route(letter.source.topic, payload, model)
        if isinstance(routed, Reject):
            return routed
    try:
        message = decode_raw(payload)
    except SchemaError as exc:
        return Reject(exc.reason, exc.detail)
    if message.entity_id not in model.by_id:
        return Reject(Reason.UNKNOWN_ENTITY, f"no entity {message.entity_id!r}")
    kafka_ms = received_ms(letter)
    if message.ts_ms > kafka_ms + flow.max_future_s * 1000:
        return Reject(Reason.TS_IN_FUTURE, f"ts {message.ts_ms} ms", message.entity_id)
    if message.ts_ms < kafka_ms - flow.max_age_s * 1000:
        return Reject(Reason.TS_TOO_OLD, f"ts {message.ts_ms} ms", message.entity_id)
    return Forward(message.entity_id)


def received_ms(letter: DeadLetter) -> int:
    """The letter's ``received_at`` in epoch milliseconds (a time without offset is UTC)."""
    received = letter.received_at
    if received.tzinfo is None:  # twinflow writes UTC; another producer may leave it out
        received = received.replace(tzinfo=UTC)
    return int(received.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class Resend:
    """One payload to put back on ``twin.raw``."""

    entity_id: str
    payload: bytes
    timestamp_ms: int


@dataclass(frozen=True)
class Refused:
    """Letters whose message would be refused again for one reason."""

    count: int
    example: str
    """The detail of the first of them."""


@dataclass(frozen=True)
class ReplayReport:
    """What one replay read, kept and re-sent.

    Every matching letter is counted once: ``matching == resent + not_kept_whole +
    repeats_skipped + sum(still_refused counts)``.
    """

    dry_run: bool
    letters_read: int
    """Messages read from the dead-letter topic."""
    unreadable: int
    """Messages of the topic that are not dead letters."""
    matching: int
    """Letters that passed the reason and ``since`` filters."""
    resent: int
    """Messages re-sent to the raw topic (a dry run: that would be)."""
    still_refused: Mapping[str, Refused]
    """By reason code: letters the current contract or twin model still refuses."""
    not_kept_whole: int
    """Letters without a usable whole payload (larger than 256 KiB, or damaged)."""
    repeats_skipped: int
    """Letters whose payload (by SHA-256) this run already handled."""

    def as_dict(self) -> dict[str, object]:
        """Plain data for ``--json``."""
        return dataclasses.asdict(self)


class ReplayPlan:
    """Decides letter by letter what a replay does, and counts it. No I/O."""

    def __init__(
        self,
        model: TwinModel,
        flow: FlowSettings,
        *,
        reasons: set[str] | None = None,
        since: datetime | None = None,
    ) -> None:
        unknown = sorted((reasons or set()) - {reason.value for reason in Reason})
        if unknown:
            known = ", ".join(reason.value for reason in Reason)
            raise ConfigError(f"unknown reason {', '.join(unknown)} (known: {known})")
        self.model = model
        self.flow = flow
        self.reasons = frozenset(reasons) if reasons else None
        self.since_ms = int(since.timestamp() * 1000) if since is not None else None
        self._seen: set[str] = set()
        self._refused: dict[str, Refused] = {}
        self.letters_read = 0
        self.unreadable = 0
        self.matching = 0
        self.not_kept_whole = 0
        self.repeats_skipped = 0
        self.accepted = 0

    def not_a_letter(self) -> None:
        """Count a message of the topic that does not decode as a dead letter."""
        self.letters_read += 1
        self.unreadable += 1

    def take(self, letter: DeadLetter) -> Resend | None:
        """The message to re-send for ``letter``, or None (filtered out, or counted)."""
        self.letters_read += 1
        if self.reasons is not None and letter.reason.value not in self.reasons:
            return None
        at_ms = received_ms(letter)
        if self.since_ms is not None and at_ms < self.since_ms:
            return None
        self.matching += 1
        payload = _whole_payload(letter)
        if payload is None:
            self.not_kept_whole += 1
            return None
        if letter.payload_sha256 in self._seen:
            self.repeats_skipped += 1
            return None
        self._seen.add(letter.payload_sha256)
        verdict = recheck(letter, payload, self.model, self.flow)
        if isinstance(verdict, Reject):
            known = self._refused.get(verdict.reason.value)
            self._refused[verdict.reason.value] = (
                Refused(1, verdict.detail)
                if known is None
                else dataclasses.replace(known, count=known.count + 1)
            )
            return None
        self.accepted += 1
        return Resend(verdict.entity_id, payload, at_ms)

    def report(self, *, dry_run: bool, resent: int) -> ReplayReport:
        """The counts so far, with ``resent`` messages confirmed by Kafka."""
        return ReplayReport(
            dry_run=dry_run,
            letters_read=self.letters_read,
            unreadable=self.unreadable,
            matching=self.matching,
            resent=resent,
            still_refused=dict(sorted(self._refused.items())),
            not_kept_whole=self.not_kept_whole,
            repeats_skipped=self.repeats_skipped,
        )


def _whole_payload(letter: DeadLetter) -> bytes | None:
    """The original payload, if the letter kept it whole and it matches its hash."""
    if letter.payload_b64 is None:
        return None
    try:
        payload = base64.b64decode(letter.payload_b64, validate=True)
    except binascii.Error:
        return None
    if hashlib.sha256(payload).hexdigest() != letter.payload_sha256:
        return None
    return payload


def replay_dead_letters(
    settings: Settings,
    model: TwinModel,
    *,
    reasons: set[str] | None,
    since: datetime | None,
    dry_run: bool,
    progress: Callable[[str], None],
) -> ReplayReport:
    """Re-send the dead letters that the current contract and twin model accept.

    Reads ``settings.topics.deadletter`` up to the end it had at the start, keeps the
    letters whose reason is in ``reasons`` (None or empty: any) and that were received
    at or after ``since`` (an aware time), and re-sends each accepted payload once to
    ``settings.topics.raw`` keyed by its entity. ``dry_run`` sends nothing. Raises
    :class:`ReplayDeliveryError` when Kafka does not confirm a message.
    """
    plan = ReplayPlan(model, settings.flow, reasons=reasons, since=since)
    topics = settings.topics
    # Fails within a second on refused credentials; a missing topic is created empty,
    # as a bridge would, and a raw topic of the wrong shape is refused.
    ensure_topics(settings.kafka, ingest_topics(topics))
    consumer = Consumer(
        client_config(
            settings.kafka,
            **{
                "group.id": REPLAY_GROUP,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            },
        )
    )
    sender = None if dry_run else _Sender(settings, topics.raw)
    last_report = time.monotonic()
    try:
        for message in _read_to_end(consumer, topics.deadletter, progress):
            try:
                letter = _letters.decode(message.value() or b"")
            except msgspec.DecodeError:
                plan.not_a_letter()
                continue
            resend = plan.take(letter)
            if resend is not None and sender is not None:
                sender.send(resend, f"{topics.deadletter}/{message.partition()}/{message.offset()}")
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                done = (
                    f"would re-send {plan.accepted}"
                    if sender is None
                    else f"re-sent {sender.confirmed}"
                )
                progress(f"read {plan.letters_read} letters, {plan.matching} matching, {done}")
    finally:
        consumer.close()
    if sender is None:
        return plan.report(dry_run=True, resent=plan.accepted)
    sender.finish(progress)
    return plan.report(dry_run=False, resent=sender.confirmed)


def _read_to_end(
    consumer: Consumer, topic: str, progress: Callable[[str], None]
) -> Iterator[Message]:
    """Every message of ``topic`` below the end offsets its partitions have now."""
    try:
        metadata = consumer.list_topics(topic, timeout=30).topics[topic]
    except KafkaException as exc:
        raise ReplayError(f"cannot read the partitions of {topic}: {exc}") from None
    ends: dict[int, int] = {}
    start: list[TopicPartition] = []
    for partition in sorted(metadata.partitions):
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=30, cached=False
        )
        if high > low:
            ends[partition] = high
            start.append(TopicPartition(topic, partition, low))
    total = sum(end - tp.offset for end, tp in zip(ends.values(), start, strict=True))
    progress(f"reading {topic}: {total} messages, up to offsets {ends}")
    if not ends:
        return
    consumer.assign(start)
    moved = time.monotonic()
    while ends:
        batch = consumer.consume(num_messages=1000, timeout=1.0)
        if batch:
            moved = time.monotonic()
        elif time.monotonic() - moved > READ_STALL_S:
            left = ", ".join(f"partition {p} before offset {end}" for p, end in ends.items())
            raise ReplayError(
                f"no message from {topic} for {READ_STALL_S:g} s with {left} still to read; "
                "is Kafka up (twinflow status)? Nothing was lost: run the replay again"
            )
        for message in batch:
            error = message.error()
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                raise ReplayError(f"reading {topic} failed: {error}")
            partition, offset = message.partition() or 0, message.offset() or 0
            end = ends.get(partition)
            if end is None or offset >= end:
                # Past the start's end: the next run's. An end of partition there also
                # ends a partition whose last offsets hold no message (a commit marker).
                if end is not None:
                    del ends[partition]
                continue
            if error is not None:
                continue
            yield message
            if offset == end - 1:
                del ends[partition]


class _Sender:
    """The reliable producer, with every delivery report checked."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.bootstrap = settings.kafka.bootstrap
        self.producer = reliable_producer(settings.kafka)
        self.sent = 0
        self.confirmed = 0
        self.failure: KafkaError | None = None

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            self.confirmed += 1
        elif self.failure is None:
            self.failure = error

    def send(self, resend: Resend, origin: str) -> None:
        """Queue one message (waiting while the producer's queue is full)."""
        self._check()
        while True:
            try:
                self.producer.produce(
                    self.topic,
                    resend.payload,
                    resend.entity_id.encode(),
                    timestamp=resend.timestamp_ms,
                    headers=[(REPLAYED_FROM, origin.encode())],
                    on_delivery=self._delivered,
                )
                break
            except BufferError:
                self.producer.poll(0.1)
        self.sent += 1
        self.producer.poll(0)

    def finish(self, progress: Callable[[str], None]) -> None:
        """Wait for every delivery report; raise on the first failure."""
        while self.producer.flush(5):
            self._check()
            progress(f"waiting for Kafka to confirm {self.sent - self.confirmed} messages")
        self._check()

    def _check(self) -> None:
        if self.failure is not None:
            raise ReplayDeliveryError(
                f"Kafka at {self.bootstrap} did not accept a re-sent message for {self.topic}: "
                f"{self.failure.str()}. {self.confirmed} of {self.sent} were confirmed; run "
                "the replay again once Kafka is healthy"
            )
