"""Modbus registers to raw readings: which reads cover a device's map, and what they say.

Pure: no I/O and no client library, so the planning and the decoding are tested
without a device. The bridge (:mod:`twinflow.bridges.modbus`) does the reading.

A device's map (sensor -> register, see :mod:`twinflow.modbus_map`) becomes a few read
requests (:func:`plan_reads`; :func:`polled_devices` for every device of a twin
model): registers of one kind are merged into contiguous ranges, and two ranges are
joined when at most ``max_gap`` unmapped registers lie between them and the joined
range stays within ``max_registers`` (Modbus allows 125 per read). Fewer requests cost
fewer round trips, which is what bounds a poll's duration on a slow link.

A range's words decode into one outcome per sensor: a :class:`RawReading` (the single
form of the raw contract, ``raw * scale + offset`` in the register's unit) or, for a
value that is not a finite number, a :class:`Rejected` that becomes a dead letter. A
read the device answered with an exception becomes one :class:`Rejected` for the range.

Examples
--------
A pump keeping a float32 at holding 40-41 and an int16 in tenths at holding 44:

>>> from twinflow.modbus_map import ModbusRegister
>>> layout = {
...     "flow": ModbusRegister(kind="holding", address=40, type="float32"),
...     "temp": ModbusRegister(kind="holding", address=44, type="int16", scale=0.1),
... }
>>> (read,) = plan_reads(layout, {"flow": "m3/h", "temp": "degC"})
>>> read.label
'holding 40-44'
>>> device = DeviceAddress("127.0.0.1", 5020, 3)
>>> for outcome in decode(read, [0x4348, 0x0000, 0, 0, 0xFF9C], "pump-1", device, 1_000):
...     print(outcome)
RawReading(entity_id='pump-1', sensor='flow', ts=1000, value=200.0, unit='m3/h', \
quality='good', source='modbus:127.0.0.1:5020/3:holding:40')
RawReading(entity_id='pump-1', sensor='temp', ts=1000, value=-10.0, unit='degC', \
quality='good', source='modbus:127.0.0.1:5020/3:holding:44')

"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from schemas.raw import RawReading, Reason
from twinflow.errors import ConfigError
from twinflow.modbus_map import ModbusRegister, RegisterKind
from twinflow.settings import ModbusSettings, env_name
from twinflow.twin_model import TwinModel

MAX_REGISTERS_PER_READ = 125
"""What one Read Holding/Input Registers request may ask for (Modbus spec, 6.3 and 6.4)."""

EXCEPTION_NAMES = {
    1: "IllegalFunction",
    2: "IllegalDataAddress",
    3: "IllegalDataValue",
    4: "ServerDeviceFailure",
    5: "Acknowledge",
    6: "ServerDeviceBusy",
    8: "MemoryParityError",
    10: "GatewayPathUnavailable",
    11: "GatewayTargetDeviceFailedToRespond",
}
"""Exception codes by their names in the Modbus application protocol spec (7)."""

_KIND_ORDER: dict[RegisterKind, int] = {"holding": 0, "input": 1}


@dataclass(frozen=True, slots=True)
class DeviceAddress:
    """Where a unit is reached: a Modbus TCP server and the unit (slave) id behind it."""

    host: str
    port: int
    unit_id: int

    @property
    def name(self) -> str:
        """``host:port/unit``, as dead letters name the device.

        >>> DeviceAddress("10.0.0.7", 502, 1).name
        '10.0.0.7:502/1'
        """
        return f"{self.host}:{self.port}/{self.unit_id}"


@dataclass(frozen=True, slots=True)
class MappedSensor:
    """A sensor of a read, with the unit its scaled value is in."""

    sensor: str
    register: ModbusRegister
    unit: str


@dataclass(frozen=True, slots=True)
class ReadRange:
    """One read request: ``count`` registers of ``kind`` from ``address`` on."""

    kind: RegisterKind
    address: int
    count: int
    sensors: tuple[MappedSensor, ...]

    @property
    def label(self) -> str:
        """The registers as dead letters name them: ``holding 40-41``, ``input 7``."""
        return _registers(self.kind, self.address, self.count)


@dataclass(frozen=True, slots=True)
class Rejected:
    """What the bridge sends to the dead-letter topic instead of a reading."""

    reason: Reason
    detail: str
    address: str
    """The registers, e.g. ``holding 40-41``."""
    payload: bytes
    """JSON of what the device answered, for the letter's excerpt."""


