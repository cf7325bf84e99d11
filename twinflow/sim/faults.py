"""Labeled faults: what the simulator injects, and the ground truth it reports.

Three categories:

- process faults change the machine's physics (bearing wear, cavitation, overload, and,
  only when a :class:`DegradationPlan` asks for it, a degradation: wear that keeps
  growing until a repair, for predictive maintenance);
- sensor faults corrupt one sensor's readings (stuck, spike, dropout, drift, unit change);
- data faults corrupt messages in transit (duplicate, out of order, late, malformed,
  unknown entity); they are drawn per message by the MQTT encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import msgspec
import numpy as np


class Category(StrEnum):
    """Where a fault acts."""

    PROCESS = "process"
    SENSOR = "sensor"
    DATA = "data"


class FaultKind(StrEnum):
    """Every fault the simulator can inject."""

    BEARING_WEAR = "bearing_wear"
    CAVITATION = "cavitation"
    OVERLOAD = "overload"
    DEGRADATION = "degradation"
    """Bearing wear growing as ``((t - start) / ramp_ms) ** shape``, unbounded, until the
    repair at ``end_ms``; only scheduled by a :class:`DegradationPlan`."""
    STUCK = "stuck"
    SPIKE = "spike"
    DROPOUT = "dropout"
    DRIFT = "drift"
    UNIT_CHANGE = "unit_change"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    LATE = "late"
    MALFORMED = "malformed"
    UNKNOWN_ENTITY = "unknown_entity"


PROCESS_FAULTS: dict[str, tuple[FaultKind, ...]] = {
    "pump": (FaultKind.BEARING_WEAR, FaultKind.CAVITATION, FaultKind.OVERLOAD),
    "motor": (FaultKind.BEARING_WEAR, FaultKind.OVERLOAD),
    "compressor": (FaultKind.BEARING_WEAR, FaultKind.OVERLOAD),
}
SENSOR_FAULTS = (
    FaultKind.STUCK,
    FaultKind.SPIKE,
    FaultKind.DROPOUT,
    FaultKind.DRIFT,
    FaultKind.UNIT_CHANGE,
)


class Fault(msgspec.Struct, frozen=True, omit_defaults=True):
    """One injected fault: the ground truth detectors are scored against."""

    kind: FaultKind
    category: Category
    entity_id: str
    start_ms: int
    end_ms: int
    sensor: str | None = None
    detail: str | None = None
    ramp_ms: int | None = None
    """Degradation: how long the wear takes to reach severity 1 (it grows on after)."""
    shape: float | None = None
    """Degradation: the exponent of its severity curve (1 = linear, > 1 accelerating)."""
    crossing_ms: int | None = None
    """Degradation, ground truth: the end of the first 10-s window whose mean of a sensor
    reached its alarm limit (:func:`twinflow.sim.degradation.with_crossings`); None if
    none did before the repair, or not computed."""
    crossing_sensor: str | None = None
    """Degradation, ground truth: the sensor that reached its alarm limit first."""

    def active(self, ts_ms: int) -> bool:
        """Whether the fault acts at ``ts_ms`` (start inclusive, end exclusive)."""
        return self.start_ms <= ts_ms < self.end_ms


@dataclass(frozen=True)
class FaultPlan:
    """How many faults to schedule; all placement is drawn from the seed."""

    process_fault_share: float = 0.3
    """Fraction of entities (of types with process faults) that get one process fault."""
    sensor_fault_share: float = 0.3
    """Fraction of entities that get one sensor fault."""
    earliest: float = 0.3
    """No fault starts before this fraction of the run: models get a clean warm-up."""


HOUR_S = 3600.0


@dataclass(frozen=True)
class DegradationPlan:
    """Which machines degrade (wear until repair) and how; all of it drawn from the seed.

    A degradation starts after a clean warm-up, grows to severity 1 over its ramp (a
    mildly accelerating P-F curve for shapes above 1) and on beyond it until the repair,
    a few hours after severity 1, when the machine is healthy again. Its alarm limits are
    crossed on the way (vibration first, at a severity below 1): where is not planned but
    found in the data (:mod:`twinflow.sim.degradation`).
    """

    share: float = 0.3
    """Fraction of the entities (of types with process faults) that degrade."""
    min_ramp_s: float = 12 * HOUR_S
    max_ramp_s: float = 96 * HOUR_S
    """Ramps (start to severity 1) are drawn uniformly between these."""
    min_shape: float = 1.0
    max_shape: float = 1.5
    """Severity exponents are drawn uniformly between these."""
    warmup_s: float = 6 * HOUR_S
    """No degradation starts this early in the run."""
    min_repair_s: float = 2 * HOUR_S
    max_repair_s: float = 6 * HOUR_S
    """The repair comes this long after severity 1 (drawn uniformly; capped at the end)."""
    entity_ids: tuple[str, ...] | None = None
    """Degrade exactly these entities (of types with process faults), whatever ``share``
    says; the draws are the same either way."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must lie in [0, 1], got {self.share}")
        if not 0 < self.min_ramp_s <= self.max_ramp_s:
            raise ValueError(f"need 0 < min_ramp_s <= max_ramp_s, got {self}")
        if not 0 < self.min_shape <= self.max_shape:
            raise ValueError(f"need 0 < min_shape <= max_shape, got {self}")
        if not 0 <= self.min_repair_s <= self.max_repair_s or self.warmup_s < 0:
            raise ValueError(f"need 0 <= min_repair_s <= max_repair_s and warmup_s >= 0: {self}")


