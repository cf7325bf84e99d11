"""The simulator's OPC UA server: the plant's sensors and setpoints under ``Objects/Plant``.

Address space, in the namespace ``settings.namespace``::

    Objects/Plant/<entity_id>/<sensor>                    Double, ns=<i>;s=<entity_id>/<sensor>
    Objects/Plant/<entity_id>/<sensor>/EngineeringUnits   EUInformation, the canonical unit
    Objects/Plant/<entity_id>/setpoints/<name>            Double (float and int setpoints) or
                                                          Boolean, writable,
                                                          ns=<i>;s=<entity_id>/setpoints/<name>
    Objects/Plant/<entity_id>/command_id                  String, writable,
                                                          ns=<i>;s=<entity_id>/command_id

Node ids are strings made of entity and sensor (:func:`node_id_string`,
:func:`setpoint_node_id_string`, :func:`command_id_node_id_string`), so they are the same
after every restart and a client can resubscribe to the very same items. Only entities
whose asset type has setpoints get the ``setpoints`` folder and ``command_id``.

A setpoint node holds what the machine runs at (its twin model default until a command
changes it), from the entity's first sample on; before, like a sensor, it is
BadWaitingForInitialData. Its source timestamps are on the simulation's clock: the
sample that showed it, or for a command the entity's latest sample.

A client delivers a command with ONE Write of two values, in this order: the command id
to ``command_id``, then the new value to the setpoint node. The server applies it as a
:class:`~schemas.control.Command` through the simulator's
:class:`~twinflow.sim.actuators.Actuators`, so the physics follows. Per value written:

- Good: applied, or a command id applied before (a redelivery: nothing changes);
- BadOutOfRange: the setpoint's spec refuses the value (the machine keeps its setpoint),
  or the command id is empty;
- BadTypeMismatch: not a Double (Boolean for a bool setpoint; String for the command id);
- BadInvalidState: a setpoint written without a command id written before it.

Each setpoint write takes the command id written before it, whatever its outcome, so a
bare setpoint write never borrows a command id meant for another value.

An OPC UA write carries no expiry, so the server takes none: expired commands are the
bridge's to hold back. Writes need a session like reads: over Basic256Sha256 only the
configured user gets one; with security none anyone does.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, timedelta
from types import TracebackType
from typing import Any, Self

from asyncua import ua
from asyncua.common.node import Node
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AddressSpace, AttributeService
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from connectors.opcua import certificate_der, certificate_uri
from schemas.control import Command
from twinflow.errors import ConfigError
from twinflow.settings import OpcUaSettings
from twinflow.sim.actuators import Actuators, Outcome
from twinflow.sim.samples import Sample
from twinflow.twin_model import SetpointSpec, SetpointValue, TwinModel

log = logging.getLogger("twinflow.simulate.opcua")
APPLICATION_URI = "urn:twinflow:sim:opcua"
_EPOCH = ua.DateTime(1970, 1, 1, tzinfo=UTC)
# OPC UA Part 8: EUInformation.UnitId is -1 when no UNECE code is given.
_NO_UNIT_ID = -1
_NEVER_MS = 2**63 - 1
_SETPOINTS = "setpoints"
_COMMAND_ID = "command_id"
_ADMIN = User(role=UserRole.Admin)


def node_id_string(entity_id: str, sensor: str) -> str:
    """The string identifier of a sensor's variable (namespace index not included)."""
    return f"{entity_id}/{sensor}"


def setpoint_node_id_string(entity_id: str, name: str) -> str:
    """The string identifier of a setpoint's variable (namespace index not included)."""
    return f"{entity_id}/{_SETPOINTS}/{name}"


def command_id_node_id_string(entity_id: str) -> str:
    """The string identifier of an entity's ``command_id`` variable (no namespace index)."""
    return f"{entity_id}/{_COMMAND_ID}"


class _PasswordUserManager(UserManager):
    """One user, and only over a secured channel.

    asyncua lets a client open a SecurityPolicy#None channel for discovery even when no
    None endpoint is offered, and would then accept a session on it. Over a secured
    channel the server knows the client's certificate, so "no certificate" means the
    client skipped the only endpoint offered (Basic256Sha256, SignAndEncrypt).
    """

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode()
        self._password = password.encode()

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if certificate is None or username is None or password is None:
            return None
        same_user = hmac.compare_digest(username.encode(), self._username)
        same_password = hmac.compare_digest(password.encode(), self._password)
        return User(role=UserRole.User, name=username) if same_user and same_password else None