Outcome = RawReading | Rejected


class _Evidence(msgspec.Struct, frozen=True, omit_defaults=True):
    entity_id: str
    ts: int
    device: str
    kind: RegisterKind
    address: int
    count: int
    sensor: str | None = None
    registers: list[int] | None = None
    exception_code: int | None = None


_encoder = msgspec.json.Encoder()


def plan_reads(
    layout: Mapping[str, ModbusRegister],
    units: Mapping[str, str],
    *,
    max_registers: int = MAX_REGISTERS_PER_READ,
    max_gap: int = 8,
) -> tuple[ReadRange, ...]:
    """The reads that cover ``layout``, holding registers first, each kind by address.

    ``units`` gives each sensor's canonical unit, the unit of a register that names
    none. Raises ValueError when a register does not fit in one read.

    >>> from twinflow.modbus_map import ModbusRegister as R
    >>> layout = {"a": R(kind="input", address=0), "b": R(kind="input", address=3),
    ...           "c": R(kind="input", address=20, type="uint32")}
    >>> [read.label for read in plan_reads(layout, dict.fromkeys("abc", "V"), max_gap=2)]
    ['input 0-3', 'input 20-21']
    >>> [read.label for read in plan_reads(layout, dict.fromkeys("abc", "V"), max_gap=1)]
    ['input 0', 'input 3', 'input 20-21']
    """
    if not 1 <= max_registers <= MAX_REGISTERS_PER_READ:
        raise ValueError(
            f"max_registers must lie in [1, {MAX_REGISTERS_PER_READ}], got {max_registers}"
        )
    if max_gap < 0:
        raise ValueError(f"max_gap must not be negative, got {max_gap}")
    mapped = sorted(
        (
            MappedSensor(sensor, register, register.unit or units[sensor])
            for sensor, register in layout.items()
        ),
        key=lambda item: (_KIND_ORDER[item.register.kind], item.register.address),
    )
    reads: list[ReadRange] = []
    current: list[MappedSensor] = []
    for item in mapped:
        register = item.register
        if register.width > max_registers:
            raise ValueError(
                f"{item.sensor}: a {register.type} takes {register.width} registers, more "
                f"than the {max_registers} one read may ask for"
            )
        if current:
            first = current[0].register
            end = max(m.register.address + m.register.width for m in current)
            joins = (
                register.kind == first.kind
                and register.address - end <= max_gap
                and register.address + register.width - first.address <= max_registers
            )
            if not joins:
                reads.append(_range(current))
                current = []
        current.append(item)
    if current:
        reads.append(_range(current))
    return tuple(reads)


def _range(sensors: list[MappedSensor]) -> ReadRange:
    first = sensors[0].register
    end = max(item.register.address + item.register.width for item in sensors)
    return ReadRange(first.kind, first.address, end - first.address, tuple(sensors))


def raw_value(register: ModbusRegister, words: Sequence[int]) -> int | float:
    """The number ``register``'s words hold, before scale and offset.

    Words are 16-bit, each big-endian on the wire already; for 32-bit types ``big``
    word order puts the high word at the lower address.

    >>> from twinflow.modbus_map import ModbusRegister as R
    >>> raw_value(R(kind="holding", address=0, type="int16"), [0xFFFE])
    -2
    >>> raw_value(R(kind="holding", address=0, type="uint32", word_order="little"), [1, 2])
    131073
    >>> raw_value(R(kind="holding", address=0, type="float32"), [0x3FC0, 0])
    1.5
    """
    if len(words) != register.width:
        raise ValueError(f"a {register.type} takes {register.width} words, got {len(words)}")
    if register.width == 2 and register.word_order == "little":
        words = [words[1], words[0]]
    data = struct.pack(f">{len(words)}H", *words)
    fmt = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
    number: int | float = struct.unpack(fmt[register.type], data)[0]
    return number


