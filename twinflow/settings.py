"""The one typed settings object of twinflow.

Values come, highest priority first, from keyword arguments, ``TWINFLOW_*`` environment
variables (nested fields use ``__``: ``TWINFLOW_KAFKA__PORT=19092``), an optional TOML
file (``TWINFLOW_CONFIG`` or ``twinflow --config FILE``) and the defaults below. The
entrypoint loads it once with :func:`load_settings` and passes it down; nothing else
reads the environment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from twinflow.errors import ConfigError

if TYPE_CHECKING:
    from twinflow.detection import DetectorConfig

ENV_PREFIX = "TWINFLOW_"
ENV_NESTED_DELIMITER = "__"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG"

Port = int
DEFAULT_TWIN_MODEL = (
    Path(__file__).resolve().parents[1] / "infra" / "twin-model" / "example-plant.yaml"
)
_HEAP = re.compile(r"^[1-9][0-9]*[mMgG]$")


def _port(default: int, description: str) -> Any:
    return Field(default=default, ge=1, le=65535, description=description)


def _check_heap(value: str) -> str:
    if not _HEAP.match(value):
        raise ValueError("JVM heap size must look like 512m or 2g")
    return value


HeapSize = Annotated[str, AfterValidator(_check_heap)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """The Kafka broker: where clients find it and how the local one runs."""

    port: Port = _port(9092, "client listener of the local broker (127.0.0.1)")
    controller_port: Port = _port(9093, "KRaft controller listener of the local broker")
    bootstrap_servers: str | None = Field(
        default=None, description="brokers clients connect to; default: the local broker"
    )
    heap: HeapSize = Field(
        default="1g", description="JVM heap of the local broker, fixed and resident from the start"
    )
    default_partitions: int = Field(default=4, ge=1, le=1024)
    security_protocol: str = Field(
        default="PLAINTEXT",
        pattern=r"^(PLAINTEXT|SASL_PLAINTEXT|SASL_SSL)$",
        description=(
            "PLAINTEXT, SASL_PLAINTEXT or SASL_SSL; the local broker (twinflow up) runs "
            "PLAINTEXT or SASL_PLAINTEXT on port, and SASL_SSL on ssl_port when that is set"
        ),
    )
    sasl_mechanism: str = Field(
        default="SCRAM-SHA-256",
        pattern=r"^SCRAM-SHA-(256|512)$",
        description="SCRAM-SHA-256 or SCRAM-SHA-512 (used with SASL_*)",
    )
    # Checked in field order, so the credential checks see security_protocol; they run
    # on defaults too, and their errors carry only the (missing or empty) value.
    sasl_username: str | None = Field(
        default=None, validate_default=True, description="SCRAM user (needed with SASL_*)"
    )
    sasl_password: SecretStr | None = Field(
        default=None, validate_default=True, description="SCRAM password (needed with SASL_*)"
    )
    ssl_ca_file: Path | None = Field(
        default=None,
        description=(
            "CA bundle for SASL_SSL; default: the system's CAs (the local broker's CA is "
            "STATE_DIR/tls/ca.pem)"
        ),
    )
    ssl_port: Port | None = Field(
        default=None,
        ge=1,
        le=65535,
        description=(
            "SASL_SSL listener of the local broker beside port, with a certificate from "
            "twinflow's private CA (twinflow up writes it to STATE_DIR/tls); SASL_SSL "
            "clients of the local broker connect here. Unset: no TLS listener"
        ),
    )

    @field_validator("sasl_username", "sasl_password")
    @classmethod
    def _sasl_credentials(
        cls, value: str | SecretStr | None, info: ValidationInfo
    ) -> str | SecretStr | None:
        protocol = info.data.get("security_protocol", "PLAINTEXT")
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if protocol.startswith("SASL_") and not text:
            env = f"{ENV_PREFIX}KAFKA{ENV_NESTED_DELIMITER}{str(info.field_name).upper()}"
            what = "user" if info.field_name == "sasl_username" else "password"
            raise ValueError(f"security_protocol {protocol} needs a SCRAM {what}: set {env}")
        return value

    @model_validator(mode="after")
    def _tls_listener(self) -> Self:
        kafka = f"{ENV_PREFIX}KAFKA{ENV_NESTED_DELIMITER}"
        if self.ssl_port is not None and not self.sasl:
            # SASL_SSL clients log in with SCRAM: the storage needs its users.
            raise ValueError(
                f"{kafka}SSL_PORT (a SASL_SSL listener) needs SCRAM users: set "
                f"{kafka}SECURITY_PROTOCOL=SASL_SSL with {kafka}SASL_USERNAME and "
                f"{kafka}SASL_PASSWORD, or unset {kafka}SSL_PORT"
            )
        if self.ssl_port is not None and self.ssl_port == self.port:
            raise ValueError(f"{kafka}SSL_PORT must differ from {kafka}PORT ({self.port})")
        local_tls = self.ssl_port is not None and self.bootstrap_servers is None
        if local_tls and self.security_protocol == "SASL_SSL" and self.ssl_ca_file is None:
            # The system's CAs never trust twinflow's private CA: every client would fail.
            raise ValueError(
                f"the local broker's SASL_SSL listener ({kafka}SSL_PORT) has a certificate "
                f"from twinflow's private CA: set {kafka}SSL_CA_FILE to STATE_DIR/tls/ca.pem "
                "(twinflow up writes it)"
            )
        return self

    @property
    def sasl(self) -> bool:
        """Whether clients authenticate with SASL/SCRAM."""
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        """Whether clients speak TLS to the broker."""
        return self.security_protocol == "SASL_SSL"

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` string clients use.

        >>> KafkaSettings().bootstrap
        '127.0.0.1:9092'
        """
        if self.bootstrap_servers:
            return self.bootstrap_servers
        port = self.ssl_port if self.tls and self.ssl_port is not None else self.port
        return f"127.0.0.1:{port}"


