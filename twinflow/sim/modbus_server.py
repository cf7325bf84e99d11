"""The simulator's Modbus TCP servers: the plant's sensors in the registers of their maps.

One pymodbus server listens on every distinct ``host:port`` of the served entities'
Modbus devices (on that host only); behind it each entity is one unit (its
``unit_id``) with a holding and an input register block. A block spans the kind's
mapped registers from the lowest to the highest, the unmapped ones between reading 0 as
on most devices, so a read may bridge the gaps between sensors; a register outside it
is answered with exception 2 (IllegalDataAddress), as a device that lacks it would.
Until an entity's first sample, its unit answers reads with exception 6
(ServerDeviceBusy): a poller must not take the zeros of a fresh block for readings.

:meth:`PlantModbusServer.publish` writes a sample in each register's encoding, the
inverse of what the bridge decodes: the canonical value converted to the register's
unit (the sensor's accepted-unit conversion), then ``raw = (value - offset) / scale``,
rounded and clipped to an integer type's range, words in the register's order. A
dropped sensor reads NaN when it is a float32; an integer register cannot say "no
value", so it keeps its last one, like a device whose input froze.
"""

from __future__ import annotations

import asyncio
import functools
import math
import struct
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimAction, SimData, SimDevice

from twinflow.errors import ConfigError
from twinflow.modbus_map import ModbusRegister, RegisterKind
from twinflow.sim.samples import Sample
from twinflow.twin_model import TwinModel

# Function codes that address each block when the server writes its own registers.
_WRITE_CODE: dict[RegisterKind, int] = {"holding": 16, "input": 4}
_INT_RANGE = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}
_FLOAT32_MAX = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]


def encode_value(register: ModbusRegister, value: float) -> list[int]:
    """The words ``register`` holds for ``value`` (in the register's unit), in its order.

    >>> from twinflow.modbus_map import ModbusRegister as R
    >>> encode_value(R(kind="holding", address=0, type="int16", scale=0.1), -1.26)
    [65523]
    >>> encode_value(R(kind="holding", address=0, type="float32", word_order="little"), 1.5)
    [0, 16320]
    >>> encode_value(R(kind="input", address=0, type="uint16"), 70_000)
    [65535]
    """
    raw = (value - register.offset) / register.scale
    if register.type == "float32":
        if not math.isnan(raw) and abs(raw) > _FLOAT32_MAX:
            raw = math.copysign(math.inf, raw)
        data = struct.pack(">f", raw)
    else:
        low, high = _INT_RANGE[register.type]
        number = min(max(round(raw), low), high) if math.isfinite(raw) else 0
        fmt = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I"}[register.type]
        data = struct.pack(fmt, number)
    words = list(struct.unpack(f">{len(data) // 2}H", data))
    return words[::-1] if register.word_order == "little" else words


class PlantModbusServer:
    """pymodbus TCP servers holding the sensors of ``entity_ids`` in their registers.

    Use ``async with``; every entity must have a Modbus device in the twin model.
    """

    def __init__(self, model: TwinModel, entity_ids: Sequence[str]) -> None:
        unknown = [entity_id for entity_id in entity_ids if entity_id not in model.by_id]
        if unknown:
            raise ConfigError(f"entities not in the twin model: {', '.join(unknown)}")
        unmapped = [e for e in entity_ids if model.by_id[e].modbus is None]
        if unmapped:
            raise ConfigError(
                f"entities without a Modbus device in the twin model: {', '.join(unmapped)}"
            )
        self._model = model
        # Per entity: the (host, port) serving it and its unit id there.
        self._units: dict[str, tuple[tuple[str, int], int]] = {}
        self._layouts: dict[str, dict[str, ModbusRegister]] = {}
        for entity_id in entity_ids:
            entity = model.by_id[entity_id]
            device = entity.modbus
            assert device is not None
            self._units[entity_id] = ((device.host, device.port), device.unit_id)
            self._layouts[entity_id] = model.modbus_layout(entity)
        self._servers: dict[tuple[str, int], ModbusTcpServer] = {}
        self._published: set[str] = set()

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` pairs served, in the order of the entities."""
        return list(dict.fromkeys(endpoint for endpoint, _unit in self._units.values()))

    async def __aenter__(self) -> Self:
        try:
            for endpoint in self.endpoints:
                devices = [
                    _device(
                        unit_id,
                        self._layouts[entity_id],
                        functools.partial(self._busy_until_published, entity_id),
                    )
                    for entity_id, (served, unit_id) in self._units.items()
                    if served == endpoint
                ]
                server = ModbusTcpServer(devices, address=endpoint)
                try:
                    await server.serve_forever(background=True)
                except RuntimeError:
                    raise ConfigError(
                        f"cannot serve Modbus TCP on {endpoint[0]}:{endpoint[1]} (taken, or "
                        "not an address of this host); change the device's host or port in "
                        "the twin model"
                    ) from None
                self._servers[endpoint] = server
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        servers, self._servers = self._servers, {}
        for server in servers.values():
            await server.shutdown()  # type: ignore[no-untyped-call]

    async def publish(self, sample: Sample) -> None:
        """Write one entity's sample into its unit's registers."""
        if not self._servers:
            raise RuntimeError("publish() needs a started server (async with)")
        try:
            endpoint, unit_id = self._units[sample.entity_id]
        except KeyError:
            raise ValueError(f"entity {sample.entity_id} is not served by this server") from None
        server = self._servers[endpoint]
        layout = self._layouts[sample.entity_id]
        specs = self._model.sensors_of(sample.entity_id)
        for sensor, value in sample.values.items():
            register = layout.get(sensor)
            if register is None:
                continue
            conversion = specs[sensor].conversion(register.unit)
            assert conversion is not None  # the twin model checked the unit
            words = encode_value(register, conversion.from_canonical(value))
            await server.async_setValues(
                unit_id, _WRITE_CODE[register.kind], register.address, words
            )
        for sensor in sample.dropped:
            register = layout.get(sensor)
            if register is not None and register.type == "float32":
                words = encode_value(register, math.nan)
                await server.async_setValues(
                    unit_id, _WRITE_CODE[register.kind], register.address, words
                )
        self._published.add(sample.entity_id)
        # The writes never suspend; without this a caller publishing flat out would
        # starve the servers' network side.
        await asyncio.sleep(0)

    async def _busy_until_published(
        self,
        entity_id: str,
        _function_code: int,
        _block_start: int,
        _address: int,
        _count: int,
        _registers: list[int],
        written: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if written is None and entity_id not in self._published:
            return ExcCodes.DEVICE_BUSY
        return None


def _device(unit_id: int, layout: dict[str, ModbusRegister], action: SimAction) -> SimDevice:
    blocks: dict[RegisterKind, list[SimData]] = {}
    for kind in ("holding", "input"):
        registers = [register for register in layout.values() if register.kind == kind]
        if not registers:
            # A block may not be empty: one invalid register, refused like any other.
            blocks[kind] = [SimData(0, datatype=DataType.INVALID)]
            continue
        first = min(register.address for register in registers)
        end = max(register.address + register.width for register in registers)
        blocks[kind] = [SimData(first, count=end - first, values=0, datatype=DataType.REGISTERS)]
    # pymodbus wants coil and discrete input blocks too; the plant has none, so 16 of
    # each that stay off.
    coils, discrete = ([SimData(0, values=[False] * 16, datatype=DataType.BITS)] for _ in "cd")
    return SimDevice(
        unit_id, simdata=(coils, discrete, blocks["holding"], blocks["input"]), action=action
    )
