"""What the simulator produces for every entity tick, before any protocol encoding."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from twinflow.twin_model import SetpointValue


@dataclass(frozen=True, slots=True)
class Sample:
    """One entity's sensor values at one instant.

    ``values`` are in each sensor's canonical unit, after process and sensor faults.
    Sensors in a dropout are absent from ``values`` and listed in ``dropped``.
    ``reported_units`` names the unit a sensor is published in over MQTT when a
    unit-change fault is active (the MQTT encoder converts); OPC UA always publishes
    canonical values, its EngineeringUnits say which. ``setpoints`` are what the machine
    ran its setpoints at (the twin model's setpoints; empty for entities without any).
    """

    entity_id: str
    ts_ms: int
    values: dict[str, float]
    dropped: tuple[str, ...] = ()
    reported_units: dict[str, str] = field(default_factory=dict)
    setpoints: Mapping[str, SetpointValue] = field(default_factory=dict)
