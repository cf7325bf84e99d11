"""The matcher of alarms against the simulator's ground truth, rule by rule."""

import msgspec
import pytest

from twinflow.detection import AlarmPolicy, AlarmTracker
from twinflow.sim.faults import Category, Fault, FaultKind
from twinflow.sim.scoring import (
    AlarmSpan,
    Score,
    Transition,
    as_fault,
    clean_time,
    fold_alarms,
    score,
)

W = 10_000
H = 3_600_000
MIN = 60_000
START = 1 * H
"""Monitored from here (the warm-up ends)."""
END = 5 * H
FAULT = Fault(FaultKind.BEARING_WEAR, Category.PROCESS, "pump-001", 2 * H, 3 * H)
SENSOR = Fault(FaultKind.STUCK, Category.SENSOR, "pump-001", 4 * H, 4 * H + 10 * MIN, "flow")


def alarm(raised: int, end: int | None = None, entity: str = "pump-001") -> AlarmSpan:
    """An alarm raised at ``raised`` by the window just before it."""
    return AlarmSpan(entity, raised - W, end, raised, f"{entity}@{raised - W}")


def run(
    alarms: list[AlarmSpan],
    faults: list[Fault] | list[dict[str, object]] | None = None,
    *,
    entities: int = 1,
    monitored_from_ms: int = START,
    margin_ms: int = 2 * MIN,
) -> Score:
    """Score on pump-001 (and pump-002 with ``entities=2``), by default its two faults."""
    return score(
        [FAULT, SENSOR] if faults is None else faults,
        alarms,
        ["pump-001", "pump-002"][:entities],
        monitored_from_ms=monitored_from_ms,
        end_ms=END,
        window_ms=W,
        margin_ms=margin_ms,
    )


def test_an_alarm_raised_inside_a_process_fault_detects_it_with_its_delay() -> None:
    result = run([alarm(2 * H + 5 * MIN, 2 * H + 30 * MIN)])
    assert result.injected == {"bearing_wear": 1}
    assert result.recall == {"bearing_wear": 1.0}
    assert result.median_delay_s == {"bearing_wear": 300.0}
    assert (result.alarms, result.in_process, result.false_alarms) == (1, 1, 0)


def test_an_alarm_already_active_when_the_fault_starts_detects_it_at_once() -> None:
    early = alarm(2 * H - 30 * MIN)  # raised half an hour before, still active
    result = run([early])
    assert result.recall == {"bearing_wear": 1.0}
    assert result.median_delay_s == {"bearing_wear": 0.0}
    # Raised outside every fault and margin: it is a false alarm all the same.
    assert result.false_alarms == 1
    ended = alarm(2 * H - 30 * MIN, 2 * H + W)  # ends just after the fault starts
    assert run([ended]).recall == {"bearing_wear": 1.0}


def test_an_alarm_that_ended_before_the_fault_does_not_detect_it() -> None:
    result = run([alarm(2 * H - 30 * MIN, 2 * H)])  # end exclusive: over at the start
    assert result.recall == {"bearing_wear": 0.0}
    assert result.median_delay_s == {"bearing_wear": None}


def test_the_window_after_the_fault_still_detects_it_the_next_does_not() -> None:
    # Active from the fault's last instant (its window starts there): overlaps [end, end + W).
    tail = AlarmSpan("pump-001", 3 * H + W - 1, None, 3 * H + 2 * W - 1)
    assert run([tail]).recall == {"bearing_wear": 1.0}
    late = AlarmSpan("pump-001", 3 * H + W, None, 3 * H + 2 * W)
    assert run([late]).recall == {"bearing_wear": 0.0}


def test_faults_widen_by_one_window_before_their_start() -> None:
    assert run([alarm(2 * H - W, 2 * H)]).in_process == 1
    before = run([alarm(2 * H - W - 1, 2 * H - 1)])
    assert (before.in_process, before.false_alarms) == (0, 1)


def test_a_process_fault_during_the_warm_up_is_not_scored() -> None:
    result = run([], monitored_from_ms=2 * H + 1)
    assert result.injected == {} and result.recall == {}
    assert result.before_monitoring == {"bearing_wear": 1}


def test_alarms_inside_a_sensor_fault_are_counted_apart() -> None:
    result = run([alarm(4 * H + MIN), alarm(4 * H + 2 * MIN)])
    assert result.in_sensor == {"stuck": 2}
    assert result.sensor_faults == {"stuck": 1} and result.sensor_faults_alarmed == {"stuck": 1}
    assert result.false_alarms == 0
    assert run([]).sensor_faults_alarmed == {"stuck": 0}


