"""The C allocator of this process: what it holds, and giving freed memory back.

glibc's malloc keeps freed memory in its arenas for reuse and returns it to the system
only from the top of a heap. A process whose demand comes in bursts keeps the RSS of
its largest burst: the flow's bursts are the buffers of a recovery snapshot and the
batches in flight while it lags (in a soak its RSS floor crept up while the bytes it
had in use did not). ``malloc_trim(0)``
returns the free pages of every arena (since glibc 2.8, not only the top), so a process
that trims now and then has an RSS that follows what it holds.

Python's small objects (512 bytes or less) do not come from malloc but from pymalloc's
1-MiB arenas, which go back to the system only when every block in them is free; no trim
reaches them. :func:`python_arenas` reads their totals, so that a process's RSS can be
split into what malloc holds, what pymalloc holds and what the objects in it use.

Elsewhere than glibc (musl, macOS) the functions are missing: nothing is measured and
nothing is trimmed.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("twinflow.allocator")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)
    if not (hasattr(libc, "mallinfo2") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.mallinfo2.argtypes = []
    libc.malloc_trim.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


_LIBC = _glibc()


def _memstream() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)
    if not (
        hasattr(libc, "open_memstream") and hasattr(ctypes.pythonapi, "_PyObject_DebugMallocStats")
    ):
        return None
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    ctypes.pythonapi._PyObject_DebugMallocStats.argtypes = [ctypes.c_void_p]
    ctypes.pythonapi._PyObject_DebugMallocStats.restype = ctypes.c_int
    return libc


_STREAMS = _memstream()
_ARENAS = re.compile(r"^(\d+) arenas \* (\d+) bytes/arena", re.MULTILINE)
_HIGHWATER = re.compile(r"^# arenas highwater mark\s*=\s*([\d,]+)", re.MULTILINE)
_IN_BLOCKS = re.compile(r"^# bytes in allocated blocks\s*=\s*([\d,]+)", re.MULTILINE)


@dataclass(frozen=True)
class Heap:
    """Bytes the allocator has handed out (arenas and mapped blocks), and bytes it keeps free.

    Free bytes stay counted after a trim has returned their pages: the RSS tells which.
    """

    in_use: int
    free: int


def heap() -> Heap | None:
    """The allocator's totals over every arena; None without glibc's ``mallinfo2``."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return Heap(in_use=info.uordblks + info.hblkhd, free=info.fordblks)


@dataclass(frozen=True)
class PythonArenas:
    """The arenas of pymalloc: bytes mapped now and at most so far, bytes their live blocks use.

    A page of an arena, once touched, stays in the RSS until the whole arena is free:
    ``mapped - in_blocks`` is what fragmentation keeps.
    """

    mapped: int
    highwater: int
    in_blocks: int


def python_arenas() -> PythonArenas | None:
    """The totals of pymalloc; None when Python's objects come from elsewhere (``PYTHONMALLOC``).

    CPython prints them (``sys._debugmallocstats``) and has no other interface: they are
    printed into a memory stream and parsed. It walks every pool under the GIL, a
    fraction of a millisecond per hundred arenas.
    """
    if _STREAMS is None:
        return None
    buffer, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = _STREAMS.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        return None
    try:
        printed = ctypes.pythonapi._PyObject_DebugMallocStats(stream)
    finally:
        _STREAMS.fclose(stream)
    try:
        text = ctypes.string_at(buffer, size.value).decode("ascii", "replace")
    finally:
        _STREAMS.free(buffer)
    arenas, highwater, in_blocks = (
        pattern.search(text) for pattern in (_ARENAS, _HIGHWATER, _IN_BLOCKS)
    )
    if not (printed and arenas and highwater and in_blocks):
        return None
    arena_bytes = int(arenas[2])
    return PythonArenas(
        mapped=int(arenas[1]) * arena_bytes,
        highwater=int(highwater[1].replace(",", "")) * arena_bytes,
        in_blocks=int(in_blocks[1].replace(",", "")),
    )


def trim() -> bool:
    """Return free pages to the system; whether any were (False without glibc)."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))


@contextmanager
def trimming(every_s: float, took: Callable[[float], None]) -> Iterator[None]:
    """Trim every ``every_s`` seconds (0: never) while the block runs; ``took`` gets each duration.

    A trim locks one arena at a time while it walks its free chunks: milliseconds for
    hundreds of MiB, which a thread that allocates meanwhile waits for.
    """
    if every_s <= 0 or _LIBC is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            started = time.perf_counter()
            trim()
            took(time.perf_counter() - started)

    thread = threading.Thread(target=loop, name="malloc-trim", daemon=True)
    thread.start()
    log.info("returning freed memory to the system every %g s (flow.malloc_trim_s)", every_s)
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
