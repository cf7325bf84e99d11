"""Desired vs reported: where one setpoint of one machine stands.

A command sets the *desired* value; the machine's telemetry *reports* the value it runs
at. The setpoint is ``in_sync`` once they agree (within the twin model's tolerance),
``pending`` until then, ``expired`` if the command's expiry passed first, and ``failed``
if a bridge could not deliver it. A machine that later reports another value (changed
on site) is ``out_of_sync``. Every decision uses the time of the message that causes it
(Kafka time), so a replay decides the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.control import Command, CommandResult, DeliveryStatus
from schemas.outputs import SetpointState, SetpointStatus
from twinflow.twin_model import SetpointSpec, SetpointValue


@dataclass(slots=True)
class Setpoint:
    """One setpoint's desired and reported values (plain fields: it pickles with the twin).

    >>> from twinflow.twin_model import SetpointSpec
    >>> spec = SetpointSpec(type="float", unit="rpm", range=(600, 1800), default=1480)
    >>> speed = Setpoint()
    >>> speed.report(spec, 1480.0, 1_000)
    True
    >>> speed.command(spec, Command(command_id="c1", entity_id="p", setpoint="speed",
    ...     value=1200.0, issued_ms=2_000, expires_ms=60_000, user="ann"), 2_000)
    True
    >>> speed.status.value, speed.report(spec, 1480.0, 3_000), speed.report(spec, 1200.0, 4_000)
    ('pending', False, True)
    >>> speed.status.value
    'in_sync'
    """

    desired: SetpointValue | None = None
    reported: SetpointValue | None = None
    status: SetpointStatus | None = None
    command_id: str | None = None
    issued_ms: int | None = None
    expires_ms: int | None = None
    reported_ms: int | None = None
    detail: str = ""

    def state(self) -> SetpointState:
        """As published in the twin state."""
        return SetpointState(
            desired=self.desired,
            reported=self.reported,
            status=self.status,
            command_id=self.command_id,
            issued_ms=self.issued_ms,
            expires_ms=self.expires_ms,
            reported_ms=self.reported_ms,
            detail=self.detail,
        )

    def command(self, spec: SetpointSpec, command: Command, at_ms: int) -> bool:
        """Take a new desired value (read at Kafka time ``at_ms``); whether anything changed."""
        if command.command_id == self.command_id:
            return False
        self.desired = command.value
        self.command_id = command.command_id
        self.issued_ms = command.issued_ms
        self.expires_ms = command.expires_ms
        self.detail = ""
        if self.reported is not None and spec.in_sync(command.value, self.reported):
            self.status = SetpointStatus.IN_SYNC
        elif at_ms > command.expires_ms:
            self.status = SetpointStatus.EXPIRED
        else:
            self.status = SetpointStatus.PENDING
        return True

    def result(self, result: CommandResult) -> bool:
        """Take a bridge's delivery result; whether anything changed."""
        if result.command_id != self.command_id or self.status is not SetpointStatus.PENDING:
            return False
        if result.status is DeliveryStatus.DELIVERED:
            detail = f"delivered by {result.by}"
            changed = detail != self.detail
            self.detail = detail
            return changed
        self.status = (
            SetpointStatus.FAILED
            if result.status is DeliveryStatus.FAILED
            else SetpointStatus.EXPIRED
        )
        self.detail = f"{result.by}: {result.detail}" if result.detail else result.by
        return True

    def report(self, spec: SetpointSpec, value: SetpointValue, at_ms: int) -> bool:
        """Take the value the machine reports (in a message of Kafka time ``at_ms``).

        A pending command past its expiry must be expired (:meth:`expire`) first.
        """
        changed = value != self.reported or type(value) is not type(self.reported)
        self.reported = value
        self.reported_ms = at_ms
        if self.desired is None:
            return changed
        before = self.status
        agree = spec.in_sync(self.desired, value)
        if agree:
            self.status = SetpointStatus.IN_SYNC
        elif self.status is SetpointStatus.IN_SYNC:
            self.status = SetpointStatus.OUT_OF_SYNC
        return changed or self.status is not before

    def expire(self, now_ms: int) -> bool:
        """End a pending command whose expiry is before ``now_ms``; whether it did."""
        if (
            self.status is SetpointStatus.PENDING
            and self.expires_ms is not None
            and now_ms > self.expires_ms
        ):
            self.status = SetpointStatus.EXPIRED
            return True
        return False