class QuestDBSettings(_Section):
    """QuestDB: HTTP (REST, ILP over HTTP, console), PostgreSQL wire and ILP/TCP."""

    host: str = Field(default="127.0.0.1", description="host clients connect to")
    http_port: Port = _port(9000, "HTTP: SQL over REST, ILP over HTTP and the web console")
    pg_port: Port = _port(8812, "PostgreSQL wire protocol")
    ilp_tcp_port: Port = _port(9009, "InfluxDB line protocol over TCP")
    min_http_port: Port = _port(9003, "minimal HTTP server (health, metrics)")
    table_prefix: str = Field(
        default="", pattern=r"^[a-z0-9_]*$", description="prefix of every table the flow writes"
    )
    # PG wire logins (Grafana, psql); the flow itself writes over ILP/HTTP.
    pg_user: str = Field(
        default="admin", min_length=1, description="PG wire user; the local server's pg.user"
    )
    pg_password: SecretStr = Field(
        default=SecretStr("quest"),
        min_length=1,
        description="PG wire password; the local server's pg.password (change the default)",
    )
    # HTTP basic auth (REST, ILP over HTTP, console). The password comes first so the
    # username's check (run on the default too) sees it; a validation error echoes its
    # input, so only the username's or an empty password's error can be raised.
    http_password: SecretStr | None = Field(
        default=None, description="HTTP basic auth password; the local server's http.password"
    )
    http_username: str | None = Field(
        default=None,
        validate_default=True,
        description="HTTP basic auth user (REST, ILP over HTTP); the local server's http.user",
    )
    heap: HeapSize = Field(
        default="1g",
        description="JVM heap of the local server, fixed and resident; data is off-heap",
    )

    @field_validator("http_password")
    @classmethod
    def _http_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty; unset it (and the username) to turn auth off")
        return value

    @field_validator("http_username")
    @classmethod
    def _http_username(cls, value: str | None, info: ValidationInfo) -> str | None:
        if "http_password" not in info.data:
            return value  # the password is invalid and already reported
        both = "TWINFLOW_QUESTDB__HTTP_USERNAME and TWINFLOW_QUESTDB__HTTP_PASSWORD"
        if (value is None) != (info.data["http_password"] is None):
            raise ValueError(f"QuestDB HTTP basic auth needs both or neither of {both}")
        if value is not None and (not value or ":" in value or not value.isprintable()):
            raise ValueError("must be non-empty, without ':' or control characters")
        return value

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP endpoint (also the web console)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def http_auth(self) -> tuple[str, str] | None:
        """``(user, password)`` for HTTP basic auth, or None when QuestDB needs none."""
        if self.http_username is None or self.http_password is None:
            return None
        return self.http_username, self.http_password.get_secret_value()

    def ilp_conf(self, **options: str | int) -> str:
        """A ``questdb`` client configuration string for ILP over HTTP.

        It holds the password in clear text when one is set: never log it.
        Values are escaped (``;`` becomes ``;;``):

        >>> QuestDBSettings(http_username="u", http_password="a;b").ilp_conf(auto_flush="off")
        'http::addr=127.0.0.1:9000;username=u;password=a;;b;auto_flush=off;'
        """
        parts = [f"http::addr={self.host}:{self.http_port}"]
        values: dict[str, str | int] = {}
        if self.http_auth is not None:
            values["username"], values["password"] = self.http_auth
        values.update(options)
        parts.extend(f"{key}={_conf_value(value)}" for key, value in values.items())
        return ";".join(parts) + ";"


