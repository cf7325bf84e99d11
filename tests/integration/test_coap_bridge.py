"""The CoAP simulator server and the CoAP -> Kafka bridge, against real parts.

The plant's CoAP server runs in a process of its own (tests/coap_server_process.py), so
that it can be SIGKILLed like a crashed device and started again on the same ports;
the bridge runs in a thread; what it produced is read back from fresh Kafka topics and,
through a ``twinflow run`` process, from QuestDB.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.resource import ObservableResource, Site
from prometheus_client import REGISTRY

from connectors.kafka import TopicSpec, ensure_topics
from connectors.questdb import QuestDBHttp
from schemas.raw import Reason, decode_raw
from tests.bridge_helpers import (
    BridgeThread,
    ServerProcess,
    TopicMessage,
    reading,
    server_process,
)
from tests.coap_server_process import TICKS, tick_of, value_at
from tests.helpers import free_ports, sample, scrape
from tests.integration.flows import create_topics, flow_process, table_rows, wait_until
from twinflow.bridges.coap import resources_of, run
from twinflow.bridges.coap_codec import ObservedResource, SensorResource
from twinflow.settings import Settings
from twinflow.sim.coap_server import PlantCoapServer
from twinflow.sim.samples import Sample
from twinflow.tables import tables
from twinflow.topics import ingest_topics
from twinflow.twin_model import TwinModel, load_twin_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "infra" / "twin-model" / "example-plant.yaml"
# Validators built once: jsonschema.validate() checks the schema itself on every call,
# which is slower than the readings arrive.
RAW_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((ROOT / "schemas" / "json" / "raw_reading.v1.schema.json").read_text())
)
LETTER_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((ROOT / "schemas" / "json" / "deadletter.v1.schema.json").read_text())
)
# Served by the server process in this order: the index is value_at's entity index.
ENTITIES = ["pump-001", "motor-001", "pump-002"]
PERIOD_MS = 50
SILENCE_S = 1.0
# asyncio may wake a paced publish a little before its tick's wall time.
EARLY_MS = 20
LOGGER = "twinflow.bridges.coap"


# --- the twin model, settings and ports ------------------------------------------------


def _free_udp_ports(count: int) -> list[int]:
    """UDP ports free on 127.0.0.1, below the ephemeral range (a client socket may take
    a port from that range while its server is down)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 12_000), low))
    random.shuffle(candidates)
    found = []
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise AssertionError("no free UDP ports below the ephemeral range")


def _write_model(path: Path, coap: dict[str, dict[str, Any]]) -> TwinModel:
    """The example plant's asset types, and the entities of ``coap`` with those maps.

    Pumps share per-sensor resources in accepted units (l/s, mA, degF) besides
    canonical ones.
    """
    document = yaml.safe_load(EXAMPLE.read_text())
    document["asset_types"]["pump"]["coap"] = {
        "flow": {"path": "flow", "unit": "l/s"},
        "discharge_pressure": {"path": "pressure"},
        "motor_current": {"path": "current", "unit": "mA"},
        "vibration_rms": {"path": "vibration"},
        "bearing_temp": {"path": "temp", "unit": "degF"},
    }
    by_id = {entity["id"]: entity for entity in document["entities"]}
    document["entities"] = [
        {**by_id[entity_id], "coap": device} for entity_id, device in coap.items()
    ]
    for entity in document["entities"]:
        if entity.get("parent") not in coap:
            entity.pop("parent", None)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_twin_model(path)


@dataclass(frozen=True)
class _Plant:
    settings: Settings
    model: TwinModel
    model_file: Path
    ports: tuple[int, int]

    @property
    def devices(self) -> set[str]:
        return {f"127.0.0.1:{port}" for port in self.ports}

    def resources(self) -> dict[tuple[str, str], ObservedResource]:
        """Resources by (entity, sensor), "*" for a telemetry resource."""
        return {
            (r.entity_id, r.sensor if isinstance(r, SensorResource) else "*"): r
            for entity_id in ENTITIES
            for r in resources_of(self.model, self.model.by_id[entity_id])
        }