_WriteHandler = Callable[[ua.WriteValue, User], Awaitable[ua.StatusCode | None]]


class _CommandWrites(AttributeService):
    """asyncua's Write service, with the writes ``handler`` claims answered by it.

    The handler returns None for the values it leaves to asyncua. Taking the service
    over, rather than reacting to writes afterwards, is what lets a refused command
    answer a Bad status for its own value.
    """

    def __init__(self, aspace: AddressSpace, handler: _WriteHandler) -> None:
        super().__init__(aspace)
        self._handler = handler

    async def write(self, params: ua.WriteParameters, user: User = _ADMIN) -> list[ua.StatusCode]:
        results = []
        for item in params.NodesToWrite:
            status = await self._handler(item, user)
            if status is None:
                (status,) = await super().write(ua.WriteParameters(NodesToWrite=[item]), user)
            results.append(status)
        return results


class PlantOpcUaServer:
    """An asyncua server exposing the sensors and setpoints of ``entity_ids``.

    Use ``async with``. Commands written to it go to ``actuators`` (shared with the
    scenario that makes the samples, so the physics follows); without one the server
    keeps its own, starting at the twin model's defaults.
    """

    def __init__(
        self,
        settings: OpcUaSettings,
        model: TwinModel,
        entity_ids: Sequence[str],
        actuators: Actuators | None = None,
    ) -> None:
        unknown = [entity_id for entity_id in entity_ids if entity_id not in model.by_id]
        if unknown:
            raise ConfigError(f"entities not in the twin model: {', '.join(unknown)}")
        for entity_id in entity_ids:
            clash = {_SETPOINTS, _COMMAND_ID} & set(model.sensors_of(entity_id))
            if model.setpoints_of(entity_id) and clash:
                raise ConfigError(
                    f"{entity_id}: a sensor named {' or '.join(sorted(clash))} would share "
                    "its OPC UA node with the setpoints; rename the sensor"
                )
        self._settings = settings
        self._model = model
        self._entity_ids = tuple(entity_ids)
        self.actuators = actuators if actuators is not None else Actuators(model, entity_ids)
        self._server: Server | None = None
        self._iserver: InternalServer | None = None
        self._nodes: dict[str, dict[str, ua.NodeId]] = {}
        # Command nodes by node id: (entity, setpoint), the setpoint None for command_id.
        self._command_nodes: dict[ua.NodeId, tuple[str, str | None]] = {}
        # What each setpoint node holds, by (entity, setpoint), once it holds a value.
        self._shown: dict[tuple[str, str], SetpointValue] = {}
        # Per entity: the source timestamp of its latest sample.
        self._latest: dict[str, ua.DateTime] = {}
        # Per entity: the command id written, until a setpoint write takes it.
        self._pending: dict[str, str] = {}
        self.namespace_index = -1

    async def __aenter__(self) -> Self:
        server = Server(user_manager=_user_manager(self._settings))
        await server.init()
        self._iserver = server.iserver
        server.iserver.attribute_service = _CommandWrites(server.iserver.aspace, self._on_write)
        server.set_server_name("twinflow plant simulator")
        server.set_endpoint(self._settings.endpoint)
        # Whatever host the endpoint names, the simulator listens on loopback only.
        server.socket_address = ("127.0.0.1", self._settings.port)
        await self._secure(server)
        self.namespace_index = await server.register_namespace(self._settings.namespace)
        await self._build_address_space(server)
        await server.start()
        self._server = server
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None

    def node_id(self, entity_id: str, sensor: str) -> ua.NodeId:
        """The node id of a sensor's variable."""
        return self._nodes[entity_id][sensor]

    async def publish(self, sample: Sample) -> None:
        """Write one entity's sample: values as Good, dropped sensors as BadNoCommunication."""
        if self._server is None:
            raise RuntimeError("publish() needs a started server (async with)")
        try:
            nodes = self._nodes[sample.entity_id]
        except KeyError:
            raise ValueError(f"entity {sample.entity_id} is not served by this server") from None
        source_ts = _EPOCH + timedelta(milliseconds=sample.ts_ms)
        server_ts = ua.DateTime.now(UTC)
        # Server-side writes skip the client stack and its encoding: a few µs per value.
        write = self._server.write_attribute_value
        for sensor, value in sample.values.items():
            await write(
                nodes[sensor],
                ua.DataValue(
                    Value=ua.Variant(float(value), ua.VariantType.Double),
                    StatusCode=_status(StatusCodes.Good),
                    SourceTimestamp=source_ts,
                    ServerTimestamp=server_ts,
                ),
            )
        for sensor in sample.dropped:
            await write(
                nodes[sensor],
                ua.DataValue(
                    StatusCode=_status(StatusCodes.BadNoCommunication),
                    SourceTimestamp=source_ts,
                    ServerTimestamp=server_ts,
                ),
            )
        # The first sample shows the setpoints, later ones a change from elsewhere (MQTT).
        self._latest[sample.entity_id] = source_ts
        for name, value in sample.setpoints.items():
            await self._show_setpoint(sample.entity_id, name, value, source_ts)
        # Writes never suspend; without this a caller publishing flat out would starve
        # the server's network side, and subscribers would get nothing.
        await asyncio.sleep(0)

    async def _secure(self, server: Server) -> None:
        settings = self._settings
        if settings.security == "none":
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
            await server.set_application_uri(APPLICATION_URI)
            return
        if settings.server_cert_file is None or settings.server_key_file is None:
            raise ConfigError(
                "security basic256sha256 needs opcua.server_cert_file and opcua.server_key_file "
                "(TWINFLOW_OPCUA__SERVER_CERT_FILE, TWINFLOW_OPCUA__SERVER_KEY_FILE)"
            )
        await server.load_certificate(settings.server_cert_file)
        await server.load_private_key(settings.server_key_file)
        await server.set_application_uri(
            certificate_uri(certificate_der(settings.server_cert_file)) or APPLICATION_URI
        )
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        server.set_identity_tokens([ua.UserNameIdentityToken])

    async def _build_address_space(self, server: Server) -> None:
        index = self.namespace_index
        plant = await server.nodes.objects.add_folder(
            _node_id("Plant", index), ua.QualifiedName("Plant", index)
        )
        for entity_id in self._entity_ids:
            entity = await plant.add_object(
                _node_id(entity_id, index), ua.QualifiedName(entity_id, index)
            )
            nodes = self._nodes.setdefault(entity_id, {})
            for sensor, spec in self._model.sensors_of(entity_id).items():
                name = node_id_string(entity_id, sensor)
                node_id = _node_id(name, index)
                variable = await entity.add_variable(
                    node_id, ua.QualifiedName(sensor, index), 0.0, ua.VariantType.Double
                )
                await variable.add_property(
                    _node_id(f"{name}/EngineeringUnits", index),
                    ua.QualifiedName("EngineeringUnits", 0),
                    _eu_information(spec.unit, spec.description),
                    ua.VariantType.ExtensionObject,
                    ua.NodeId(ua.Int32(ObjectIds.EUInformation)),
                )
                # Until the first sample, a subscriber must not take the 0.0 placeholder
                # for a reading.
                await server.write_attribute_value(
                    node_id,
                    ua.DataValue(StatusCode=_status(StatusCodes.BadWaitingForInitialData)),
                )
                nodes[sensor] = node_id
            await self._add_command_nodes(server, entity, entity_id)

    async def _add_command_nodes(self, server: Server, entity: Node, entity_id: str) -> None:
        index = self.namespace_index
        specs = self._model.setpoints_of(entity_id)
        if not specs:
            return
        folder = await entity.add_folder(
            _node_id(f"{entity_id}/{_SETPOINTS}", index), ua.QualifiedName(_SETPOINTS, index)
        )
        for name, spec in specs.items():
            node_id = _node_id(setpoint_node_id_string(entity_id, name), index)
            value = self.actuators.setpoints(entity_id)[name]
            variable = await folder.add_variable(
                node_id, ua.QualifiedName(name, index), _variant(spec, value)
            )
            await variable.set_writable()
            self._command_nodes[node_id] = (entity_id, name)
            # Like a sensor, a setpoint is reported from the machine's first sample on.
            await server.write_attribute_value(
                node_id, ua.DataValue(StatusCode=_status(StatusCodes.BadWaitingForInitialData))
            )
        node_id = _node_id(command_id_node_id_string(entity_id), index)
        variable = await entity.add_variable(
            node_id, ua.QualifiedName(_COMMAND_ID, index), "", ua.VariantType.String
        )
        await variable.set_writable()
        self._command_nodes[node_id] = (entity_id, None)

    async def _on_write(self, item: ua.WriteValue, user: User) -> ua.StatusCode | None:
        target = self._command_nodes.get(item.NodeId)
        if target is None or item.AttributeId != AttributeIds.Value:
            return None
        entity_id, name = target
        variant = item.Value.Value
        if name is None:
            if variant is None or variant.VariantType != ua.VariantType.String:
                return _status(StatusCodes.BadTypeMismatch)
            if not variant.Value:
                return _status(StatusCodes.BadOutOfRange)
            self._pending[entity_id] = variant.Value
            await self._write(item.NodeId, variant, ua.DateTime.now(UTC))
            return _status(StatusCodes.Good)
        # Taken whatever comes of the write: a command id goes with one setpoint value.
        command_id = self._pending.pop(entity_id, None)
        spec = self._model.setpoints_of(entity_id)[name]
        if variant is None or variant.VariantType != _variant_type(spec):
            return _status(StatusCodes.BadTypeMismatch)
        if command_id is None:
            log.warning(
                "OPC UA write of %s/%s without a command id first: refused", entity_id, name
            )
            return _status(StatusCodes.BadInvalidState)
        now_ms = time.time_ns() // 1_000_000
        command = Command(
            command_id=command_id,
            entity_id=entity_id,
            setpoint=name,
            value=variant.Value,
            issued_ms=now_ms,
            expires_ms=_NEVER_MS,
            user=user.name or "opcua",
        )
        outcome = self.actuators.apply(command, now_ms)
        if outcome is Outcome.REFUSED:
            problem = self.actuators.problem(command)
            log.warning("OPC UA command %s refused: %s", command_id, problem)
            return _status(StatusCodes.BadOutOfRange)
        log.info(
            "OPC UA command %s (%s %s=%r): %s", command_id, entity_id, name, variant.Value, outcome
        )
        # On the simulation's clock: as of the entity's latest sample it runs at this.
        source_ts = self._latest.get(entity_id) or ua.DateTime.now(UTC)
        value = self.actuators.setpoints(entity_id)[name]
        await self._show_setpoint(entity_id, name, value, source_ts)
        return _status(StatusCodes.Good)

    async def _show_setpoint(
        self, entity_id: str, name: str, value: SetpointValue, source_ts: ua.DateTime
    ) -> None:
        """Write a setpoint's node unless it holds ``value`` already."""
        if self._shown.get((entity_id, name)) == value:
            return
        spec = self._model.setpoints_of(entity_id)[name]
        node_id = _node_id(setpoint_node_id_string(entity_id, name), self.namespace_index)
        self._shown[(entity_id, name)] = value
        await self._write(node_id, _variant(spec, value), source_ts)

    async def _write(self, node_id: ua.NodeId, variant: ua.Variant, source_ts: ua.DateTime) -> None:
        assert self._iserver is not None
        value = ua.DataValue(
            Value=variant,
            StatusCode=_status(StatusCodes.Good),
            SourceTimestamp=source_ts,
            ServerTimestamp=ua.DateTime.now(UTC),
        )
        await self._iserver.write_attribute_value(node_id, value)


def _variant_type(spec: SetpointSpec) -> ua.VariantType:
    return ua.VariantType.Boolean if spec.type == "bool" else ua.VariantType.Double


def _variant(spec: SetpointSpec, value: SetpointValue) -> ua.Variant:
    if spec.type == "bool":
        return ua.Variant(bool(value), ua.VariantType.Boolean)
    return ua.Variant(float(value), ua.VariantType.Double)


def _node_id(identifier: str, namespace_index: int) -> ua.NodeId:
    return ua.NodeId(ua.String(identifier), ua.Int16(namespace_index))


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _user_manager(settings: OpcUaSettings) -> UserManager | None:
    if settings.security == "none":
        return None
    if settings.username is None or settings.password is None:
        raise ConfigError(
            "security basic256sha256 needs opcua.username and opcua.password "
            "(TWINFLOW_OPCUA__USERNAME, TWINFLOW_OPCUA__PASSWORD)"
        )
    return _PasswordUserManager(settings.username, settings.password.get_secret_value())


def _eu_information(unit: str, description: str) -> ua.EUInformation:
    return ua.EUInformation(
        NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
        UnitId=_NO_UNIT_ID,
        DisplayName=ua.LocalizedText(unit),
        Description=ua.LocalizedText(description or unit),
    )
