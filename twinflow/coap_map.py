"""The twin model's CoAP maps: which resources carry an entity's readings.

An entity read over CoAP names its server and either one ``telemetry`` resource whose
representation is a JSON message of the raw contract (single or batch form), or a
resource per sensor whose representation is one number as text (in ``unit``: the
sensor's canonical unit unless given). An asset type may give the per-sensor paths its
machines share (``coap``).
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

_PATH = r"^[A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*$"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CoapResource(_Strict):
    """One sensor's resource."""

    path: str = Field(pattern=_PATH, description="URI path without the leading slash")
    unit: str | None = Field(
        default=None, description="unit of the value; default: the sensor's canonical unit"
    )


CoapResources = dict[str, CoapResource]
"""Sensor name -> its resource."""


class CoapDevice(_Strict):
    """The CoAP server one entity's readings are observed on."""

    host: str = Field(min_length=1)
    port: int = Field(default=5683, ge=1, le=65535)
    telemetry: str | None = Field(
        default=None, pattern=_PATH, description="one resource with raw-contract JSON"
    )
    resources: CoapResources | None = Field(
        default=None, description="a resource per sensor; default: its asset type's"
    )

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if self.telemetry is not None and self.resources is not None:
            raise ValueError("give either telemetry (one JSON resource) or resources, not both")
        return self