def _settings(stack: Settings, raw: str, metrics_port: int) -> Settings:
    return stack.model_copy(
        update={
            "topics": stack.topics.model_copy(update={"raw": raw, "deadletter": f"{raw}.dead"}),
            "coap": stack.coap.model_copy(
                update={"silence_s": SILENCE_S, "reconnect_max_backoff_s": 1.0, "timeout_s": 2.0}
            ),
            "metrics": stack.metrics.model_copy(update={"coap_bridge_port": metrics_port}),
        }
    )


@pytest.fixture
def plant(stack: Settings, unique: str, tmp_path: Path) -> _Plant:
    """pump-001 (per-sensor) and motor-001 (telemetry) on one server, pump-002 (its own
    per-sensor resources, one in kelvin) on another; fresh topics."""
    port_a, port_b = _free_udp_ports(2)
    (metrics_port,) = free_ports(1)
    model = _write_model(
        tmp_path / "plant.yaml",
        {
            "pump-001": {"host": "127.0.0.1", "port": port_a},
            "motor-001": {"host": "127.0.0.1", "port": port_a, "telemetry": "motor-001/all"},
            "pump-002": {
                "host": "127.0.0.1",
                "port": port_b,
                "resources": {
                    "flow": {"path": "p2/flow"},
                    "bearing_temp": {"path": "p2/temp", "unit": "K"},
                },
            },
        },
    )
    settings = _settings(stack, f"test.coap.{unique}", metrics_port)
    ensure_topics(stack.kafka, [TopicSpec(settings.topics.raw, settings.topics.raw_partitions)])
    return _Plant(settings, model, tmp_path / "plant.yaml", (port_a, port_b))


# --- the server process ----------------------------------------------------------------


def _server_process(plant: _Plant) -> AbstractContextManager[ServerProcess]:
    """Start the server process; yield it with the ``start_ms`` of its tick 0."""
    args = ["--model", str(plant.model_file), "--entities", ",".join(ENTITIES)]
    return server_process("tests.coap_server_process", [*args, "--period-ms", str(PERIOD_MS)])


class _FixedResource(ObservableResource):  # type: ignore[misc]
    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self._payload = payload

    async def render_get(self, _request: Message) -> Message:
        return Message(code=Code.CONTENT, payload=self._payload)


@contextmanager
def _fixed_server(port: int, representations: dict[str, bytes]) -> Iterator[None]:
    """An aiocoap server on 127.0.0.1:``port`` serving fixed bytes at each path."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stopping = asyncio.Event()
    failures: list[BaseException] = []

    async def serve() -> None:
        site = Site()
        for path, payload in representations.items():
            site.add_resource(tuple(path.split("/")), _FixedResource(payload))
        context = await Context.create_server_context(
            site, bind=("127.0.0.1", port), transports=["udp6"]
        )
        started.set()
        await stopping.wait()
        await context.shutdown()

    def target() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:
            failures.append(exc)
            started.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    started.wait(10)
    assert failures == []
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stopping.set)
        thread.join(10)
        loop.close()


# --- the bridge thread and the topics --------------------------------------------------


def _resource(message: TopicMessage) -> tuple[str, str]:
    """(entity, sensor) of a message; "*" for a telemetry body."""
    return (str(message.body["entity_id"]), str(message.body.get("sensor", "*")))


def _ts(message: TopicMessage) -> int:
    ts = message.body["ts"]
    assert isinstance(ts, int)
    return ts


# --- what the server served ------------------------------------------------------------


@dataclass(frozen=True)
class _Served:
    entity: str
    sensor: str
    start_ms: int
    tick: int


def _served(message: TopicMessage, plant: _Plant, starts: list[int]) -> _Served:
    """The tick of which server run ``message`` carries, checking it carries exactly
    what that server served: the same number in the resource's unit, the same body."""
    RAW_SCHEMA.validate(message.body)
    decoded = decode_raw(message.raw)
    entity = decoded.entity_id
    assert message.key == entity
    entity_index = ENTITIES.index(entity)
    specs = plant.model.sensors_of(entity)
    sensors = list(specs)
    resource = plant.resources()[_resource(message)]
    if not isinstance(resource, SensorResource):
        start = max(s for s in starts if s <= decoded.ts_ms)
        tick, offset = divmod(decoded.ts_ms - start, PERIOD_MS)
        assert offset == 0 and tick < TICKS
        assert message.body == {
            "entity_id": entity,
            "ts": decoded.ts_ms,
            "values": {name: value_at(entity_index, i, tick) for i, name in enumerate(sensors)},
            "units": {name: spec.unit for name, spec in specs.items()},
        }
        return _Served(entity, "*", start, tick)
    sensor, value = resource.sensor, decoded.value
    assert value is not None
    assert decoded.unit == resource.unit
    assert decoded.quality == "good"
    assert decoded.source == resource.uri
    conversion = specs[sensor].conversion(resource.unit)
    assert conversion is not None
    sensor_index = sensors.index(sensor)
    tick = tick_of(entity_index, sensor_index, conversion.to_canonical(value))
    assert 0 <= tick < TICKS
    served = conversion.from_canonical(value_at(entity_index, sensor_index, tick))
    assert value == float(repr(float(served)))
    # A number carries the time it arrived: after its tick's, from the server then up.
    start = max(s for s in starts if s - EARLY_MS <= decoded.ts_ms)
    tick_ms = start + tick * PERIOD_MS
    assert tick_ms - EARLY_MS <= decoded.ts_ms < tick_ms + 5_000
    return _Served(entity, sensor, start, tick)


