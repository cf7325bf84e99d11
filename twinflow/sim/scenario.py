"""A deterministic simulation run: which entities, how fast, how long, which faults."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from twinflow.errors import ConfigError
from twinflow.sim.actuators import Actuators
from twinflow.sim.faults import (
    Category,
    DegradationPlan,
    Fault,
    FaultKind,
    FaultPlan,
    FaultTarget,
    schedule_degradations,
    schedule_faults,
)
from twinflow.sim.physics import Machine, drive_ratio
from twinflow.sim.samples import Sample
from twinflow.twin_model import Entity, SetpointValue, TwinModel

SPIKE_FRACTION = 0.6
"""A spike jumps by this fraction of the sensor's valid range."""
DRIFT_FRACTION = 0.15
"""A drift reaches this fraction of the valid range by the end of the fault."""
_DEGRADATION_STREAM = 1 << 40
_DAILY_LOAD_STREAM = (1 << 40) + 1
"""Spawn keys of the generators of the optional features: far from the keys the entities'
and the faults' generators get (0 .. entities), so turning a feature on moves no draw of
the others, and leaving it off draws nothing."""


@dataclass(frozen=True)
class ScenarioConfig:
    """The knobs of a run. The same config and model give the same samples."""

    start_ms: int
    duration_s: float = 60.0
    rate: float = 1000.0
    """Readings per second across the whole plant."""
    entities: int | None = None
    """Use the first N entities of the twin model (default: all)."""
    seed: int = 7
    faults: FaultPlan = field(default_factory=FaultPlan)
    daily_load: float = 0.0
    """Amplitude of a 24-hour sinusoidal load cycle on each machine's own load (day and
    night shifts; a driven machine follows its parent's), phase drawn per entity. 0: off."""
    degradation: DegradationPlan | None = None
    """Machines that degrade until repair (predictive maintenance); None: off. Degraded
    entities get no other process or sensor fault."""


