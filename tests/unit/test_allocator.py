"""The C allocator's totals and trimming, on this process's glibc."""

from __future__ import annotations

import threading
import time

import pytest

from twinflow import allocator

pytestmark = pytest.mark.skipif(allocator.heap() is None, reason="the C library is not glibc")


def _anon_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


def test_the_heap_counts_what_is_handed_out_and_what_is_kept() -> None:
    before = allocator.heap()
    assert before is not None
    # 20 k buffers of 30 KB: below the mmap threshold, so they come from the arenas.
    held = [bytearray(30_000) for _ in range(20_000)]
    during = allocator.heap()
    assert during is not None and during.in_use - before.in_use >= 20_000 * 30_000
    # Free every other one: the gaps cannot go back from the top of the heap. Exactly
    # what was freed leaves the bytes in use; of the bytes kept free, a long session's
    # heap may have trimmed a part (the freed chunks next to its top).
    del held[::2]
    after = allocator.heap()
    assert after is not None and during.in_use - after.in_use >= 10_000 * 30_000
    assert after.free - during.free >= 10_000 * 30_000 / 2
    del held


def test_a_trim_returns_the_free_pages_from_the_middle_of_the_heap() -> None:
    held = [bytearray(30_000) for _ in range(20_000)]
    del held[::2]
    kept = _anon_kib()
    assert allocator.trim()
    # About 290 MiB were free between live buffers; most of it leaves the RSS.
    assert kept - _anon_kib() > 200 * 1024
    del held


def test_trimming_runs_on_its_interval_and_stops_with_the_block() -> None:
    durations: list[float] = []
    with allocator.trimming(0.05, durations.append):
        time.sleep(0.4)
    counted = len(durations)
    assert counted >= 3 and all(d >= 0 for d in durations)
    assert "malloc-trim" not in {t.name for t in threading.enumerate()}
    time.sleep(0.2)
    assert len(durations) == counted


def test_zero_means_never() -> None:
    durations: list[float] = []
    with allocator.trimming(0, durations.append):
        time.sleep(0.1)
    assert durations == [] and "malloc-trim" not in {t.name for t in threading.enumerate()}


def test_python_arenas_hold_small_objects_until_every_block_of_an_arena_is_free() -> None:
    before = allocator.python_arenas()
    if before is None:
        pytest.skip("Python's objects do not come from pymalloc (PYTHONMALLOC)")
    # Empty dicts (64-byte blocks) until the arenas grow by 8 MiB: a long session's
    # arenas have room for many first.
    held: list[dict[str, int]] = []
    while (during := allocator.python_arenas()) is not None and (
        during.mapped < before.mapped + 8 * 2**20
    ):
        held.extend({} for _ in range(100_000))
        assert len(held) < 20_000_000, "the arenas did not grow"
    assert during is not None
    assert during.in_blocks - before.in_blocks >= len(held) * 48
    assert during.highwater >= during.mapped >= during.in_blocks
    # Every other one freed: the blocks go, the arenas they shared with the others stay.
    del held[::2]
    after = allocator.python_arenas()
    assert after is not None
    assert during.in_blocks - after.in_blocks >= len(held) * 48
    assert after.mapped >= during.mapped - 2**20
    del held
