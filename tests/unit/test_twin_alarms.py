"""Alarms through PartitionTwins: one hand-built entity whose flow jumps for five windows.

pump-001 reads every second; flow is 100-102 l/s except for windows 80-84 (flow 140).
With a 60-window warm-up and no smoothing, the detector flags windows 81-84 (two of
three windows over the threshold), so one alarm is raised at the end of window 81 and
cleared after three normal windows, at the end of window 87.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import msgspec
import pytest

from flows.partition import PickledTwins, pickled, restored
from schemas.outputs import Alarm, AlarmEvent, Status, TwinState
from schemas.transport import InputMessage
from twinflow.detection import DetectorConfig
from twinflow.settings import FlowSettings, load_settings
from twinflow.twin import STATE_VERSION, IncompatibleSnapshotError, PartitionTwins, StepOutput
from twinflow.twin_model import load_twin_model

MODEL = load_twin_model(
    Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
)
START = 1_793_000_000_000
WINDOW_MS = 10_000
CONFIG = DetectorConfig(
    warmup_windows=60, smoothing=(1.0,), min_count=10, periods=(), clear_windows=3
)
FAULT = range(80, 85)
"""Windows (by index from START) in which flow reads 140 l/s."""
ALARM_ID = f"pump-001@{START + 81 * WINDOW_MS}"
WALL_MS = 1_000_000


def _flow() -> FlowSettings:
    # Only data closes windows here: idleness (system time) stays out of the way.
    return load_settings().flow.model_copy(update={"idle_close_s": 3600.0, "stale_after_s": 3600.0})


def _message(second: int) -> InputMessage:
    flow = 140.0 if second // 10 in FAULT else 100.0 + second % 3
    body = {
        "entity_id": "pump-001",
        "ts": START + second * 1000,
        "values": {"flow": flow, "bearing_temp": 50.0 + second % 2},
    }
    return InputMessage("twin.raw", 0, second, START + second * 1000, msgspec.json.encode(body))


MESSAGES = [_message(second) for second in range(1000)]


def _run(batch: int, messages: list[InputMessage] = MESSAGES) -> tuple[PartitionTwins, StepOutput]:
    """The messages through one partition in batches of ``batch``; all outputs joined."""
    twins = PartitionTwins(MODEL, _flow(), CONFIG)
    joined = StepOutput()
    for first in range(0, len(messages), batch):
        out = twins.step(messages[first : first + batch], WALL_MS)
        joined.alarms.extend(out.alarms)
        joined.states.extend(out.states)
        joined.anomalies.extend(out.anomalies)
    return twins, joined


@pytest.fixture(scope="module")
def whole() -> tuple[PartitionTwins, StepOutput]:
    return _run(len(MESSAGES))


def _summary(alarm: Alarm) -> tuple[object, ...]:
    return (
        alarm.event,
        alarm.alarm_id,
        alarm.active,
        alarm.ts_ms - START,
        alarm.start_ms - START,
        None if alarm.end_ms is None else alarm.end_ms - START,
        alarm.anomalous_windows,
    )


def test_a_fault_raises_one_alarm_that_clears_after_three_normal_windows(
    whole: tuple[PartitionTwins, StepOutput],
) -> None:
    twins, out = whole
    assert [_summary(alarm) for alarm in out.alarms] == [
        (AlarmEvent.RAISED, ALARM_ID, True, 820_000, 810_000, None, 1),
        # Cleared at the end of window 87; the alarm ended with its last anomalous window.
        (AlarmEvent.CLEARED, ALARM_ID, False, 880_000, 810_000, 850_000, 4),
    ]
    raised, cleared = out.alarms
    assert raised.peak_score > raised.threshold
    assert cleared.peak_score >= raised.peak_score
    assert cleared.contributions and cleared.contributions[0].sensor == "flow"
    assert len({alarm.msg_id for alarm in out.alarms}) == 2
    # The anomalies output is still the per-window record: every flagged window.
    assert [a.window_start_ms - START for a in out.anomalies] == [
        w * WINDOW_MS for w in range(81, 85)
    ]
    assert twins.entities["pump-001"].counts["alarms"] == 1


def _active_at(state: TwinState, alarms: list[Alarm]) -> bool:
    raised, cleared = alarms
    return raised.ts_ms <= state.ts_ms < cleared.ts_ms


def test_the_states_name_the_active_alarm_and_say_alarm_exactly_then(
    whole: tuple[PartitionTwins, StepOutput],
) -> None:
    _twins, out = whole
    assert len(out.states) == 99  # every closed window but the last, still open
    for state in out.states:
        active = _active_at(state, out.alarms)
        assert state.active_alarms == ([ALARM_ID] if active else []), state.ts_ms
        assert (state.status is Status.ALARM) == active, (state.ts_ms, state.status)
        assert state.counts.alarms == (0 if state.ts_ms < out.alarms[0].ts_ms else 1)
    assert sum(state.status is Status.ALARM for state in out.states) == 6
    # The window before the first anomalous one was suspicious, the one after the
    # clearing window is clean again.
    by_end = {state.ts_ms - START: state.status for state in out.states}
    assert by_end[810_000] is Status.WARN and by_end[880_000] is Status.OK


@pytest.mark.parametrize("batch", [1, 7])
def test_alarms_and_states_do_not_depend_on_batch_boundaries(
    batch: int, whole: tuple[PartitionTwins, StepOutput]
) -> None:
    _twins, out = _run(batch)
    assert out.alarms == whole[1].alarms
    assert out.states == whole[1].states


def test_a_partition_restored_mid_alarm_carries_it_on() -> None:
    twins, before = _run(50, MESSAGES[:830])  # window 82 closed: the alarm is active
    assert [alarm.event for alarm in before.alarms] == [AlarmEvent.RAISED]
    restored = pickle.loads(pickle.dumps(twins))
    assert restored.entities["pump-001"].monitor.alarms.active_ids == [ALARM_ID]
    after = restored.step(MESSAGES[830:], WALL_MS)
    _all_twins, whole = _run(len(MESSAGES))
    assert before.alarms + after.alarms == whole.alarms


def test_a_silent_entity_goes_stale_still_naming_its_active_alarm() -> None:
    flow = load_settings().flow
    twins = PartitionTwins(MODEL, flow, CONFIG)
    twins.step(MESSAGES[:830], WALL_MS)
    stale_ms = int(flow.stale_after_s * 1000)
    states = [
        state
        for now in range(WALL_MS + 1000, WALL_MS + stale_ms + 1, 1000)
        for state in twins.step([], now).states
    ]
    assert states[-1].status is Status.STALE
    assert states[-1].active_alarms == [ALARM_ID]


def test_a_snapshot_of_another_state_layout_is_refused_with_the_fix() -> None:
    twins, _out = _run(len(MESSAGES), MESSAGES[:700])
    older = pickle.dumps(twins).replace(b"state_version", b"state_versiom")  # none recorded
    expected = f"layout 1, this twinflow keeps layout {STATE_VERSION}"
    with pytest.raises(IncompatibleSnapshotError, match=expected):
        pickle.loads(older)
    assert pickle.loads(pickle.dumps(twins)).state_version == STATE_VERSION


def test_a_pickled_snapshot_resumes_the_same_twins_or_is_refused_with_the_fix() -> None:
    twins, _out = _run(len(MESSAGES), MESSAGES[:700])
    # Snapshots taken before arrays were stored as bytes are plain pickles: both resume.
    snapshots = (pickled(twins), PickledTwins(pickle.dumps(twins)))
    resumed = [restored(snapshot).step(MESSAGES[700:], WALL_MS) for snapshot in snapshots]
    original = twins.step(MESSAGES[700:], WALL_MS)
    for out in resumed:
        assert out.alarms and out.alarms == original.alarms
        assert out.states == original.states
        assert out.windows == original.windows
    missing_class = b"cno_such_module\nTwins\n."
    for unreadable in (PickledTwins(missing_class), PickledTwins(pickle.dumps({"twins": 1}))):
        with pytest.raises(IncompatibleSnapshotError, match="Move the recovery store away"):
            restored(unreadable)