def _ticks(served: list[_Served], start_ms: int) -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    for item in served:
        if item.start_ms == start_ms:
            found[(item.entity, item.sensor)].append(item.tick)
    return found


class _Ledger:
    """What the server served, for each message read so far: each checked once."""

    def __init__(self, plant: _Plant, starts: list[int]) -> None:
        self.plant = plant
        self.starts = starts
        self._checked: dict[int, _Served] = {}

    def served(self, messages: list[TopicMessage]) -> list[_Served]:
        for message in messages:
            if id(message) not in self._checked:
                self._checked[id(message)] = _served(message, self.plant, self.starts)
        return [self._checked[id(message)] for message in messages]

    def latest_run(self, messages: list[TopicMessage]) -> dict[tuple[str, str], list[int]]:
        """Ticks by resource of the latest server run."""
        return _ticks(self.served(messages), self.starts[-1])


def _missing(ticks: list[int]) -> int:
    """Ticks between the first and the last not there."""
    return max(ticks) - min(ticks) + 1 - len(set(ticks))


# --- the bridge's metrics and logs -----------------------------------------------------


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"bridge": "coap", **labels}) or 0.0


def _bridge_counts() -> dict[str, float]:
    """The bridge's counters; the bridge threads of every test count in this process."""
    return {
        "received": _count("twinflow_bridge_messages_received_total"),
        "forwarded": _count("twinflow_bridge_messages_forwarded_total"),
        "reconnects": _count("twinflow_bridge_reconnects_total"),
        "repeats": _count("twinflow_bridge_values_skipped_total", why="repeat"),
        "dead letters": sum(
            _count("twinflow_bridge_dead_letters_total", reason=reason) for reason in Reason
        ),
    }


def _since(before: dict[str, float]) -> dict[str, float]:
    return {name: value - before[name] for name, value in _bridge_counts().items()}


def _served_connected(port: int) -> float:
    """``twinflow_bridge_connected`` as the bridge's /metrics endpoint serves it."""
    return sample(scrape(port), "twinflow_bridge_connected", bridge="coap")


def _logs(caplog: pytest.LogCaptureFixture, fragment: str, since: int = 0) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records[since:]
        if record.name == LOGGER and fragment in record.getMessage()
    ]


def _wait(check: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.05)


# --- tests -----------------------------------------------------------------------------


