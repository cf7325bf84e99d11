"""The pure parts of the dead-letter replay: --since, the re-check and the counting."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from schemas.deadletter import FULL_PAYLOAD_LIMIT, DeadLetter, Source, dead_letter
from schemas.raw import Reason
from twinflow.bridges.routing import Forward, Reject
from twinflow.deadletters import ReplayPlan, Resend, parse_since, recheck
from twinflow.errors import ConfigError
from twinflow.settings import FlowSettings
from twinflow.twin_model import load_twin_model

MODEL = load_twin_model(
    Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
)
FLOW = FlowSettings()
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RAW_SOURCE = Source(kind="kafka", topic="twin.raw", partition=0, offset=7)


def _payload(entity: str = "pump-001", ts: datetime = NOW, **fields: object) -> bytes:
    body: dict[str, object] = {
        "entity_id": entity,
        "sensor": "flow",
        "ts": int(ts.timestamp() * 1000),
        "value": 120.0,
    }
    return msgspec.json.encode({**body, **fields})


def _letter(
    payload: bytes,
    reason: Reason = Reason.UNKNOWN_ENTITY,
    received_at: datetime = NOW,
    source: Source = RAW_SOURCE,
) -> DeadLetter:
    return dead_letter(payload, reason, "as refused then", source, received_at)


def _mqtt(entity_topic: str) -> Source:
    return Source(kind="mqtt", topic=entity_topic)


def _topic_of(entity_id: str) -> str:
    return MODEL.mqtt_topic(MODEL.by_id[entity_id])


# -- parse_since ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("45s", timedelta(seconds=45)),
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        (" 1w ", timedelta(weeks=1)),
    ],
)
def test_a_duration_counts_back_from_now(text: str, back: timedelta) -> None:
    assert parse_since(text, NOW) == NOW - back


@pytest.mark.parametrize(
    "text",
    ["2026-03-01T10:00:00Z", "2026-03-01T11:00:00+01:00", "2026-03-01 05:00:00-05:00"],
)
def test_an_rfc3339_time_with_offset_is_taken_as_is(text: str) -> None:
    since = parse_since(text, NOW)
    assert since == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    assert since.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["yesterday", "2h30", "-2h", "3y", "", "2026-03-01T10:00:00"])
def test_anything_else_is_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ConfigError, match="--since"):
        parse_since(text, NOW)


# -- recheck ------------------------------------------------------------------------


def test_an_entity_the_model_now_knows_goes_back_keyed_by_it() -> None:
    payload = _payload("pump-001")
    assert recheck(_letter(payload), payload, MODEL, FLOW) == Forward("pump-001")


def test_an_entity_still_unknown_is_still_refused() -> None:
    payload = _payload("pump-999")
    verdict = recheck(_letter(payload), payload, MODEL, FLOW)
    assert verdict == Reject(Reason.UNKNOWN_ENTITY, "no entity 'pump-999'")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"entity_id": "pump-001", "sensor": ', Reason.BAD_JSON),
        (b'{"entity_id": "pump-001", "sensor": "flow", "ts": 1, "value": "1"}', Reason.SCHEMA),
        (b'{"entity_id": "pump-001", "ts": 1}', Reason.BAD_FORM),
    ],
)
def test_a_payload_the_contract_still_refuses_keeps_its_reason(
    payload: bytes, reason: Reason
) -> None:
    verdict = recheck(_letter(payload, reason), payload, MODEL, FLOW)
    assert isinstance(verdict, Reject) and verdict.reason is reason


@pytest.mark.parametrize(
    "fields",
    [{"sensor": "no_such_sensor"}, {"value": 1e9}, {"unit": "furlong/fortnight"}],
)
def test_reading_level_problems_are_left_to_the_flow(fields: dict[str, object]) -> None:
    payload = _payload("pump-001", NOW, **fields)
    assert recheck(_letter(payload), payload, MODEL, FLOW) == Forward("pump-001")


def test_the_time_checks_use_the_time_the_letter_was_received() -> None:
    # A reading from a year ago that arrived a year ago: the replay keeps that arrival
    # time as its Kafka timestamp, so the flow's age check passes as it did then.
    then = NOW - timedelta(days=365)
    payload = _payload("pump-001", ts=then)
    assert recheck(_letter(payload, received_at=then), payload, MODEL, FLOW) == Forward("pump-001")
    late = _letter(payload, received_at=then + timedelta(seconds=FLOW.max_age_s + 1))
    assert recheck(late, payload, MODEL, FLOW) == Reject(
        Reason.TS_TOO_OLD, f"ts {int(then.timestamp() * 1000)} ms", "pump-001"
    )
    early = _letter(payload, received_at=then - timedelta(seconds=FLOW.max_future_s + 1))
    verdict = recheck(early, payload, MODEL, FLOW)
    assert isinstance(verdict, Reject) and verdict.reason is Reason.TS_IN_FUTURE


def test_a_letter_from_mqtt_also_meets_the_bridges_topic_rules() -> None:
    payload = _payload("pump-001")
    own = _letter(payload, source=_mqtt(_topic_of("pump-001")))
    assert recheck(own, payload, MODEL, FLOW) == Forward("pump-001")
    other = _letter(payload, Reason.ENTITY_MISMATCH, source=_mqtt(_topic_of("pump-002")))
    verdict = recheck(other, payload, MODEL, FLOW)
    assert isinstance(verdict, Reject) and verdict.reason is Reason.ENTITY_MISMATCH
    stranger = _letter(payload, source=_mqtt("plant/x/y/pump-001/telemetry"))
    assert recheck(stranger, payload, MODEL, FLOW) == Reject(
        Reason.UNKNOWN_ENTITY, "no entity publishes on plant/x/y/pump-001/telemetry"
    )


# -- ReplayPlan ---------------------------------------------------------------------


def test_a_kept_letter_is_re_sent_unchanged_at_its_arrival_time() -> None:
    payload = b'{ "entity_id":"pump-001", "sensor":"flow", "ts":1772366400000, "value":3 }'
    plan = ReplayPlan(MODEL, FLOW)
    resend = plan.take(_letter(payload))
    assert resend == Resend("pump-001", payload, int(NOW.timestamp() * 1000))


def test_the_filters_keep_only_the_reasons_and_times_asked_for() -> None:
    plan = ReplayPlan(
        MODEL, FLOW, reasons={"unknown_entity", "schema"}, since=NOW - timedelta(hours=1)
    )
    letters = [
        _letter(_payload(ts=NOW - timedelta(minutes=10)), received_at=NOW - timedelta(minutes=10)),
        _letter(_payload(ts=NOW - timedelta(hours=1)), received_at=NOW - timedelta(hours=1)),
        _letter(_payload(ts=NOW - timedelta(hours=2)), received_at=NOW - timedelta(hours=2)),
        _letter(_payload(value=1e9), Reason.OUT_OF_RANGE),
    ]
    sent = [plan.take(letter) for letter in letters]
    assert [resend is not None for resend in sent] == [True, True, False, False]
    report = plan.report(dry_run=True, resent=2)
    assert (report.letters_read, report.matching, report.resent) == (4, 2, 2)


def test_without_filters_every_letter_matches() -> None:
    plan = ReplayPlan(MODEL, FLOW, reasons=set(), since=None)
    assert plan.take(_letter(_payload(), Reason.OUT_OF_RANGE)) is not None
    assert plan.matching == 1


def test_an_unknown_reason_is_refused_before_anything_is_read() -> None:
    with pytest.raises(ConfigError, match=r"unknown reason typo .*known: bad_json"):
        ReplayPlan(MODEL, FLOW, reasons={"unknown_entity", "typo"})


def test_the_report_counts_every_matching_letter_once() -> None:
    plan = ReplayPlan(MODEL, FLOW)
    big = _payload(source="x" * FULL_PAYLOAD_LIMIT)
    damaged = msgspec.structs.replace(_letter(_payload(seq=9)), payload_sha256="0" * 64)
    letters = [
        _letter(_payload(seq=1)),  # re-sent
        _letter(_payload(seq=1)),  # the same payload again: a repeat
        _letter(_payload(seq=2)),  # re-sent
        _letter(_payload("pump-999")),  # still refused: unknown entity
        _letter(_payload("pump-998")),  # still refused: unknown entity
        _letter(b"{oops", Reason.BAD_JSON),  # still refused: bad JSON
        _letter(big, Reason.TOO_LARGE),  # not kept whole
        damaged,  # its payload does not match its hash: not kept whole
    ]
    resends = [resend for letter in letters if (resend := plan.take(letter)) is not None]
    plan.not_a_letter()
    report = plan.report(dry_run=False, resent=len(resends))
    assert report.letters_read == len(letters) + 1
    assert report.unreadable == 1
    assert report.matching == len(letters)
    assert report.resent == 2
    assert report.repeats_skipped == 1
    assert report.not_kept_whole == 2
    assert {reason: refused.count for reason, refused in report.still_refused.items()} == {
        "bad_json": 1,
        "unknown_entity": 2,
    }
    assert report.still_refused["unknown_entity"].example == "no entity 'pump-999'"
    refused = sum(refused.count for refused in report.still_refused.values())
    assert report.matching == (
        report.resent + report.not_kept_whole + report.repeats_skipped + refused
    )


def test_the_report_is_plain_data_for_json() -> None:
    plan = ReplayPlan(MODEL, FLOW)
    plan.take(_letter(_payload("pump-999")))
    document = json.loads(json.dumps(plan.report(dry_run=True, resent=0).as_dict()))
    assert document == {
        "dry_run": True,
        "letters_read": 1,
        "unreadable": 0,
        "matching": 1,
        "resent": 0,
        "still_refused": {"unknown_entity": {"count": 1, "example": "no entity 'pump-999'"}},
        "not_kept_whole": 0,
        "repeats_skipped": 0,
    }
