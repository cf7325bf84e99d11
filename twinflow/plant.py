"""The plant as ``twinflow serve`` shows it: the twin model's tree with the live state.

:class:`PlantView` folds the ``twin.state`` and ``twin.alarms`` records it is given
(in any order across entities, in topic order per entity) and answers the tree, an
entity's twin and the alarm list. It does no I/O: the server feeds it from Kafka and
from QuestDB (latest windows), so it is tested without brokers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import fmean

from schemas.outputs import Alarm, Flag, TwinState
from schemas.serve import (
    EntityView,
    NodeKind,
    PlantNode,
    SensorView,
    SetpointView,
    StateEvent,
    ViewStatus,
    WindowView,
)
from twinflow.twin_model import Entity, TwinModel

_SEVERITY = {status: rank for rank, status in enumerate(ViewStatus)}


def worst(statuses: Iterable[ViewStatus]) -> ViewStatus:
    """The most severe status (ALARM > WARN > STALE > UNKNOWN > OK); OK when none.

    >>> worst([ViewStatus.OK, ViewStatus.STALE, ViewStatus.WARN])
    <ViewStatus.WARN: 'WARN'>
    """
    return max(statuses, key=_SEVERITY.__getitem__, default=ViewStatus.OK)


def quality(flags: int) -> list[str]:
    """The names of a reading's quality flags.

    >>> quality(Flag.SPIKE | Flag.GAP)
    ['SPIKE', 'GAP']
    """
    return [flag.name for flag in Flag if flag & flags and flag.name is not None]


@dataclass(slots=True)
class PlantView:
    """The latest state and alarms of every entity of a twin model."""

    model: TwinModel
    states: dict[str, TwinState] = field(default_factory=dict)
    alarms: dict[str, Alarm] = field(default_factory=dict)
    windows: dict[tuple[str, str], WindowView] = field(default_factory=dict)
    windows_available: bool = False
    version: int = 0
    """Grows with every change kept, so answers built from the view can be cached."""
    entity_versions: dict[str, int] = field(default_factory=dict)
    """Per entity, grows with every change to its state or alarms."""
    windows_version: int = 0
    children: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.children = {entity.id: [] for entity in self.model.entities}
        for entity in self.model.entities:
            if entity.parent is not None:
                self.children[entity.parent].append(entity.id)

    # -- folding the topics ---------------------------------------------------------------

    def apply_state(self, state: TwinState) -> StateEvent | None:
        """Keep ``state`` if it is the entity's newest; the change, if the page must know.

        States of entities the model does not know are ignored (another plant's flow
        may share the topic). An older state than the one kept (a replay after a flow
        restart) changes nothing.
        """
        if state.entity_id not in self.children:
            return None
        before = self.states.get(state.entity_id)
        if before is not None and state.ts_ms < before.ts_ms:
            return None
        self.states[state.entity_id] = state
        self._changed(state.entity_id)
        changed = (
            before is None
            or before.status != state.status
            or before.health != state.health
            or before.active_alarms != state.active_alarms
        )
        return self.state_event(state.entity_id) if changed else None

    def apply_alarm(self, alarm: Alarm) -> Alarm | None:
        """Keep the alarm's newest event; the alarm when that changed it."""
        if alarm.entity_id not in self.children:
            return None
        before = self.alarms.get(alarm.alarm_id)
        if before is not None and (alarm.ts_ms, alarm.msg_id) <= (before.ts_ms, before.msg_id):
            return None
        self.alarms[alarm.alarm_id] = alarm
        self._changed(alarm.entity_id)
        return alarm

    def set_windows(self, windows: dict[tuple[str, str], WindowView]) -> None:
        """Replace the latest windows (by entity and sensor) with a fresh read."""
        self.windows = windows
        self.windows_available = True
        self.version += 1
        self.windows_version += 1

    def _changed(self, entity_id: str) -> None:
        self.version += 1
        self.entity_versions[entity_id] = self.entity_versions.get(entity_id, 0) + 1

    # -- answers ----------------------------------------------------------------------

    def status_of(self, entity_id: str) -> ViewStatus:
        """An entity's own status (UNKNOWN before its first state)."""
        state = self.states.get(entity_id)
        return ViewStatus.UNKNOWN if state is None else ViewStatus(state.status.value)

    def active_alarms(self, entity_id: str | None = None) -> list[Alarm]:
        """Active alarms, oldest first; of one entity if given."""
        found = [
            alarm
            for alarm in self.alarms.values()
            if alarm.active and (entity_id is None or alarm.entity_id == entity_id)
        ]
        return sorted(found, key=lambda alarm: (alarm.start_ms, alarm.alarm_id))

    def alarm_list(
        self, *, active: bool | None = None, entity_id: str | None = None
    ) -> list[Alarm]:
        """Every alarm's latest event, newest first; filtered by state and entity."""
        found = [
            alarm
            for alarm in self.alarms.values()
            if (active is None or alarm.active == active)
            and (entity_id is None or alarm.entity_id == entity_id)
        ]
        return sorted(found, key=lambda alarm: (-alarm.ts_ms, alarm.alarm_id))

    def state_event(self, entity_id: str) -> StateEvent:
        """What the page shows of an entity in the tree."""
        state = self.states.get(entity_id)
        return StateEvent(
            entity_id=entity_id,
            status=self.status_of(entity_id),
            health=None if state is None else state.health,
            ts_ms=0 if state is None else state.ts_ms,
            active_alarms=0 if state is None else len(state.active_alarms),
        )

    def tree(self) -> PlantNode:
        """Plant → sites → lines → entities (child assets under their parent)."""
        by_site: dict[str, dict[str, list[Entity]]] = {}
        for entity in self.model.entities:
            parent = self.model.by_id.get(entity.parent) if entity.parent else None
            if parent is not None and (parent.site, parent.line) == (entity.site, entity.line):
                continue  # shown under its parent
            by_site.setdefault(entity.site, {}).setdefault(entity.line, []).append(entity)
        sites = [
            self._group(
                "site",
                site,
                site,
                [
                    self._group(
                        "line",
                        f"{site}/{line}",
                        line,
                        [self._entity_node(entity) for entity in entities],
                    )
                    for line, entities in lines.items()
                ],
            )
            for site, lines in by_site.items()
        ]
        return self._group("plant", "plant", "plant", sites)

    def entity(self, entity_id: str) -> EntityView:
        """The current twin of an entity of the model (KeyError if unknown)."""
        entity = self.model.by_id[entity_id]
        asset = self.model.asset_types[entity.type]
        state = self.states.get(entity_id)
        sensors = {}
        for name, spec in asset.sensors.items():
            latest = None if state is None else state.sensors.get(name)
            sensors[name] = SensorView(
                name=name,
                unit=spec.unit,
                range=spec.range,
                value=None if latest is None else latest.value,
                ts_ms=None if latest is None else latest.ts_ms,
                flags=0 if latest is None else latest.flags,
                quality=[] if latest is None else quality(latest.flags),
                window=self.windows.get((entity_id, name)),
            )
        setpoints = {
            name: SetpointView(
                name=name,
                type=spec.type,
                unit=spec.unit,
                allowed=spec.allowed(),
                state=None if state is None else state.setpoints.get(name),
            )
            for name, spec in asset.setpoints.items()
        }
        return EntityView(
            entity_id=entity_id,
            entity_type=entity.type,
            site=entity.site,
            line=entity.line,
            parent=entity.parent,
            children=list(self.children[entity_id]),
            status=self.status_of(entity_id),
            health=None if state is None else state.health,
            anomaly_score=None if state is None else state.anomaly_score,
            threshold=None if state is None else state.threshold,
            ts_ms=None if state is None else state.ts_ms,
            sensors=sensors,
            derived={} if state is None else dict(state.derived),
            counts=None if state is None else state.counts,
            active_alarms=self.active_alarms(entity_id),
            setpoints=setpoints,
            forecasts={} if state is None else dict(state.forecasts),
            windows_available=self.windows_available,
        )

    # -- the tree's nodes -----------------------------------------------------------------

    def _entity_node(self, entity: Entity) -> PlantNode:
        children = [self._entity_node(self.model.by_id[child]) for child in self._nested(entity)]
        state = self.states.get(entity.id)
        own_health = [] if state is None else [state.health]
        healths = own_health + [h for child in children for h in self._healths(child)]
        return PlantNode(
            kind="entity",
            id=entity.id,
            name=entity.id,
            status=worst([self.status_of(entity.id), *(child.status for child in children)]),
            health_min=min(healths, default=None),
            health_mean=fmean(healths) if healths else None,
            active_alarms=len(self.active_alarms(entity.id))
            + sum(child.active_alarms for child in children),
            entities=1 + sum(child.entities for child in children),
            children=children,
            entity_type=entity.type,
            own_status=self.status_of(entity.id),
        )

    def _nested(self, entity: Entity) -> list[str]:
        """Children shown under ``entity``: those on its own site and line."""
        return [
            child
            for child in self.children[entity.id]
            if (self.model.by_id[child].site, self.model.by_id[child].line)
            == (entity.site, entity.line)
        ]

    def _healths(self, node: PlantNode) -> list[float]:
        if node.kind != "entity":
            return [h for child in node.children for h in self._healths(child)]
        state = self.states.get(node.id)
        own = [] if state is None else [state.health]
        return own + [h for child in node.children for h in self._healths(child)]

    def _group(
        self, kind: NodeKind, node_id: str, name: str, children: list[PlantNode]
    ) -> PlantNode:
        healths = [h for child in children for h in self._healths(child)]
        return PlantNode(
            kind=kind,
            id=node_id,
            name=name,
            status=worst(child.status for child in children),
            health_min=min(healths, default=None),
            health_mean=fmean(healths) if healths else None,
            active_alarms=sum(child.active_alarms for child in children),
            entities=sum(child.entities for child in children),
            children=children,
        )
