import math
import pickle
from pathlib import Path

import pytest

from schemas.control import Command
from twinflow.sim.actuators import Actuators, Outcome
from twinflow.twin_model import TwinModel, load_twin_model

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "twin-model" / "example-plant.yaml"
NOW_MS = 1_793_000_000_000
ENTITIES = ["pump-001", "motor-001", "compressor-001"]


@pytest.fixture(scope="module")
def model() -> TwinModel:
    return load_twin_model(EXAMPLE)


@pytest.fixture
def actuators(model: TwinModel) -> Actuators:
    return Actuators(model, ENTITIES)


def _command(
    command_id: str = "c-1",
    entity_id: str = "pump-001",
    setpoint: str = "speed",
    value: float | bool = 1200.0,
    expires_ms: int = NOW_MS + 60_000,
) -> Command:
    return Command(
        command_id=command_id,
        entity_id=entity_id,
        setpoint=setpoint,
        value=value,
        issued_ms=NOW_MS - 1_000,
        expires_ms=expires_ms,
        user="ops",
    )


def test_setpoints_start_at_the_twin_model_defaults(actuators: Actuators) -> None:
    assert actuators.setpoints("pump-001") == {"speed": 1480.0}
    assert isinstance(actuators.setpoints("pump-001")["speed"], float)
    assert actuators.setpoints("motor-001") == {"enable": True}
    assert actuators.setpoints("compressor-001") == {}
    with pytest.raises(KeyError):
        actuators.setpoints("pump-002")  # in the model, but not simulated here
    assert actuators.counts() == {"applied": 0, "repeated": 0, "expired": 0, "refused": 0}


def test_a_command_is_applied_once_and_a_redelivery_changes_nothing(
    actuators: Actuators,
) -> None:
    assert actuators.apply(_command(value=1200.0), NOW_MS) is Outcome.APPLIED
    assert actuators.setpoints("pump-001") == {"speed": 1200.0}
    # The same id again, even with another value (a confused sender): nothing changes.
    assert actuators.apply(_command(value=1200.0), NOW_MS + 5) is Outcome.REPEATED
    assert actuators.apply(_command(value=900.0), NOW_MS + 6) is Outcome.REPEATED
    assert actuators.setpoints("pump-001") == {"speed": 1200.0}
    # A redelivery after the expiry is still just a repeat of what was applied.
    assert actuators.apply(_command(), NOW_MS + 3_600_000) is Outcome.REPEATED
    assert actuators.apply(_command("c-2", value=900.0), NOW_MS) is Outcome.APPLIED
    assert actuators.setpoints("pump-001") == {"speed": 900.0}
    assert actuators.counts() == {"applied": 2, "repeated": 3, "expired": 0, "refused": 0}
    assert actuators.changes == 2  # what readers cache setpoint-derived values by


def test_an_expired_command_is_never_applied(actuators: Actuators) -> None:
    late = _command("late", value=700.0, expires_ms=NOW_MS - 1)
    assert actuators.apply(late, NOW_MS) is Outcome.EXPIRED
    assert actuators.apply(late, NOW_MS) is Outcome.EXPIRED  # not remembered as applied
    assert actuators.setpoints("pump-001") == {"speed": 1480.0}
    # Up to and including its expiry millisecond it is on time.
    assert actuators.apply(_command("just", expires_ms=NOW_MS), NOW_MS) is Outcome.APPLIED
    assert actuators.counts()["expired"] == 2