def test_alarms_in_the_recovery_margin_are_counted_apart_and_the_margin_is_a_setting() -> None:
    after = 3 * H + W  # the widened end of the process fault
    result = run([alarm(after), alarm(after + 2 * MIN - 1), alarm(after + 2 * MIN)])
    assert (result.in_margin, result.false_alarms) == (2, 1)
    assert result.false_alarm_entities == {"pump-001"}
    assert run([alarm(after + 2 * MIN)], margin_ms=5 * MIN).in_margin == 1
    sensor_end = SENSOR.end_ms + W
    assert run([alarm(sensor_end + MIN)]).in_margin == 1


def test_exposure_is_monitored_time_outside_widened_faults_and_their_margins() -> None:
    result = run([], entities=2)
    widened_process = H + 2 * W + 2 * MIN
    widened_sensor = 10 * MIN + 2 * W + 2 * MIN
    assert result.exposure_ms == (4 * H - widened_process - widened_sensor) + 4 * H
    # Overlapping faults are not subtracted twice; monitoring starts cut them.
    overlapping = [FAULT, Fault(FaultKind.DRIFT, Category.SENSOR, "pump-001", 2 * H, 2 * H + MIN)]
    assert run([], overlapping).exposure_ms == 4 * H - widened_process
    assert run([], [FAULT], monitored_from_ms=2 * H + 30 * MIN).exposure_ms == (
        END - (3 * H + W + 2 * MIN)
    )


def test_false_alarms_per_entity_hour_divide_by_the_clean_exposure() -> None:
    result = run([alarm(4 * H + 30 * MIN, entity="pump-002")], [], entities=2)
    assert result.exposure_h == 8.0
    assert result.false_alarms_per_entity_hour == pytest.approx(1 / 8)
    assert run([], []).false_alarms_per_entity_hour == 0.0
    empty = score([], [], [], monitored_from_ms=0, end_ms=H, window_ms=W)
    assert empty.false_alarms_per_entity_hour is None


def test_alarms_before_monitoring_and_of_other_entities_are_not_false_alarms() -> None:
    result = run([alarm(START - MIN), alarm(4 * H + 30 * MIN, entity="motor-009")])
    assert (result.alarms, result.alarms_before_monitoring, result.false_alarms) == (1, 1, 0)


def test_truth_file_dicts_score_like_faults_and_data_faults_are_ignored() -> None:
    data = Fault(FaultKind.LATE, Category.DATA, "pump-001", 2 * H - MIN, 2 * H - MIN + 1)
    dicts = msgspec.to_builtins([FAULT, SENSOR, data])
    assert as_fault(dicts[0]) == FAULT
    alarms = [alarm(2 * H + MIN), alarm(H + 30 * MIN)]
    assert run(alarms, dicts) == run(alarms, [FAULT, SENSOR])


def test_scores_pool_across_runs() -> None:
    pooled = run([alarm(2 * H + MIN)])
    pooled += run([alarm(H + 30 * MIN, H + 40 * MIN)])
    assert pooled.injected == {"bearing_wear": 2}
    assert pooled.recall == {"bearing_wear": 0.5}
    assert pooled.median_delay_s == {"bearing_wear": 60.0}
    assert (pooled.alarms, pooled.false_alarms) == (2, 1)
    assert pooled.exposure_ms == 2 * run([]).exposure_ms


def test_folding_the_tracker_transitions_gives_one_span_per_alarm() -> None:
    tracker = AlarmTracker("pump-001", AlarmPolicy(clear_windows=2, rebaseline_windows=5))
    flags = [False, True, True, False, False, True, True, True, True, True, True]
    events = [
        event
        for i, flag in enumerate(flags)
        for event in tracker.update(flag, 9.0, 4.0, [], i * W, (i + 1) * W)
    ]
    spans = fold_alarms(reversed(events))  # order of the events does not matter
    assert [(s.start_ms, s.end_ms, s.raised_ms) for s in spans] == [
        (W, 3 * W, 2 * W),  # cleared: ends with its last anomalous window
        (5 * W, 10 * W, 6 * W),  # re-baselined: ends at the transition
        (10 * W, None, 11 * W),  # still active
    ]


def test_an_alarm_without_its_raise_event_starts_at_its_earliest_event() -> None:
    (span,) = fold_alarms([Transition("p@0", "p", "cleared", 500, 0, 300)])
    assert (span.start_ms, span.end_ms, span.raised_ms, span.top_sensor) == (0, 300, 500, None)


def test_clean_time_of_nothing_busy_is_the_whole_span() -> None:
    assert clean_time([], 0, 100) == 100
    assert clean_time([(0, 100)], 0, 100) == 0
    assert clean_time([], 100, 0) == 0
