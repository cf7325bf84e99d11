"""Status and health of one twin, with hysteresis so that a status does not flap.

Per closed window the entity's status machine gets the detector's verdict and the share
of flagged readings:

- ALARM after ``ALARM_ENTER`` anomalous windows in a row; it is left only after
  ``ALARM_EXIT`` normal windows in a row (to WARN if that window is still suspicious).
- WARN while a window is suspicious: score above ``WARN_RATIO`` of the threshold, or
  more than ``WARN_FLAGGED`` of its readings flagged; left after ``WARN_EXIT`` clean
  windows.
- STALE when the entity has been silent for the configured time (system time); the
  next reading brings back the status it had.

Health (0-100) is 100 minus up to 60 points for the score's closeness to the threshold
and up to 40 points for the share of flagged readings.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.outputs import Status

ALARM_ENTER = 2
ALARM_EXIT = 3
WARN_EXIT = 2
WARN_RATIO = 0.8
WARN_FLAGGED = 0.2


@dataclass
class StatusMachine:
    """The status of one entity."""

    status: Status = Status.OK
    before_stale: Status = Status.OK
    anomalous_run: int = 0
    normal_run: int = 0
    health: float = 100.0

    def window(self, is_anomaly: bool, score_ratio: float | None, flagged_share: float) -> bool:
        """Take one closed window's verdict; return whether the status changed.

        >>> machine = StatusMachine()
        >>> [(machine.window(True, 1.5, 0.0), machine.status.value) for _ in range(3)]
        [(True, 'WARN'), (True, 'ALARM'), (False, 'ALARM')]
        >>> [(machine.window(False, 0.1, 0.0), machine.status.value) for _ in range(3)]
        [(False, 'ALARM'), (False, 'ALARM'), (True, 'OK')]
        """
        before = self.status
        if self.status is Status.STALE:
            self.status = self.before_stale
        suspicious = (score_ratio or 0.0) > WARN_RATIO or flagged_share > WARN_FLAGGED
        if is_anomaly:
            self.anomalous_run += 1
            self.normal_run = 0
        else:
            self.anomalous_run = 0
            self.normal_run += 1
        if self.anomalous_run >= ALARM_ENTER:
            self.status = Status.ALARM
        elif self.status is Status.ALARM:
            if self.normal_run >= ALARM_EXIT:
                self.status = Status.WARN if suspicious else Status.OK
        elif suspicious or is_anomaly:
            self.status = Status.WARN
        elif self.status is Status.WARN and self.normal_run >= WARN_EXIT:
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
