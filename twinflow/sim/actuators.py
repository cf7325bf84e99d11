"""The simulated machines' setpoints, and what a command does to them.

A real machine applies a command id once: brokers redeliver (MQTT QoS 1), bridges retry
after a crash, and a redelivered command must be harmless. A command arriving after its
expiry is never applied, whatever it asks. Values are checked against the twin model's
:class:`~twinflow.twin_model.SetpointSpec` as a machine's controller would, so the
simulator stands in for one when the twin's back channel is tested.

Pure logic, no I/O, picklable; the caller supplies the clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from enum import StrEnum

from schemas.control import Command
from twinflow.twin_model import SetpointSpec, SetpointValue, TwinModel

MEMORY = 10_000
"""Applied command ids remembered: redeliveries come within seconds, not 10 000 commands."""


class Outcome(StrEnum):
    """What a machine did with one command."""

    APPLIED = "applied"
    REPEATED = "repeated"
    """Its id was applied before: nothing changes."""
    EXPIRED = "expired"
    """It came after its ``expires_ms``: not applied."""
    REFUSED = "refused"
    """Unknown entity or setpoint, or a value its spec does not allow: not applied."""


class Actuators:
    """The current setpoint values of the simulated entities, starting at the defaults."""

    def __init__(self, model: TwinModel, entity_ids: Iterable[str], memory: int = MEMORY) -> None:
        if memory < 1:
            raise ValueError(f"memory must be at least 1, got {memory}")
        self._specs: dict[str, dict[str, SetpointSpec]] = {
            entity_id: model.setpoints_of(entity_id) for entity_id in entity_ids
        }
        # Copied on write, never changed in place: a sample may hold the mapping it got.
        self._values: dict[str, dict[str, SetpointValue]] = {
            entity_id: {name: _typed(spec, spec.default) for name, spec in specs.items()}
            for entity_id, specs in self._specs.items()
        }
        self._memory = memory
        self._applied: dict[str, None] = {}  # insertion-ordered: the oldest id goes first
        self._counts: Counter[Outcome] = Counter()
        self._changes = 0

    @property
    def changes(self) -> int:
        """How many commands were applied so far.

        What a reader derived from the values is stale once this moves.
        """
        return self._changes

    def setpoints(self, entity_id: str) -> Mapping[str, SetpointValue]:
        """What ``entity_id`` runs its setpoints at now (KeyError if not simulated)."""
        return self._values[entity_id]

    def problem(self, command: Command, addressed_to: str | None = None) -> str | None:
        """Why ``command`` would be refused, or None when it may be applied.

        ``addressed_to`` is the entity whose command channel carried it: a machine does
        not act on a command naming another one.
        """
        if addressed_to is not None and command.entity_id != addressed_to:
            return f"names {command.entity_id!r}, but came on the channel of {addressed_to!r}"
        specs = self._specs.get(command.entity_id)
        if specs is None:
            return f"entity {command.entity_id!r} is not simulated here"
        spec = specs.get(command.setpoint)
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            return f"{command.entity_id} has no setpoint {command.setpoint!r} (it has: {known})"
        return spec.check(command.value)

    def apply(self, command: Command, now_ms: int, addressed_to: str | None = None) -> Outcome:
        """Apply ``command`` at wall-clock ``now_ms`` (epoch ms) unless it must not be."""
        if command.command_id in self._applied:
            outcome = Outcome.REPEATED
        elif now_ms > command.expires_ms:
            outcome = Outcome.EXPIRED
        elif self.problem(command, addressed_to) is not None:
            outcome = Outcome.REFUSED
        else:
            spec = self._specs[command.entity_id][command.setpoint]
            current = self._values[command.entity_id]
            self._values[command.entity_id] = {
                **current,
                command.setpoint: _typed(spec, command.value),
            }
            self._remember(command.command_id)
            self._changes += 1
            outcome = Outcome.APPLIED
        self._counts[outcome] += 1
        return outcome

    def counts(self) -> dict[str, int]:
        """How many commands had each outcome, every outcome named (for run summaries)."""
        return {outcome.value: self._counts[outcome] for outcome in Outcome}

    def _remember(self, command_id: str) -> None:
        self._applied[command_id] = None
        if len(self._applied) > self._memory:
            del self._applied[next(iter(self._applied))]


def _typed(spec: SetpointSpec, value: SetpointValue) -> SetpointValue:
    """``value`` as the spec's type, so reports read 1200.0 for a float, 3 for an int."""
    if spec.type == "bool":
        return bool(value)
    if spec.type == "int":
        return int(value)
    return float(value)
