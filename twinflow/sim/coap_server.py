"""The simulator's CoAP servers: each entity's readings as observable resources.

One aiocoap server (UDP only) runs on every distinct ``host:port`` of the served
entities' CoAP maps, bound to that host alone. At each path of an entity's map it
serves an observable resource (RFC 7641):

- a per-sensor path: the sensor's value as UTF-8 text in the resource's unit
  (``text/plain``, converted from the canonical value when the map names an accepted
  unit), e.g. ``161.6``;
- a telemetry path: one raw-contract JSON message in the batch form
  (``application/json``): ``{"entity_id", "ts", "values", "units"}``, canonical units.

Every sample updates its entity's resources and notifies their observers; a sensor in a
dropout keeps its last value unnotified (a telemetry body leaves it out, and a sample
with every sensor dropped changes nothing). Before an entity's first sample its
resources answer 5.03 Service Unavailable, which ends an observe request.

Each representation carries an ETag naming the sample it comes from: the sample's
epoch milliseconds as 8 bytes. A client that re-registers after losing its observation
can tell the current value it already has (same ETag) from a new sample with the same
value (a stuck sensor: another ETag). A restarted server shows its new samples' times,
so its ETags are new too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import msgspec
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.resource import ObservableResource, Site

from twinflow.errors import ConfigError
from twinflow.sim.samples import Sample
from twinflow.twin_model import TwinModel, UnitConversion

log = logging.getLogger("twinflow.simulate.coap")

_TEXT = ContentFormat.TEXT
_JSON = ContentFormat.JSON
# Until the first sample, a client asking again within a second finds the same answer.
_NOT_YET_MAX_AGE_S = 1


class _Representation(ObservableResource):  # type: ignore[misc]
    """One resource's latest representation; every update notifies its observers."""

    def __init__(self, content_format: ContentFormat) -> None:
        super().__init__()
        self._content_format = content_format
        self._payload: bytes | None = None
        self._etag = b""

    def show(self, payload: bytes, etag: bytes) -> None:
        self._payload, self._etag = payload, etag
        self.updated_state()

    async def render_get(self, _request: Message) -> Message:
        if self._payload is None:
            return Message(
                code=Code.SERVICE_UNAVAILABLE,
                payload=b"no sample yet",
                max_age=_NOT_YET_MAX_AGE_S,
            )
        return Message(
            code=Code.CONTENT,
            payload=self._payload,
            content_format=self._content_format,
            etag=self._etag,
        )


class _SensorResource:
    """A per-sensor path: which sensor, and how its canonical value becomes the unit's."""

    def __init__(self, sensor: str, conversion: UnitConversion | None) -> None:
        self.sensor = sensor
        self.conversion = conversion
        self.representation = _Representation(_TEXT)


class _Telemetry(msgspec.Struct, frozen=True):
    entity_id: str
    ts: int
    values: dict[str, float]
    units: dict[str, str]


_encoder = msgspec.json.Encoder()


class PlantCoapServer:
    """aiocoap servers exposing the readings of ``entity_ids`` (each with a CoAP map).

    Use ``async with``; :meth:`publish` each entity's samples.
    """

    def __init__(self, model: TwinModel, entity_ids: Sequence[str]) -> None:
        unknown = [entity_id for entity_id in entity_ids if entity_id not in model.by_id]
        if unknown:
            raise ConfigError(f"entities not in the twin model: {', '.join(unknown)}")
        unmapped = [entity_id for entity_id in entity_ids if model.by_id[entity_id].coap is None]
        if unmapped:
            raise ConfigError(f"entities without a coap map in the twin model: {unmapped}")
        self._model = model
        self._sites: dict[tuple[str, int], Site] = {}
        # Which path of which server holds what, to refuse two entities sharing one.
        self._owners: dict[tuple[str, int, str], str] = {}
        self._sensors: dict[str, list[_SensorResource]] = {}
        self._telemetry: dict[str, _Representation] = {}
        self._contexts: list[Context] = []
        for entity_id in dict.fromkeys(entity_ids):
            self._add_entity(entity_id)

    def _add_entity(self, entity_id: str) -> None:
        entity = self._model.by_id[entity_id]
        coap = entity.coap
        assert coap is not None
        site = self._sites.setdefault((coap.host, coap.port), Site())
        if coap.telemetry is not None:
            telemetry = _Representation(_JSON)
            self._add(site, entity_id, coap.telemetry, telemetry)
            self._telemetry[entity_id] = telemetry
            return
        specs = self._model.sensors_of(entity_id)
        resources = self._sensors.setdefault(entity_id, [])
        for sensor, mapped in self._model.coap_resources(entity).items():
            spec = specs[sensor]
            served = _SensorResource(sensor, spec.conversion(mapped.unit))
            self._add(site, entity_id, mapped.path, served.representation)
            resources.append(served)

    def _add(self, site: Site, entity_id: str, path: str, shown: _Representation) -> None:
        coap = self._model.by_id[entity_id].coap
        assert coap is not None
        owner = self._owners.setdefault((coap.host, coap.port, path), entity_id)
        if owner != entity_id:
            raise ConfigError(
                f"coap://{coap.host}:{coap.port}/{path} is in the coap maps of both "
                f"{owner} and {entity_id}; give one of them another path or port"
            )
        site.add_resource(tuple(path.split("/")), shown)

    async def __aenter__(self) -> Self:
        try:
            for (host, port), site in self._sites.items():
                context = await Context.create_server_context(
                    site, bind=(host, port), transports=["udp6"]
                )
                self._contexts.append(context)
                log.info("CoAP server at coap://%s:%d", host, port)
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
        contexts, self._contexts = self._contexts, []
        for context in contexts:
            await context.shutdown()

    async def publish(self, sample: Sample) -> None:
        """Show one entity's sample on its resources and notify their observers."""
        if not self._contexts:
            raise RuntimeError("publish() needs a started server (async with)")
        etag = sample.ts_ms.to_bytes(8, "big", signed=True)
        if sample.entity_id in self._telemetry:
            self._show_telemetry(sample, etag)
        elif sample.entity_id in self._sensors:
            self._show_values(sample, etag)
        else:
            raise ValueError(f"entity {sample.entity_id} is not served by this server")
        # Notifications are rendered by the observations' own tasks: let them run now,
        # or a caller publishing flat out would replace each value before it was sent.
        await asyncio.sleep(0)

    def _show_telemetry(self, sample: Sample, etag: bytes) -> None:
        if not sample.values:
            return
        specs = self._model.sensors_of(sample.entity_id)
        body = _Telemetry(
            entity_id=sample.entity_id,
            ts=sample.ts_ms,
            values={name: float(value) for name, value in sample.values.items()},
            units={name: specs[name].unit for name in sample.values},
        )
        self._telemetry[sample.entity_id].show(_encoder.encode(body), etag)

    def _show_values(self, sample: Sample, etag: bytes) -> None:
        for served in self._sensors[sample.entity_id]:
            value = sample.values.get(served.sensor)
            if value is None:
                continue
            if served.conversion is not None:
                value = served.conversion.from_canonical(value)
            served.representation.show(repr(float(value)).encode(), etag)
