"""Waiting out a server's outage: back-off, give-up, and what is not waited out."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from connectors.outage import MAX_DELAY_S, OutageWait, SinkGaveUpError


class _Clock:
    """Time that passes only when the waiter sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _Down(Exception):
    pass


def _failing(times: int, error: Exception) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def write() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "written"

    return calls, write


def _waiter(clock: _Clock, give_up_s: float = 900) -> OutageWait:
    return OutageWait("questdb", "QuestDB at test", give_up_s, clock=clock, sleep=clock.sleep)


def test_a_transient_failure_is_retried_with_doubling_bounded_delays() -> None:
    clock = _Clock()
    calls, write = _failing(8, _Down("connection refused"))
    result = _waiter(clock).attempt(write, lambda exc: isinstance(exc, _Down))
    assert result == "written"
    assert len(calls) == 9
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, MAX_DELAY_S, MAX_DELAY_S, MAX_DELAY_S]


def test_other_errors_raise_at_once() -> None:
    clock = _Clock()
    calls, write = _failing(1, ValueError("bad row"))
    with pytest.raises(ValueError, match="bad row"):
        _waiter(clock).attempt(write, lambda exc: isinstance(exc, _Down))
    assert len(calls) == 1 and clock.sleeps == []


def test_it_gives_up_after_the_setting_naming_it() -> None:
    clock = _Clock()
    _, write = _failing(10_000, _Down("connection refused"))
    with pytest.raises(SinkGaveUpError) as raised:
        _waiter(clock, give_up_s=60).attempt(write, lambda exc: isinstance(exc, _Down))
    message = str(raised.value)
    assert "unavailable for 60 s" in message
    assert "connection refused" in message
    assert "TWINFLOW_FLOW__SINK_GIVE_UP_S" in message
    # The last sleep is cut to end exactly at the limit, not a back-off step past it.
    assert clock.now == 60
    assert isinstance(raised.value.__cause__, _Down)


def test_the_waiting_gauge_is_up_during_an_outage_only() -> None:
    clock = _Clock()
    seen: list[float | None] = []

    def write() -> str:
        seen.append(REGISTRY.get_sample_value("twinflow_sink_waiting", {"sink": "questdb"}))
        if len(seen) < 3:
            raise _Down("down")
        return "written"

    retries = REGISTRY.get_sample_value("twinflow_sink_retries_total", {"sink": "questdb"}) or 0
    _waiter(clock).attempt(write, lambda exc: isinstance(exc, _Down))
    assert seen == [0.0, 1.0, 1.0]
    assert REGISTRY.get_sample_value("twinflow_sink_waiting", {"sink": "questdb"}) == 0
    after = REGISTRY.get_sample_value("twinflow_sink_retries_total", {"sink": "questdb"})
    assert after == retries + 2
