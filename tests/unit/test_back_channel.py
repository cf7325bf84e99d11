"""The back channel through PartitionTwins: verdicts and commands, merged by Kafka time.

pump-001 reads every second. Its flow is 100-102 l/s, until window 80 (second 800) when a
planned setpoint change lifts it to 140 l/s for good. With a 60-window warm-up and no
smoothing the change raises an alarm at the end of window 81. Each run here feeds the
same messages in other batches, with the back channel arriving at other moments, as a
restart after a crash would: the results must not change.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec
import pytest

from schemas.control import Command, CommandResult, DeliveryStatus, Feedback, Verdict
from schemas.outputs import AlarmEvent, SetpointStatus, Status, TwinState
from schemas.raw import Reason
from schemas.transport import ControlBatch, ControlMessage, ControlPayload, InputMessage
from twinflow.detection import DetectorConfig
from twinflow.settings import FlowSettings, load_settings
from twinflow.twin import PartitionTwins, StepOutput
from twinflow.twin_model import load_twin_model

MODEL = load_twin_model(
    Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
)
START = 1_793_000_000_000
WINDOW_MS = 10_000
CONFIG = DetectorConfig(
    warmup_windows=60, smoothing=(1.0,), min_count=10, periods=(), clear_windows=3
)
ALARM_ID = f"pump-001@{START + 81 * WINDOW_MS}"
SECONDS = 1000


def _flow() -> FlowSettings:
    # Only data closes windows here: idleness (system time) stays out of the way.
    return load_settings().flow.model_copy(update={"idle_close_s": 3600.0, "stale_after_s": 3600.0})


def _raw(second: int, speed: float = 1480.0) -> InputMessage:
    body = {
        "entity_id": "pump-001",
        "ts": START + second * 1000,
        "values": {"flow": (140.0 if second >= 800 else 100.0) + second % 3},
        "reported": {"speed": speed},
    }
    return InputMessage("twin.raw", 0, second, START + second * 1000, msgspec.json.encode(body))


def _control(second: float, message: ControlPayload, offset: int = 0) -> ControlMessage:
    topic = "twin.feedback" if isinstance(message, Feedback) else "twin.commands"
    return ControlMessage(topic, offset, START + int(second * 1000), message)


def _verdict(verdict: Verdict, alarm_id: str = ALARM_ID) -> Feedback:
    return Feedback(
        feedback_id=f"f-{verdict}",
        alarm_id=alarm_id,
        entity_id="pump-001",
        verdict=verdict,
        user="ann",
        ts_ms=0,
        note="planned speed change",
    )


def _command(value: float, expires_s: float, command_id: str = "c1") -> Command:
    return Command(
        command_id=command_id,
        entity_id="pump-001",
        setpoint="speed",
        value=value,
        issued_ms=0,
        expires_ms=START + int(expires_s * 1000),
        user="ann",
    )


def _feed(
    raw: Sequence[InputMessage], control: Sequence[ControlMessage], every_s: float, batch: int
) -> Iterator[Sequence[InputMessage] | ControlBatch]:
    """What the sources hand the step if polled every ``every_s`` of Kafka time: raw in
    batches of at most ``batch``, the back channel with its progress, in turns."""
    step_ms = int(every_s * 1000)
    raw_at = control_at = 0
    for now in range(START, START + (SECONDS + 10) * 1000, step_ms):
        fresh = []
        while control_at < len(control) and control[control_at].timestamp_ms <= now:
            fresh.append(control[control_at])
            control_at += 1
        yield ControlBatch(tuple(fresh), now - int(_flow().back_channel_margin_s * 1000))
        while raw_at < len(raw) and raw[raw_at].timestamp_ms <= now:
            yield raw[raw_at : raw_at + batch]
            raw_at += batch
    yield ControlBatch((), 2**62)  # the back channel read to its end
    yield []  # and the raw partition too


def _run(
    raw: Sequence[InputMessage], control: Sequence[ControlMessage], every_s: float, batch: int
) -> StepOutput:
    twins = PartitionTwins(MODEL, _flow(), CONFIG, back_channel=True)
    joined = StepOutput()
    for item in _feed(raw, control, every_s, batch):
        now_ms = START + 2**40 if isinstance(item, list) and not item else 0
        out = twins.step(item, now_ms)
        joined.alarms += out.alarms
        joined.states += out.states
        joined.setpoints += out.setpoints
        joined.dead_letters += out.dead_letters
    return joined


FEEDS = [(1.0, 1000), (0.5, 3), (7.0, 50), (30.0, 1000)]
"""(poll period s, raw batch size): from message by message to long stretches."""


def _same_whatever_the_feed(
    raw: Sequence[InputMessage], control: Sequence[ControlMessage]
) -> StepOutput:
    runs = [_run(raw, control, every_s, batch) for every_s, batch in FEEDS]
    first = runs[0]
    for other in runs[1:]:
        assert other.alarms == first.alarms
        assert other.states == first.states
        assert sorted(other.setpoints, key=repr) == sorted(first.setpoints, key=repr)
    return first


def _events(out: StepOutput) -> list[tuple[str, str, int]]:
    return [(a.event.value, a.alarm_id, (a.ts_ms - START) // 1000) for a in out.alarms]


def test_a_rejected_alarm_ends_and_the_new_level_stays_normal() -> None:
    raw = [_raw(second) for second in range(SECONDS)]
    out = _same_whatever_the_feed(raw, [_control(830.5, _verdict(Verdict.REJECT))])
    assert _events(out) == [("raised", ALARM_ID, 820), ("rejected", ALARM_ID, 820)]
    rejected = out.alarms[1]
    assert rejected.end_ms == rejected.ts_ms and not rejected.active
    assert rejected.operator == "ann" and rejected.note == "planned speed change"
    # Back to OK within a few windows, and not one more anomaly on the new level.
    after = [s for s in out.states if s.ts_ms > START + 840_000]
    assert after and all(s.status is Status.OK and not s.active_alarms for s in after)


def test_without_a_verdict_the_new_level_stays_in_alarm() -> None:
    out = _run([_raw(second) for second in range(SECONDS)], [], 1.0, 1000)
    assert _events(out) == [("raised", ALARM_ID, 820)]
    assert out.states[-1].status is Status.ALARM


def test_a_confirmed_alarm_keeps_alarming_and_an_ack_marks_it() -> None:
    raw = [_raw(second) for second in range(SECONDS)]
    control = [
        _control(825.0, _verdict(Verdict.ACK)),
        _control(826.0, _verdict(Verdict.ACK), 1),  # a repeat changes nothing
        _control(840.0, _verdict(Verdict.CONFIRM), 2),
    ]
    out = _same_whatever_the_feed(raw, control)
    assert [event for event, _, _ in _events(out)] == ["raised", "acknowledged", "confirmed"]
    assert out.alarms[1].acknowledged and out.alarms[2].verdict == "confirmed"
    assert out.states[-1].status is Status.ALARM
    assert out.states[-1].active_alarms == [ALARM_ID]


def test_a_verdict_on_an_unknown_alarm_changes_nothing() -> None:
    raw = [_raw(second) for second in range(SECONDS)]
    out = _run(raw, [_control(830.0, _verdict(Verdict.REJECT, "pump-001@0"))], 1.0, 1000)
    assert _events(out) == [("raised", ALARM_ID, 820)]


def _setpoint(state: TwinState) -> tuple[object, ...]:
    speed = state.setpoints["speed"]
    return speed.desired, speed.reported, speed.status


def test_a_command_is_pending_until_the_machine_reports_its_value() -> None:
    # The command goes out at 300.5 s; the machine runs at 1200 rpm from 304 s.
    raw = [_raw(second, 1480.0 if second < 304 else 1200.0) for second in range(400)]
    out = _same_whatever_the_feed(raw, [_control(300.5, _command(1200.0, expires_s=360))])
    # A window's state is emitted at the message that closes it, 5 s (the lateness) on.
    states = {(s.ts_ms - START) // 1000: _setpoint(s) for s in out.states}
    assert states[290] == (None, 1480.0, None)
    assert states[300] == (1200.0, 1200.0, SetpointStatus.IN_SYNC)
    changes = [(c.ts_ms - START, c.state.status) for c in out.setpoints]
    assert changes == [
        (0, None),  # the first report
        (300_500, SetpointStatus.PENDING),
        (304_000, SetpointStatus.IN_SYNC),
    ]


def test_a_command_the_machine_never_takes_expires_at_its_expiry() -> None:
    raw = [_raw(second) for second in range(400)]
    out = _same_whatever_the_feed(raw, [_control(300.5, _command(1200.0, expires_s=330))])
    expired = [c for c in out.setpoints if c.state.status is SetpointStatus.EXPIRED]
    assert [c.ts_ms - START for c in expired] == [330_000]
    assert _setpoint(out.states[-1]) == (1200.0, 1480.0, SetpointStatus.EXPIRED)


def test_a_failed_delivery_fails_the_command() -> None:
    raw = [_raw(second) for second in range(400)]
    failed = CommandResult(
        command_id="c1",
        entity_id="pump-001",
        setpoint="speed",
        status=DeliveryStatus.FAILED,
        ts_ms=0,
        by="opcua",
        detail="BadNotWritable",
    )
    control = [
        _control(300.5, _command(1200.0, expires_s=360)),
        _control(301.0, failed, 1),
    ]
    out = _same_whatever_the_feed(raw, control)
    speed = out.states[-1].setpoints["speed"]
    assert speed.status is SetpointStatus.FAILED and speed.detail == "opcua: BadNotWritable"


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (_command(5000.0, 360), Reason.OUT_OF_RANGE),
        (msgspec.structs.replace(_command(1.0, 360), setpoint="torque"), Reason.UNKNOWN_SETPOINT),
        (msgspec.structs.replace(_command(1.0, 360), entity_id="pump-999"), Reason.UNKNOWN_ENTITY),
    ],
)
def test_a_command_the_model_refuses_is_one_dead_letter(command: Command, reason: Reason) -> None:
    message = (_control(1.0, command),)

    def applied(reports: bool) -> list[Reason]:
        twins = PartitionTwins(MODEL, _flow(), CONFIG, back_channel=True)
        out = twins.step(ControlBatch(message, START + 5000, reports=reports), 0)
        tick = twins.step([_raw(10)], 0)  # a later raw message lets the command through
        assert out.setpoints == tick.setpoints == []
        return [letter.reason for letter in out.dead_letters + tick.dead_letters]

    assert applied(reports=True) == [reason]
    assert applied(reports=False) == []


def test_a_report_of_an_unknown_setpoint_is_a_dead_letter() -> None:
    body = {"entity_id": "pump-001", "ts": START, "reported": {"torque": 3.0}}
    message = InputMessage("twin.raw", 0, 0, START, msgspec.json.encode(body))
    out = PartitionTwins(MODEL, _flow(), CONFIG).step([message], 0)
    assert [letter.reason for letter in out.dead_letters] == [Reason.UNKNOWN_SETPOINT]


def test_raw_messages_wait_for_the_back_channel() -> None:
    twins = PartitionTwins(MODEL, _flow(), CONFIG, back_channel=True)
    assert len(twins.step([_raw(s) for s in range(30)], 0).readings) == 0
    out = twins.step(ControlBatch((), START + 14_500), 0)
    assert len(out.readings) == 15  # seconds 0-14
    assert AlarmEvent.RAISED not in [a.event for a in out.alarms]
