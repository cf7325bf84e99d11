"""Alarms with a lifecycle: one per incident, explained, and never without an end.

The detector judges windows; an operator wants incidents. :class:`AlarmTracker` turns
the stream of per-window verdicts of one entity into alarms:

- **raised** at the first anomalous window of an incident (the detector's own
  persistence rule has already confirmed it), with a stable id (entity and start);
- **active** while the detector keeps flagging; its peak score and the explanation of
  the peak window are kept up to date;
- **cleared** after ``clear_windows`` normal windows in a row (hysteresis: a fault that
  dips under the threshold for a moment is still one incident, not a flapping series);
- **re-baselined** when it has been active for ``rebaseline_windows`` windows: a change
  that lasts that long is a new operating point (a setpoint change, a new load, a
  repaired machine), not an incident, and an alarm that never ends is one nobody
  trusts. The tracker ends the alarm with that cause, so a person still sees "new
  normal accepted at T", and the caller makes the model accept the level
  (:meth:`~twinflow.detection.EntityDetector.rebaseline`).

Operators judge alarms (:meth:`AlarmTracker.feedback`): ``ack`` marks the active alarm
acknowledged; ``confirm`` marks it a true fault, which is then never re-baselined (the
caller also keeps its windows out of learning); ``reject`` ends it as a false alarm
(the caller makes the model accept the level).

The same lifecycle serves predictive maintenance (``kind`` ``maintenance_due``, see
:mod:`twinflow.maintenance`): its "anomalous windows" are trend updates whose time to
limit falls inside the horizon, it carries the latest forecast, and it is never
re-baselined (a machine wearing out is no new normal).

Every transition is one :class:`~schemas.outputs.Alarm` message, emitted once. Pure code
and plain state (a few numbers and one small struct), so it pickles with the entity.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.control import Verdict
from schemas.outputs import (
    Alarm,
    AlarmEvent,
    AlarmKind,
    AlarmVerdict,
    Contribution,
    LimitForecast,
)


@dataclass(frozen=True)
class AlarmPolicy:
    """When an incident ends; counts are in windows."""

    clear_windows: int
    """Normal windows in a row that clear an active alarm."""
    rebaseline_windows: int | None
    """An alarm active this many windows ends as re-baselined (None: never)."""

    def __post_init__(self) -> None:
        if self.clear_windows < 1:
            raise ValueError(f"clear_windows must be at least 1, got {self.clear_windows}")
        if self.rebaseline_windows is not None and self.rebaseline_windows <= self.clear_windows:
            raise ValueError(
                f"rebaseline_windows ({self.rebaseline_windows}) must exceed clear_windows "
                f"({self.clear_windows}), or no alarm could clear before it is re-baselined"
            )


@dataclass
class _Incident:
    start_ms: int
    peak_score: float
    threshold: float
    contributions: list[Contribution]
    anomalous_windows: int = 1
    windows: int = 1
    """Windows since it was raised, the raising one included."""
    last_anomalous_end_ms: int = 0
    last_end_ms: int = 0
    """End of its latest window: the event time an operator's verdict takes effect at."""
    normal_run: int = 0
    acknowledged: bool = False
    confirmed: bool = False
    operator: str | None = None
    note: str | None = None
    forecast: LimitForecast | None = None
    """The latest forecast that found maintenance due (maintenance alarms only)."""