class Scenario:
    """Samples of every simulated entity in event-time order, with the faults applied."""

    def __init__(self, model: TwinModel, config: ScenarioConfig) -> None:
        if config.entities is not None and not 1 <= config.entities <= len(model.entities):
            raise ConfigError(
                f"--entities {config.entities}: the twin model has {len(model.entities)} "
                "entities; choose 1 to that many, or add entities to the model"
            )
        if config.rate <= 0 or config.duration_s <= 0:
            raise ConfigError("--rate and --duration must be positive")
        if not 0.0 <= config.daily_load <= 1.0:
            raise ConfigError(f"daily_load must lie in [0, 1], got {config.daily_load}")
        self.model = model
        self.config = config
        self.entities: list[Entity] = model.entities[: config.entities]
        sensor_count = sum(len(model.sensors_of(entity.id)) for entity in self.entities)
        # Every entity samples all its sensors once per tick; the ticks of different
        # entities are spread evenly across the tick so the load is smooth.
        self.tick_ms = max(1, round(1000 * sensor_count / config.rate))
        self.duration_ms = int(config.duration_s * 1000)
        root = np.random.SeedSequence(config.seed)
        fault_seed, *entity_seeds = root.spawn(len(self.entities) + 1)
        targets = [
            FaultTarget(
                entity.id,
                entity.type,
                list(model.sensors_of(entity.id)),
                [name for name, spec in model.sensors_of(entity.id).items() if spec.accepted_units],
            )
            for entity in self.entities
        ]
        self.faults: list[Fault] = schedule_faults(
            targets,
            config.start_ms,
            self.duration_ms,
            self.tick_ms,
            config.faults,
            np.random.default_rng(fault_seed),
        )
        if config.degradation is not None:
            degradations = schedule_degradations(
                targets,
                config.start_ms,
                self.duration_ms,
                self.tick_ms,
                config.degradation,
                _stream(config.seed, _DEGRADATION_STREAM),
            )
            degraded = {fault.entity_id for fault in degradations}
            # Drawn as without degradations, then dropped: the others keep their faults.
            self.faults = [f for f in self.faults if f.entity_id not in degraded] + degradations
        self._daily_phases = [0.0] * len(self.entities)
        if config.daily_load > 0:
            phases = _stream(config.seed, _DAILY_LOAD_STREAM).uniform(
                0, 2 * math.pi, len(self.entities)
            )
            self._daily_phases = [float(phase) for phase in phases]
        self._entity_seeds = entity_seeds

    @property
    def readings_per_tick(self) -> int:
        """Readings all entities produce in one tick."""
        return sum(len(self.model.sensors_of(entity.id)) for entity in self.entities)

    def samples(self, actuators: Actuators | None = None) -> Iterator[Sample]:
        """Every sample of the run, ordered by timestamp.

        The machines run at the setpoints ``actuators`` holds when each sample is taken
        (the twin model's defaults without it), so a command applied between two samples
        acts from the next one on.
        """
        if actuators is None:
            actuators = Actuators(self.model, [entity.id for entity in self.entities])
        drives: dict[str, float] = {}
        drives_as_of = -1
        machines = {
            entity.id: Machine(
                asset_type=entity.type,
                sensors=list(self.model.sensors_of(entity.id)),
                ranges={n: s.range for n, s in self.model.sensors_of(entity.id).items()},
                rng=np.random.default_rng(seed),
                daily_load=self.config.daily_load,
                daily_phase=phase,
            )
            for entity, seed, phase in zip(
                self.entities, self._entity_seeds, self._daily_phases, strict=True
            )
        }
        faults_by_entity: dict[str, list[Fault]] = {}
        for fault in self.faults:
            faults_by_entity.setdefault(fault.entity_id, []).append(fault)
        held: dict[tuple[str, str], float] = {}
        loads: dict[str, float] = {}
        start, tick, count = self.config.start_ms, self.tick_ms, len(self.entities)
        dt_s = tick / 1000
        for k in range(self.duration_ms // tick + 1):
            for index, entity in enumerate(self.entities):
                offset = k * tick + index * tick // count
                if offset >= self.duration_ms:
                    return
                ts_ms = start + offset
                machine = machines[entity.id]
                active = [f for f in faults_by_entity.get(entity.id, ()) if f.active(ts_ms)]
                load = machine.own_load(offset / 1000, dt_s)
                if entity.parent is not None and entity.parent in loads:
                    load = loads[entity.parent]
                loads[entity.id] = load
                effects = {
                    f.kind: _severity(f, ts_ms) for f in active if f.category is Category.PROCESS
                }
                if actuators.changes != drives_as_of:
                    drives, drives_as_of = self._drives(actuators), actuators.changes
                values = machine.step(load, dt_s, effects, drives[entity.id])
                setpoints = actuators.setpoints(entity.id)
                yield self._apply_sensor_faults(entity, ts_ms, values, setpoints, active, held)

    def _drives(self, actuators: Actuators) -> dict[str, float]:
        """Per entity, the shaft speed the setpoints of the machines on its shaft ask for.

        On its shaft: itself, the machine it drives (its parent) and the ones driving it.
        """
        simulated = {entity.id for entity in self.entities}
        shafts = {entity.id: [entity.id] for entity in self.entities}
        for entity in self.entities:
            if entity.parent is not None and entity.parent in simulated:
                shafts[entity.id].append(entity.parent)
                shafts[entity.parent].append(entity.id)
        return {
            entity_id: math.prod(
                (
                    drive_ratio(actuators.setpoints(member), self.model.setpoints_of(member))
                    for member in members
                ),
                start=1.0,
            )
            for entity_id, members in shafts.items()
        }

    def _apply_sensor_faults(
        self,
        entity: Entity,
        ts_ms: int,
        values: dict[str, float],
        setpoints: Mapping[str, SetpointValue],
        active: list[Fault],
        held: dict[tuple[str, str], float],
    ) -> Sample:
        dropped: list[str] = []
        reported_units: dict[str, str] = {}
        specs = self.model.sensors_of(entity.id)
        for fault in active:
            if fault.category is not Category.SENSOR or fault.sensor not in values:
                continue
            sensor = fault.sensor
            low, high = specs[sensor].range
            if fault.kind is FaultKind.STUCK:
                values[sensor] = held.setdefault((entity.id, sensor), values[sensor])
            elif fault.kind is FaultKind.SPIKE:
                values[sensor] += SPIKE_FRACTION * (high - low)
            elif fault.kind is FaultKind.DRIFT:
                values[sensor] += DRIFT_FRACTION * (high - low) * _severity(fault, ts_ms)
            elif fault.kind is FaultKind.DROPOUT:
                del values[sensor]
                dropped.append(sensor)
            elif fault.kind is FaultKind.UNIT_CHANGE:
                reported_units[sensor] = next(iter(specs[sensor].accepted_units))
        return Sample(entity.id, ts_ms, values, tuple(dropped), reported_units, setpoints)


def _stream(seed: int, key: int) -> np.random.Generator:
    """The generator of one optional feature of the run with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


def _severity(fault: Fault, ts_ms: int) -> float:
    """Bearing wear and drift grow over the fault; the others are on or off.

    A degradation grows as ``((t - start) / ramp) ** shape``, past 1 after its ramp.
    """
    if fault.kind is FaultKind.DEGRADATION:
        ramp = fault.ramp_ms or max(1, fault.end_ms - fault.start_ms)
        elapsed = max(0, ts_ms - fault.start_ms)
        return float((elapsed / ramp) ** (fault.shape or 1.0))
    if fault.kind in (FaultKind.BEARING_WEAR, FaultKind.DRIFT):
        return (ts_ms - fault.start_ms) / max(1, fault.end_ms - fault.start_ms)
    return 1.0