def _conf_value(value: str | int) -> str:
    """A value for a ``questdb`` client configuration string (``;`` doubled)."""
    return str(value).replace(";", ";;")


class MqttSettings(_Section):
    """The MQTT broker (Mosquitto) and how twinflow's clients connect to it."""

    host: str = Field(default="127.0.0.1", description="host clients connect to")
    port: Port = _port(1883, "MQTT listener of the local broker")
    username: str | None = None
    password: SecretStr | None = None
    tls_ca_file: Path | None = Field(
        default=None,
        description=(
            "CA bundle; set, twinflow's clients speak TLS (to tls_port when that is set). "
            "The local broker's CA is STATE_DIR/tls/ca.pem"
        ),
    )
    tls_cert_file: Path | None = Field(default=None, description="client certificate (mTLS)")
    tls_key_file: Path | None = Field(default=None, description="client private key (mTLS)")
    tls_port: Port | None = Field(
        default=None,
        ge=1,
        le=65535,
        description=(
            "TLS listener of the local broker beside port, with a certificate from "
            "twinflow's private CA (twinflow up writes it to STATE_DIR/tls). Unset: none"
        ),
    )
    bridge_client_id: str = Field(
        default="twinflow-mqtt-bridge",
        min_length=1,
        description="fixed id of the bridge's persistent session; one per bridge instance",
    )
    session_expiry_s: int = Field(
        default=86_400, ge=0, description="how long the broker keeps the bridge's session"
    )
    receive_maximum: int = Field(
        default=1000, ge=1, le=65535, description="unacknowledged QoS 1 messages in flight"
    )
    max_queued_messages: int = Field(
        default=1_000_000,
        ge=0,
        description=(
            "messages kept per offline persistent session; Mosquitto's default of 1000 "
            "would drop QoS 1 readings while a bridge restarts"
        ),
    )
    password_file: Path | None = Field(
        default=None,
        description=(
            "mosquitto_passwd file of the local broker (twinflow up); set, anonymous "
            "clients are refused and twinflow's clients log in as username/password"
        ),
    )
    acl_file: Path | None = Field(
        default=None, description="Mosquitto ACL file of the local broker; needs password_file"
    )

    @field_validator("password_file", "acl_file")
    @classmethod
    def _existing_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        env = f"{ENV_PREFIX}MQTT{ENV_NESTED_DELIMITER}{str(info.field_name).upper()}"
        # Mosquitto reads the file from its own folder and splits its config on spaces.
        path = path.expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{env}={path} is not an existing file")
        if any(char.isspace() for char in str(path)):
            raise ValueError(f"{env}={path}: Mosquitto cannot read a path with spaces")
        return path

    @model_validator(mode="after")
    def _tls_complete(self) -> Self:
        mqtt = f"{ENV_PREFIX}MQTT{ENV_NESTED_DELIMITER}"
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                f"a client certificate needs its key: set both or neither of "
                f"{mqtt}TLS_CERT_FILE and {mqtt}TLS_KEY_FILE"
            )
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            raise ValueError(
                f"{mqtt}TLS_CERT_FILE is only sent over TLS: set {mqtt}TLS_CA_FILE to the "
                "CA of the broker's certificate"
            )
        if self.tls_port is not None and self.tls_port == self.port:
            raise ValueError(f"{mqtt}TLS_PORT must differ from {mqtt}PORT ({self.port})")
        return self

    @property
    def tls(self) -> bool:
        """Whether twinflow's clients speak TLS to the broker."""
        return self.tls_ca_file is not None

    @property
    def client_port(self) -> int:
        """The port twinflow's clients connect to: the TLS listener when they speak TLS.

        >>> MqttSettings(port=1883, tls_port=8883).client_port
        1883
        >>> MqttSettings(port=1883, tls_port=8883, tls_ca_file="ca.pem").client_port
        8883
        """
        if self.tls and self.tls_port is not None:
            return self.tls_port
        return self.port

    @model_validator(mode="after")
    def _broker_auth_complete(self) -> Self:
        mqtt = f"{ENV_PREFIX}MQTT{ENV_NESTED_DELIMITER}"
        if self.acl_file is not None and self.password_file is None:
            raise ValueError(
                f"{mqtt}ACL_FILE needs {mqtt}PASSWORD_FILE: an ACL names users, and without "
                "a password file Mosquitto lets anyone in anonymously"
            )
        if self.password_file is not None and (self.username is None or self.password is None):
            raise ValueError(
                f"{mqtt}PASSWORD_FILE refuses anonymous clients: set {mqtt}USERNAME and "
                f"{mqtt}PASSWORD to a user of that file, for twinflow's own clients"
            )
        return self