@pytest.mark.parametrize(
    ("command", "addressed_to", "why"),
    [
        (_command(entity_id="pump-002"), None, "'pump-002' is not simulated here"),
        (_command(entity_id="ghost-1"), None, "'ghost-1' is not simulated here"),
        (_command(setpoint="pressure"), None, "no setpoint 'pressure' (it has: speed)"),
        (
            _command(entity_id="compressor-001", setpoint="speed"),
            None,
            "no setpoint 'speed' (it has: none)",
        ),
        (_command(value=2000.0), None, "2000 is outside [600, 1800] rpm"),
        (_command(value=599.9), None, "599.9 is outside [600, 1800] rpm"),
        (_command(value=math.nan), None, "got nan"),
        (_command(value=True), None, "got a bool"),
        (_command(entity_id="motor-001", setpoint="enable", value=0.0), None, "true or false"),
        (_command(), "pump-002", "came on the channel of 'pump-002'"),
    ],
)
def test_what_the_machine_would_not_do_is_refused(
    actuators: Actuators, command: Command, addressed_to: str | None, why: str
) -> None:
    problem = actuators.problem(command, addressed_to)
    assert problem is not None and why in problem
    assert actuators.apply(command, NOW_MS, addressed_to) is Outcome.REFUSED
    assert actuators.setpoints("pump-001") == {"speed": 1480.0}
    assert actuators.setpoints("motor-001") == {"enable": True}
    assert actuators.counts() == {"applied": 0, "repeated": 0, "expired": 0, "refused": 1}


def test_allowed_values_and_the_addressed_channel_pass(actuators: Actuators) -> None:
    assert actuators.problem(_command(value=600.0)) is None
    assert actuators.problem(_command(value=1800.0), "pump-001") is None
    stop = _command("stop", entity_id="motor-001", setpoint="enable", value=False)
    assert actuators.apply(stop, NOW_MS, addressed_to="motor-001") is Outcome.APPLIED
    assert actuators.setpoints("motor-001") == {"enable": False}


def test_memory_of_applied_ids_is_bounded(model: TwinModel) -> None:
    actuators = Actuators(model, ENTITIES, memory=3)
    for n in range(4):
        speed = 1000.0 + n
        assert actuators.apply(_command(f"c-{n}", value=speed), NOW_MS) is Outcome.APPLIED
    # The three newest are remembered; the oldest was forgotten to make room.
    for n in (1, 2, 3):
        assert actuators.apply(_command(f"c-{n}"), NOW_MS) is Outcome.REPEATED
    assert actuators.apply(_command("c-0", value=1000.0), NOW_MS) is Outcome.APPLIED
    with pytest.raises(ValueError, match="memory must be at least 1"):
        Actuators(model, ENTITIES, memory=0)


def test_a_mapping_handed_out_never_changes_afterwards(actuators: Actuators) -> None:
    before = actuators.setpoints("pump-001")
    actuators.apply(_command(value=1000.0), NOW_MS)
    assert before == {"speed": 1480.0}
    assert actuators.setpoints("pump-001") == {"speed": 1000.0}


def test_it_pickles_with_its_values_memory_and_counts(actuators: Actuators) -> None:
    actuators.apply(_command(value=1000.0), NOW_MS)
    copy = pickle.loads(pickle.dumps(actuators))
    assert copy.setpoints("pump-001") == {"speed": 1000.0}
    assert copy.apply(_command(value=1000.0), NOW_MS) is Outcome.REPEATED
    assert copy.counts() == {"applied": 1, "repeated": 1, "expired": 0, "refused": 0}
    assert actuators.counts()["repeated"] == 0


def test_values_take_the_setpoints_type() -> None:
    model = TwinModel.model_validate(
        {
            "version": 1,
            "asset_types": {
                "valve": {
                    "sensors": {
                        "position": {
                            "unit": "%",
                            "range": [0, 100],
                            "max_rate": 50,
                            "stuck_after_s": 30,
                        },
                    },
                    "setpoints": {
                        "steps": {"type": "int", "range": [0, 10], "default": 2},
                        "opening": {"type": "float", "range": [0, 100], "default": 50},
                    },
                }
            },
            "entities": [{"id": "v-1", "type": "valve", "site": "s", "line": "l"}],
        }
    )
    actuators = Actuators(model, ["v-1"])
    assert actuators.setpoints("v-1") == {"steps": 2, "opening": 50.0}
    assert isinstance(actuators.setpoints("v-1")["steps"], int)
    steps = _command("s", entity_id="v-1", setpoint="steps", value=7.0)
    assert actuators.apply(steps, NOW_MS) is Outcome.APPLIED
    assert actuators.setpoints("v-1")["steps"] == 7
    assert isinstance(actuators.setpoints("v-1")["steps"], int)
    half = _command("h", entity_id="v-1", setpoint="steps", value=2.5)
    assert actuators.apply(half, NOW_MS) is Outcome.REFUSED