@dataclass
class AlarmTracker:
    """The alarms of one entity.

    >>> from schemas.outputs import Contribution
    >>> tracker = AlarmTracker("pump-001", AlarmPolicy(clear_windows=2, rebaseline_windows=5))
    >>> flags = [False, True, True, False, False, True, True, True, True, True, True]
    >>> for i, flag in enumerate(flags):
    ...     for alarm in tracker.update(flag, 9.0 + i, 4.0, [], i * 10, i * 10 + 10):
    ...         print(i, alarm.event.value, alarm.alarm_id, alarm.end_ms, alarm.peak_score)
    1 raised pump-001@10 None 10.0
    4 cleared pump-001@10 30 11.0
    5 raised pump-001@50 None 14.0
    9 rebaselined pump-001@50 100 18.0
    10 raised pump-001@100 None 19.0
    >>> tracker.active_ids, tracker.raised
    (['pump-001@100'], 3)
    """

    entity_id: str
    policy: AlarmPolicy
    kind: AlarmKind = AlarmKind.ANOMALY
    incident: _Incident | None = None
    raised: int = 0
    """Alarms raised so far."""

    @property
    def active_ids(self) -> list[str]:
        """Ids of the active alarms (at most one: an entity has one incident at a time)."""
        return [] if self.incident is None else [self._id(self.incident)]

    def update(
        self,
        is_anomaly: bool,
        score: float,
        threshold: float | None,
        contributions: list[Contribution],
        start_ms: int,
        end_ms: int,
        forecast: LimitForecast | None = None,
    ) -> list[Alarm]:
        """Take one scored window's verdict; the transitions it caused, in order."""
        incident = self.incident
        if incident is None:
            if not is_anomaly or threshold is None:
                return []
            self.raised += 1
            incident = self.incident = _Incident(
                start_ms,
                score,
                threshold,
                list(contributions),
                last_anomalous_end_ms=end_ms,
                last_end_ms=end_ms,
                forecast=forecast,
            )
            return [self._event(incident, AlarmEvent.RAISED, end_ms, active=True)]
        incident.windows += 1
        incident.last_end_ms = end_ms
        if is_anomaly:
            incident.anomalous_windows += 1
            incident.last_anomalous_end_ms = end_ms
            incident.normal_run = 0
            if forecast is not None:
                incident.forecast = forecast
            if score > incident.peak_score:
                incident.peak_score = score
                incident.contributions = list(contributions)
        else:
            incident.normal_run += 1
            if incident.normal_run >= self.policy.clear_windows:
                self.incident = None
                return [
                    self._event(
                        incident,
                        AlarmEvent.CLEARED,
                        end_ms,
                        active=False,
                        ended_ms=incident.last_anomalous_end_ms,
                    )
                ]
        limit = self.policy.rebaseline_windows
        if limit is not None and incident.windows >= limit and not incident.confirmed:
            self.incident = None
            return [
                self._event(incident, AlarmEvent.REBASELINED, end_ms, active=False, ended_ms=end_ms)
            ]
        return []

    @property
    def confirmed(self) -> bool:
        """Whether the active alarm was confirmed a true fault."""
        return self.incident is not None and self.incident.confirmed

    def feedback(self, alarm_id: str, verdict: Verdict, operator: str, note: str) -> list[Alarm]:
        """Apply an operator's verdict; the transition it caused (none if it changes nothing).

        Only the active alarm can be judged: a verdict on an ended or unknown alarm, or
        one that repeats what was already said (a second ``ack``), changes nothing.

        >>> tracker = AlarmTracker("p", AlarmPolicy(clear_windows=2, rebaseline_windows=3))
        >>> _ = tracker.update(True, 9.0, 4.0, [], 0, 10)
        >>> [a.event.value for a in tracker.feedback("p@0", Verdict.CONFIRM, "ann", "")]
        ['confirmed']
        >>> [a.event.value for w in range(3) for a in tracker.update(True, 9.0, 4.0, [], w, w)]
        []
        >>> [(a.event.value, a.active, a.end_ms)
        ...  for a in tracker.feedback("p@0", Verdict.REJECT, "bo", "")]
        [('rejected', False, 2)]
        >>> tracker.feedback("p@0", Verdict.ACK, "ann", "")
        []
        """
        incident = self.incident
        if incident is None or self._id(incident) != alarm_id:
            return []
        incident.operator = operator
        incident.note = note or None
        if verdict is Verdict.REJECT:
            self.incident = None
            at = incident.last_end_ms
            return [self._event(incident, AlarmEvent.REJECTED, at, active=False, ended_ms=at)]
        if verdict is Verdict.CONFIRM:
            if incident.confirmed:
                return []
            incident.confirmed = incident.acknowledged = True
            return [self._event(incident, AlarmEvent.CONFIRMED, incident.last_end_ms, active=True)]
        if incident.acknowledged:
            return []
        incident.acknowledged = True
        return [self._event(incident, AlarmEvent.ACKNOWLEDGED, incident.last_end_ms, active=True)]

    def _id(self, incident: _Incident) -> str:
        if self.kind is AlarmKind.ANOMALY:
            return f"{self.entity_id}@{incident.start_ms}"
        # Entity ids never hold "/": the kind keeps the two lifecycles' ids apart.
        return f"{self.entity_id}/{self.kind.value}@{incident.start_ms}"

    def _event(
        self,
        incident: _Incident,
        event: AlarmEvent,
        ts_ms: int,
        *,
        active: bool,
        ended_ms: int | None = None,
    ) -> Alarm:
        alarm_id = self._id(incident)
        return Alarm(
            msg_id=f"{alarm_id}/{event.value}",
            alarm_id=alarm_id,
            entity_id=self.entity_id,
            kind=self.kind,
            event=event,
            active=active,
            ts_ms=ts_ms,
            start_ms=incident.start_ms,
            end_ms=ended_ms,
            peak_score=incident.peak_score,
            threshold=incident.threshold,
            anomalous_windows=incident.anomalous_windows,
            contributions=list(incident.contributions),
            acknowledged=incident.acknowledged,
            verdict=(
                AlarmVerdict.REJECTED
                if event is AlarmEvent.REJECTED
                else AlarmVerdict.CONFIRMED
                if incident.confirmed
                else None
            ),
            operator=incident.operator,
            note=incident.note,
            forecast=incident.forecast,
        )
