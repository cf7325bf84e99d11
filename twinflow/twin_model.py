"""The twin model: one YAML file describing asset types, their sensors and the plant.

The simulator, the bridges (MQTT topic / OPC UA node -> entity and sensor), the flow
(cleaning rules, features) and the dashboards all read this one file. A bad file fails
at load with the path of the offending field and the reason.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twinflow.coap_map import CoapDevice, CoapResource, CoapResources
from twinflow.errors import ConfigError
from twinflow.modbus_map import ModbusDevice, ModbusLayout, ModbusRegister

_NAME = r"^[a-z][a-z0-9_]*$"
_ENTITY_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# MQTT topic segments must not contain wildcards or separators.
_SEGMENT = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UnitConversion(_Strict):
    """``canonical = value * factor + offset``."""

    factor: float
    offset: float = 0.0

    @field_validator("factor")
    @classmethod
    def _nonzero(cls, factor: float) -> float:
        if factor == 0 or not math.isfinite(factor):
            raise ValueError("factor must be a finite, non-zero number")
        return factor

    def to_canonical(self, value: float) -> float:
        """Convert a value in this unit to the canonical unit."""
        return value * self.factor + self.offset

    def from_canonical(self, value: float) -> float:
        """Convert a canonical value into this unit."""
        return (value - self.offset) / self.factor


class OperatingLimits(_Strict):
    """Where a sensor's value stops being healthy operation (not where it stops being valid).

    ``warn_*`` is where an operator should look, ``alarm_*`` where the machine must not
    run (a trip, a vibration severity zone D): the limit predictive maintenance
    forecasts the crossing of. Any may be left out; each side's warn limit lies inside
    its alarm limit.
    """

    warn_low: float | None = None
    warn_high: float | None = None
    alarm_low: float | None = None
    alarm_high: float | None = None

    @model_validator(mode="after")
    def _nested(self) -> Self:
        for name in ("warn_low", "warn_high", "alarm_low", "alarm_high"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if (
            self.warn_high is not None
            and self.alarm_high is not None
            and self.warn_high >= self.alarm_high
        ):
            raise ValueError(
                f"warn_high ({self.warn_high:g}) must be below alarm_high "
                f"({self.alarm_high:g}): a warning comes before the alarm"
            )
        if (
            self.warn_low is not None
            and self.alarm_low is not None
            and self.warn_low <= self.alarm_low
        ):
            raise ValueError(
                f"warn_low ({self.warn_low:g}) must be above alarm_low "
                f"({self.alarm_low:g}): a warning comes before the alarm"
            )
        lows = [v for v in (self.warn_low, self.alarm_low) if v is not None]
        highs = [v for v in (self.warn_high, self.alarm_high) if v is not None]
        if lows and highs and max(lows) >= min(highs):
            raise ValueError(
                f"the low limits ({max(lows):g}) must lie below the high limits ({min(highs):g})"
            )
        return self


class SensorSpec(_Strict):
    """One sensor of an asset type, with the rules readings are cleaned by."""

    unit: str = Field(description="canonical unit; readings are normalised to it")
    accepted_units: dict[str, UnitConversion] = Field(
        default_factory=dict, description="other units a reading may carry, with conversions"
    )
    range: tuple[float, float] = Field(description="valid physical range [min, max]")
    max_rate: float = Field(gt=0, description="largest plausible change per second")
    stuck_after_s: float = Field(gt=0, description="unchanged this long means stuck")
    limits: OperatingLimits | None = Field(
        default=None, description="operating limits, inside the physical range"
    )
    description: str = ""

    @field_validator("range")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = bounds
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ValueError(f"range must be [min, max] with min < max, got [{low}, {high}]")
        return bounds

    @model_validator(mode="after")
    def _canonical_not_repeated(self) -> Self:
        if self.unit in self.accepted_units:
            raise ValueError(f"accepted_units repeats the canonical unit {self.unit!r}")
        return self

    @model_validator(mode="after")
    def _limits_inside_range(self) -> Self:
        if self.limits is None:
            return self
        low, high = self.range
        for name, value in self.limits.model_dump(exclude_none=True).items():
            if not low < value < high:
                raise ValueError(
                    f"limits.{name} ({value:g}) must lie inside the range [{low:g}, {high:g}]: "
                    "a reading outside the range is invalid, so it could never be forecast"
                )
        return self

    def conversion(self, unit: str | None) -> UnitConversion | None:
        """How to bring ``unit`` (None = canonical) to canonical, or None if not accepted."""
        if unit is None or unit == self.unit:
            return _IDENTITY
        return self.accepted_units.get(unit)


_IDENTITY = UnitConversion(factor=1.0)


class DerivedMetric(_Strict):
    """A metric computed from the latest values of an entity's sensors."""

    expression: str = Field(description="arithmetic over sensor names: + - * / ** and numbers")
    unit: str = ""

    def sensors(self) -> frozenset[str]:
        """Sensor names the expression reads."""
        return frozenset(
            node.id
            for node in ast.walk(ast.parse(self.expression, mode="eval"))
            if isinstance(node, ast.Name)
        )

    def evaluate(self, values: Mapping[str, float]) -> float | None:
        """The metric for ``values``; None when an input is missing or the maths fails.

        >>> DerivedMetric(expression="flow * pressure / 36").evaluate(
        ...     {"flow": 90.0, "pressure": 4.0})
        10.0
        """
        try:
            return _evaluate(ast.parse(self.expression, mode="eval").body, values)
        except (KeyError, ZeroDivisionError, OverflowError):
            return None


