"""Helpers shared by the harnesses' result files."""

from __future__ import annotations

from typing import Any


def plain(value: Any) -> Any:
    """``value`` with every ``str`` subclass (an enum member) turned into a plain ``str``.

    >>> from schemas.outputs import AlarmEvent
    >>> plain({"event": AlarmEvent.RAISED, "nested": {"n": 3}})
    {'event': 'raised', 'nested': {'n': 3}}
    """
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, str) else value
