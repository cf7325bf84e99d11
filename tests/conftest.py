"""Shared fixtures: the real local services, started once per session or reused."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from twinflow.services import manager
from twinflow.settings import Settings, load_settings

log = logging.getLogger("tests.services")


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings a developer's `twinflow up` uses (environment included)."""
    return load_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Settings]:
    """Kafka, QuestDB, Mosquitto and Prometheus up and healthy; stops only what it started."""
    started = manager.up(settings, [], log.info)
    yield settings
    if started:
        manager.down(settings, started, log.info)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topics and tables, so tests never share data."""
    return uuid.uuid4().hex[:10]


_CHAOS_ROWS = pytest.StashKey[list[dict[str, object]]]()
_CHAOS_COLUMNS = ("fault", "runs", "lost", "duplicates", "mismatches", "notes")


@pytest.fixture(scope="session")
def chaos_table(request: pytest.FixtureRequest) -> list[dict[str, object]]:
    """Rows of the chaos table (fault, runs, lost, duplicates, mismatches, notes).

    A chaos recipe appends its row before asserting, so a failing recipe shows its
    numbers too; the table is printed at the end of the run and written as JSON and
    Markdown under STATE_DIR/chaos.
    """
    return request.config.stash.setdefault(_CHAOS_ROWS, [])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print and save the chaos table when chaos recipes ran."""
    rows = sorted(config.stash.get(_CHAOS_ROWS, []), key=_recipe_number)
    if not rows:
        return
    lines = [
        "| " + " | ".join(_CHAOS_COLUMNS) + " |",
        "|" + "---|" * len(_CHAOS_COLUMNS),
        *("| " + " | ".join(str(row.get(c, "")) for c in _CHAOS_COLUMNS) + " |" for row in rows),
    ]
    out = load_settings().state_dir / "chaos"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rows, indent=2, default=str))
    (out / "report.md").write_text("# twinflow chaos table\n\n" + "\n".join(lines) + "\n")
    terminalreporter.section("chaos table")
    for line in lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"written to {out}/report.md and report.json")


def _recipe_number(row: dict[str, object]) -> int:
    """A row's recipe number (its fault reads "N. ..."), for the table's order."""
    number = str(row["fault"]).split(".", 1)[0]
    return int(number) if number.isdigit() else 99
