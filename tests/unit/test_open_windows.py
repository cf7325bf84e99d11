"""OpenWindows.holds: repeats of held readings are found, whatever the order."""

from __future__ import annotations

import pickle

import numpy as np

from twinflow.windows import OpenWindows


def _ints(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _held() -> OpenWindows:
    windows = OpenWindows(10_000)
    windows.add(_ints(0, 0, 1), _ints(1_000, 2_000, 1_500), np.zeros(3), _ints(0, 0, 0))
    return windows


def test_holds_finds_repeats_before_and_at_the_newest_reading() -> None:
    windows = _held()
    found = windows.holds(_ints(0, 0, 0, 1, 1, 2), _ints(1_000, 1_500, 2_000, 1_500, 3_000, 1_000))
    assert found.tolist() == [True, False, True, True, False, False]


def test_holds_forgets_readings_of_closed_windows() -> None:
    windows = _held()
    closed = windows.pop_closed(_ints(20_000, 0))  # series 0's window closes
    assert len(closed) == 2
    assert windows.holds(_ints(0, 1), _ints(1_000, 1_500)).tolist() == [False, True]


def test_a_snapshot_without_newest_times_still_finds_repeats() -> None:
    windows = _held()
    state = dict(windows.__dict__)
    del state["newest_ms"]
    restored = OpenWindows.__new__(OpenWindows)
    restored.__setstate__(state)
    assert restored.holds(_ints(0, 1), _ints(2_000, 1_500)).tolist() == [True, True]
    again = pickle.loads(pickle.dumps(restored))
    assert again.newest_ms.tolist() == [2_000, 1_500]
