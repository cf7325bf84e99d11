"""The metrics endpoint and what the flow counts, without brokers."""

from __future__ import annotations

import socket
import urllib.request
from datetime import UTC, datetime

import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from flows.twin import observe
from schemas.deadletter import Source, dead_letter
from schemas.outputs import Alarm, AlarmEvent, AlarmKind, Anomaly, LateReading, SensorWindow
from schemas.raw import Reason
from schemas.transport import CodedStrings
from tests.helpers import free_ports
from twinflow import allocator
from twinflow.errors import ConfigError
from twinflow.metrics import serving
from twinflow.settings import MetricsSettings, Settings
from twinflow.twin import ReadingColumns, StepOutput


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _window(end_ms: int) -> SensorWindow:
    return SensorWindow("p1", "flow", end_ms - 10_000, end_ms, 3, 1, 0, 2, 1, 1, 0, 0)


def _alarm(event: AlarmEvent) -> Alarm:
    active = event is AlarmEvent.RAISED
    return Alarm(
        msg_id=f"p1@0/{event.value}",
        alarm_id="p1@0",
        entity_id="p1",
        kind=AlarmKind.ANOMALY,
        event=event,
        active=active,
        ts_ms=30_000,
        start_ms=0,
        end_ms=None if active else 30_000,
        peak_score=9.0,
        threshold=3.0,
        anomalous_windows=2,
        contributions=[],
    )


def test_observe_counts_what_a_step_produced() -> None:
    names = (
        "twinflow_readings_accepted_total",
        "twinflow_readings_flagged_total",
        "twinflow_late_readings_total",
        "twinflow_windows_closed_total",
        "twinflow_window_close_lag_seconds_count",
        "twinflow_window_close_lag_seconds_sum",
        "twinflow_anomalies_total",
    )
    before = {name: _value(name) for name in names}
    bad_json = _value("twinflow_dead_letters_total", reason="bad_json")
    alarms = {event: _value("twinflow_alarms_total", event=event.value) for event in AlarmEvent}
    source = Source(kind="kafka", topic="twin.raw", partition=0, offset=1)
    received = datetime(2026, 1, 1, tzinfo=UTC)
    out = StepOutput(
        readings=ReadingColumns(
            entity=CodedStrings.of(["p1"] * 4),
            sensor=CodedStrings.of(["flow"] * 4),
            ts_ms=np.arange(4, dtype=np.int64),
            value=np.ones(4),
            flags=np.array([0, 1, 0, 4], dtype=np.int64),
        ),
        windows=[_window(100_000), _window(100_000), _window(97_000)],
        late=[LateReading("m", "p1", "flow", 1, 1.0, 2, "twin.raw", 0, 1)],
        anomalies=[Anomaly("a", "p1", 90_000, 100_000, 9.0, 3.0, "hst", [])],
        alarms=[_alarm(AlarmEvent.RAISED), _alarm(AlarmEvent.CLEARED), _alarm(AlarmEvent.RAISED)],
        dead_letters=[
            dead_letter(b"{", Reason.BAD_JSON, "x", source, received),
            dead_letter(b"{", Reason.BAD_JSON, "y", source, received),
        ],
    )
    observe(out, now_ms=101_000)
    after = {name: _value(name) - before[name] for name in names}
    assert after == {
        "twinflow_readings_accepted_total": 4,
        "twinflow_readings_flagged_total": 2,
        "twinflow_late_readings_total": 1,
        "twinflow_windows_closed_total": 3,
        "twinflow_window_close_lag_seconds_count": 3,
        "twinflow_window_close_lag_seconds_sum": pytest.approx(1 + 1 + 4),
        "twinflow_anomalies_total": 1,
    }
    assert _value("twinflow_dead_letters_total", reason="bad_json") - bad_json == 2
    assert {
        event: _value("twinflow_alarms_total", event=event.value) - alarms[event]
        for event in AlarmEvent
    } == {**dict.fromkeys(AlarmEvent, 0), AlarmEvent.RAISED: 2, AlarmEvent.CLEARED: 1}


def test_every_alarm_event_has_a_series_from_the_start() -> None:
    # Zero rather than no data: "no alarm cleared" reads as 0 on a graph.
    for event in AlarmEvent:
        assert (
            REGISTRY.get_sample_value("twinflow_alarms_total", {"event": event.value}) is not None
        )


def test_the_endpoint_serves_the_registry_on_the_configured_address() -> None:
    (port,) = free_ports(1)
    with serving(MetricsSettings(flow_port=port), port, "flow_port") as url:
        assert url == f"http://127.0.0.1:{port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {"twinflow_readings_accepted", "twinflow_kafka_consumer_lag"} <= names
    assert "process_resident_memory_bytes" in names
    with socket.socket() as probe:  # shut down with the block
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_taken_port_fails_fast_naming_the_setting() -> None:
    (port,) = free_ports(1)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with (
            pytest.raises(ConfigError, match="TWINFLOW_METRICS__MQTT_BRIDGE_PORT") as caught,
            serving(MetricsSettings(), port, "mqtt_bridge_port"),
        ):
            pass
    assert "metrics.mqtt_bridge_port" in str(caught.value)
    assert "TWINFLOW_METRICS__ENABLED=false" in str(caught.value)


def test_metrics_off_serves_nothing() -> None:
    with serving(MetricsSettings(enabled=False), 1, "flow_port") as url:
        assert url is None


def test_each_process_of_a_local_cluster_gets_its_own_port() -> None:
    local = MetricsSettings(flow_port=9300)
    assert [local.flow_process_port(i) for i in (None, 0, 1, 2)] == [9300, 9300, 9301, 9302]
    pods = MetricsSettings(flow_port=9300, per_process_port=False)
    assert pods.flow_process_port(2) == 9300


def test_a_metrics_port_may_not_repeat_a_service_port() -> None:
    with pytest.raises(ValueError, match=r"metrics\.flow_port and kafka\.port"):
        Settings(metrics=MetricsSettings(flow_port=Settings().kafka.port))


def test_the_allocator_gauges_split_this_process_memory() -> None:
    def value(name: str) -> float:
        found = REGISTRY.get_sample_value(name)
        assert found is not None, name
        return found

    if allocator.heap() is None or allocator.python_arenas() is None:
        pytest.skip("the gauges read glibc's malloc and pymalloc; this interpreter lacks one")
    assert value("twinflow_python_allocated_blocks") > 10_000
    assert value("twinflow_malloc_in_use_bytes") > 0
    arenas, highwater = (
        value("twinflow_pymalloc_arena_bytes"),
        value("twinflow_pymalloc_arena_highwater_bytes"),
    )
    assert highwater >= arenas >= value("twinflow_pymalloc_block_bytes") > 1_000_000