class TopicSettings(_Section):
    """Kafka topic names and sizes."""

    raw: str = "twin.raw"
    deadletter: str = "twin.deadletter"
    ground_truth: str = "twin.ground_truth"
    state: str = "twin.state"
    anomalies: str = "twin.anomalies"
    late: str = "twin.late"
    alarms: str = "twin.alarms"
    feedback: str = "twin.feedback"
    commands: str = "twin.commands"
    raw_partitions: int = Field(default=4, ge=1, le=1024)


class OpcUaSettings(_Section):
    """The OPC UA server the simulator runs and the bridge subscribes to."""

    endpoint: str = Field(
        default="opc.tcp://127.0.0.1:4840/twinflow/", pattern=r"^opc\.tcp://[^/:]+:\d+(/.*)?$"
    )
    namespace: str = "urn:twinflow:plant"
    security: str = Field(
        default="none",
        pattern=r"^(none|basic256sha256)$",
        description="none, or basic256sha256 (Basic256Sha256, SignAndEncrypt)",
    )
    username: str | None = None
    password: SecretStr | None = None
    client_cert_file: Path | None = Field(
        default=None, description="bridge's certificate (DER/PEM)"
    )
    client_key_file: Path | None = Field(default=None, description="bridge's private key (PEM)")
    server_cert_file: Path | None = Field(
        default=None, description="pinned server certificate; a different server is refused"
    )
    server_key_file: Path | None = Field(
        default=None, description="private key of the simulator's server certificate"
    )
    publishing_interval_ms: int = Field(default=100, ge=10, le=60_000)
    queue_size: int = Field(default=1000, ge=1, description="values buffered per monitored item")
    reconnect_max_backoff_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _security_complete(self) -> Self:
        if self.security == "basic256sha256" and None in (
            self.client_cert_file,
            self.client_key_file,
        ):
            raise ValueError(
                "security basic256sha256 needs client_cert_file and client_key_file "
                "(TWINFLOW_OPCUA__CLIENT_CERT_FILE, TWINFLOW_OPCUA__CLIENT_KEY_FILE)"
            )
        if self.security == "basic256sha256" and self.server_cert_file is None:
            # Without a pinned certificate the bridge would encrypt to whichever server
            # answers, and send it the password.
            raise ValueError(
                "security basic256sha256 needs server_cert_file, the pinned certificate of "
                "the OPC UA server (TWINFLOW_OPCUA__SERVER_CERT_FILE); an unpinned server "
                "is refused"
            )
        return self

    @property
    def port(self) -> int:
        """The TCP port of the endpoint."""
        return int(self.endpoint.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


class ModbusSettings(_Section):
    """How `twinflow bridge modbus` polls the devices of the twin model's Modbus maps."""

    timeout_s: float = Field(default=2.0, gt=0, le=60, description="one request's answer")
    reconnect_max_backoff_s: float = Field(
        default=5.0, gt=0, description="longest wait before reconnecting to a silent device"
    )
    max_registers_per_read: int = Field(
        default=125, ge=1, le=125, description="registers in one read (Modbus allows 125)"
    )
    max_gap: int = Field(
        default=8,
        ge=0,
        le=124,
        description="unmapped registers one read may span to join two ranges",
    )


class CoapSettings(_Section):
    """How `twinflow bridge coap` observes the resources of the twin model's CoAP maps."""

    timeout_s: float = Field(
        default=5.0, gt=0, le=120, description="first answer of an observe request"
    )
    reconnect_max_backoff_s: float = Field(
        default=5.0, gt=0, description="longest wait before observing a lost resource again"
    )
    silence_s: float = Field(
        default=30.0,
        gt=0,
        description="no notification for this long re-registers the observation",
    )


class FlowSettings(_Section):
    """The twin dataflow (`twinflow run`)."""

    window_s: float = Field(
        default=10.0, gt=0, description="tumbling window length, aligned to epoch"
    )
    allowed_lateness_s: float = Field(
        default=5.0, ge=0, description="how far behind an entity's newest reading a reading may be"
    )
    idle_close_s: float = Field(
        default=15.0,
        gt=0,
        description="an entity silent this long (system time) has its open windows closed",
    )
    stale_after_s: float = Field(
        default=60.0, gt=0, description="an entity silent this long (system time) becomes STALE"
    )
    max_future_s: float = Field(default=300.0, ge=0, description="newer readings are dead letters")
    max_age_s: float = Field(
        default=7 * 86_400.0, gt=0, description="older readings are dead letters"
    )
    batch_size: int = Field(default=5000, ge=1, description="Kafka messages per step call")
    back_channel_margin_s: float = Field(
        default=0.05,
        ge=0,
        le=60,
        description="a source that finds nothing more to read has read all stamped this "
        "long before now: the broker's stamp-to-readable time plus the hosts' clock skew",
    )
    maintenance_horizon_h: float = Field(
        default=48.0,
        gt=0,
        description="maintenance is due (an alarm) when a sensor's trend may reach its "
        "alarm limit within this many hours (the lower bound of its time to limit)",
    )
    snapshot_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="recovery snapshot interval: a snapshot pickles every twin of the "
        "worker, so its share of the worker is its cost over this interval; a restart "
        "replays at most this much input",
    )
    malloc_trim_s: float = Field(
        default=30.0,
        ge=0,
        description="return the memory the flow freed to the system this often (glibc "
        "keeps it, and the RSS of the largest burst with it); 0: never",
    )
    sink_give_up_s: float = Field(
        default=900.0,
        gt=0,
        description="how long a sink waits out an unreachable QuestDB or Kafka (retrying "
        "with back-off while the sources stop reading) before the flow stops",
    )
    recovery_dir: Path | None = Field(
        default=None, description="recovery store (mode 0700); default STATE_DIR/recovery"
    )
    recovery: bool = Field(default=True, description="off only for throwaway runs")
    consumer_group: str = "twinflow-flow"