@dataclass(frozen=True)
class FaultTarget:
    """What the scheduler needs to know of one entity."""

    entity_id: str
    asset_type: str
    sensors: Sequence[str]
    convertible: Sequence[str]
    """Sensors with an alternative unit (candidates for a unit change)."""


def schedule_faults(
    targets: Sequence[FaultTarget],
    start_ms: int,
    duration_ms: int,
    tick_ms: int,
    plan: FaultPlan,
    rng: np.random.Generator,
) -> list[Fault]:
    """Place process and sensor faults; every entity ticks once per ``tick_ms``."""
    faults: list[Fault] = []
    earliest = start_ms + int(duration_ms * plan.earliest)
    room = start_ms + duration_ms - earliest
    if room <= tick_ms:
        return faults
    for target in targets:
        kinds = PROCESS_FAULTS.get(target.asset_type, ())
        if kinds and rng.random() < plan.process_fault_share:
            kind = kinds[int(rng.integers(len(kinds)))]
            length = max(tick_ms, int(room * rng.uniform(0.25, 0.5)))
            begin = earliest + int(rng.integers(0, max(1, room - length)))
            faults.append(Fault(kind, Category.PROCESS, target.entity_id, begin, begin + length))
        if target.sensors and rng.random() < plan.sensor_fault_share:
            kind = SENSOR_FAULTS[int(rng.integers(len(SENSOR_FAULTS)))]
            candidates = target.convertible if kind is FaultKind.UNIT_CHANGE else target.sensors
            if not candidates:
                kind, candidates = FaultKind.DRIFT, target.sensors
            sensor = candidates[int(rng.integers(len(candidates)))]
            # A spike hits exactly one reading: any span of one tick holds one tick.
            length = tick_ms if kind is FaultKind.SPIKE else int(room * rng.uniform(0.05, 0.2))
            length = max(tick_ms, length)
            begin = earliest + int(rng.integers(0, max(1, room - length)))
            faults.append(
                Fault(kind, Category.SENSOR, target.entity_id, begin, begin + length, sensor)
            )
    return faults


def schedule_degradations(
    targets: Sequence[FaultTarget],
    start_ms: int,
    duration_ms: int,
    tick_ms: int,
    plan: DegradationPlan,
    rng: np.random.Generator,
) -> list[Fault]:
    """Place degradations (at most one per entity) by ``plan``.

    Every target of a type with process faults takes the same five draws whether it
    degrades or not, so the share only decides which entities do. The start is drawn so
    that ramp and repair fit between the warm-up and the end; when the run is too short
    for the drawn ramp, the ramp shrinks to fit, but not below ``min_ramp_s`` (the repair
    is then capped at the end of the run, or the wear goes on to the end).
    """
    faults: list[Fault] = []
    end = start_ms + duration_ms
    earliest = start_ms + round(plan.warmup_s * 1000)
    if end - earliest <= tick_ms:
        return faults
    chosen = None if plan.entity_ids is None else set(plan.entity_ids)
    min_ramp_ms = round(plan.min_ramp_s * 1000)
    for target in targets:
        if target.asset_type not in PROCESS_FAULTS:
            continue
        draw = float(rng.random())
        ramp_ms = round(1000 * rng.uniform(plan.min_ramp_s, plan.max_ramp_s))
        shape = float(rng.uniform(plan.min_shape, plan.max_shape))
        repair_ms = round(1000 * rng.uniform(plan.min_repair_s, plan.max_repair_s))
        position = float(rng.random())
        degrades = draw < plan.share if chosen is None else target.entity_id in chosen
        if not degrades:
            continue
        room = end - earliest
        ramp_ms = max(min_ramp_ms, min(ramp_ms, room - repair_ms))
        slack = max(0, room - ramp_ms - repair_ms)
        begin = earliest + int(position * slack)
        faults.append(
            Fault(
                FaultKind.DEGRADATION,
                Category.PROCESS,
                target.entity_id,
                begin,
                min(end, begin + ramp_ms + repair_ms),
                ramp_ms=ramp_ms,
                shape=round(shape, 4),
            )
        )
    return faults
