"""Detached service processes tracked by PID files.

A PID file records the PID together with the kernel's start time of that process, so a
recycled PID is never mistaken for our service and never signalled. Stopping signals
exactly that PID; nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from twinflow.errors import ServiceError


def _proc_stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses; it ends at the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks since boot, else None."""
    fields = _proc_stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a process has used, every thread included; None if gone."""
    fields = _proc_stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP listener could bind ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Servers bind with SO_REUSEADDR, so closed connections lingering in TIME_WAIT do
        # not block them; only another listener does. Probe the same way.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _reap(pid: int) -> None:
    # When the caller itself started the process (tests, `demo`), a dead child stays a
    # zombie until waited for; reap it so its PID and ports are really released.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass(frozen=True)
class PidFile:
    """Where a service's PID is kept, and the live process it names (if any)."""

    path: Path

    def live_pid(self) -> int | None:
        """The recorded PID if that very process is still running; clears stale files."""
        try:
            record = json.loads(self.path.read_text())
            pid, ticks = int(record["pid"]), int(record["start_ticks"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            self.path.unlink(missing_ok=True)
            return None
        _reap(pid)
        if process_start_ticks(pid) != ticks:
            self.path.unlink(missing_ok=True)
            return None
        return pid

    def record(self, pid: int, argv: Sequence[str]) -> None:
        """Remember ``pid`` (with its start time, to survive PID reuse)."""
        ticks = process_start_ticks(pid)
        if ticks is None:
            raise ServiceError(f"process {pid} exited before it could be recorded")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "start_ticks": ticks, "argv": list(argv)}))
        tmp.replace(self.path)


def spawn(argv: Sequence[str], *, cwd: Path, log_file: Path, pid_file: PidFile) -> int:
    """Start ``argv`` detached from this terminal, output appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        try:
            child = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ServiceError(f"cannot start {argv[0]}: {exc.strerror}") from exc
    pid_file.record(child.pid, argv)
    return child.pid


def terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM ``pid``, wait up to ``timeout_s``, then SIGKILL; return once it is gone."""
    start_ticks = process_start_ticks(pid)
    if start_ticks is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, start_ticks, timeout_s):
        return
    crash(pid)


def crash(pid: int) -> None:
    """SIGKILL ``pid`` (no shutdown at all, as a power cut would); return once it is gone."""
    start_ticks = process_start_ticks(pid)
    if start_ticks is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, start_ticks, 10.0):
        raise ServiceError(f"process {pid} survived SIGKILL")


def _wait_gone(pid: int, start_ticks: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if process_start_ticks(pid) != start_ticks:
            return True
        time.sleep(0.1)
    return False


def log_tail(log_file: Path, lines: int = 15) -> str:
    """The last lines of a service log, for error messages."""
    try:
        text = log_file.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])