_NEVER = frozenset({"none", "never"})


class DetectionSettings(_Section):
    """How the flow's alarms end; the rest of the detector is ``DetectorConfig``.

    An unset field means the detector's own default (``DetectorConfig()``), so the
    defaults live in one place. They are resolved only when asked for (the flow, and
    ``twinflow config``): importing the detector loads River, about a second and 80 MiB
    that the bridges and the service commands would pay for nothing. Read the values
    through :meth:`effective` or :meth:`detector_config`, not the fields: here None is
    "unset" unless the field was set, where it means "never".
    """

    clear_windows: int | None = Field(
        default=None,
        ge=1,
        description="normal windows in a row that clear an active alarm; unset: the detector's",
    )
    rebaseline_after: float | None = Field(
        default=None,
        gt=0,
        description=(
            "warm-ups (30 min each by default) after which an active alarm ends as "
            "re-baselined and the model accepts the level ('none': never); unset: the detector's"
        ),
    )

    @field_validator("clear_windows")
    @classmethod
    def _given(cls, value: int | None) -> int:
        if value is None:  # only a set value is validated: unset stays None
            raise ValueError("must be a whole number of windows")
        return value

    @field_validator("rebaseline_after", mode="before")
    @classmethod
    def _never(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _NEVER:
            return None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.model_fields_set:
            try:
                self.detector_config()
            except ValueError as exc:
                names = " and ".join(
                    f"detection.{name} ({env_name(('detection', name))})"
                    for name in ("clear_windows", "rebaseline_after")
                )
                raise ValueError(f"{exc}; set {names} accordingly") from None
        return self

    def overrides(self) -> dict[str, float | None]:
        """The fields that were set, by name (None for rebaseline_after: never)."""
        return {name: getattr(self, name) for name in sorted(self.model_fields_set)}

    def detector_config(self, **extra: Any) -> DetectorConfig:
        """The flow's ``DetectorConfig``: its defaults, these settings, then ``extra``."""
        from twinflow.detection import DetectorConfig  # loads River; see the class doc

        return DetectorConfig(**{**self.overrides(), **extra})

    def effective(self) -> dict[str, float | None]:
        """Each setting's value in force, the detector's defaults filled in.

        >>> from twinflow.detection import DetectorConfig
        >>> DetectionSettings().effective() == {
        ...     "clear_windows": DetectorConfig().clear_windows,
        ...     "rebaseline_after": DetectorConfig().rebaseline_after,
        ... }
        True
        >>> DetectionSettings(clear_windows=5, rebaseline_after="none").effective()
        {'clear_windows': 5, 'rebaseline_after': None}
        """
        config = self.detector_config()
        return {name: getattr(config, name) for name in type(self).model_fields}


class MetricsSettings(_Section):
    """The Prometheus endpoints of the flow and the bridges, and the local Prometheus."""

    enabled: bool = Field(default=True, description="serve /metrics from the flow and bridges")
    host: str = Field(
        default="127.0.0.1",
        description="address the /metrics endpoints bind; 0.0.0.0 in a container",
    )
    flow_port: Port = _port(9250, "/metrics of `twinflow run` (see per_process_port)")
    per_process_port: bool = Field(
        default=True,
        description=(
            "process i of a cluster (-i) serves on flow_port + i, so processes sharing a "
            "host never collide; false where each process has its own address (pods)"
        ),
    )
    mqtt_bridge_port: Port = _port(9240, "/metrics of `twinflow bridge mqtt`")
    opcua_bridge_port: Port = _port(9241, "/metrics of `twinflow bridge opcua`")
    modbus_bridge_port: Port = _port(9243, "/metrics of `twinflow bridge modbus`")
    coap_bridge_port: Port = _port(9244, "/metrics of `twinflow bridge coap`")
    serve_port: Port = _port(9242, "/metrics of `twinflow serve`")
    prometheus_port: Port = _port(9090, "the local Prometheus (twinflow up): UI and API")
    scrape_interval_s: int = Field(
        default=5, ge=1, le=300, description="how often the local Prometheus scrapes"
    )
    retention: str = Field(
        default="2d",
        pattern=r"^[1-9][0-9]*[hdwy]$",
        description="how long the local Prometheus keeps samples (e.g. 12h, 2d)",
    )

    def flow_process_port(self, process_id: int | None) -> int:
        """The port the flow process ``process_id`` serves on."""
        if self.per_process_port and process_id:
            return self.flow_port + process_id
        return self.flow_port


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class ServeUser(_Section):
    """A person or program allowed to use ``twinflow serve``, by bearer token."""

    token: SecretStr = Field(min_length=16, description="bearer token, 16 characters or more")
    role: Literal["viewer", "operator"] = Field(
        default="viewer", description="viewer reads; operator may also judge alarms and command"
    )


class ServeSettings(_Section):
    """``twinflow serve``: the twin API and the viewer page."""

    host: str = Field(default="127.0.0.1", description="address the server binds")
    port: Port = _port(8080, "HTTP port of the API and the viewer page")
    token: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="operator bearer token; when set (or users are), every request needs one",
    )
    users: dict[str, ServeUser] = Field(
        default_factory=dict, description="named users with their own token and role"
    )
    max_points: int = Field(
        default=2000, ge=10, le=100_000, description="most points a series request may ask"
    )
    windows_refresh_s: float = Field(
        default=5.0, gt=0, description="how often the latest windows are re-read from QuestDB"
    )
    command_expires_s: float = Field(
        default=60.0, gt=0, description="default expiry of a setpoint command sent by the API"
    )
    ssl_certfile: Path | None = Field(
        default=None,
        description=(
            "certificate chain (PEM) to serve HTTPS with, e.g. STATE_DIR/tls/server.pem "
            "from twinflow up; unset: plain HTTP"
        ),
    )
    ssl_keyfile: Path | None = Field(
        default=None, description="private key (PEM) of ssl_certfile, e.g. STATE_DIR/tls/server.key"
    )

    @field_validator("ssl_certfile", "ssl_keyfile")
    @classmethod
    def _absolute_tls_file(cls, path: Path | None) -> Path | None:
        # `twinflow up serve` starts the server in another folder.
        return path.expanduser().resolve() if path is not None else None

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            serve = f"{ENV_PREFIX}SERVE{ENV_NESTED_DELIMITER}"
            raise ValueError(
                f"HTTPS needs a certificate and its key: set both or neither of "
                f"{serve}SSL_CERTFILE and {serve}SSL_KEYFILE"
            )
        return self

    @property
    def scheme(self) -> str:
        """``https`` when the server has a certificate, else ``http``."""
        return "https" if self.ssl_certfile is not None else "http"

    @property
    def secured(self) -> bool:
        """Whether requests need a token."""
        return self.token is not None or bool(self.users)

    @model_validator(mode="after")
    def _no_open_server_off_loopback(self) -> Self:
        # Operators' verdicts and setpoint commands reach the machines: an address
        # others can reach needs a token.
        if self.host not in _LOOPBACK and not self.secured:
            raise ValueError(
                f"serve.host {self.host} is reachable from other machines: set serve.token "
                "(or serve.users) so requests need a token, or bind 127.0.0.1"
            )
        return self