@pytest.mark.chaos
def test_values_arrive_as_served_and_once_each_after_the_server_is_killed(
    plant: _Plant, caplog: pytest.LogCaptureFixture, chaos_table: list[dict[str, object]]
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    settings, every = plant.settings, set(plant.resources())
    resources = plant.resources().values()
    metrics_port = settings.metrics.coap_bridge_port
    before_run = _bridge_counts()
    with reading(settings, settings.topics.raw) as topic, BridgeThread(run, settings, plant.model):
        with _server_process(plant) as first:
            starts = [first.start_ms]
            ledger = _Ledger(plant, starts)
            topic.wait_for(
                lambda got: (
                    set(ledger.latest_run(got)) == every
                    and all(len(t) >= 20 for t in ledger.latest_run(got).values())
                ),
                timeout_s=30,
            )
        killed_ms, logged = time.time_ns() // 1_000_000, len(caplog.records)
        # Both servers' ports fall silent; once every resource is known lost, a new
        # server is a resumption for each of them.
        _wait(
            lambda: all(
                any(r.uri in line for line in _logs(caplog, " lost: ", logged)) for r in resources
            ),
            "the bridge noticing the loss",
            timeout_s=10,
        )
        with _server_process(plant) as second:
            starts.append(second.start_ms)
            topic.wait_for(lambda got: set(ledger.latest_run(got)) == every, timeout_s=20)
            # Some more ticks, so that repeats or losses after the resume would show.
            topic.wait_for(
                lambda got: all(len(t) >= 20 for t in ledger.latest_run(got).values()),
                timeout_s=20,
            )
            assert _served_connected(metrics_port) == 1
            # Before this server goes too, and its devices are lost again.
            lost_logs = [
                line for line in _logs(caplog, " lost: ") if line.startswith("CoAP device")
            ]
            back_logs = _logs(caplog, " is back: observed again after a gap of ")
        # Both servers are gone: once every delivery is confirmed, the counters must
        # match what reached the topic.
        deadline = time.monotonic() + 10
        while True:
            counts = _since(before_run)
            accounted = counts["forwarded"] + counts["repeats"] + counts["dead letters"]
            if accounted == counts["received"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        topic.wait_for(lambda got: len(got) >= counts["forwarded"], timeout_s=10)
        topic.settle(quiet_s=1.0)

    served = ledger.served(topic.messages)
    keys = [(s.entity, s.sensor, s.start_ms, s.tick) for s in served]
    duplicates = len(keys) - len(set(keys))
    runs = [_ticks(served, start) for start in starts]
    missing = sum(_missing(ticks) for run_ticks in runs for ticks in run_ticks.values())
    chaos_table.append(
        {
            "fault": "17. CoAP server SIGKILL, new server on the same ports",
            "runs": 2,
            "lost": missing,
            "duplicates": duplicates,
            "mismatches": 0,
            "notes": f"{len(every)} resources on 2 devices; logged: {'; '.join(back_logs)}",
        }
    )
    assert accounted == counts["received"], counts
    assert counts["forwarded"] == len(topic.messages)
    assert counts["dead letters"] == 0
    assert duplicates == 0
    # No tick missing between a resource's first and last reading of either run.
    assert missing == 0
    assert all(set(run_ticks) == every for run_ticks in runs)
    # The gap of each device: logged once when lost, once when back, counted once.
    assert sorted(line.split()[2] for line in lost_logs) == sorted(plant.devices)
    assert sorted(line.split()[2] for line in back_logs) == sorted(plant.devices)
    assert counts["reconnects"] == len(plant.devices)
    # No reading from between the runs.
    assert all(_ts(m) < killed_ms or _ts(m) >= starts[1] - EARLY_MS for m in topic.messages)


@pytest.mark.chaos
def test_a_quiet_server_is_observed_again_without_forwarding_a_value_twice(
    plant: _Plant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings, every = plant.settings, set(plant.resources())
    with (
        _server_process(plant) as server,
        reading(settings, settings.topics.raw) as topic,
        BridgeThread(run, settings, plant.model),
    ):
        starts = [server.start_ms]
        ledger = _Ledger(plant, starts)
        topic.wait_for(lambda got: set(ledger.latest_run(got)) == every, timeout_s=30)
        # The server keeps answering, but publishes nothing: after silence_s the bridge
        # re-registers and finds each resource's current value, which it has already.
        server.send("pause")
        topic.settle(quiet_s=0.5)
        paused_with = len(topic.messages)
        before, backs = _bridge_counts(), len(_logs(caplog, " is back: "))
        # Two rounds of re-registration from here: one of them wholly counted.
        _wait(
            lambda: len(_logs(caplog, " is back: ")) >= backs + 2 * len(plant.devices),
            "re-registration",
            timeout_s=15,
        )
        topic.settle(quiet_s=1.0)
        assert len(topic.messages) == paused_with
        counts = _since(before)
        resumed_ms = time.time_ns() // 1_000_000
        server.send("resume")
        topic.wait_for(
            lambda got: {_resource(m) for m in got if _ts(m) >= resumed_ms} == every, timeout_s=20
        )

    keys = [(s.entity, s.sensor, s.tick) for s in ledger.served(topic.messages)]
    assert len(keys) == len(set(keys))
    assert counts["repeats"] >= len(every)
    assert counts["repeats"] == counts["received"]
    assert counts["forwarded"] == 0


def test_malformed_representations_become_dead_letters_with_reason_and_source(
    stack: Settings, unique: str, tmp_path: Path
) -> None:
    (port,), (metrics_port,) = _free_udp_ports(1), free_ports(1)
    device = {"host": "127.0.0.1", "port": port}
    model = _write_model(
        tmp_path / "plant.yaml",
        {
            "pump-001": device,
            "motor-001": {**device, "telemetry": "motor-001/all"},
            "compressor-001": {**device, "telemetry": "compressor-001/all"},
        },
    )
    settings = _settings(stack, f"test.coap.{unique}", metrics_port)
    ensure_topics(stack.kafka, ingest_topics(settings.topics))
    before_run = _bridge_counts()
    stranger = b'{"entity_id":"pump-001","ts":1767225600000,"values":{"flow":3.5}}'
    representations = {
        "flow": b"abc",
        "temp": b"nan",
        "pressure": b"12.5",
        "current": b"7",
        "vibration": b"2.5",
        "motor-001/all": b"{not json",
        "compressor-001/all": stranger,
    }
    expected = {
        ("pump-001", "flow"): ("bad_payload", b"abc"),
        ("pump-001", "temp"): ("non_finite", b"nan"),
        ("motor-001", "motor-001/all"): ("bad_json", b"{not json"),
        ("compressor-001", "compressor-001/all"): ("entity_mismatch", stranger),
    }
    with (
        _fixed_server(port, representations),
        reading(settings, settings.topics.raw) as raw,
        reading(settings, settings.topics.deadletter) as dead,
        BridgeThread(run, settings, model),
    ):
        dead.wait_for(lambda got: len(got) >= len(expected), timeout_s=30)
        raw.wait_for(lambda got: len(got) >= 3, timeout_s=10)
        # The values never change, so the bridge re-registers every silence_s and finds
        # them again: a bad value is dead-lettered once, like a good one is forwarded once.
        before = _bridge_counts()
        _wait(
            lambda: _since(before)["repeats"] >= 2 * len(representations),
            "two re-registrations",
            timeout_s=15,
        )
        dead.settle(quiet_s=1.0)
        raw.settle(quiet_s=0.5)
        counts = _since(before_run)

    letters = {(m.key, m.body["source"]["address"]): m.body for m in dead.messages}
    assert len(dead.messages) == len(letters) == len(expected)
    for (entity, path), (reason, payload) in expected.items():
        letter = letters[(entity, path)]
        LETTER_SCHEMA.validate(letter)
        assert letter["reason"] == reason
        assert letter["entity_id"] == entity
        assert letter["source"] == {"kind": "coap", "device": f"127.0.0.1:{port}", "address": path}
        assert letter["payload_size"] == len(payload)
        assert letter["payload_excerpt"] == payload.decode()
    assert counts["dead letters"] == len(expected)
    assert sorted((m.body["sensor"], m.body["value"], m.body["unit"]) for m in raw.messages) == [
        ("discharge_pressure", 12.5, "bar"),
        ("motor_current", 7.0, "mA"),
        ("vibration_rms", 2.5, "mm/s"),
    ]


def test_readings_reach_questdb_through_the_flow_in_canonical_units(
    plant: _Plant, stack: Settings, unique: str, tmp_path: Path
) -> None:
    topics = {
        "raw": plant.settings.topics.raw,
        "deadletter": plant.settings.topics.deadletter,
        "feedback": f"test.coap.{unique}.fb",
        "commands": f"test.coap.{unique}.cmd",
    }
    create_topics(stack, topics)
    flow = flow_process(stack, topics, tmp_path, "coap")
    flow.env["TWINFLOW_TWIN_MODEL"] = str(plant.model_file)
    table = tables(flow.env["TWINFLOW_QUESTDB__TABLE_PREFIX"]).readings.name
    sql = QuestDBHttp(stack.questdb)
    # Resources in degF, K, l/s, mA and one telemetry body in canonical units.
    watched = [
        ("pump-001", "bearing_temp"),
        ("pump-001", "flow"),
        ("pump-001", "motor_current"),
        ("pump-002", "bearing_temp"),
        ("motor-001", "winding_temp"),
    ]

    def rows() -> list[tuple[object, ...]]:
        return table_rows(sql, table, "entity, sensor, value")

    def enough() -> bool:
        found = rows()
        return all(sum(1 for r in found if r[:2] == key) >= 10 for key in watched)

    flow.start()
    try:
        with (
            _server_process(plant),
            BridgeThread(run, plant.settings, plant.model),
        ):
            wait_until(enough, flow, "readings in QuestDB", timeout_s=180)
    finally:
        flow.stop()
    for entity, sensor, value in rows():
        assert isinstance(value, float) and isinstance(entity, str) and isinstance(sensor, str)
        entity_index = ENTITIES.index(entity)
        sensor_index = list(plant.model.sensors_of(entity)).index(sensor)
        tick = tick_of(entity_index, sensor_index, value)
        assert value == pytest.approx(value_at(entity_index, sensor_index, tick), abs=1e-6), (
            entity,
            sensor,
            value,
        )


def _udp_listeners(port: int) -> set[str]:
    """Local addresses of the UDP sockets bound to ``port`` (Linux /proc, hex form)."""
    found = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            address, local_port = line.split()[1].rsplit(":", 1)
            if int(local_port, 16) == port:
                found.add(address)
    return found


def test_the_simulator_serves_text_in_resource_units_json_and_etags_on_its_host_only(
    tmp_path: Path,
) -> None:
    port_a, port_b = _free_udp_ports(2)
    model = _write_model(
        tmp_path / "plant.yaml",
        {
            "pump-001": {"host": "127.0.0.1", "port": port_a},
            "motor-001": {"host": "127.0.0.1", "port": port_b, "telemetry": "motor-001/all"},
        },
    )
    ts_ms = 1_767_225_600_123

    async def get(context: Context, uri: str) -> Message:
        return await context.request(Message(code=Code.GET, uri=uri)).response

    async def scenario() -> None:
        async with PlantCoapServer(model, ["pump-001", "motor-001"]) as server:
            # The IPv4-mapped loopback address, in /proc/net/udp6's byte order.
            assert (
                _udp_listeners(port_a)
                == _udp_listeners(port_b)
                == {"0000000000000000FFFF00000100007F"}
            )
            context = await Context.create_client_context(transports=["udp6"])
            try:
                early = await get(context, f"coap://127.0.0.1:{port_a}/temp")
                assert early.code == Code.SERVICE_UNAVAILABLE
                await server.publish(
                    Sample(
                        "pump-001", ts_ms, {"bearing_temp": 60.0, "flow": 36.0}, ("vibration_rms",)
                    )
                )
                await server.publish(Sample("motor-001", ts_ms, {"speed": 1480.0}))
                temp = await get(context, f"coap://127.0.0.1:{port_a}/temp")
                assert temp.code == Code.CONTENT
                assert temp.opt.content_format == ContentFormat.TEXT
                spec = model.sensors_of("pump-001")["bearing_temp"]
                degf = spec.conversion("degF")
                assert degf is not None
                assert temp.payload == repr(degf.from_canonical(60.0)).encode()
                assert temp.opt.etag == ts_ms.to_bytes(8, "big")
                flow = await get(context, f"coap://127.0.0.1:{port_a}/flow")
                assert flow.payload == b"10.0"  # 36 m3/h in l/s
                pressure = await get(context, f"coap://127.0.0.1:{port_a}/pressure")
                assert pressure.code == Code.SERVICE_UNAVAILABLE  # not in any sample yet
                body = await get(context, f"coap://127.0.0.1:{port_b}/motor-001/all")
                assert body.opt.content_format == ContentFormat.JSON
                assert json.loads(body.payload) == {
                    "entity_id": "motor-001",
                    "ts": ts_ms,
                    "values": {"speed": 1480.0},
                    "units": {"speed": "rpm"},
                }
                missing = await get(context, f"coap://127.0.0.1:{port_b}/temp")
                assert missing.code == Code.NOT_FOUND
            finally:
                await context.shutdown()

    asyncio.run(scenario())
