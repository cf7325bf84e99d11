"""Recipe 11: the recovery store (pickled state) and the state folder are private."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twinflow.errors import ConfigError
from twinflow.runner import recovery_config
from twinflow.services.manager import ensure_private_dir
from twinflow.settings import load_settings

pytestmark = [pytest.mark.chaos]


@pytest.fixture
def open_umask() -> object:
    """A umask that would leave new folders readable by everyone."""
    previous = os.umask(0o000)
    yield
    os.umask(previous)


def test_recovery_store_and_state_folder_are_created_0700(
    tmp_path: Path, open_umask: object
) -> None:
    state = tmp_path / "state"
    ensure_private_dir(state)
    settings = load_settings(state_dir=state)
    config = recovery_config(settings)
    assert config is not None
    store = Path(config.db_dir)
    assert store == state / "recovery"
    assert state.stat().st_mode & 0o777 == 0o700
    assert store.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in store.iterdir()) == [
        *(f"part-{i}.sqlite3" for i in range(4)),
        "twinflow-store.json",
    ]


def test_a_recovery_store_others_can_read_is_refused(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    config = recovery_config(settings)
    assert config is not None
    os.chmod(config.db_dir, 0o755)
    with pytest.raises(ConfigError, match=r"readable by others.*chmod 700"):
        recovery_config(settings)