_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


def _evaluate(node: ast.expr, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, values)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, values), _evaluate(node.right, values)
        return float(_BINARY[type(node.op)](left, right))
    raise ValueError(f"unsupported expression element {ast.dump(node)}")


def _check_expression(expression: str, sensors: Mapping[str, SensorSpec]) -> None:
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"expression {expression!r} is not valid: {exc.msg}") from None
    allowed = f"expression {expression!r} may only use sensor names, numbers and + - * / **"
    for node in ast.walk(tree.body):
        if isinstance(node, ast.Name):
            if node.id not in sensors:
                raise ValueError(f"expression uses unknown sensor {node.id!r}")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise ValueError(allowed)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.USub):
                raise ValueError(allowed)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise ValueError(allowed)
        elif not isinstance(node, ast.operator | ast.unaryop | ast.expr_context):
            raise ValueError(allowed)


SetpointValue = float | bool


class SetpointSpec(_Strict):
    """A value the twin may write to its machine (a speed setpoint, an enable)."""

    type: Literal["float", "int", "bool"] = "float"
    unit: str = ""
    range: tuple[float, float] | None = Field(
        default=None, description="allowed [min, max]; required for float and int"
    )
    default: SetpointValue = Field(description="what the machine runs at until told otherwise")
    tolerance: float = Field(
        default=0.0, ge=0, description="largest |reported - desired| that still counts as in sync"
    )
    description: str = ""

    @model_validator(mode="after")
    def _range_fits_type(self) -> Self:
        if self.type == "bool":
            if self.range is not None:
                raise ValueError("a bool setpoint has no range")
        elif self.range is None:
            raise ValueError(f"a {self.type} setpoint needs a range [min, max]")
        else:
            low, high = self.range
            if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
                raise ValueError(f"range must be [min, max] with min < max, got [{low}, {high}]")
        problem = self.check(self.default)
        if problem is not None:
            raise ValueError(f"default: {problem}")
        return self

    def allowed(self) -> str:
        """The allowed values, for messages: ``a float in [600, 1800] rpm``."""
        if self.type == "bool":
            return "true or false"
        assert self.range is not None
        unit = f" {self.unit}" if self.unit else ""
        kind = "an integer" if self.type == "int" else "a number"
        return f"{kind} in [{self.range[0]:g}, {self.range[1]:g}]{unit}"

    def check(self, value: object) -> str | None:
        """Why ``value`` is not allowed, or None when it is.

        >>> spec = SetpointSpec(type="float", unit="rpm", range=(600, 1800), default=1480)
        >>> spec.check(2000)
        '2000 is outside [600, 1800] rpm'
        >>> spec.check(True)
        'expected a number in [600, 1800] rpm, got a bool'
        """
        if self.type == "bool":
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            got = "a bool" if isinstance(value, bool) else repr(value)
            return f"expected {self.allowed()}, got {got}"
        if not math.isfinite(value):
            return f"expected {self.allowed()}, got {value}"
        if self.type == "int" and value != int(value):
            return f"expected {self.allowed()}, got {value:g}"
        assert self.range is not None
        low, high = self.range
        if not low <= value <= high:
            unit = f" {self.unit}" if self.unit else ""
            return f"{value:g} is outside [{low:g}, {high:g}]{unit}"
        return None

    def parse(self, text: str) -> SetpointValue:
        """A value typed on a command line, or ValueError naming what is allowed."""
        if self.type == "bool":
            lowered = text.strip().lower()
            if lowered in {"true", "on", "1", "yes"}:
                return True
            if lowered in {"false", "off", "0", "no"}:
                return False
            raise ValueError(f"expected true or false, got {text!r}")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected {self.allowed()}, got {text!r}") from None
        problem = self.check(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def in_sync(self, desired: SetpointValue, reported: SetpointValue) -> bool:
        """Whether the machine reports what was asked for."""
        if self.type == "bool" or isinstance(desired, bool) or isinstance(reported, bool):
            return bool(desired) == bool(reported) and type(desired) is type(reported)
        return abs(float(reported) - float(desired)) <= self.tolerance


class AssetType(_Strict):
    """A kind of machine: its sensors, derived metrics and writable setpoints."""

    description: str = ""
    sensors: dict[str, SensorSpec] = Field(min_length=1)
    derived: dict[str, DerivedMetric] = Field(default_factory=dict)
    setpoints: dict[str, SetpointSpec] = Field(default_factory=dict)
    modbus: ModbusLayout | None = Field(
        default=None, description="register layout its machines share (sensor -> register)"
    )
    coap: CoapResources | None = Field(
        default=None, description="CoAP resource per sensor its machines share"
    )

    @field_validator("sensors", "derived", "setpoints")
    @classmethod
    def _names(cls, items: dict[str, Any]) -> dict[str, Any]:
        for name in items:
            if not re.match(_NAME, name):
                raise ValueError(f"name {name!r} must be lower_snake_case")
        return items

    @model_validator(mode="after")
    def _derived_reads_known_sensors(self) -> Self:
        for name, metric in self.derived.items():
            if name in self.sensors:
                raise ValueError(f"derived metric {name!r} has the name of a sensor")
            try:
                _check_expression(metric.expression, self.sensors)
            except ValueError as exc:
                raise ValueError(f"derived.{name}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _field_maps_name_sensors(self) -> Self:
        if self.modbus is not None:
            _check_layout("modbus", self.modbus, self.sensors)
        if self.coap is not None:
            _check_resources("coap", self.coap, self.sensors)
        return self


def _check_unit(where: str, unit: str | None, spec: SensorSpec) -> None:
    if unit is not None and unit != spec.unit and unit not in spec.accepted_units:
        known = ", ".join([spec.unit, *spec.accepted_units])
        raise ValueError(f"{where}.unit {unit!r} is not a unit of the sensor (known: {known})")


def _check_layout(where: str, layout: ModbusLayout, sensors: Mapping[str, SensorSpec]) -> None:
    """Sensors exist, units are theirs, and no two registers overlap."""
    if not layout:
        raise ValueError(f"{where} maps no sensor")
    taken: dict[tuple[str, int], str] = {}
    for sensor, register in layout.items():
        spec = sensors.get(sensor)
        if spec is None:
            raise ValueError(f"{where}.{sensor}: not a sensor of the asset type")
        _check_unit(f"{where}.{sensor}", register.unit, spec)
        for address in range(register.address, register.address + register.width):
            other = taken.setdefault((register.kind, address), sensor)
            if other != sensor:
                raise ValueError(
                    f"{where}.{sensor}: {register.kind} register {address} is also {other}'s"
                )


def _check_resources(
    where: str, resources: CoapResources, sensors: Mapping[str, SensorSpec]
) -> None:
    """Sensors exist, units are theirs, and no two share a path."""
    if not resources:
        raise ValueError(f"{where} maps no sensor")
    paths: dict[str, str] = {}
    for sensor, resource in resources.items():
        spec = sensors.get(sensor)
        if spec is None:
            raise ValueError(f"{where}.{sensor}: not a sensor of the asset type")
        _check_unit(f"{where}.{sensor}", resource.unit, spec)
        other = paths.setdefault(resource.path, sensor)
        if other != sensor:
            raise ValueError(f"{where}.{sensor}: path {resource.path!r} is also {other}'s")


class Entity(_Strict):
    """One machine in the plant."""

    id: str = Field(pattern=_ENTITY_ID)
    type: str
    site: str = Field(pattern=_SEGMENT)
    line: str = Field(pattern=_SEGMENT)
    parent: str | None = None
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)
    modbus: ModbusDevice | None = Field(default=None, description="read over Modbus TCP")
    coap: CoapDevice | None = Field(default=None, description="observed over CoAP")


class TwinModel(_Strict):
    """The whole plant: asset types and the entity registry."""

    version: int = Field(ge=1, le=1)
    mqtt_topic_prefix: str = Field(
        default="plant", pattern=_SEGMENT, description="first level of every telemetry topic"
    )
    asset_types: dict[str, AssetType] = Field(min_length=1)
    entities: list[Entity] = Field(min_length=1)

    @model_validator(mode="after")
    def _registry_consistent(self) -> Self:
        seen: set[str] = set()
        for index, entity in enumerate(self.entities):
            where = f"entities[{index}] ({entity.id})"
            if entity.id in seen:
                raise ValueError(f"{where}: duplicate entity id")
            seen.add(entity.id)
            if entity.type not in self.asset_types:
                known = ", ".join(sorted(self.asset_types))
                raise ValueError(f"{where}: unknown asset type {entity.type!r} (known: {known})")
        for index, entity in enumerate(self.entities):
            if entity.parent is not None and entity.parent not in seen:
                raise ValueError(
                    f"entities[{index}] ({entity.id}): parent {entity.parent!r} is not an entity"
                )
        self._field_maps_complete()
        return self

    def _field_maps_complete(self) -> None:
        units: dict[tuple[str, int, int], str] = {}
        resources: dict[tuple[str, int, str], str] = {}
        for index, entity in enumerate(self.entities):
            where = f"entities[{index}] ({entity.id})"
            asset = self.asset_types[entity.type]
            if entity.modbus is not None:
                layout = entity.modbus.registers
                if layout is None and asset.modbus is None:
                    raise ValueError(
                        f"{where}.modbus: no registers, and asset type {entity.type!r} gives "
                        "no modbus layout either"
                    )
                if layout is not None:
                    _check_layout(f"{where}.modbus.registers", layout, asset.sensors)
                device = (entity.modbus.host, entity.modbus.port, entity.modbus.unit_id)
                other = units.setdefault(device, entity.id)
                if other != entity.id:
                    raise ValueError(
                        f"{where}.modbus: unit {device[2]} at {device[0]}:{device[1]} is "
                        f"already {other}'s"
                    )
            if entity.coap is not None:
                coap = entity.coap
                if coap.telemetry is None and coap.resources is None and asset.coap is None:
                    raise ValueError(
                        f"{where}.coap: neither telemetry nor resources, and asset type "
                        f"{entity.type!r} gives no coap resources either"
                    )
                if coap.resources is not None:
                    _check_resources(f"{where}.coap.resources", coap.resources, asset.sensors)
                paths = (
                    [coap.telemetry]
                    if coap.telemetry is not None
                    else [resource.path for resource in self.coap_resources(entity).values()]
                )
                for path in paths:
                    other = resources.setdefault((coap.host, coap.port, path), entity.id)
                    if other != entity.id:
                        raise ValueError(
                            f"{where}.coap: resource {path!r} at {coap.host}:{coap.port} is "
                            f"already {other}'s"
                        )

    def modbus_layout(self, entity: Entity) -> dict[str, ModbusRegister]:
        """The registers ``entity``'s device is read at (empty when it has no Modbus map)."""
        if entity.modbus is None:
            return {}
        return dict(entity.modbus.registers or self.asset_types[entity.type].modbus or {})

    def coap_resources(self, entity: Entity) -> dict[str, CoapResource]:
        """Per-sensor resources of ``entity`` (empty for none, or one telemetry resource)."""
        if entity.coap is None or entity.coap.telemetry is not None:
            return {}
        return dict(entity.coap.resources or self.asset_types[entity.type].coap or {})

    @cached_property
    def by_id(self) -> dict[str, Entity]:
        """Entities by id."""
        return {entity.id: entity for entity in self.entities}

    @cached_property
    def by_mqtt_topic(self) -> dict[str, Entity]:
        """Entities by the MQTT topic they publish on."""
        return {self.mqtt_topic(entity): entity for entity in self.entities}

    def mqtt_topic(self, entity: Entity) -> str:
        """Where ``entity`` publishes its telemetry: ``<prefix>/<site>/<line>/<id>/telemetry``."""
        return f"{self.mqtt_topic_prefix}/{entity.site}/{entity.line}/{entity.id}/telemetry"

    @property
    def mqtt_topic_filter(self) -> str:
        """The subscription that receives every entity's telemetry (and strangers')."""
        return f"{self.mqtt_topic_prefix}/+/+/+/telemetry"

    def sensors_of(self, entity_id: str) -> dict[str, SensorSpec]:
        """The sensor specs of an entity (KeyError if unknown)."""
        return self.asset_types[self.by_id[entity_id].type].sensors

    def setpoints_of(self, entity_id: str) -> dict[str, SetpointSpec]:
        """The setpoint specs of an entity (KeyError if unknown)."""
        return self.asset_types[self.by_id[entity_id].type].setpoints

    def mqtt_command_topic(self, entity: Entity) -> str:
        """Where ``entity`` receives commands: ``<prefix>/<site>/<line>/<id>/cmd``."""
        return f"{self.mqtt_topic_prefix}/{entity.site}/{entity.line}/{entity.id}/cmd"


def load_twin_model(path: Path) -> TwinModel:
    """Read and validate a twin model file, or raise :class:`ConfigError` saying where."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"twin model file {path} does not exist; set TWINFLOW_TWIN_MODEL or --model"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"twin model {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"twin model {path} must be a mapping with asset_types and entities")
    try:
        return TwinModel.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "(top level)"
            problems.append(f"  - {where}: {error['msg'].removeprefix('Value error, ')}")
        raise ConfigError(f"twin model {path} is invalid:\n" + "\n".join(problems)) from None
