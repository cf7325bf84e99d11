"""Physically plausible, correlated signals per asset type.

Each machine follows a load (0..1.1): a daily-like cycle, plus a slow random walk,
plus the load of the machine it drives (a motor follows its pump or compressor).
Sensors are functions of load and of each other (a pump curve ties pressure to flow,
current to hydraulic power, temperatures lag load through a first-order response),
with Gaussian noise. Process faults bend these relations the way the real fault does.
All randomness comes from the generator handed in, so a seed fixes every value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from twinflow.sim.faults import FaultKind

Effects = Mapping[FaultKind, float]
"""Active process faults and their severity (0..1)."""


@dataclass
class Machine:
    """The evolving state of one simulated machine."""

    asset_type: str
    sensors: Sequence[str]
    ranges: Mapping[str, tuple[float, float]]
    rng: np.random.Generator
    period_s: float = field(init=False)
    phase: float = field(init=False)
    base_load: float = field(init=False)
    nominal: float = field(init=False)
    walk: float = 0.0
    temperature: float = field(init=False)

    def __post_init__(self) -> None:
        self.period_s = float(self.rng.uniform(600, 1800))
        self.phase = float(self.rng.uniform(0, 2 * math.pi))
        self.base_load = float(self.rng.uniform(0.55, 0.75))
        self.nominal = float(self.rng.uniform(0.9, 1.1))
        self.temperature = float("nan")

    def own_load(self, t_s: float, dt_s: float) -> float:
        """Advance this machine's own load process by ``dt_s`` and return it."""
        # Ornstein-Uhlenbeck walk: wanders, but returns to the cycle within minutes.
        tau = 120.0
        self.walk += -self.walk * dt_s / tau + 0.05 * math.sqrt(dt_s / tau) * self.rng.normal()
        cycle = 0.2 * math.sin(2 * math.pi * t_s / self.period_s + self.phase)
        return min(1.1, max(0.1, self.base_load + cycle + self.walk))

    def _lagged_temperature(self, target: float, dt_s: float, tau_s: float = 90.0) -> float:
        if math.isnan(self.temperature):
            self.temperature = target
        self.temperature += (target - self.temperature) * (1 - math.exp(-dt_s / tau_s))
        return self.temperature

    def _noise(self, scale: float) -> float:
        return float(self.rng.normal(0.0, scale))

    def step(self, load: float, dt_s: float, effects: Effects) -> dict[str, float]:
        """Sensor values (canonical units) at the current instant."""
        wear = effects.get(FaultKind.BEARING_WEAR, 0.0)
        overload = effects.get(FaultKind.OVERLOAD, 0.0)
        cavitation = effects.get(FaultKind.CAVITATION, 0.0)
        if self.asset_type == "pump":
            values = self._pump(load, dt_s, wear, overload, cavitation)
        elif self.asset_type == "motor":
            values = self._motor(load, dt_s, wear, overload)
        elif self.asset_type == "compressor":
            values = self._compressor(load, dt_s, wear, overload)
        else:
            values = {}
        # Sensors the physics does not model (custom asset types) hover mid-range.
        for sensor in self.sensors:
            if sensor not in values:
                low, high = self.ranges[sensor]
                values[sensor] = (
                    low + (high - low) * (0.3 + 0.4 * load) + self._noise(0.005 * (high - low))
                )
        return {sensor: values[sensor] for sensor in self.sensors}

    def _pump(
        self, load: float, dt_s: float, wear: float, overload: float, cavitation: float
    ) -> dict[str, float]:
        q_nominal = 200.0 * self.nominal
        p_nominal = 9.0 * self.nominal
        flow = q_nominal * load * (1 - 0.12 * cavitation) + self._noise(0.01 * q_nominal)
        ratio = max(0.0, flow / q_nominal)
        pressure = p_nominal * (1.25 - 0.35 * ratio**2) + self._noise(0.04)
        if cavitation and self.rng.random() < 0.3:
            # Vapour bubbles collapse: sudden pressure dips with vibration bursts.
            pressure *= 1 - 0.3 * cavitation * float(self.rng.uniform(0.5, 1.0))
        power = ratio * pressure / p_nominal
        current = 120.0 * (0.35 + 0.65 * power) * (1 + 0.35 * overload) + self._noise(0.6)
        vibration = (
            2.4 * (0.7 + 0.3 * load)
            + 6.0 * wear
            + 1.2 * overload
            + cavitation * abs(self._noise(2.5))
            + self._noise(0.06)
        )
        target = 38.0 + 20.0 * load + 28.0 * wear + 14.0 * overload
        temperature = self._lagged_temperature(target, dt_s) + self._noise(0.1)
        return {
            "flow": max(0.0, flow),
            "discharge_pressure": max(0.0, pressure),
            "motor_current": max(0.0, current),
            "vibration_rms": max(0.0, vibration),
            "bearing_temp": temperature,
        }

    def _motor(self, load: float, dt_s: float, wear: float, overload: float) -> dict[str, float]:
        rated_speed = 1480.0 if self.nominal < 1.0 else 2970.0
        slip = 0.02 * load + 0.015 * overload
        current = 140.0 * (0.3 + 0.7 * load) * (1 + 0.4 * overload) + self._noise(0.7)
        target = 45.0 + 45.0 * load + 22.0 * wear + 30.0 * overload
        return {
            "speed": rated_speed * (1 - slip) + self._noise(1.5),
            "current": max(0.0, current),
            "voltage": 400.0 + self._noise(2.0),
            "winding_temp": self._lagged_temperature(target, dt_s, tau_s=150.0) + self._noise(0.1),
            "vibration_rms": max(
                0.0, 1.8 * (0.8 + 0.2 * load) + 5.0 * wear + 0.8 * overload + self._noise(0.05)
            ),
        }

    def _compressor(
        self, load: float, dt_s: float, wear: float, overload: float
    ) -> dict[str, float]:
        suction = 1.0 * self.nominal + self._noise(0.015)
        discharge = suction * (6.0 + 3.0 * load + 1.5 * overload) + self._noise(0.05)
        current = 180.0 * (0.4 + 0.6 * load) * (1 + 0.35 * overload) + self._noise(0.8)
        target = 65.0 + 40.0 * load + 20.0 * wear + 25.0 * overload
        return {
            "suction_pressure": max(0.05, suction),
            "discharge_pressure": max(0.0, discharge),
            "discharge_temp": self._lagged_temperature(target, dt_s, tau_s=120.0)
            + self._noise(0.15),
            "motor_current": max(0.0, current),
            "vibration_rms": max(
                0.0, 3.0 * (0.75 + 0.25 * load) + 6.0 * wear + 1.0 * overload + self._noise(0.08)
            ),
        }
