"""Labeled faults: what the simulator injects, and the ground truth it reports.

Three categories:

- process faults change the machine's physics (bearing wear, cavitation, overload);
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
