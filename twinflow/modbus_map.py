"""The twin model's Modbus maps: where a device keeps each sensor's value, and how.

An asset type may give the register layout its machines share (``modbus``); an entity
that is read over Modbus names its device (``modbus``: host, port, unit id, poll
interval) and may give a layout of its own instead. A sensor's value is
``raw * scale + offset`` in ``unit`` (the sensor's canonical unit unless given; another
unit must be one of the sensor's accepted units).
"""

from __future__ import annotations

import math
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RegisterKind = Literal["holding", "input"]
RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32"]
WordOrder = Literal["big", "little"]

WIDTH: dict[RegisterType, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
}
"""16-bit registers each type takes."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModbusRegister(_Strict):
    """One sensor's value in a device's registers."""

    kind: RegisterKind = Field(description="holding (function 3) or input (function 4)")
    address: int = Field(ge=0, le=65535, description="zero-based address of the first register")
    type: RegisterType = "uint16"
    word_order: WordOrder = Field(
        default="big", description="32-bit types: big = the high word at the lower address"
    )
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = Field(
        default=None, description="unit of the scaled value; default: the sensor's canonical unit"
    )

    @field_validator("scale", "offset")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("scale")
    @classmethod
    def _nonzero(cls, scale: float) -> float:
        if scale == 0:
            raise ValueError("scale must not be 0 (every raw value would read as the offset)")
        return scale

    @model_validator(mode="after")
    def _fits(self) -> Self:
        if self.address + WIDTH[self.type] > 65536:
            raise ValueError(
                f"a {self.type} at address {self.address} runs past the last register (65535)"
            )
        return self

    @property
    def width(self) -> int:
        """Registers it takes."""
        return WIDTH[self.type]


ModbusLayout = dict[str, ModbusRegister]
"""Sensor name -> its register."""


class ModbusDevice(_Strict):
    """The Modbus TCP device (or gateway unit) one entity is read from."""

    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=0, le=255, description="the device's unit (slave) id")
    poll_interval_s: float = Field(default=1.0, gt=0, le=3600)
    registers: ModbusLayout | None = Field(
        default=None, description="this device's layout; default: its asset type's"
    )
