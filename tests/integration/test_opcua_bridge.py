"""The OPC UA simulator server and the OPC UA -> Kafka bridge, against real parts.

The server runs in a process of its own (tests/opcua_server_process.py), so that it can
be SIGKILLed like a crashed PLC gateway; the bridge runs in a thread; readings are read
back from a fresh Kafka topic.
"""

import asyncio
import json
import logging
import os
import threading
import time
from collections import defaultdict
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from asyncua import Client, ua
from confluent_kafka.admin import AdminClient
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import SecretStr

from connectors.kafka import TopicSpec, client_config, ensure_topics
from schemas.raw import decode_raw
from tests.bridge_helpers import (
    BridgeThread,
    ServerProcess,
    TopicMessage,
    reading,
    server_process,
)
from tests.helpers import free_ports, opcua_certificate, sample, scrape
from tests.opcua_server_process import (
    DROPOUT_EVERY,
    DROPOUT_TICK,
    STUCK_SENSOR_INDEX,
    dropped_at,
    value_at,
)
from tests.relay import TcpRelay
from twinflow.bridges.opcua import OpcUaSecurityError, run
from twinflow.settings import Settings
from twinflow.sim.opcua_server import PlantOpcUaServer
from twinflow.sim.samples import Sample
from twinflow.twin_model import TwinModel, load_twin_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RAW_SCHEMA = json.loads((ROOT / "schemas" / "json" / "raw_reading.v1.schema.json").read_text())
ENTITIES = ["pump-001", "motor-001", "compressor-001"]
PERIOD_MS = 50
RESUME_LIMIT_MS = 10_000


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return load_twin_model(ROOT / "infra" / "twin-model" / "example-plant.yaml")


@pytest.fixture
def bridged(stack: Settings, unique: str) -> Settings:
    """Settings with a fresh raw topic and an OPC UA endpoint on a free port."""
    topic = f"test.opcua.{unique}"
    ensure_topics(stack.kafka, [TopicSpec(topic, stack.topics.raw_partitions)])
    port, metrics_port = free_ports(2)
    return stack.model_copy(
        update={
            "topics": stack.topics.model_copy(
                update={"raw": topic, "commands": f"{topic}.commands", "feedback": f"{topic}.fb"}
            ),
            "opcua": stack.opcua.model_copy(
                update={"endpoint": f"opc.tcp://127.0.0.1:{port}/twinflow/"}
            ),
            "metrics": stack.metrics.model_copy(update={"opcua_bridge_port": metrics_port}),
        }
    )


# --- the server process ----------------------------------------------------------------


def _opcua_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.opcua.model_dump().items():
        key = f"TWINFLOW_OPCUA__{name.upper()}"
        if isinstance(value, SecretStr):
            env[key] = value.get_secret_value()
        elif value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def _server_process(settings: Settings) -> AbstractContextManager[ServerProcess]:
    """Start the server process; yield it with the ``start_ms`` of its tick 0."""
    args = ["--entities", ",".join(ENTITIES), "--period-ms", str(PERIOD_MS)]
    return server_process("tests.opcua_server_process", args, env=_opcua_env(settings))


# --- the bridge's messages --------------------------------------------------------------


def _ts(message: TopicMessage) -> int:
    ts = message.body["ts"]
    assert isinstance(ts, int)
    return ts


def _readings(messages: list[TopicMessage], since_ms: int) -> dict[tuple[str, str], list[int]]:
    """Timestamps by (entity, sensor) of the readings at or after ``since_ms``."""
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    for message in messages:
        ts = _ts(message)
        if ts >= since_ms:
            found[(str(message.body["entity_id"]), str(message.body["sensor"]))].append(ts)
    return found


def _every_sensor(model: TwinModel) -> set[tuple[str, str]]:
    return {(entity, sensor) for entity in ENTITIES for sensor in model.sensors_of(entity)}


