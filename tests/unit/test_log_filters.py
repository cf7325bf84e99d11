"""A flood of one line, let through once per interval with a count."""

from __future__ import annotations

import logging

from twinflow.log_filters import RepeatedLines


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("twinflow.librdkafka", logging.ERROR, __file__, 1, message, (), None)


def test_lines_differing_only_in_numbers_are_shown_once_per_interval_with_a_count() -> None:
    now = [0.0]
    lines = RepeatedLines(interval_s=30, clock=lambda: now[0])
    refused = "FAIL [rdkafka#consumer-{}] 127.0.0.1:{}: Connection refused (after {}ms)"
    shown = []
    for i in range(100):
        now[0] = i * 0.5
        record = _record(refused.format(i, 30493, i % 7))
        if lines.filter(record):
            shown.append(record.getMessage())
    other = _record("FAIL: SSL handshake failed")
    assert lines.filter(other)
    assert len(shown) == 2  # at 0 s and at 30 s
    assert shown[0] == refused.format(0, 30493, 0)
    assert shown[1].endswith("(59 more like it in the last 30 s)")
