"""The alarm lifecycle: raised once per incident, active while flagged, cleared, re-baselined."""

import pickle

import jsonschema
import msgspec
import numpy as np
import pytest

from schemas.control import Verdict
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
    raised = 0
    values = series([(100, 100.0), (30, 130.0), (30, 100.0), (200, 70.0), (10, 40.0)])
    for i, value in enumerate(values):
        alarms = monitor.process({"flow.mean": value}, i * WINDOW_MS, (i + 1) * WINDOW_MS).alarms
        for alarm in list(alarms):
            if alarm.event is AlarmEvent.RAISED:
                raised += 1
                # The first is acknowledged, the third confirmed and then rejected.
                verdicts = {1: [Verdict.ACK], 3: [Verdict.CONFIRM, Verdict.REJECT]}
                for verdict in verdicts.get(raised, []):
                    alarms += monitor.feedback(alarm.alarm_id, verdict, "ann", "checked")
        for alarm in alarms:
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


# Operator feedback. The flow's setting: 10-s windows of 1-Hz sensors, both time scales.
FLOW_LIKE = DetectorConfig(warmup_windows=60, min_count=10, periods=(), clear_windows=3)
READINGS = {"flow": 10}


def judged(
    monitor: EntityMonitor, values: list[float], first: int, verdict: Verdict | None = None
) -> tuple[list[str], list[bool]]:
    """Process ``values`` from window ``first``; apply ``verdict`` to the alarm it raises."""
    events, active = [], []
    for i, value in enumerate(values, start=first):
        verdict_alarms = monitor.process(
            {"flow.mean": value}, i * WINDOW_MS, (i + 1) * WINDOW_MS, READINGS
        ).alarms
        for alarm in list(verdict_alarms):
            if alarm.event is AlarmEvent.RAISED and verdict is not None:
                verdict_alarms += monitor.feedback(alarm.alarm_id, verdict, "ann", "planned")
        events += [alarm.event.value for alarm in verdict_alarms]
        active.append(monitor.in_alarm)
    return events, active


def warmed_up() -> EntityMonitor:
    monitor = EntityMonitor("pump-001", FLOW_LIKE)
    events, _ = judged(monitor, series([(100, 100.0)]), 0)
    assert events == []
    return monitor


def test_a_rejected_alarm_ends_and_its_level_does_not_alarm_again() -> None:
    """A planned setpoint change: the operator rejects its alarm as soon as it is raised."""
    step = series([(120, 115.0)], seed=1)
    monitor = warmed_up()
    events, active = judged(monitor, step, 100, Verdict.REJECT)
    assert events == ["raised", "rejected"]
    assert not any(active)
    # Without the verdict the same change stays in alarm until it is re-baselined.
    events, active = judged(warmed_up(), step, 100)
    assert events == ["raised", "rebaselined"]
    assert sum(active) > 50


def test_a_confirmed_fault_keeps_alarming_and_is_never_learned() -> None:
    monitor = warmed_up()
    scores = monitor.detector._parts()[2]
    means, counts = scores.means.copy(), scores.count.copy()
    # Longer than the re-baselining limit (60 windows here): a confirmed fault stays.
    events, active = judged(monitor, series([(150, 112.0)], seed=3), 100, Verdict.CONFIRM)
    assert events == ["raised", "confirmed"]
    assert all(active[2:])
    assert np.array_equal(scores.means, means) and np.array_equal(scores.count, counts)
    # Repaired: the entity is normal again, the alarm clears and learning resumes.
    events, active = judged(monitor, series([(40, 100.0)], seed=4), 250)
    assert events == ["cleared"] and not active[-1]
    assert (scores.count >= counts).all() and (scores.count > counts).any()


def test_a_verdict_on_another_or_an_ended_alarm_changes_nothing() -> None:
    monitor = warmed_up()
    events, _ = judged(monitor, series([(5, 120.0)], seed=5), 100)
    assert events == ["raised"]
    alarm_id = monitor.alarms.active_ids[0]
    assert monitor.feedback("pump-001@0", Verdict.REJECT, "ann") == []
    assert [a.event.value for a in monitor.feedback(alarm_id, Verdict.ACK, "ann")] == [
        "acknowledged"
    ]
    assert monitor.feedback(alarm_id, Verdict.ACK, "bo") == []
    judged(monitor, series([(20, 100.0)], seed=6), 105)
    assert not monitor.in_alarm
    assert monitor.feedback(alarm_id, Verdict.REJECT, "ann") == []
