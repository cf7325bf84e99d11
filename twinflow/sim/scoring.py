"""Alarms scored against the simulator's ground truth: faults found, how fast, false alarms.

One matcher for everything that grades alarms on simulated plant time (the detection
benchmark, ``twinflow demo``'s summary), so they count the same way. Time is in event
milliseconds; ``window_ms`` is the detector's window length. Rules, per entity:

- **injected**: a process fault that starts at or after ``monitored_from_ms`` (the end of
  the warm-up); one that starts earlier was learned as normal and is counted apart
  (``before_monitoring``).
- **detected**: an alarm overlaps ``[fault start, fault end + one window)``. An alarm
  already active when the fault starts counts. The **delay** is the first such alarm's
  raise (the end of its raising window) minus the fault's start, at least 0.
- every alarm **raised** (at its raise time) is exactly one of: inside a process fault,
  inside a sensor fault (each fault widened by one window on both sides; process first),
  inside the **recovery margin** after either (``margin_ms`` after the widened end:
  temperatures lag their cause by minutes), before ``monitored_from_ms``, or a **false
  alarm**. Alarms inside sensor faults are neither hits nor false alarms: a stuck or
  drifting sensor is not a process fault, but flagging it is not wrong either.
- **exposure**: monitored time (``monitored_from_ms`` to ``end_ms``) outside every widened
  fault interval and its margin, summed over entities; false alarms are counted per
  entity-hour of it.

Pure code, no I/O.

>>> from twinflow.sim.faults import Category, Fault, FaultKind
>>> H = 3_600_000
>>> faults = [Fault(FaultKind.OVERLOAD, Category.PROCESS, "pump-001", 2 * H, 3 * H)]
>>> alarms = [AlarmSpan("pump-001", 2 * H + 50_000, 2 * H + 600_000, 2 * H + 60_000),
...           AlarmSpan("pump-002", 3 * H, 3 * H + 30_000, 3 * H + 10_000)]
>>> result = score(faults, alarms, ["pump-001", "pump-002"], monitored_from_ms=H,
...                end_ms=5 * H, window_ms=10_000)
>>> result.recall, result.median_delay_s, result.false_alarms
({'overload': 1.0}, {'overload': 60.0}, 1)
>>> round(result.exposure_h, 3), round(result.false_alarms_per_entity_hour, 3)
(6.961, 0.144)
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from schemas.outputs import Alarm, AlarmEvent
from twinflow.sim.faults import Category, Fault

MARGIN_MS = 120_000
"""Default recovery margin: alarms raised this long after a fault are not false alarms."""
HOUR_MS = 3_600_000


def as_fault(fault: Fault | Mapping[str, Any]) -> Fault:
    """A :class:`~twinflow.sim.faults.Fault`, given one or its ground-truth file dict.

    >>> as_fault({"kind": "stuck", "category": "sensor", "entity_id": "pump-001",
    ...           "start_ms": 0, "end_ms": 10, "sensor": "flow"}).category
    <Category.SENSOR: 'sensor'>
    """
    if isinstance(fault, Fault):
        return fault
    return msgspec.convert(fault, Fault)


@dataclass(frozen=True, slots=True)
class AlarmSpan:
    """One alarm of one entity, folded from its transitions."""

    entity_id: str
    start_ms: int
    """Start of the window that raised it."""
    end_ms: int | None
    """When it ended; None: still active at the end of the run."""
    raised_ms: int
    """Event time of the raise (the end of the raising window)."""
    alarm_id: str = ""
    top_sensor: str | None = None
    """The sensor that explained the raising window best, if known."""

    def overlaps(self, low: int, high: int) -> bool:
        """Whether the alarm was active at some time in ``[low, high)``."""
        return self.start_ms < high and (self.end_ms is None or self.end_ms > low)


class Transition(NamedTuple):
    """One alarm transition as a table row gives it (an :class:`Alarm` without scores)."""

    alarm_id: str
    entity_id: str
    event: str
    """An :class:`~schemas.outputs.AlarmEvent` value."""
    ts_ms: int
    start_ms: int
    end_ms: int | None
    top_sensor: str | None = None


def fold_alarms(events: Iterable[Alarm | Transition]) -> list[AlarmSpan]:
    """Fold transitions into one span per ``alarm_id``, ordered by raise time.

    The end comes from the ending transition (cleared or re-baselined); without one the
    alarm is still active. Without its raise event (raised before the events at hand)
    an alarm is taken as raised at its earliest event.

    >>> fold_alarms([
    ...     Transition("p@0", "p", "raised", 10, 0, None, "flow"),
    ...     Transition("p@0", "p", "cleared", 200, 0, 100),
    ...     Transition("p@500", "p", "raised", 510, 500, None),
    ... ])  # doctest: +NORMALIZE_WHITESPACE
    [AlarmSpan(entity_id='p', start_ms=0, end_ms=100, raised_ms=10, alarm_id='p@0',
               top_sensor='flow'),
     AlarmSpan(entity_id='p', start_ms=500, end_ms=None, raised_ms=510, alarm_id='p@500',
               top_sensor=None)]
    """
    by_id: dict[str, list[Transition]] = defaultdict(list)
    for event in events:
        by_id[event.alarm_id].append(_transition(event))
    spans = []
    for alarm_id, transitions in by_id.items():
        raises = [t for t in transitions if t.event == AlarmEvent.RAISED]
        first = min(raises or transitions, key=lambda t: t.ts_ms)
        ends = [
            t.end_ms for t in transitions if t.event != AlarmEvent.RAISED and t.end_ms is not None
        ]
        spans.append(
            AlarmSpan(
                entity_id=first.entity_id,
                start_ms=min(t.start_ms for t in transitions),
                end_ms=max(ends) if ends else None,
                raised_ms=first.ts_ms,
                alarm_id=alarm_id,
                top_sensor=first.top_sensor if raises else None,
            )
        )
    return sorted(spans, key=lambda s: (s.raised_ms, s.entity_id))


def _transition(event: Alarm | Transition) -> Transition:
    if isinstance(event, Transition):
        return event
    return Transition(
        event.alarm_id,
        event.entity_id,
        event.event.value,
        event.ts_ms,
        event.start_ms,
        event.end_ms,
        event.contributions[0].sensor if event.contributions else None,
    )


@dataclass
class Score:
    """Alarms against faults, over one run or several pooled with ``+=``; picklable."""

    injected: Counter[str] = field(default_factory=Counter)
    """Process faults monitored, per kind."""
    detected: Counter[str] = field(default_factory=Counter)
    delays_ms: dict[str, list[int]] = field(default_factory=dict)
    first_sensor: dict[str, Counter[str]] = field(default_factory=dict)
    """Per kind: the top sensor of each detecting alarm's raise, counted."""
    before_monitoring: Counter[str] = field(default_factory=Counter)
    """Process faults that started during the warm-up (not scored), per kind."""
    alarms: int = 0
    """Alarms raised, of the entities scored."""
    in_process: int = 0
    in_sensor: Counter[str] = field(default_factory=Counter)
    """Alarms raised inside a sensor fault, per sensor-fault kind."""
    in_margin: int = 0
    alarms_before_monitoring: int = 0
    false_alarms: int = 0
    false_alarm_entities: set[str] = field(default_factory=set)
    sensor_faults: Counter[str] = field(default_factory=Counter)
    sensor_faults_alarmed: Counter[str] = field(default_factory=Counter)
    """Sensor faults with at least one alarm raised inside them, per kind."""
    exposure_ms: int = 0

    def __iadd__(self, other: Score) -> Score:
        for mine, theirs in (
            (self.injected, other.injected),
            (self.detected, other.detected),
            (self.before_monitoring, other.before_monitoring),
            (self.in_sensor, other.in_sensor),
            (self.sensor_faults, other.sensor_faults),
            (self.sensor_faults_alarmed, other.sensor_faults_alarmed),
        ):
            mine.update(theirs)
        for kind, delays in other.delays_ms.items():
            self.delays_ms.setdefault(kind, []).extend(delays)
        for kind, sensors in other.first_sensor.items():
            self.first_sensor.setdefault(kind, Counter()).update(sensors)
        self.alarms += other.alarms
        self.in_process += other.in_process
        self.in_margin += other.in_margin
        self.alarms_before_monitoring += other.alarms_before_monitoring
        self.false_alarms += other.false_alarms
        self.false_alarm_entities |= other.false_alarm_entities
        self.exposure_ms += other.exposure_ms
        return self

    @property
    def kinds(self) -> list[str]:
        """Process-fault kinds that were injected, sorted."""
        return sorted(self.injected)

    @property
    def recall(self) -> dict[str, float]:
        """Share of the injected process faults detected, per kind."""
        return {k: self.detected[k] / self.injected[k] for k in self.kinds}

    @property
    def median_delay_s(self) -> dict[str, float | None]:
        """Median delay of the detected faults in seconds, per kind."""
        return {
            k: statistics.median(self.delays_ms[k]) / 1000 if self.delays_ms.get(k) else None
            for k in self.kinds
        }

    @property
    def exposure_h(self) -> float:
        """Clean monitored entity-hours."""
        return self.exposure_ms / HOUR_MS

    @property
    def false_alarms_per_entity_hour(self) -> float | None:
        """False alarms per clean monitored entity-hour (None without exposure)."""
        return self.false_alarms / self.exposure_h if self.exposure_ms else None


