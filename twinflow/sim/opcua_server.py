"""The simulator's OPC UA server: the plant's sensors as variables under ``Objects/Plant``.

Address space, in the namespace ``settings.namespace``::

    Objects/Plant/<entity_id>/<sensor>                    Double, ns=<i>;s=<entity_id>/<sensor>
    Objects/Plant/<entity_id>/<sensor>/EngineeringUnits   EUInformation, the canonical unit

Node ids are strings made of entity and sensor, so they are the same after every restart
and a client can resubscribe to the very same items.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Sequence
from datetime import UTC, timedelta
from types import TracebackType
from typing import Any, Self

from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from connectors.opcua import certificate_der, certificate_uri
from twinflow.errors import ConfigError
from twinflow.settings import OpcUaSettings
from twinflow.sim.samples import Sample
from twinflow.twin_model import TwinModel

APPLICATION_URI = "urn:twinflow:sim:opcua"
_EPOCH = ua.DateTime(1970, 1, 1, tzinfo=UTC)
# OPC UA Part 8: EUInformation.UnitId is -1 when no UNECE code is given.
_NO_UNIT_ID = -1


def node_id_string(entity_id: str, sensor: str) -> str:
    """The string identifier of a sensor's variable (namespace index not included)."""
    return f"{entity_id}/{sensor}"


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
        return User(role=UserRole.User) if same_user and same_password else None


class PlantOpcUaServer:
    """An asyncua server exposing the sensors of ``entity_ids``; use ``async with``."""

    def __init__(
        self, settings: OpcUaSettings, model: TwinModel, entity_ids: Sequence[str]
    ) -> None:
        unknown = [entity_id for entity_id in entity_ids if entity_id not in model.by_id]
        if unknown:
            raise ConfigError(f"entities not in the twin model: {', '.join(unknown)}")
        self._settings = settings
        self._model = model
        self._entity_ids = tuple(entity_ids)
        self._server: Server | None = None
        self._nodes: dict[str, dict[str, ua.NodeId]] = {}
        self.namespace_index = -1

    async def __aenter__(self) -> Self:
        server = Server(user_manager=_user_manager(self._settings))
        await server.init()
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
