"""`twinflow serve` over a running flow: its answers, refusals, commands and events.

The server reads the flow's twin.state and twin.alarms; what it holds must equal what
QuestDB's ``LATEST ON`` says once the flow is done. Schemathesis then throws generated
requests at every operation of the published document: no 5xx, no answer outside it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from connectors.questdb import QuestDBHttp
from tests.helpers import consume_all, free_ports, sample, scrape, wait_for_wal
from tests.integration.served import (
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    ServedPlant,
    request,
    serve_plant,
)
from twinflow.settings import Settings
from twinflow.tables import tables
from twinflow.twin_model import load_twin_model

pytestmark = pytest.mark.integration

MODEL = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"


@pytest.fixture(scope="module")
def plant(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedPlant]:
    yield from serve_plant(stack, tmp_path_factory.mktemp("served"))


def _wait(check: Any, plant: ServedPlant, what: str, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert plant.flow.running(), f"the flow exited:\n{plant.flow.tail()}"
        assert plant.server.poll() is None, f"serve exited:\n{plant.tail()}"
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout_s} s:\n{plant.tail()}")


def _entities(node: dict[str, Any]) -> list[dict[str, Any]]:
    own = [node] if node["kind"] == "entity" else []
    return own + [e for child in node["children"] for e in _entities(child)]


@pytest.fixture(scope="module")
def settled(plant: ServedPlant) -> dict[str, Any]:
    """The plant once every entity has a state and the flow has raised pump-001's alarm."""

    def every_state_and_the_alarm() -> dict[str, Any] | None:
        status, tree = plant.get("/api/v1/plant")
        assert status == 200, tree
        if any(e["status"] == "UNKNOWN" for e in _entities(tree)):
            return None
        _, alarms = plant.get("/api/v1/alarms?entity=pump-001")
        return tree if alarms else None

    return _wait(every_state_and_the_alarm, plant, "a state for every entity and an alarm")


def test_the_plant_lists_every_entity_of_the_model_with_rollups(
    plant: ServedPlant, settled: dict[str, Any]
) -> None:
    model = load_twin_model(MODEL)
    listed = _entities(settled)
    assert sorted(e["id"] for e in listed) == sorted(e.id for e in model.entities)
    assert settled["entities"] == len(model.entities)
    assert settled["status"] == "ALARM" and settled["active_alarms"] >= 1
    pump = next(e for e in listed if e["id"] == "pump-001")
    assert pump["status"] == "ALARM"
    assert [child["id"] for child in pump["children"]] == ["motor-001"]


def test_the_served_state_equals_questdb_latest_on(
    plant: ServedPlant, settled: dict[str, Any]
) -> None:
    sql = QuestDBHttp(plant.stack.questdb)
    table = tables(plant.flow.env["TWINFLOW_QUESTDB__TABLE_PREFIX"]).twin_state.name

    def latest() -> dict[str, tuple[object, ...]]:
        wait_for_wal(sql, [table])
        rows = sql.exec(
            f'SELECT entity, status, health, ts FROM "{table}" LATEST ON ts PARTITION BY entity'
        ).rows
        return {str(row[0]): tuple(row[1:]) for row in rows}

    def served() -> dict[str, tuple[object, ...]]:
        found = {}
        for entity in load_twin_model(MODEL).entities:
            status, twin = plant.get(f"/api/v1/entities/{entity.id}")
            assert status == 200, twin
            found[entity.id] = (twin["status"], twin["health"], _iso(twin["ts_ms"]))
        return found

    # The flow may still be writing: equal once both stop moving.
    def equal() -> bool:
        return latest() == served()

    _wait(equal, plant, "the served state to equal QuestDB's LATEST ON", timeout_s=60)
    assert len(latest()) == len(load_twin_model(MODEL).entities)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}000Z"


