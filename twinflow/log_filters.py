"""Logging filters that keep a flood of one line readable."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

_VARYING = re.compile(r"\d+")
_MAX_KINDS = 1000


class RepeatedLines(logging.Filter):
    """Lets one line of a kind through per ``interval_s``; counts the rest.

    Lines are of a kind when they differ only in numbers (client ids, ports, timings):
    librdkafka logs each refused connection of each of the flow's clients, thousands of
    lines for a broker restart that say one thing. The next line of a kind let through
    says how many were suppressed.
    """

    def __init__(self, interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._shown: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        kind = _VARYING.sub("#", text)
        now = self._clock()
        shown = self._shown.get(kind)
        if shown is not None and now - shown < self._interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        if len(self._shown) >= _MAX_KINDS:
            self._shown.clear()
        self._shown[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            record.msg = f"{text} ({suppressed} more like it in the last {self._interval_s:g} s)"
            record.args = ()
        return True