def decode(
    read: ReadRange, words: Sequence[int], entity_id: str, device: DeviceAddress, ts: int
) -> list[Outcome]:
    """One outcome per sensor of ``read`` from the words a device answered it with.

    ``ts`` is the poll's time (epoch ms), shared by every reading of the poll. A value
    that is not finite (a float32 NaN or infinity, or a scale overflowing it) is
    rejected as ``non_finite``.

    >>> from twinflow.modbus_map import ModbusRegister as R
    >>> (read,) = plan_reads({"t": R(kind="input", address=7, type="float32")}, {"t": "K"})
    >>> (letter,) = decode(read, [0x7FC0, 0], "oven-1", DeviceAddress("h", 502, 1), 5)
    >>> letter.reason, letter.address, letter.detail
    (<Reason.NON_FINITE: 'non_finite'>, 'input 7-8', 't is nan (float32 words 0x7fc0 0x0000)')
    """
    if len(words) < read.count:
        raise ValueError(f"{read.label} needs {read.count} words, got {len(words)}")
    outcomes: list[Outcome] = []
    for item in read.sensors:
        register = item.register
        start = register.address - read.address
        mine = list(words[start : start + register.width])
        value = raw_value(register, mine) * register.scale + register.offset
        address = _registers(register.kind, register.address, register.width)
        if not math.isfinite(value):
            shown = " ".join(f"{word:#06x}" for word in mine)
            outcomes.append(
                Rejected(
                    Reason.NON_FINITE,
                    f"{item.sensor} is {value} ({register.type} words {shown})",
                    address,
                    _encoder.encode(
                        _Evidence(
                            entity_id,
                            ts,
                            device.name,
                            register.kind,
                            register.address,
                            register.width,
                            sensor=item.sensor,
                            registers=mine,
                        )
                    ),
                )
            )
            continue
        outcomes.append(
            RawReading(
                entity_id=entity_id,
                sensor=item.sensor,
                ts=ts,
                value=float(value),
                unit=item.unit,
                quality="good",
                source=f"modbus:{device.name}:{register.kind}:{register.address}",
            )
        )
    return outcomes


def refused(
    read: ReadRange, exception_code: int, entity_id: str, device: DeviceAddress, ts: int
) -> Rejected:
    """The dead letter for a read the device answered with an exception response.

    >>> from twinflow.modbus_map import ModbusRegister as R
    >>> (read,) = plan_reads({"p": R(kind="holding", address=500)}, {"p": "bar"})
    >>> letter = refused(read, 2, "pump-1", DeviceAddress("h", 502, 9), 5)
    >>> letter.reason, letter.address, letter.detail
    (<Reason.DEVICE_EXCEPTION: 'device_exception'>, 'holding 500', 'h:502/9 answered \
reading holding 500 (p) with exception 2 (IllegalDataAddress)')
    """
    name = EXCEPTION_NAMES.get(exception_code, "unknown")
    sensors = ", ".join(item.sensor for item in read.sensors)
    return Rejected(
        Reason.DEVICE_EXCEPTION,
        f"{device.name} answered reading {read.label} ({sensors}) with exception "
        f"{exception_code} ({name})",
        read.label,
        _encoder.encode(
            _Evidence(
                entity_id,
                ts,
                device.name,
                read.kind,
                read.address,
                read.count,
                exception_code=exception_code,
            )
        ),
    )


def _registers(kind: RegisterKind, address: int, width: int) -> str:
    last = address + width - 1
    return f"{kind} {address}" if last == address else f"{kind} {address}-{last}"


@dataclass(frozen=True, slots=True)
class PolledDevice:
    """One entity's device and the reads that make one poll of it."""

    entity_id: str
    address: DeviceAddress
    interval_s: float
    reads: tuple[ReadRange, ...]


def polled_devices(model: TwinModel, settings: ModbusSettings) -> list[PolledDevice]:
    """Every entity with a Modbus device, in model order; ConfigError if a map cannot be read.

    The twin model checks each map on its own; what it cannot check is a map against
    the bridge's read size.
    """
    devices = []
    for entity in model.entities:
        if entity.modbus is None:
            continue
        units = {name: spec.unit for name, spec in model.sensors_of(entity.id).items()}
        try:
            reads = plan_reads(
                model.modbus_layout(entity),
                units,
                max_registers=settings.max_registers_per_read,
                max_gap=settings.max_gap,
            )
        except ValueError as exc:
            raise ConfigError(
                f"entity {entity.id}: its Modbus map cannot be read with "
                f"{env_name(('modbus', 'max_registers_per_read'))}="
                f"{settings.max_registers_per_read}: {exc}"
            ) from None
        device = entity.modbus
        devices.append(
            PolledDevice(
                entity.id,
                DeviceAddress(device.host, device.port, device.unit_id),
                device.poll_interval_s,
                reads,
            )
        )
    return devices