def test_an_entity_carries_sensors_windows_setpoints_and_its_alarm(
    plant: ServedPlant, settled: dict[str, Any]
) -> None:
    def with_windows() -> dict[str, Any] | None:
        _, twin = plant.get("/api/v1/entities/pump-001")
        return twin if twin["sensors"]["flow"]["window"] is not None else None

    twin = _wait(with_windows, plant, "pump-001's latest windows", timeout_s=30)
    flow = twin["sensors"]["flow"]
    assert flow["unit"] == "m3/h" and flow["value"] > 140  # after the step up
    assert flow["window"]["count"] > 0 and twin["windows_available"]
    assert twin["setpoints"]["speed"]["allowed"].startswith("a number in [")
    [active] = twin["active_alarms"]
    assert active["entity_id"] == "pump-001" and active["active"]
    assert any(c["sensor"] == "flow" for c in active["contributions"])

    status, series = plant.get(
        f"/api/v1/entities/pump-001/series?sensor=flow&from={plant.start_ms}"
        f"&to={plant.start_ms + 3_600_000}&points=100"
    )
    assert status == 200, series
    points = series["points"]
    assert 50 <= len(points["ts_ms"]) <= 101
    assert all(
        low <= mean <= high
        for low, mean, high in zip(points["min"], points["mean"], points["max"], strict=True)
    )
    assert series["windows"], "window bands"
    assert [span["alarm_id"] for span in series["alarms"]] == [active["alarm_id"]]