def score(
    faults: Iterable[Fault | Mapping[str, Any]],
    alarms: Iterable[AlarmSpan],
    entities: Iterable[str],
    *,
    monitored_from_ms: int,
    end_ms: int,
    window_ms: int,
    margin_ms: int = MARGIN_MS,
) -> Score:
    """Score the ``alarms`` of ``entities`` against the ``faults`` (module doc: the rules).

    Faults and alarms of other entities are left out; data faults are ignored.
    """
    names = list(dict.fromkeys(entities))
    scored = set(names)
    faults_of: dict[str, list[Fault]] = defaultdict(list)
    for fault in map(as_fault, faults):
        if fault.entity_id in scored and fault.category is not Category.DATA:
            faults_of[fault.entity_id].append(fault)
    alarms_of: dict[str, list[AlarmSpan]] = defaultdict(list)
    for alarm in alarms:
        if alarm.entity_id in scored:
            alarms_of[alarm.entity_id].append(alarm)
    result = Score()
    for entity_id in names:
        _score_entity(
            result,
            entity_id,
            faults_of[entity_id],
            sorted(alarms_of[entity_id], key=lambda a: a.raised_ms),
            monitored_from_ms,
            end_ms,
            window_ms,
            margin_ms,
        )
    return result


def _score_entity(
    result: Score,
    entity_id: str,
    faults: list[Fault],
    alarms: list[AlarmSpan],
    monitored_from_ms: int,
    end_ms: int,
    window_ms: int,
    margin_ms: int,
) -> None:
    _match_process_faults(result, faults, alarms, monitored_from_ms, window_ms)
    process = [(f.start_ms - window_ms, f.end_ms + window_ms) for f in faults if _process(f)]
    sensor = [f for f in faults if f.category is Category.SENSOR]
    alarmed: set[int] = set()
    for alarm in alarms:
        at = alarm.raised_ms
        result.alarms += 1
        if at < monitored_from_ms:
            result.alarms_before_monitoring += 1
        elif any(low <= at < high for low, high in process):
            result.in_process += 1
        elif inside := [
            i for i, f in enumerate(sensor) if f.start_ms - window_ms <= at < f.end_ms + window_ms
        ]:
            result.in_sensor[str(sensor[inside[0]].kind)] += 1
            alarmed.update(inside)
        elif any(
            f.end_ms + window_ms <= at < f.end_ms + window_ms + margin_ms
            for f in faults
            if f.category in (Category.PROCESS, Category.SENSOR)
        ):
            result.in_margin += 1
        else:
            result.false_alarms += 1
            result.false_alarm_entities.add(entity_id)
    for i, fault in enumerate(sensor):
        result.sensor_faults[str(fault.kind)] += 1
        result.sensor_faults_alarmed[str(fault.kind)] += i in alarmed
    result.exposure_ms += clean_time(
        [(f.start_ms - window_ms, f.end_ms + window_ms + margin_ms) for f in faults],
        monitored_from_ms,
        end_ms,
    )