def _check_message(message: TopicMessage, model: TwinModel, starts: list[int]) -> None:
    """The message is a valid raw reading carrying exactly what the server wrote."""
    jsonschema.validate(message.body, RAW_SCHEMA)
    decoded = decode_raw(message.raw)
    entity, sensor = decoded.entity_id, decoded.sensor
    assert sensor is not None
    assert message.key == entity
    sensors = list(model.sensors_of(entity))
    assert decoded.unit == model.sensors_of(entity)[sensor].unit
    assert decoded.quality == "good"
    assert decoded.source == f"opcua:ns=2;s={entity}/{sensor}"
    # The timestamp is one the server wrote: on the tick grid of the run it came from.
    start = max(start for start in starts if start <= decoded.ts_ms)
    tick, offset = divmod(decoded.ts_ms - start, PERIOD_MS)
    assert offset == 0
    entity_index, sensor_index = ENTITIES.index(entity), sensors.index(sensor)
    assert not dropped_at(entity_index, sensor_index, tick)
    assert decoded.value == value_at(entity_index, sensor_index, tick)


# --- tests -----------------------------------------------------------------------------


@pytest.mark.chaos
def test_readings_flow_and_resume_after_the_server_is_killed(
    bridged: Settings,
    model: TwinModel,
    caplog: pytest.LogCaptureFixture,
    chaos_table: list[dict[str, object]],
) -> None:
    caplog.set_level(logging.INFO, logger="twinflow.bridges.opcua")
    every_sensor = _every_sensor(model)
    metrics_port = bridged.metrics.opcua_bridge_port
    with reading(bridged, bridged.topics.raw) as topic, BridgeThread(run, bridged, model):
        # Counters are process-wide and earlier tests bridged in this process too.
        before_run = _bridge_counts(metrics_port)
        with _server_process(bridged) as first:
            first_start = first.start_ms
            topic.wait_for(
                lambda got: (
                    all(len(ts) >= 20 for ts in _readings(got, first_start).values())
                    and set(_readings(got, first_start)) == every_sensor
                ),
                timeout_s=30,
            )
        killed_ms = time.time_ns() // 1_000_000
        before = _readings(topic.messages, first_start)

        with _server_process(bridged) as second:
            second_start = second.start_ms
            assert second_start >= killed_ms
            topic.wait_for(
                lambda got: set(_readings(got, second_start)) == every_sensor, timeout_s=20
            )
            # A few more ticks, so that repeats or losses after the resume would show.
            last_seen = max(ts for ts in _readings(topic.messages, second_start).values())
            topic.wait_for(
                lambda got: (
                    min(map(max, _readings(got, second_start).values()))
                    >= max(last_seen) + 10 * PERIOD_MS
                ),
                timeout_s=10,
            )
            assert sample(scrape(metrics_port), "twinflow_bridge_connected", bridge="opcua") == 1
        after = _readings(topic.messages, second_start)
        # Both servers are gone, so the bridge forwards nothing more: its counters must
        # match what reached the topic.
        deadline = time.monotonic() + 10
        while True:  # until every forwarded reading's delivery is confirmed
            counts = {
                name: value - before_run[name]
                for name, value in _bridge_counts(metrics_port).items()
            }
            accounted = counts["forwarded"] + counts["skipped no_value"] + counts["skipped repeat"]
            if accounted == counts["received"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert accounted == counts["received"], counts
        topic.wait_for(lambda got: len(got) >= counts["forwarded"], timeout_s=10)
        assert counts["forwarded"] == len(topic.messages)
        assert counts["reconnects"] == 1
        assert counts["skipped no_value"] > 0  # the dropouts

    assert set(before) == every_sensor and all(before.values())
    assert set(after) == every_sensor and all(after.values())
    # Every reading of the first run was sent before the kill; none is from between.
    assert max(max(ts) for ts in before.values()) < killed_ms
    assert all(m.body["ts"] < killed_ms or m.body["ts"] >= second_start for m in topic.messages)
    # The bridge resumed with every monitored item, soon after the new server was up.
    resume_ms = max(min(ts) for ts in after.values()) - second_start
    assert 0 <= resume_ms <= RESUME_LIMIT_MS, f"resumed after {resume_ms} ms"

    for message in topic.messages:
        _check_message(message, model, [first_start, second_start])
    # No reading twice, not even around the reconnect.
    keys = [(m.body["entity_id"], m.body["sensor"], m.body["ts"]) for m in topic.messages]
    assert len(keys) == len(set(keys))
    # The outage is reported as a gap, with its length.
    (gap,) = _bridge_logs(caplog, "OPC UA readings resumed after a gap of")
    chaos_table.append(
        {
            "fault": "9. OPC UA server SIGKILL, new server on the same endpoint",
            "runs": 2,
            # Received and neither forwarded nor skipped, or forwarded and not in Kafka;
            # every tick of both servers' lives is also checked below.
            "lost": int(counts["received"] - accounted + counts["forwarded"]) - len(topic.messages),
            "duplicates": len(keys) - len(set(keys)),
            "mismatches": 0,
            "notes": f"bridge resumed after {resume_ms} ms; logged: {gap}",
        }
    )

    first_entity = list(model.sensors_of(ENTITIES[0]))
    for start, run_readings in ((first_start, before), (second_start, after)):
        ticks = {
            key: {(ts - start) // PERIOD_MS for ts in tss} for key, tss in run_readings.items()
        }
        # A stuck sensor reports every tick, like a changing one.
        for entity in ENTITIES:
            sensors = list(model.sensors_of(entity))
            stuck, changing = sensors[STUCK_SENSOR_INDEX], sensors[STUCK_SENSOR_INDEX + 1]
            assert ticks[(entity, stuck)] == ticks[(entity, changing)]
        # A dropout is a gap, not a reading; the sensor reports again after it.
        dropping = (ENTITIES[0], first_entity[0])
        neighbour = ticks[(ENTITIES[0], first_entity[2])]
        dropout_ticks = {tick for tick in neighbour if tick % DROPOUT_EVERY == DROPOUT_TICK}
        assert dropout_ticks, "the run was too short to see a dropout"
        assert ticks[dropping] == neighbour - dropout_ticks


def _bridge_counts(port: int) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while True:  # the bridge thread may not be serving yet
        try:
            samples = scrape(port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    counts = {
        name: sample(samples, f"twinflow_bridge_{name}_total", bridge="opcua")
        for name in ("messages_received", "messages_forwarded", "reconnects")
    }
    return {
        "received": counts["messages_received"],
        "forwarded": counts["messages_forwarded"],
        "reconnects": counts["reconnects"],
        **{
            f"skipped {why}": sample(
                samples, "twinflow_bridge_values_skipped_total", bridge="opcua", why=why
            )
            for why in ("no_value", "repeat")
        },
    }


def _bridge_logs(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "twinflow.bridges.opcua" and record.getMessage().startswith(prefix)
    ]


@pytest.mark.chaos
def test_a_silent_network_drop_is_detected_and_no_reading_is_sent_twice(
    bridged: Settings, model: TwinModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="twinflow.bridges.opcua")
    (server_port,) = free_ports(1)
    direct = bridged.model_copy(
        update={
            "opcua": bridged.opcua.model_copy(
                update={"endpoint": f"opc.tcp://127.0.0.1:{server_port}/twinflow/"}
            )
        }
    )
    every_sensor = _every_sensor(model)
    with (
        _server_process(direct) as server,
        TcpRelay(bridged.opcua.port, server_port) as relay,
        reading(bridged, bridged.topics.raw) as topic,
        BridgeThread(run, bridged, model),
    ):
        topic.wait_for(
            lambda got: set(_readings(got, server.start_ms)) == every_sensor, timeout_s=30
        )
        # With the server quiet, a resubscription finds the values already sent.
        server.send("pause")
        topic.settle(quiet_s=1.0)
        before = len(topic.messages)
        last_tick = (max(_ts(m) for m in topic.messages) - server.start_ms) // PERIOD_MS
        frozen_at = time.monotonic()
        relay.freeze()
        while len(_bridge_logs(caplog, "monitoring ")) < 2:
            assert time.monotonic() - frozen_at < 20, "the bridge did not reconnect"
            time.sleep(0.05)
        detected_s = time.monotonic() - frozen_at
        topic.settle(quiet_s=1.0)
        assert len(topic.messages) == before
        resumed_ms = time.time_ns() // 1_000_000
        server.send("resume")
        topic.wait_for(lambda got: set(_readings(got, resumed_ms)) == every_sensor, timeout_s=20)

    # Probe interval (1 s) + probe timeout (2 s) + first backoff (0.5 s) + reconnect.
    assert detected_s < 6, f"reconnected {detected_s:.1f} s after the link froze"
    keys = [(m.body["entity_id"], m.body["sensor"], m.body["ts"]) for m in topic.messages]
    assert len(keys) == len(set(keys))
    for message in topic.messages:
        _check_message(message, model, [server.start_ms])
    # Every item's current value came again on resubscribing, and was not produced.
    stats = dict(
        field.split("=") for field in _bridge_logs(caplog, "opcua bridge:")[-1].split()[2:]
    )
    silent_dropout = dropped_at(0, 0, last_tick)
    assert int(stats["repeats"]) == len(every_sensor) - silent_dropout
    assert int(stats["reconnects"]) == 1


def _refused(settings: Settings, model: TwinModel) -> OpcUaSecurityError:
    """Run the bridge and return the security error it must stop with."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def target() -> None:
        try:
            run(settings, model, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    stop.set()
    thread.join(30)
    assert len(errors) == 1, "the bridge kept running instead of refusing"
    assert isinstance(errors[0], OpcUaSecurityError)
    return errors[0]


@pytest.mark.chaos
def test_basic256sha256_with_password_and_pinned_server(
    bridged: Settings, model: TwinModel, tmp_path: Path, chaos_table: list[dict[str, object]]
) -> None:
    server_uri = "urn:twinflow:test:server"
    server_cert, server_key = opcua_certificate(
        tmp_path, "server", server_uri, [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    client_cert, client_key = opcua_certificate(
        tmp_path, "client", "urn:twinflow:test:bridge", [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    impostor_cert, _ = opcua_certificate(
        tmp_path, "impostor", server_uri, [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    secure = bridged.opcua.model_copy(
        update={
            "security": "basic256sha256",
            "username": "bridge",
            "password": SecretStr("s3cret"),
            "client_cert_file": client_cert,
            "client_key_file": client_key,
            "server_cert_file": server_cert,
            "server_key_file": server_key,
        }
    )
    settings = bridged.model_copy(update={"opcua": secure})

    def variant(**update: object) -> Settings:
        return settings.model_copy(update={"opcua": secure.model_copy(update=update)})

    with _server_process(settings) as server, reading(settings, settings.topics.raw) as topic:
        start = server.start_ms
        error = _refused(variant(server_cert_file=impostor_cert), model)
        assert "pinned" in str(error) and str(impostor_cert) in str(error)
        _refused(variant(password=SecretStr("wrong")), model)
        error = _refused(variant(security="none"), model)
        assert "offers no" in str(error) and "SecurityPolicy#None" in str(error)
        chaos_table.append(
            {
                "fault": "10. OPC UA bridge: impostor server certificate, wrong password, "
                "policy None",
                "runs": 3,
                # Refusals move no data (as tests.helpers.refusal_row's rows say).
                "lost": "n/a",
                "duplicates": "n/a",
                "mismatches": "n/a",
                "notes": "each refused with OpcUaSecurityError; an unpinned server is refused "
                "at settings load",
            }
        )

        with BridgeThread(run, settings, model):
            topic.wait_for(
                lambda got: set(_readings(got, start)) == _every_sensor(model), timeout_s=20
            )
    for message in topic.messages:
        _check_message(message, model, [start])


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (Linux /proc, hex form)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.rsplit(":", 1)
            if state == "0A" and int(local_port, 16) == port:
                found.add(address)
    return found


def test_address_space_units_timestamps_and_status(bridged: Settings, model: TwinModel) -> None:
    ts_ms = 1_767_225_600_123  # 2026-01-01T00:00:00.123Z
    port = bridged.opcua.port
    # An endpoint naming any host still listens on loopback only.
    anywhere = bridged.opcua.model_copy(update={"endpoint": f"opc.tcp://0.0.0.0:{port}/twinflow/"})

    async def scenario() -> None:
        async with PlantOpcUaServer(anywhere, model, ["pump-001"]) as server:
            assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1
            await server.publish(
                Sample("pump-001", ts_ms, {"discharge_pressure": 4.25}, dropped=("flow",))
            )
            async with Client(bridged.opcua.endpoint) as client:
                index = await client.get_namespace_index(bridged.opcua.namespace)
                assert server.namespace_index == index
                pressure = await client.nodes.objects.get_child(
                    [f"{index}:Plant", f"{index}:pump-001", f"{index}:discharge_pressure"]
                )
                assert pressure.nodeid == ua.NodeId("pump-001/discharge_pressure", index)
                assert pressure.nodeid == server.node_id("pump-001", "discharge_pressure")
                value = await pressure.read_data_value()
                assert value.Value is not None and value.Value.Value == 4.25
                assert value.Value.VariantType == ua.VariantType.Double
                assert value.StatusCode is not None and value.StatusCode.is_good()
                assert value.SourceTimestamp == datetime(2026, 1, 1, 0, 0, 0, 123_000, UTC)
                assert value.ServerTimestamp is not None

                units = await pressure.get_child("0:EngineeringUnits")
                info = await units.read_value()
                assert isinstance(info, ua.EUInformation)
                assert (
                    info.DisplayName.Text == model.sensors_of("pump-001")["discharge_pressure"].unit
                )

                flow = client.get_node(ua.NodeId("pump-001/flow", index))
                dropped = await flow.read_data_value(raise_on_bad_status=False)
                assert dropped.StatusCode == ua.StatusCode(ua.StatusCodes.BadNoCommunication)
                assert dropped.SourceTimestamp == value.SourceTimestamp

                never = client.get_node(ua.NodeId("pump-001/bearing_temp", index))
                unwritten = await never.read_data_value(raise_on_bad_status=False)
                assert unwritten.StatusCode == ua.StatusCode(
                    ua.StatusCodes.BadWaitingForInitialData
                )

    asyncio.run(scenario())


def test_bridge_creates_its_topics_before_any_server_answers(bridged: Settings) -> None:
    topics = bridged.topics.model_copy(
        update={"raw": bridged.topics.raw + ".own", "deadletter": bridged.topics.raw + ".dead"}
    )
    settings = bridged.model_copy(update={"topics": topics})
    admin = AdminClient(client_config(settings.kafka))
    assert topics.raw not in admin.list_topics(timeout=10).topics
    stop = threading.Event()
    failures: list[BaseException] = []

    def forward() -> None:
        try:
            run(
                settings,
                load_twin_model(ROOT / "infra" / "twin-model" / "example-plant.yaml"),
                stop,
            )
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=forward)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while topics.raw not in admin.list_topics(timeout=10).topics:
            assert time.monotonic() < deadline, "the bridge did not create its raw topic"
            time.sleep(0.1)
        metadata = admin.list_topics(timeout=10).topics
        assert len(metadata[topics.raw].partitions) == topics.raw_partitions
        assert topics.deadletter in metadata
    finally:
        stop.set()
        worker.join(30)
    assert not worker.is_alive()
    assert failures == []
