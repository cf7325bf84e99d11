"""Samples to MQTT messages, with data faults injected in transit.

Each entity publishes either batched payloads (all sensors of a tick in one message) or
single payloads (one message per sensor), with epoch-millisecond or RFC 3339 timestamps
— chosen per entity from the seed, as real fleets mix device firmwares. Every message
carries the entity's message counter ``seq``: a duplicate repeats the same ``seq``. An
entity with setpoints reports in every message what it runs them at: ``"reported":
{setpoint: value}``.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np

from schemas.raw import Reason
from twinflow.sim.faults import Category, Fault, FaultKind
from twinflow.sim.samples import Sample
from twinflow.twin_model import TwinModel

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class DataFaultPlan:
    """Per-message probabilities of data faults, and the shape of the payloads."""

    batched_share: float = 0.5
    duplicate: float = 0.002
    out_of_order: float = 0.002
    late: float = 0.001
    malformed: float = 0.002
    unknown_entity: float = 0.0005
    late_delay_s: float = 120.0
    """How far behind a late message is published (beyond any allowed lateness)."""


@dataclass(frozen=True, slots=True)
class Emission:
    """One MQTT message to publish."""

    publish_at_ms: int
    """Simulated time at which it is published (after any injected delay)."""
    topic: str
    payload: bytes
    entity_id: str
    seq: int | None
    readings: int
    """New valid readings it carries: 0 for duplicates and rejects."""
    fault: FaultKind | None = None
    expected_reason: Reason | None = None
    """The dead-letter reason a bridge must give it, for messages built to be rejected."""


@dataclass
class Tally:
    """What was published, to compare with what arrived."""

    messages: int = 0
    valid_messages: int = 0
    valid_readings: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    expected_rejects: Counter[str] = field(default_factory=Counter)

    def add(self, emission: Emission) -> None:
        """Count one published message."""
        self.messages += 1
        if emission.readings:
            self.valid_messages += 1
            self.valid_readings += emission.readings
        if emission.fault is not None:
            self.faults[emission.fault.value] += 1
        if emission.expected_reason is not None:
            self.expected_rejects[emission.expected_reason.value] += 1

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the ground-truth file."""
        return {
            "messages": self.messages,
            "valid_messages": self.valid_messages,
            "valid_readings": self.valid_readings,
            "data_faults": dict(sorted(self.faults.items())),
            "expected_rejects": dict(sorted(self.expected_rejects.items())),
        }


_MALFORMATIONS = (
    Reason.BAD_JSON,
    Reason.SCHEMA,
    Reason.BAD_FORM,
    Reason.BAD_TIMESTAMP,
    Reason.ENTITY_MISMATCH,
)