def _process(fault: Fault) -> bool:
    return fault.category is Category.PROCESS


def _match_process_faults(
    result: Score,
    faults: list[Fault],
    alarms: list[AlarmSpan],
    monitored_from_ms: int,
    window_ms: int,
) -> None:
    for fault in filter(_process, faults):
        kind = str(fault.kind)
        if fault.start_ms < monitored_from_ms:
            result.before_monitoring[kind] += 1
            continue
        result.injected[kind] += 1
        overlapping = [a for a in alarms if a.overlaps(fault.start_ms, fault.end_ms + window_ms)]
        if not overlapping:
            continue
        result.detected[kind] += 1
        first = min(overlapping, key=lambda a: a.raised_ms)
        result.delays_ms.setdefault(kind, []).append(max(0, first.raised_ms - fault.start_ms))
        if first.top_sensor:
            result.first_sensor.setdefault(kind, Counter())[first.top_sensor] += 1


def clean_time(busy: Iterable[tuple[int, int]], start_ms: int, end_ms: int) -> int:
    """Milliseconds of ``[start_ms, end_ms)`` outside every ``busy`` interval.

    >>> clean_time([(50, 120), (100, 150), (300, 400), (-10, 5)], 0, 350)
    195
    """
    clean = max(0, end_ms - start_ms)
    cursor = start_ms
    for low, high in sorted((max(lo, start_ms), min(hi, end_ms)) for lo, hi in busy):
        low = max(low, cursor)
        if high > low:
            clean -= high - low
            cursor = high
    return clean
