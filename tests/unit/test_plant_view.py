"""The plant as `twinflow serve` shows it: folding states and alarms, the rolled-up tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.outputs import (
    Alarm,
    AlarmEvent,
    AlarmKind,
    Counts,
    Flag,
    SensorState,
    SetpointState,
    SetpointStatus,
    Status,
    TwinState,
)
from schemas.serve import PlantNode, ViewStatus, WindowView
from twinflow.plant import PlantView, worst
from twinflow.twin_model import TwinModel, load_twin_model

MODEL = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return load_twin_model(MODEL)


def state(entity: str, ts_ms: int, status: Status = Status.OK, health: float = 1.0) -> TwinState:
    return TwinState(
        msg_id=f"{entity}-{ts_ms}",
        entity_id=entity,
        ts_ms=ts_ms,
        status=status,
        health=health,
        anomaly_score=0.5,
        threshold=3.0,
        sensors={"flow": SensorState(value=120.0, ts_ms=ts_ms, flags=int(Flag.SPIKE), unit="m3/h")},
        derived={"hydraulic_power_kw": 26.7},
        counts=Counts(readings=10),
        setpoints={
            "speed": SetpointState(desired=1500.0, reported=1480.0, status=SetpointStatus.PENDING)
        },
    )


def alarm(entity: str, start_ms: int, ts_ms: int, active: bool, event: AlarmEvent) -> Alarm:
    return Alarm(
        msg_id=f"{entity}@{start_ms}/{event}",
        alarm_id=f"{entity}@{start_ms}",
        entity_id=entity,
        kind=AlarmKind.ANOMALY,
        event=event,
        active=active,
        ts_ms=ts_ms,
        start_ms=start_ms,
        end_ms=None if active else ts_ms,
        peak_score=5.0,
        threshold=3.0,
        anomalous_windows=2,
        contributions=[],
    )


def node(tree: PlantNode, node_id: str) -> PlantNode:
    if tree.id == node_id:
        return tree
    for child in tree.children:
        try:
            return node(child, node_id)
        except KeyError:
            continue
    raise KeyError(node_id)


def entity_ids(tree: PlantNode) -> list[str]:
    own = [tree.id] if tree.kind == "entity" else []
    return own + [e for child in tree.children for e in entity_ids(child)]


def test_the_tree_holds_every_entity_once_children_under_their_parent(model: TwinModel) -> None:
    tree = PlantView(model).tree()
    assert sorted(entity_ids(tree)) == sorted(entity.id for entity in model.entities)
    assert tree.entities == len(model.entities)
    pump = node(tree, "pump-001")
    children = [child.id for child in pump.children]
    assert children == [e.id for e in model.entities if e.parent == "pump-001"]
    assert all(n.status is ViewStatus.UNKNOWN for n in (tree, pump))
    assert (tree.health_min, tree.health_mean, tree.active_alarms) == (None, None, 0)


def test_status_health_and_alarms_roll_up_to_every_level(model: TwinModel) -> None:
    view = PlantView(model)
    for entity in model.entities:
        view.apply_state(state(entity.id, 1000, health=0.9))
    child = next(e for e in model.entities if e.parent == "pump-001")
    view.apply_state(state(child.id, 2000, Status.ALARM, health=0.3))
    view.apply_alarm(alarm(child.id, 1500, 2000, True, AlarmEvent.RAISED))
    tree = view.tree()
    pump = node(tree, "pump-001")
    line = node(tree, f"{child.site}/{child.line}")
    for level in (node(tree, child.id), pump, line, node(tree, child.site), tree):
        assert level.status is ViewStatus.ALARM
        assert level.active_alarms == 1
        assert level.health_min == pytest.approx(0.3)
    assert pump.health_mean == pytest.approx((0.9 + 0.3) / 2)
    assert tree.health_mean == pytest.approx((0.9 * (len(model.entities) - 1) + 0.3) / 60)
    other_site = next(s for s in tree.children if s.id != child.site)
    assert other_site.status is ViewStatus.OK and other_site.active_alarms == 0


def test_an_older_state_or_alarm_event_changes_nothing(model: TwinModel) -> None:
    view = PlantView(model)
    first = view.apply_state(state("pump-001", 2000, Status.WARN, 0.7))
    assert first is not None and first.status is ViewStatus.WARN
    assert view.apply_state(state("pump-001", 1000, Status.OK)) is None
    assert view.status_of("pump-001") is ViewStatus.WARN
    same = state("pump-001", 3000, Status.WARN, 0.7)
    assert view.apply_state(same) is None, "nothing the tree shows changed"
    assert view.states["pump-001"].ts_ms == 3000

    raised = alarm("pump-001", 1000, 1000, True, AlarmEvent.RAISED)
    cleared = alarm("pump-001", 1000, 5000, False, AlarmEvent.CLEARED)
    assert view.apply_alarm(cleared) == cleared
    assert view.apply_alarm(raised) is None
    assert view.active_alarms() == []
    assert view.alarm_list(active=False) == [cleared]


def test_unknown_entities_are_ignored(model: TwinModel) -> None:
    view = PlantView(model)
    version = view.version
    assert view.apply_state(state("stranger-9", 1000)) is None
    assert view.apply_alarm(alarm("stranger-9", 1, 1, True, AlarmEvent.RAISED)) is None
    assert view.version == version and not view.states and not view.alarms


def test_an_entity_view_joins_model_state_alarms_and_windows(model: TwinModel) -> None:
    view = PlantView(model)
    before = view.entity("pump-001")
    assert before.status is ViewStatus.UNKNOWN and before.health is None
    assert set(before.sensors) == set(model.sensors_of("pump-001"))
    assert before.sensors["flow"].value is None and not before.windows_available

    view.apply_state(state("pump-001", 1000, Status.ALARM, 0.4))
    view.apply_alarm(alarm("pump-001", 900, 1000, True, AlarmEvent.RAISED))
    window = WindowView(0, 10_000, 10, 120.0, 118.0, 122.0, 1.0, 121.0, 0.1, 0)
    view.set_windows({("pump-001", "flow"): window})
    twin = view.entity("pump-001")
    assert twin.status is ViewStatus.ALARM and twin.health == 0.4
    assert twin.sensors["flow"].value == 120.0
    assert twin.sensors["flow"].quality == ["SPIKE"]
    assert twin.sensors["flow"].window == window and twin.windows_available
    assert twin.sensors["flow"].unit == model.sensors_of("pump-001")["flow"].unit
    assert [a.alarm_id for a in twin.active_alarms] == ["pump-001@900"]
    speed = twin.setpoints["speed"]
    assert speed.state is not None and speed.state.desired == 1500.0
    assert speed.allowed == model.setpoints_of("pump-001")["speed"].allowed()
    assert twin.children == [e.id for e in model.entities if e.parent == "pump-001"]


def test_worst_orders_statuses_by_severity() -> None:
    assert worst([]) is ViewStatus.OK
    assert worst([ViewStatus.UNKNOWN, ViewStatus.OK]) is ViewStatus.UNKNOWN
    assert worst([ViewStatus.STALE, ViewStatus.UNKNOWN]) is ViewStatus.STALE
    assert worst([ViewStatus.WARN, ViewStatus.ALARM, ViewStatus.STALE]) is ViewStatus.ALARM


def test_versions_grow_with_the_changes_an_answer_depends_on(model: TwinModel) -> None:
    view = PlantView(model)
    view.apply_state(state("pump-001", 1000))
    view.apply_alarm(alarm("pump-001", 900, 1000, True, AlarmEvent.RAISED))
    assert view.entity_versions == {"pump-001": 2}
    view.apply_state(state("pump-001", 500))  # older: kept nothing
    view.apply_state(state("pump-002", 1000))
    assert view.entity_versions == {"pump-001": 2, "pump-002": 1}
    windows, overall = view.windows_version, view.version
    view.set_windows({})
    assert (view.windows_version, view.version) == (windows + 1, overall + 1)
