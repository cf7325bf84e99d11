"""Physically plausible, correlated signals per asset type.

Each machine follows a load (0..1.1): a daily-like cycle, plus a slow random walk,
plus the load of the machine it drives (a motor follows its pump or compressor). With
``daily_load`` above 0 a 24-hour cycle of that amplitude adds to it (a plant's day and
night shifts); at 0, the default, nothing changes and nothing more is drawn.
Sensors are functions of load and of each other (a pump curve ties pressure to flow,
current to hydraulic power, temperatures lag load through a first-order response),
with Gaussian noise. Process faults bend these relations the way the real fault does.
All randomness comes from the generator handed in, so a seed fixes every value.

Setpoints act through the shaft speed, relative to rated (``drive``, 1.0 at the twin
model's defaults, where every value is exactly what it was before setpoints existed): a
pump's ``speed`` scales it by the affinity laws (flow ~ s, head ~ s², hydraulic power
~ s³, on top of the motor's no-load current), and ``enable`` false stops a machine:
flows, currents and vibrations fall to about zero, temperatures cool towards ambient
through their lags. A machine and the one it drives share a shaft (:func:`drive_ratio`
is multiplied over both), so a motor slows with its pump and a pump stops with its motor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from twinflow.sim.faults import FaultKind
from twinflow.twin_model import SetpointSpec, SetpointValue

Effects = Mapping[FaultKind, float]
"""Active process faults and their severity (0..1; a degradation's grows past 1)."""

DAY_S = 86_400.0

SPEED = "speed"
"""The setpoint of a variable-speed drive, rated at its default."""
ENABLE = "enable"
"""The setpoint that stops a machine when false."""
RAMP_S = 4.0
"""A drive ramps from standstill to rated speed in this long (a VFD's acceleration ramp):
a new setpoint is a level shift within seconds."""
IDLE_SPEED = 0.4
"""Below this share of rated speed a drive is stopping and its no-load current fades;
the example pumps' lowest setpoint, 600 of 1480 rpm, is above it."""
AMBIENT_C = 25.0
"""What a stopped machine's temperatures cool down to."""


def drive_ratio(setpoints: Mapping[str, SetpointValue], specs: Mapping[str, SetpointSpec]) -> float:
    """The factor one machine's setpoints put on its shaft speed: 1.0 at the defaults.

    >>> spec = SetpointSpec(type="float", range=(600, 1800), default=1480)
    >>> drive_ratio({"speed": 740.0}, {"speed": spec})
    0.5
    >>> drive_ratio({"enable": False}, {"enable": SetpointSpec(type="bool", default=True)})
    0.0
    """
    ratio = 1.0
    speed, spec = setpoints.get(SPEED), specs.get(SPEED)
    if spec is not None and spec.type != "bool" and spec.default and speed is not None:
        ratio = float(speed) / float(spec.default)
    if setpoints.get(ENABLE) is False:
        ratio = 0.0
    return ratio


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
    drive: float = 1.0
    """Shaft speed relative to rated, ramping towards what the setpoints ask."""
    temperature: float = field(init=False)
    daily_load: float = 0.0
    """Amplitude of a 24-hour load cycle on top of the machine's own load (0: none)."""
    daily_phase: float = 0.0
    """Its phase (radians), drawn by the scenario from its own generator."""

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
        if self.daily_load:
            cycle += self.daily_load * math.sin(2 * math.pi * t_s / DAY_S + self.daily_phase)
        return min(1.1, max(0.1, self.base_load + cycle + self.walk))

    def _lagged_temperature(self, target: float, dt_s: float, tau_s: float = 90.0) -> float:
        if math.isnan(self.temperature):
            self.temperature = target
        self.temperature += (target - self.temperature) * (1 - math.exp(-dt_s / tau_s))
        return self.temperature

    def _noise(self, scale: float) -> float:
        return float(self.rng.normal(0.0, scale))

    def step(
        self, load: float, dt_s: float, effects: Effects, drive_target: float = 1.0
    ) -> dict[str, float]:
        """Sensor values (canonical units) at the current instant.

        ``drive_target`` is the shaft speed (relative to rated) the setpoints ask for;
        the drive ramps there at :data:`RAMP_S` per full speed.
        """
        ramp = dt_s / RAMP_S
        self.drive = min(self.drive + ramp, max(self.drive - ramp, drive_target))
        wear = effects.get(FaultKind.BEARING_WEAR, 0.0)
        if FaultKind.DEGRADATION in effects:
            # Wear that keeps growing until a repair: the same physics as bearing wear.
            wear += effects[FaultKind.DEGRADATION]
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
        s = self.drive
        q_nominal = 200.0 * self.nominal
        p_nominal = 9.0 * self.nominal
        # Affinity laws: at speed s the pump curve H(Q) becomes s² H(Q / s).
        flow = q_nominal * load * s * (1 - 0.12 * cavitation) + self._noise(0.01 * q_nominal)
        ratio = max(0.0, flow / q_nominal)
        pressure = p_nominal * (1.25 * s * s - 0.35 * ratio**2) + self._noise(0.04)
        if cavitation and self.rng.random() < 0.3:
            # Vapour bubbles collapse: sudden pressure dips with vibration bursts.
            pressure *= 1 - 0.3 * cavitation * float(self.rng.uniform(0.5, 1.0))
        power = ratio * pressure / p_nominal
        share = 0.35 * _idle(s) + 0.65 * power
        current = 120.0 * share * (1 + 0.35 * overload) + self._noise(0.6)
        vibration = (
            2.4 * (0.7 + 0.3 * load)
            + 6.0 * wear
            + 1.2 * overload
            + cavitation * abs(self._noise(2.5))
        ) * s + self._noise(0.06)
        target = _slowed(38.0 + 20.0 * load + 28.0 * wear + 14.0 * overload, AMBIENT_C, s)
        temperature = self._lagged_temperature(target, dt_s) + self._noise(0.1)
        return {
            "flow": max(0.0, flow),
            "discharge_pressure": max(0.0, pressure),
            "motor_current": max(0.0, current),
            "vibration_rms": max(0.0, vibration),
            "bearing_temp": temperature,
        }

    def _motor(self, load: float, dt_s: float, wear: float, overload: float) -> dict[str, float]:
        s = self.drive
        rated_speed = 1480.0 if self.nominal < 1.0 else 2970.0
        slip = 0.02 * load + 0.015 * overload
        # It drives a pump: the load's share of the current follows hydraulic power, ~ s³.
        share = 0.3 * _idle(s) + 0.7 * load * s**3
        current = 140.0 * share * (1 + 0.4 * overload) + self._noise(0.7)
        target = _slowed(45.0 + 45.0 * load + 22.0 * wear + 30.0 * overload, AMBIENT_C, s)
        vibration = (1.8 * (0.8 + 0.2 * load) + 5.0 * wear + 0.8 * overload) * s
        return {
            "speed": max(0.0, rated_speed * s * (1 - slip) + self._noise(1.5)),
            "current": max(0.0, current),
            # Measured on the supply side: the mains stay on when the motor stops.
            "voltage": 400.0 + self._noise(2.0),
            "winding_temp": self._lagged_temperature(target, dt_s, tau_s=150.0) + self._noise(0.1),
            "vibration_rms": max(0.0, vibration + self._noise(0.05)),
        }

    def _compressor(
        self, load: float, dt_s: float, wear: float, overload: float
    ) -> dict[str, float]:
        s = self.drive
        suction = 1.0 * self.nominal + self._noise(0.015)
        # A screw compressor's pressure ratio holds while it turns and falls to 1 at rest;
        # its flow and power go with speed.
        compression = _slowed(6.0 + 3.0 * load + 1.5 * overload, 1.0, s)
        discharge = suction * compression + self._noise(0.05)
        share = 0.4 * _idle(s) + 0.6 * load * s
        current = 180.0 * share * (1 + 0.35 * overload) + self._noise(0.8)
        target = _slowed(65.0 + 40.0 * load + 20.0 * wear + 25.0 * overload, AMBIENT_C, s)
        vibration = (3.0 * (0.75 + 0.25 * load) + 6.0 * wear + 1.0 * overload) * s
        return {
            "suction_pressure": max(0.05, suction),
            "discharge_pressure": max(0.0, discharge),
            "discharge_temp": self._lagged_temperature(target, dt_s, tau_s=120.0)
            + self._noise(0.15),
            "motor_current": max(0.0, current),
            "vibration_rms": max(0.0, vibration + self._noise(0.08)),
        }


def _idle(s: float) -> float:
    """The share of the no-load current drawn at shaft speed ``s``: 1 unless stopping."""
    return min(1.0, s / IDLE_SPEED)


def _slowed(running: float, at_rest: float, s: float) -> float:
    """``running`` at rated speed, moved towards ``at_rest`` as the shaft slows.

    Exactly ``running`` at s = 1, so default runs keep their values to the last bit.
    """
    return running - (1.0 - s) * (running - at_rest)