class TlsSettings(_Section):
    """The private CA and server certificate ``twinflow up`` makes for TLS listeners.

    They are made (in STATE_DIR/tls) when a local listener needs them: kafka.ssl_port
    or mqtt.tls_port.
    """

    server_names: tuple[str, ...] = Field(
        default=("localhost", "127.0.0.1"),
        min_length=1,
        description=(
            "DNS names and IP addresses the server certificate is issued for; clients "
            "must connect by one of them (a change issues a new certificate)"
        ),
    )

    @field_validator("server_names")
    @classmethod
    def _plain_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not name or any(char.isspace() or char in ",/*" for char in name):
                raise ValueError(
                    f"{name!r} is not a host name or IP address; list names like "
                    "localhost,127.0.0.1 in TWINFLOW_TLS__SERVER_NAMES"
                )
        return names


class ServicesSettings(_Section):
    """How ``twinflow up`` runs the local services."""

    start_timeout_s: float = Field(default=120.0, gt=0)
    stop_timeout_s: float = Field(default=30.0, gt=0)
    java: str = Field(default="java", description="java executable (JDK 17 or newer)")
    maven: str = Field(default="mvn", description="Maven executable used to fetch the jars")


class Settings(BaseSettings):
    """Everything twinflow can be told. Frozen: load once, pass down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        frozen=True,
        extra="forbid",
    )

    config_file: Path | None = Field(
        default=None, description=f"TOML file these settings were read from ({CONFIG_FILE_ENV})"
    )
    state_dir: Path = Field(
        default=Path(".twinflow"),
        description="private folder for service data, logs, PID files and recovery",
    )
    lib_dir: Path | None = Field(
        default=None, description="jar cache for Kafka and QuestDB; default: STATE_DIR/lib"
    )
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    twin_model: Path = Field(
        default=DEFAULT_TWIN_MODEL, description="YAML file describing asset types and entities"
    )
    kafka: KafkaSettings = KafkaSettings()
    questdb: QuestDBSettings = QuestDBSettings()
    mqtt: MqttSettings = MqttSettings()
    opcua: OpcUaSettings = OpcUaSettings()
    modbus: ModbusSettings = ModbusSettings()
    coap: CoapSettings = CoapSettings()
    topics: TopicSettings = TopicSettings()
    flow: FlowSettings = FlowSettings()
    detection: DetectionSettings = DetectionSettings()
    metrics: MetricsSettings = MetricsSettings()
    services: ServicesSettings = ServicesSettings()
    serve: ServeSettings = ServeSettings()
    tls: TlsSettings = TlsSettings()

    @field_validator("config_file", "state_dir", "lib_dir", "twin_model")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        # Services, Maven and child processes run in other folders; pin the path now.
        return path.expanduser().resolve() if path is not None else None

    @model_validator(mode="after")
    def _ports_distinct(self) -> Self:
        claimed: dict[int, str] = {}
        metrics = self.metrics
        endpoints = {
            "metrics.flow_port": metrics.flow_port,
            "metrics.mqtt_bridge_port": metrics.mqtt_bridge_port,
            "metrics.opcua_bridge_port": metrics.opcua_bridge_port,
            "metrics.modbus_bridge_port": metrics.modbus_bridge_port,
            "metrics.coap_bridge_port": metrics.coap_bridge_port,
            "metrics.serve_port": metrics.serve_port,
            "serve.port": self.serve.port,
        }
        for name, port in {**self.local_ports(), **endpoints}.items():
            if port in claimed:
                raise ValueError(f"{name} and {claimed[port]} are both set to port {port}")
            claimed[port] = name
        return self

    def local_ports(self) -> dict[str, int]:
        """Every port the local services bind, by setting name."""
        tls = {"kafka.ssl_port": self.kafka.ssl_port, "mqtt.tls_port": self.mqtt.tls_port}
        return {
            **{name: port for name, port in tls.items() if port is not None},
            "kafka.port": self.kafka.port,
            "kafka.controller_port": self.kafka.controller_port,
            "questdb.http_port": self.questdb.http_port,
            "questdb.pg_port": self.questdb.pg_port,
            "questdb.ilp_tcp_port": self.questdb.ilp_tcp_port,
            "questdb.min_http_port": self.questdb.min_http_port,
            "mqtt.port": self.mqtt.port,
            "metrics.prometheus_port": self.metrics.prometheus_port,
        }

    @property
    def jar_dir(self) -> Path:
        """Where the Kafka and QuestDB jars are cached."""
        return self.lib_dir or self.state_dir / "lib"

    def masked(self) -> dict[str, Any]:
        """Every setting as plain data, secrets shown as ``**********``, defaults resolved."""
        masked: dict[str, Any] = _mask(self.model_dump(mode="python"))
        masked["detection"] = self.detection.effective()
        return masked

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Add the optional TOML file (named by the ``config_file`` argument) below the env."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if isinstance(init_settings, InitSettingsSource):
            config_file = init_settings.init_kwargs.get("config_file")
            if config_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********" if value.get_secret_value() else ""
    if isinstance(value, dict):
        return {key: _mask(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def env_name(location: tuple[str | int, ...]) -> str:
    """The environment variable that sets the field at a pydantic error location.

    >>> env_name(("kafka", "port"))
    'TWINFLOW_KAFKA__PORT'
    """
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(part).upper() for part in location)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load and validate the settings, or raise :class:`ConfigError` naming each bad one.

    ``config_file`` defaults to the file named by ``TWINFLOW_CONFIG``, if any.
    """
    if config_file is None and os.environ.get(CONFIG_FILE_ENV):
        config_file = Path(os.environ[CONFIG_FILE_ENV])
    if config_file is not None and not config_file.is_file():
        raise ConfigError(
            f"config file {config_file} does not exist; pass an existing TOML file "
            f"to --config or {CONFIG_FILE_ENV}"
        )
    try:
        return Settings(config_file=config_file, **overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for error in exc.errors():
        location = tuple(error["loc"])
        if location:
            dotted = ".".join(str(part) for part in location)
            where = f"{dotted} (env {env_name(location)})"
            shown = _without_secrets(Settings, location, error.get("input"))
            received = f"; got {shown!r}" if "input" in error else ""
        else:
            where, received = "settings", ""
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  - {where}: {message}{received}")
    lines.append("Fix the value in the environment or the config file and run again.")
    return "\n".join(lines)


# Names of unknown (mistyped) fields whose values may be secrets.
_SECRET_NAME = re.compile(r"pas|pwd|secret|token|credential|key", re.IGNORECASE)


def _without_secrets(model: type[BaseModel] | None, location: tuple[Any, ...], value: Any) -> Any:
    """The input ``value`` at ``location`` below ``model``, every secret in it masked.

    An error's input is the raw value: a section's validator gets the whole section,
    passwords in clear text included.

    >>> _without_secrets(Settings, ("mqtt",), {"port": "1", "password": "s3cret"})
    {'port': '1', 'password': '**********'}
    """
    if location:
        part, rest = location[0], location[1:]
        if model is None:
            return value
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return "**********" if _SECRET_NAME.search(str(part)) else value
        annotation = field.annotation
        if annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ()):
            return "**********"
        if get_origin(annotation) is dict:  # named entries: skip the name
            entry = _model_or_none(get_args(annotation)[1])
            if not rest:
                return _masked_entries(entry, value)
            return _without_secrets(entry, rest[1:], value)
        return _without_secrets(_model_or_none(annotation), rest, value)
    if isinstance(value, dict) and model is not None:
        return {key: _without_secrets(model, (key,), item) for key, item in value.items()}
    return value


def _masked_entries(entry: type[BaseModel] | None, value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_secrets(entry, (), item) for key, item in value.items()}
    return value


def _model_or_none(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None