class MessageEncoder:
    """Turns samples into MQTT emissions and records the data faults it injects."""

    def __init__(self, model: TwinModel, plan: DataFaultPlan, seed: int) -> None:
        self.model = model
        self.plan = plan
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))
        self.batched: dict[str, bool] = {}
        self.rfc3339: dict[str, bool] = {}
        self.seq: Counter[str] = Counter()
        self.data_faults: list[Fault] = []
        self._delayed: list[tuple[int, int, Emission]] = []
        self._order = 0

    def emissions(self, samples: Iterable[Sample], tick_ms: int) -> Iterator[Emission]:
        """Every message of ``samples``, in publication order."""
        for sample in samples:
            yield from self.feed(sample, tick_ms)
        yield from self.drain()

    def feed(self, sample: Sample, tick_ms: int) -> Iterator[Emission]:
        """Messages due once ``sample`` is taken: delayed ones that are due, then its own."""
        while self._delayed and self._delayed[0][0] <= sample.ts_ms:
            yield heapq.heappop(self._delayed)[2]
        for emission in self._encode(sample):
            yield from self._with_faults(emission, sample, tick_ms)

    def drain(self) -> Iterator[Emission]:
        """The delayed messages still held back, at the end of a run."""
        while self._delayed:
            yield heapq.heappop(self._delayed)[2]

    def _encode(self, sample: Sample) -> list[Emission]:
        entity = self.model.by_id[sample.entity_id]
        if entity.id not in self.batched:
            self.batched[entity.id] = bool(self.rng.random() < self.plan.batched_share)
            self.rfc3339[entity.id] = bool(self.rng.random() < 0.5)
        ts: int | str = sample.ts_ms
        if self.rfc3339[entity.id]:
            ts = (
                datetime.fromtimestamp(sample.ts_ms / 1000, UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )
        specs = self.model.sensors_of(entity.id)
        topic = self.model.mqtt_topic(entity)
        readings = {}
        for sensor, value in sample.values.items():
            unit = sample.reported_units.get(sensor)
            if unit is not None:
                value = specs[sensor].accepted_units[unit].from_canonical(value)
            # Six significant digits: what real devices send, in any unit's magnitude.
            readings[sensor] = (float(f"{value:.6g}"), unit)
        if not readings:
            return []
        if self.batched[entity.id]:
            self.seq[entity.id] += 1
            body: dict[str, Any] = {
                "entity_id": entity.id,
                "ts": ts,
                "values": {sensor: value for sensor, (value, _unit) in readings.items()},
                "seq": self.seq[entity.id],
            }
            units = {sensor: unit for sensor, (_value, unit) in readings.items() if unit}
            if units:
                body["units"] = units
            if sample.setpoints:
                body["reported"] = sample.setpoints
            return [self._emission(sample, topic, body, len(readings))]
        messages = []
        for sensor, (value, unit) in readings.items():
            self.seq[entity.id] += 1
            body = {
                "entity_id": entity.id,
                "sensor": sensor,
                "ts": ts,
                "value": value,
                "seq": self.seq[entity.id],
            }
            if unit:
                body["unit"] = unit
            if sample.setpoints:
                body["reported"] = sample.setpoints
            messages.append(self._emission(sample, topic, body, 1))
        return messages

    @staticmethod
    def _emission(sample: Sample, topic: str, body: dict[str, Any], readings: int) -> Emission:
        return Emission(
            publish_at_ms=sample.ts_ms,
            topic=topic,
            payload=_encoder.encode(body),
            entity_id=sample.entity_id,
            seq=int(body["seq"]),
            readings=readings,
        )

    def _with_faults(self, emission: Emission, sample: Sample, tick_ms: int) -> Iterator[Emission]:
        plan, draw = self.plan, float(self.rng.random())
        edges = np.cumsum(
            [plan.duplicate, plan.out_of_order, plan.late, plan.malformed, plan.unknown_entity]
        )
        if draw < edges[0]:
            yield emission
            yield self._record(emission, FaultKind.DUPLICATE, readings=0)
        elif draw < edges[1]:
            delay = int(tick_ms * self.rng.uniform(2, 4))
            self._delay(self._record(emission, FaultKind.OUT_OF_ORDER, delay_ms=delay))
        elif draw < edges[2]:
            delay = int(plan.late_delay_s * 1000)
            self._delay(self._record(emission, FaultKind.LATE, delay_ms=delay))
        elif draw < edges[3]:
            reason = _MALFORMATIONS[int(self.rng.integers(len(_MALFORMATIONS)))]
            yield self._record(
                emission,
                FaultKind.MALFORMED,
                readings=0,
                payload=_malform(emission.payload, reason),
                reason=reason,
            )
        elif draw < edges[4]:
            yield emission
            ghost = f"ghost-{int(self.rng.integers(1000)):03d}"
            entity = self.model.by_id[sample.entity_id]
            body = msgspec.json.decode(emission.payload)
            body["entity_id"] = ghost
            yield self._record(
                emission,
                FaultKind.UNKNOWN_ENTITY,
                readings=0,
                payload=_encoder.encode(body),
                reason=Reason.UNKNOWN_ENTITY,
                topic=self.model.mqtt_topic(entity.model_copy(update={"id": ghost})),
            )
        else:
            yield emission

    def _record(
        self,
        emission: Emission,
        kind: FaultKind,
        *,
        readings: int | None = None,
        payload: bytes | None = None,
        reason: Reason | None = None,
        topic: str | None = None,
        delay_ms: int = 0,
    ) -> Emission:
        faulty = Emission(
            publish_at_ms=emission.publish_at_ms + delay_ms,
            topic=topic or emission.topic,
            payload=payload if payload is not None else emission.payload,
            entity_id=emission.entity_id,
            seq=emission.seq,
            readings=emission.readings if readings is None else readings,
            fault=kind,
            expected_reason=reason,
        )
        detail = f"seq={emission.seq}" + (f" reason={reason}" if reason else "")
        self.data_faults.append(
            Fault(
                kind,
                Category.DATA,
                emission.entity_id,
                emission.publish_at_ms,
                faulty.publish_at_ms + 1,
                detail=detail,
            )
        )
        return faulty

    def _delay(self, emission: Emission) -> None:
        self._order += 1  # ties keep their order
        heapq.heappush(self._delayed, (emission.publish_at_ms, self._order, emission))


def _malform(payload: bytes, reason: Reason) -> bytes:
    """A payload the bridge must reject with ``reason``."""
    if reason is Reason.BAD_JSON:
        return payload[: len(payload) // 2]
    body = msgspec.json.decode(payload)
    if reason is Reason.SCHEMA:
        if "values" in body:
            body["values"] = {name: "n/a" for name in body["values"]}
        else:
            body["value"] = "n/a"
    elif reason is Reason.BAD_FORM:
        body.pop("value", None)
        body.pop("values", None)
        body.pop("sensor", None)
        body.pop("reported", None)  # reported values alone make a valid message
    elif reason is Reason.BAD_TIMESTAMP:
        body["ts"] = "2026-01-01T00:00:00"
    elif reason is Reason.ENTITY_MISMATCH:
        body["entity_id"] = body["entity_id"] + "-x"
    return _encoder.encode(body)
