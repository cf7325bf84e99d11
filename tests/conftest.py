"""Shared fixtures: the real local services, started once per session or reused."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

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
    """Kafka, QuestDB and Mosquitto up and healthy; stops at the end only what it started."""
    started = manager.up(settings, [], log.info)
    yield settings
    if started:
        manager.down(settings, started, log.info)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topics and tables, so tests never share data."""
    return uuid.uuid4().hex[:10]
