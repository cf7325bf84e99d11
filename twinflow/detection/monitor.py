"""What the flow and replay run per closed window of an entity: the detector, then its alarms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas import control
from schemas.outputs import Alarm, AlarmEvent, SensorWindow
from twinflow.detection.alarms import AlarmTracker
from twinflow.detection.detector import Detection, DetectorConfig, EntityDetector


@dataclass(frozen=True, slots=True)
class Verdict:
    """One window's detection and the alarm transitions it caused."""

    detection: Detection
    alarms: list[Alarm]

    @property
    def raised(self) -> bool:
        """Whether the window raised a new alarm."""
        return any(alarm.event is AlarmEvent.RAISED for alarm in self.alarms)


class EntityMonitor:
    """One entity's anomaly model and alarm lifecycle, kept together so they agree.

    When the tracker re-baselines an alarm, or an operator rejects it, the detector
    accepts the entity's current level in the same call, so the next window is judged
    against it. While the active alarm is a confirmed fault, the detector scores
    windows without learning from them.

    >>> from twinflow.detection import DetectorConfig
    >>> config = DetectorConfig(warmup_windows=60, smoothing=(1.0,), min_count=10, periods=())
    >>> monitor = EntityMonitor("pump-001", config)
    >>> for i in range(80):
    ...     _ = monitor.process({"flow.mean": 100.0 + i % 3}, i * 10_000, (i + 1) * 10_000)
    >>> [len(monitor.process({"flow.mean": 140.0}, t, t + 10_000).alarms)
    ...  for t in range(800_000, 850_000, 10_000)]
    [0, 1, 0, 0, 0]
    >>> monitor.alarms.active_ids
    ['pump-001@810000']
    """

    def __init__(self, entity_id: str, config: DetectorConfig | None = None) -> None:
        self.detector = EntityDetector(config)
        self.alarms = AlarmTracker(entity_id, self.detector.config.alarm_policy)

    def process_window(
        self, windows: Mapping[str, SensorWindow], start_ms: int, end_ms: int
    ) -> Verdict:
        """Judge one closed window of the entity (its sensors' features)."""
        detection = self.detector.process_window(windows, start_ms, learn=not self.alarms.confirmed)
        return self._judge(detection, start_ms, end_ms)

    def process(
        self,
        x: Mapping[str, float],
        start_ms: int,
        end_ms: int,
        readings: Mapping[str, int] | None = None,
    ) -> Verdict:
        """Judge one window given as a feature dict (see ``EntityDetector.process``)."""
        detection = self.detector.process(x, readings, start_ms, learn=not self.alarms.confirmed)
        return self._judge(detection, start_ms, end_ms)

    def feedback(
        self, alarm_id: str, verdict: control.Verdict, operator: str, note: str = ""
    ) -> list[Alarm]:
        """Apply an operator's verdict on an alarm; the alarm transitions it caused.

        ``reject`` makes the detector accept the entity's level as normal, so the entity
        is back to OK within a few windows and does not alarm again on that level.
        """
        alarms = self.alarms.feedback(alarm_id, verdict, operator, note)
        if any(alarm.event is AlarmEvent.REJECTED for alarm in alarms):
            self.detector.rebaseline(settling=True)
        return alarms

    @property
    def in_alarm(self) -> bool:
        """Whether the entity has an active alarm."""
        return self.alarms.incident is not None

    def _judge(self, detection: Detection, start_ms: int, end_ms: int) -> Verdict:
        if detection.warming_up or not detection.scored:
            return Verdict(detection, [])
        alarms = self.alarms.update(
            detection.is_anomaly,
            detection.score,
            detection.threshold,
            detection.contributions,
            start_ms,
            end_ms,
        )
        if alarms and any(alarm.event is AlarmEvent.REBASELINED for alarm in alarms):
            self.detector.rebaseline()
        return Verdict(detection, alarms)
