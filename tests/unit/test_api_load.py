"""The API load benchmark's own parts: its plant and states, its maths, its parsers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from benchmarks.api_load import (
    API,
    TARGET_P99_MS,
    TARGET_REQUESTS_PER_S,
    ApiLoad,
    LoadOptions,
    bench_model,
    changed_state,
    content_length,
    events_summary,
    latency_summary,
    machine_cpu_ticks,
    markdown,
    memory_kib,
    nudged,
    per_second,
    sse_event,
    synthetic_records,
    targets,
)
from schemas.outputs import Alarm, Status, TwinState, encode
from schemas.serve import ViewStatus
from twinflow.plant import PlantView
from twinflow.settings import Settings
from twinflow.twin_model import TwinModel

NOW_MS = 1_790_000_000_000
ENTITY = f"{API}/entities/{{id}}"


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return TwinModel.model_validate(bench_model(200))


# -- the plant and its states -------------------------------------------------------------


def test_the_model_nests_motors_under_pumps_on_their_line(model: TwinModel) -> None:
    assert len(model.entities) == 200
    first, second = model.entities[0], model.entities[1]
    assert second.parent == first.id
    assert (second.site, second.line) == (first.site, first.line)
    assert all(e.parent is None for e in model.entities[::2])
    assert set(model.setpoints_of(first.id)) == {"speed", "enabled"}


def test_every_entity_has_a_state_and_five_percent_an_active_alarm(model: TwinModel) -> None:
    states, alarms = synthetic_records(model, NOW_MS)
    assert [s.entity_id for s in states] == [e.id for e in model.entities]
    assert len(alarms) == 10
    by_entity = {alarm.entity_id: alarm for alarm in alarms}
    for state in states:
        alarm = by_entity.get(state.entity_id)
        if alarm is None:
            assert (state.status, state.active_alarms) == (Status.OK, [])
        else:
            assert (state.status, state.active_alarms) == (Status.ALARM, [alarm.alarm_id])
            assert alarm.active and alarm.start_ms < alarm.ts_ms <= NOW_MS


def test_states_are_plausible_against_the_model(model: TwinModel) -> None:
    states, _alarms = synthetic_records(model, NOW_MS)
    for state in states:
        specs = model.sensors_of(state.entity_id)
        assert state.sensors.keys() == specs.keys()
        for name, reading in state.sensors.items():
            low, high = specs[name].range
            assert low <= reading.value <= high
            assert reading.unit == specs[name].unit
        flow, pressure = state.sensors["flow"].value, state.sensors["pressure"].value
        assert state.derived["hydraulic_power"] == pytest.approx(flow * pressure / 36)
        setpoints = model.setpoints_of(state.entity_id)
        assert state.setpoints.keys() == setpoints.keys()
        for name, setpoint in state.setpoints.items():
            assert setpoints[name].check(setpoint.reported) is None
            if setpoint.desired is not None:
                assert setpoints[name].check(setpoint.desired) is None
        assert 0.0 <= state.health <= 1.0


def test_some_setpoints_are_commanded_and_others_only_reported(model: TwinModel) -> None:
    states, _alarms = synthetic_records(model, NOW_MS)
    commanded = [sp for s in states for sp in s.setpoints.values() if sp.desired is not None]
    assert 0 < len(commanded) < len(states)


def test_records_decode_as_the_server_reads_them_and_fill_its_view(model: TwinModel) -> None:
    states, alarms = synthetic_records(model, NOW_MS)
    view = PlantView(model)
    for alarm in alarms:
        view.apply_alarm(msgspec.json.decode(encode(alarm), type=Alarm))
    for state in states:
        view.apply_state(msgspec.json.decode(encode(state), type=TwinState))
    tree = view.tree()
    assert (tree.entities, tree.active_alarms, tree.status) == (200, 10, ViewStatus.ALARM)
    assert view.entity(alarms[0].entity_id).active_alarms == [alarms[0]]


def test_a_changed_state_is_an_event_for_the_server(model: TwinModel) -> None:
    states, _alarms = synthetic_records(model, NOW_MS)
    view = PlantView(model)
    view.apply_state(states[0])
    later = changed_state(states[0], NOW_MS + 5, np.random.default_rng(3))
    assert later.ts_ms == NOW_MS + 5 and later.health != states[0].health
    event = view.apply_state(later)
    assert event is not None and event.ts_ms == NOW_MS + 5


@pytest.mark.parametrize("health", [0.0, 0.5, 0.9999, 1.0])
def test_a_nudged_health_always_moves_and_stays_in_range(health: float) -> None:
    rng = np.random.default_rng(5)
    for _ in range(500):
        moved = nudged(health, rng)
        assert moved != health
        assert 0.0 <= moved <= 1.0


# -- the figures -------------------------------------------------------------------------


def test_latency_summary_of_a_known_distribution() -> None:
    summary = latency_summary(np.arange(1, 101, dtype=float))
    assert summary == {
        "p50_ms": 50.5,
        "p90_ms": 90.1,
        "p99_ms": 99.01,
        "max_ms": 100.0,
        "mean_ms": 50.5,
    }


def test_latency_summary_of_nothing_is_empty() -> None:
    assert latency_summary([]) == {}


def test_percentiles_never_decrease() -> None:
    values = np.random.default_rng(1).lognormal(0.0, 1.0, 10_000)
    summary = latency_summary(values)
    keys = ["p50_ms", "p90_ms", "p99_ms", "max_ms"]
    assert [summary[k] for k in keys] == sorted(summary[k] for k in keys)


def test_rates() -> None:
    assert per_second(30_000, 20.0) == 1500.0
    assert per_second(7, 3.0) == 2.3
    assert per_second(10, 0.0) == 0.0


def test_events_summary_without_events_or_clients() -> None:
    assert events_summary([0, 0], 0)["delivered_share"] == 0.0
    nobody = events_summary([], 100)
    assert (nobody["clients"], nobody["mean"], nobody["delivered_share"]) == (0, 0.0, 0.0)


def test_events_summary_counts_losses() -> None:
    summary = events_summary([100, 50], 100)
    assert (summary["min"], summary["max"], summary["delivered_share"]) == (50, 100, 0.75)


def _phase(
    name: str, endpoint: str, rate: float, p99: float | None, errors: int = 0
) -> dict[str, Any]:
    return {
        "name": name,
        "endpoint": endpoint,
        "requests_per_s": rate,
        "latency": {} if p99 is None else {"p99_ms": p99},
        "errors": errors,
        "sse": None,
    }


def test_targets_judge_the_entity_phases_and_every_error() -> None:
    phases = [
        _phase("entities", ENTITY, TARGET_REQUESTS_PER_S, TARGET_P99_MS),
        _phase("plant", f"{API}/plant", 10.0, 900.0, errors=1),
        _phase("entities under SSE", ENTITY, TARGET_REQUESTS_PER_S - 1, TARGET_P99_MS + 0.1),
    ]
    found = {t["target"]: t["met"] for t in targets(phases)}
    assert found == {
        "entities: >= 2,000 req/s": True,
        "entities: p99 <= 50 ms": True,
        "entities under SSE: >= 2,000 req/s": False,
        "entities under SSE: p99 <= 50 ms": False,
        "no request errors in any phase": False,
    }


def test_an_sse_stream_ended_early_misses_its_target() -> None:
    phase = _phase("entities under SSE", ENTITY, 3000.0, 10.0) | {"sse": {"streams_failed": 2}}
    found = {t["target"]: (t["measured"], t["met"]) for t in targets([phase])}
    assert found["every SSE stream lasts its phase"] == (2, False)


def test_a_phase_without_answers_misses_its_latency_target() -> None:
    found = targets([_phase("entities", ENTITY, 0.0, None)])
    assert [t["met"] for t in found] == [False, False, True]


# -- the parsers ---------------------------------------------------------------------------


def test_cpu_ticks_of_the_machine() -> None:
    busy, total = machine_cpu_ticks(Path("/proc/stat").read_text())
    assert 0 <= busy <= total


def test_memory_of_this_process() -> None:
    kib = memory_kib(Path(f"/proc/{os.getpid()}/status").read_text())
    assert 0 < kib["VmRSS"] <= kib["VmHWM"]


def test_content_length_is_required() -> None:
    assert content_length(b"HTTP/1.1 404 Not Found\r\ncontent-length:   17\r\n\r\n") == 17
    with pytest.raises(ValueError, match="Content-Length"):
        content_length(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")


def test_sse_events() -> None:
    assert sse_event(b"data: x") == ("message", b"x")
    assert sse_event(b"event: alarm\r\ndata: a\r\ndata: b") == ("alarm", b"a\nb")
    assert sse_event(b"event: ready\ndata:{}") == ("ready", b"{}")
    assert sse_event(b": ping") is None


# -- the harness's plans and report ----------------------------------------------------------


def test_clients_and_sse_clients_are_spread_over_the_processes(tmp_path: Path) -> None:
    options = LoadOptions(entities=10, clients=5, sse=3, processes=2, out=tmp_path)
    bench = ApiLoad(Settings(state_dir=tmp_path), options)
    assert (bench.work / "model.yaml").is_file()
    phase = bench.phases()[2]
    plans = bench.plans(phase, 8080)
    assert [(p.clients, p.first_client, p.sse) for p in plans] == [(2, 0, 1), (3, 2, 2)]
    assert all(p.all_clients == 5 and len(p.paths) == 10 for p in plans)
    assert bench.topics.state.startswith("bench.api.") and bench.topics.state.endswith(".state")


def test_the_report_shows_every_phase_and_each_missed_target() -> None:
    phase = {
        **_phase("entities", ENTITY, 1234.5, 80.0),
        "sse_clients": 0,
        "requests": 24_690,
        "requests_per_server_cpu_s": 1300.2,
        "error_samples": [],
        "latency": {"p50_ms": 30.0, "p90_ms": 60.0, "p99_ms": 80.0, "max_ms": 120.0},
        "server_rss_mib": {"before": 90.0, "after": 95.0, "peak": 97.0, "hwm": 97.0},
        "cpu_cores": {"server": 1.0, "load_generator": 0.4, "harness": 0.01, "machine": 1.6},
        "sse": None,
    }
    document = {
        "created": "2026-01-01T00:00:00+00:00",
        "machine": {"cpus": 2, "python": "3.11.7"},
        "options": {"processes": 1, "clients": 50, "seconds": 20.0},
        "setup": {
            "entities": 1000,
            "active_alarms": 50,
            "caught_up_s": 2.0,
            "idle_rss_mib": 90.0,
            "background_cores": 0.1,
            "idle_server_cores": 0.01,
            "checks": {"plant_bytes": 300_000, "entity_bytes": 2500},
        },
        "phases": [phase],
        "targets": targets([phase]),
    }
    text = markdown(document)
    assert "| entities | `/api/v1/entities/{id}` | 0 | 24,690 | 1,234 | 1,300 | 30.0 |" in text
    assert "| entities: >= 2,000 req/s | 1,234.5 | **no** |" in text
    assert "| no request errors in any phase | 0.0 | yes |" in text