def test_a_second_server_side_by_side_serves_the_same_plant(
    plant: ServedPlant, settled: dict[str, Any], tmp_path: Path
) -> None:
    """No consumer group: a second server reads the topics whole, beside the first."""
    port, metrics_port = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    env = {
        **plant.env,
        "TWINFLOW_SERVE__PORT": str(port),
        "TWINFLOW_METRICS__SERVE_PORT": str(metrics_port),
    }
    with (tmp_path / "second.log").open("a") as out:
        second = subprocess.Popen(
            [sys.executable, "-m", "twinflow", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def caught_up() -> bool:
            assert second.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
            try:
                status, health = request(url + "/api/v1/health", token=None)
            except OSError:
                return False
            return status == 200 and bool(health["caught_up"])

        _wait(caught_up, plant, "the second server to read the topics")

        def twins(base: str) -> list[tuple[object, ...]]:
            _, tree = request(base + "/api/v1/plant")
            return [(e["id"], e["own_status"], e["active_alarms"]) for e in _entities(tree)]

        # The trees may be up to a second old; equal once both have caught up.
        _wait(lambda: twins(url) == twins(plant.url), plant, "the same plant", timeout_s=30)
        assert len(twins(url)) == len(load_twin_model(MODEL).entities)
    finally:
        second.terminate()
        second.wait(30)


def test_requests_and_streams_are_counted_in_metrics(
    plant: ServedPlant, settled: dict[str, Any]
) -> None:
    assert plant.get("/api/v1/entities/pump-001")[0] == 200
    assert request(plant.url + "/api/v1/plant", token=None)[0] == 401
    samples = scrape(int(plant.env["TWINFLOW_METRICS__SERVE_PORT"]))
    entity = {"route": "/api/v1/entities/{id}", "status": "200"}
    assert sample(samples, "twinflow_serve_requests_total", **entity) >= 1
    assert sample(samples, "twinflow_serve_requests_total", route="unrouted", status="401") >= 1
    assert sample(samples, "twinflow_serve_caught_up") == 1
    state_topic = plant.flow.env["TWINFLOW_TOPICS__STATE"]
    assert sample(samples, "twinflow_serve_records_read_total", topic=state_topic) >= 60


def test_tokens_and_roles_are_enforced(plant: ServedPlant) -> None:
    assert request(plant.url + "/api/v1/plant", token=None)[0] == 401
    assert request(plant.url + "/api/v1/plant", token="not-a-token-at-all")[0] == 401
    assert request(plant.url + "/api/v1/plant", token=VIEWER_TOKEN)[0] == 200
    status, refused = request(
        plant.url + "/api/v1/entities/pump-001/setpoints/speed",
        token=VIEWER_TOKEN,
        method="PUT",
        body={"value": 1500},
    )
    assert status == 403 and "viewer" in refused["detail"]
    status, refused = request(
        plant.url + "/api/v1/alarms/pump-001@1/reject", token=VIEWER_TOKEN, method="POST", body={}
    )
    assert status == 403
    assert request(plant.url + "/api/v1/openapi.json", token=None)[0] == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("GET", "/api/v1/entities/nope", None, 404, "id"),
        ("GET", "/api/v1/entities/pump-001/series?sensor=nope", None, 422, "sensor"),
        ("GET", "/api/v1/entities/pump-001/series?sensor=flow&points=1", None, 422, "points"),
        ("GET", "/api/v1/entities/pump-001/series?sensor=flow&from=9&to=3", None, 422, "from"),
        ("GET", "/api/v1/alarms?state=sideways", None, 422, "state"),
        ("GET", "/api/v1/alarms?entity=nope", None, 422, "entity"),
        ("PUT", "/api/v1/entities/pump-001/setpoints/speed", {"value": 99999}, 422, "value"),
        ("PUT", "/api/v1/entities/pump-001/setpoints/speed", {"value": "fast"}, 422, "value"),
        ("PUT", "/api/v1/entities/pump-001/setpoints/speed", {"valu": 1}, 422, "valu"),
        ("PUT", "/api/v1/entities/pump-001/setpoints/speed", {}, 422, "value"),
        ("PUT", "/api/v1/entities/pump-001/setpoints/speed", b"{", 400, "body"),
        ("PUT", "/api/v1/entities/pump-001/setpoints/speed", b"[1]", 422, "body"),
        ("PUT", "/api/v1/entities/pump-001/setpoints/torque", {"value": 1}, 404, "name"),
        ("POST", "/api/v1/alarms/pump-001@1/ack", {}, 404, "id"),
        ("POST", "/api/v1/alarms/pump-001@1/ack", {"note": 5}, 422, "note"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(
    plant: ServedPlant, method: str, path: str, body: Any, status: int, field: str
) -> None:
    got, error = request(plant.url + path, method=method, body=body)
    assert (got, error["field"]) == (status, field), error
    assert error["detail"]


def test_a_write_not_declared_json_is_refused(plant: ServedPlant) -> None:
    """A cross-site form or text POST (no CORS preflight) cannot judge or command."""
    for method, path in (
        ("POST", "/api/v1/alarms/pump-001@1/reject"),
        ("PUT", "/api/v1/entities/pump-001/setpoints/speed"),
    ):
        req = urllib.request.Request(
            plant.url + path,
            data=b'{"value": 1500}',
            method=method,
            headers={"Content-Type": "text/plain", "Authorization": f"Bearer {OPERATOR_TOKEN}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        error = json.loads(refused.value.read())
        assert (refused.value.code, error["field"]) == (415, "Content-Type"), error


def test_a_setpoint_command_reaches_twin_commands(plant: ServedPlant) -> None:
    status, command = request(
        plant.url + "/api/v1/entities/pump-001/setpoints/speed",
        method="PUT",
        body={"value": 1500, "expires_s": 30},
    )
    assert status == 202, command
    assert (command["entity_id"], command["setpoint"], command["value"]) == (
        "pump-001",
        "speed",
        1500.0,
    )
    assert command["user"] == "operator"
    sent = consume_all(plant.stack.kafka, plant.topics["commands"])
    assert command["command_id"] in {json.loads(m.value())["command_id"] for m in sent}


def test_events_stream_state_changes(plant: ServedPlant, settled: dict[str, Any]) -> None:
    """Connect, then make pump-001's state move: its state event arrives."""
    port = int(plant.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), 10) as conn:
        conn.sendall(
            b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {OPERATOR_TOKEN}\r\n\r\n".encode()
        )
        conn.settimeout(60)
        received = b""
        while b"event: ready" not in received:
            received += conn.recv(65536)
        assert b"text/event-stream" in received
        plant.more_pump_telemetry()
        while not any(
            b"event: state" in block and b'"entity_id":"pump-001"' in block
            for block in received.replace(b"\r\n", b"\n").split(b"\n\n")
        ):
            chunk = conn.recv(65536)
            assert chunk, f"stream ended:\n{received[-2000:]!r}"
            received += chunk


def test_generated_requests_get_no_5xx_and_no_undocumented_answer(
    plant: ServedPlant, settled: dict[str, Any]
) -> None:
    schema = schemathesis.openapi.from_url(plant.url + "/api/v1/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 8
    for api in operations:
        if api.path == "/api/v1/events":
            continue  # an endless stream; tested above

        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=api.as_strategy())
        def check(case: Any) -> None:
            response = case.call(headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
            # A schema-valid request naming an entity, sensor or alarm the plant does not
            # have is refused with a 4xx on purpose: not a failure here.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        check()
