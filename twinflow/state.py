"""Status and health of one twin, with hysteresis so that a status does not flap.

Per closed window the entity's status machine gets whether the entity has an active
alarm after that window, the score's ratio to the threshold and the share of flagged
readings:

- ALARM exactly while the entity has an active alarm. The alarm's own lifecycle
  (:mod:`twinflow.detection.alarms`: raised, cleared after normal windows in a row,
  re-baselined) is the hysteresis, so the status and the alarms never disagree. When
  the alarm ends the status becomes WARN if that window is still suspicious, else OK.
- WARN while a window is suspicious: score above ``WARN_RATIO`` of the threshold, or
  more than ``WARN_FLAGGED`` of its readings flagged; left after ``WARN_EXIT`` clean
  windows in a row.
- STALE when the entity has been silent for the configured time (system time); it
  overrides the others, an active alarm included (the twin state still lists the
  alarm). The next closed window brings back the status that window calls for.

Health (0-100) is 100 minus up to 60 points for the score's closeness to the threshold
and up to 40 points for the share of flagged readings.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.outputs import Status

WARN_EXIT = 2
WARN_RATIO = 0.8
WARN_FLAGGED = 0.2


@dataclass
class StatusMachine:
    """The status of one entity."""

    status: Status = Status.OK
    before_stale: Status = Status.OK
    clean_run: int = 0
    """Windows in a row that were neither suspicious nor under an alarm."""
    health: float = 100.0

    def window(self, alarm_active: bool, score_ratio: float | None, flagged_share: float) -> bool:
        """Take one closed window; return whether the status changed.

        ``alarm_active`` is whether the entity has an active alarm after this window.

        >>> machine = StatusMachine()
        >>> [(machine.window(False, 0.9, 0.0), machine.status.value),
        ...  (machine.window(True, 1.5, 0.0), machine.status.value),
        ...  (machine.window(True, 0.1, 0.0), machine.status.value)]
        [(True, 'WARN'), (True, 'ALARM'), (False, 'ALARM')]
        >>> [(machine.window(False, 0.1, 0.0), machine.status.value) for _ in range(3)]
        [(True, 'OK'), (False, 'OK'), (False, 'OK')]
        >>> [(machine.window(False, r, 0.0), machine.status.value) for r in (0.9, 0.1, 0.1)]
        [(True, 'WARN'), (False, 'WARN'), (True, 'OK')]
        """
        before = self.status
        if self.status is Status.STALE:
            self.status = self.before_stale
        suspicious = (score_ratio or 0.0) > WARN_RATIO or flagged_share > WARN_FLAGGED
        self.clean_run = 0 if suspicious or alarm_active else self.clean_run + 1
        if alarm_active:
            self.status = Status.ALARM
        elif suspicious:
            self.status = Status.WARN
        elif self.status is Status.ALARM:
            self.status = Status.OK  # the alarm ended on a clean window
        elif self.status is Status.WARN and self.clean_run >= WARN_EXIT:
            self.status = Status.OK
        closeness = min(max(score_ratio or 0.0, 0.0), 1.5) / 1.5
        self.health = round(100.0 - 60.0 * closeness - 40.0 * min(flagged_share, 1.0), 1)
        return self.status is not before

    def stale(self) -> bool:
        """The entity went silent; return whether the status changed."""
        if self.status is Status.STALE:
            return False
        self.before_stale = self.status
        self.status = Status.STALE
        return True
