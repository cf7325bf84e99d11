"""The alarm lifecycle: raised once per incident, active while flagged, cleared, re-baselined."""

import pickle

import jsonschema
import msgspec
import numpy as np
import pytest

from schemas.generate import output_schemas
from schemas.outputs import AlarmEvent, encode
from twinflow.detection import AlarmPolicy, AlarmTracker, DetectorConfig, EntityMonitor

WINDOW_MS = 10_000
CONFIG = DetectorConfig(
    warmup_windows=60, smoothing=(1.0,), min_count=10, periods=(), clear_windows=3
)


def series(levels: list[tuple[int, float]], seed: int = 0) -> list[float]:
    """Noisy values: ``levels`` lists (windows, level) stretches."""
    rng = np.random.default_rng(seed)
    return [level + rng.normal(0, 1.0) for count, level in levels for _ in range(count)]


def monitor_run(
    values: list[float], config: DetectorConfig = CONFIG
) -> tuple[EntityMonitor, list[tuple[int, str, str]], list[bool]]:
    """Every transition as (window, event, alarm id), and whether an alarm was active."""
    monitor = EntityMonitor("pump-001", config)
    events, active = [], []
    for i, value in enumerate(values):
        verdict = monitor.process({"flow.mean": value}, i * WINDOW_MS, (i + 1) * WINDOW_MS)
        events += [(i, alarm.event.value, alarm.alarm_id) for alarm in verdict.alarms]
        active.append(monitor.in_alarm)
    return monitor, events, active


def test_an_incident_raises_one_alarm_that_stays_and_then_clears() -> None:
    values = series([(100, 100.0), (40, 130.0), (30, 100.0)])
    _, events, active = monitor_run(values)
    raised_at = events[0][0]
    assert events == [
        (raised_at, "raised", f"pump-001@{raised_at * WINDOW_MS}"),
        (events[1][0], "cleared", f"pump-001@{raised_at * WINDOW_MS}"),
    ]
    assert raised_at == 101  # persistence: the second anomalous window raises it
    assert all(active[raised_at:140])  # active through the incident
    assert 140 + CONFIG.clear_windows - 1 <= events[1][0] <= 140 + CONFIG.clear_windows + 1
    assert not any(active[events[1][0] :])


def test_a_short_dip_under_the_threshold_does_not_split_an_incident() -> None:
    values = series([(100, 100.0), (20, 130.0), (3, 100.0), (20, 130.0), (30, 100.0)])
    hysteresis = DetectorConfig(
        warmup_windows=60, smoothing=(1.0,), min_count=10, periods=(), clear_windows=10
    )
    _, events, _ = monitor_run(values, hysteresis)
    assert [event for _, event, _ in events] == ["raised", "cleared"]
    _, events, _ = monitor_run(values)  # 3 windows clear it: two incidents
    assert [event for _, event, _ in events] == ["raised", "cleared", "raised", "cleared"]


def test_a_lasting_new_level_is_rebaselined_and_becomes_normal() -> None:
    config = DetectorConfig(
        warmup_windows=60, smoothing=(1.0,), min_count=10, periods=(), rebaseline_after=1.0
    )
    values = series([(100, 100.0), (200, 130.0), (100, 100.0), (50, 130.0)])
    monitor, events, active = monitor_run(values, config)
    assert [event for _, event, _ in events] == ["raised", "rebaselined"]
    raised_at, ended_at = events[0][0], events[1][0]
    assert ended_at - raised_at + 1 == config.rebaseline_windows == 60
    assert not any(active[ended_at:])  # back at the old level, then at the new one: normal
    assert monitor.alarms.raised == 1


def test_without_rebaselining_a_new_level_stays_in_alarm() -> None:
    config = DetectorConfig(
        warmup_windows=60, smoothing=(1.0,), min_count=10, periods=(), rebaseline_after=None
    )
    _, events, active = monitor_run(series([(100, 100.0), (300, 130.0)]), config)
    assert [event for _, event, _ in events] == ["raised"]
    assert all(active[102:])


def test_each_transition_says_what_happened() -> None:
    config = DetectorConfig(warmup_windows=60, smoothing=(1.0,), min_count=10, periods=())
    monitor = EntityMonitor("pump-001", config)
    alarms = []
    for i, value in enumerate(series([(100, 100.0), (300, 130.0)])):
        alarms += monitor.process({"flow.mean": value}, i * WINDOW_MS, (i + 1) * WINDOW_MS).alarms
    raised, rebaselined = alarms[:2]
    assert raised.event is AlarmEvent.RAISED and raised.active and raised.end_ms is None
    assert raised.msg_id == f"{raised.alarm_id}/raised"
    assert raised.contributions[0].sensor == "flow"
    low, high = raised.contributions[0].expected_low, raised.contributions[0].expected_high
    assert low < 100.0 < high < 130.0
    assert rebaselined.event is AlarmEvent.REBASELINED and not rebaselined.active
    assert rebaselined.end_ms == rebaselined.ts_ms
    assert rebaselined.alarm_id == raised.alarm_id
    assert rebaselined.peak_score >= raised.peak_score
    assert rebaselined.anomalous_windows > 10


def test_alarm_events_validate_against_their_schema() -> None:
    schema = output_schemas()["alarm.v1.schema.json"]
    config = DetectorConfig(
        warmup_windows=60, smoothing=(1.0,), min_count=10, periods=(), rebaseline_after=1.0
    )
    monitor = EntityMonitor("pump-001", config)
    seen = set()
    values = series([(100, 100.0), (30, 130.0), (30, 100.0), (200, 70.0)])
    for i, value in enumerate(values):
        for alarm in monitor.process(
            {"flow.mean": value}, i * WINDOW_MS, (i + 1) * WINDOW_MS
        ).alarms:
            jsonschema.validate(msgspec.json.decode(encode(alarm)), schema)
            seen.add(alarm.event)
    assert seen == set(AlarmEvent)


def test_the_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="clear_windows must be at least 1"):
        AlarmPolicy(0, None)
    with pytest.raises(ValueError, match="must exceed clear_windows"):
        AlarmPolicy(10, 10)


def test_a_tracker_mid_incident_pickles_and_goes_on_the_same_way() -> None:
    tracker = AlarmTracker("pump-001", AlarmPolicy(clear_windows=2, rebaseline_windows=50))
    flags = [False, True, True, True, False, True, False, False, True]
    for i, flag in enumerate(flags[:4]):
        tracker.update(flag, 5.0 + i, 4.0, [], i * 10, i * 10 + 10)
    copy = pickle.loads(pickle.dumps(tracker))
    rest = list(enumerate(flags))[4:]
    left = [a.msg_id for i, f in rest for a in tracker.update(f, 9.0, 4.0, [], i * 10, i * 10 + 10)]
    right = [a.msg_id for i, f in rest for a in copy.update(f, 9.0, 4.0, [], i * 10, i * 10 + 10)]
    assert left == right == ["pump-001@10/cleared", "pump-001@80/raised"]
