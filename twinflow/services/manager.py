"""``twinflow up | down | status``: start, stop and inspect the local services."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from twinflow.errors import ServiceError
from twinflow.services.base import LocalService
from twinflow.services.kafka import KafkaService
from twinflow.services.mosquitto import MosquittoService
from twinflow.services.process import (
    log_tail,
    port_is_free,
    rss_bytes,
    spawn,
    terminate,
)
from twinflow.services.prometheus import PrometheusService
from twinflow.services.provision import Progress
from twinflow.services.questdb import QuestDBService
from twinflow.services.serve import ServeService
from twinflow.settings import Settings, env_name

# Start order; `down` stops in reverse. Prometheus comes last: it only scrapes the others.
SERVICE_TYPES: dict[str, type[LocalService]] = {
    service.name: service
    for service in (KafkaService, QuestDBService, MosquittoService, PrometheusService)
}
SERVICE_NAMES = tuple(SERVICE_TYPES)
# Started only when named (`twinflow up serve`, the demo); `status` and `down` include
# them while they run. They come after the services they use.
OPTIONAL_TYPES: dict[str, type[LocalService]] = {ServeService.name: ServeService}
_ALL_TYPES = {**SERVICE_TYPES, **OPTIONAL_TYPES}


class State(StrEnum):
    """What ``status`` says of a service."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ServiceStatus:
    """One row of ``twinflow status``."""

    name: str
    state: State
    pid: int | None
    rss_bytes: int | None
    ports: dict[str, int]
    endpoints: list[str]
    log_file: str


def services(
    settings: Settings, names: Sequence[str] = (), *, running_optional: bool = False
) -> list[LocalService]:
    """The named services, in start order.

    No names: the default services, and with ``running_optional`` the optional ones
    that are running.
    """
    unknown = sorted(set(names) - set(_ALL_TYPES))
    if unknown:
        raise ServiceError(f"unknown service(s) {unknown}; choose from {list(_ALL_TYPES)}")
    found = [_ALL_TYPES[name](settings) for name in _ALL_TYPES if name in names]
    if names:
        return found
    optional = [kind(settings) for kind in OPTIONAL_TYPES.values()] if running_optional else []
    return [kind(settings) for kind in SERVICE_TYPES.values()] + [
        service for service in optional if service.pid_file.live_pid() is not None
    ]


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` readable by its owner only (it holds configs with secrets)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


@contextmanager
def _state_lock(settings: Settings) -> Iterator[None]:
    # Two `up`s racing (a demo and a test session) must not both spawn a broker.
    ensure_private_dir(settings.state_dir)
    with (settings.state_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def status(settings: Settings, names: Sequence[str] = ()) -> list[ServiceStatus]:
    """Health, PID and memory of each service."""
    rows = []
    for service in services(settings, names, running_optional=True):
        pid = service.pid_file.live_pid()
        if pid is None:
            state = State.STOPPED
        else:
            state = State.HEALTHY if service.healthy() else State.UNHEALTHY
        rows.append(
            ServiceStatus(
                name=service.name,
                state=state,
                pid=pid,
                rss_bytes=rss_bytes(pid) if pid else None,
                ports=service.ports(),
                endpoints=service.endpoints(),
                log_file=str(service.log_file),
            )
        )
    return rows


def up(settings: Settings, names: Sequence[str], progress: Progress) -> list[str]:
    """Start what is not running and wait until every named service is healthy.

    Returns the names of the services this call started; already running ones are left
    alone, so calling it twice is a no-op.
    """
    with _state_lock(settings):
        started: dict[str, int] = {}
        waiting: list[LocalService] = []
        for service in services(settings, names):
            if service.pid_file.live_pid() is not None:
                progress(f"{service.name}: already running")
            else:
                _check_ports_free(service)
                argv = service.prepare(progress)
                started[service.name] = spawn(
                    argv, cwd=service.workdir, log_file=service.log_file, pid_file=service.pid_file
                )
                progress(f"{service.name}: started (pid {started[service.name]})")
            waiting.append(service)
        try:
            _wait_healthy(settings, waiting, progress)
        except ServiceError:
            for service in waiting:
                if service.name in started:
                    terminate(started[service.name], settings.services.stop_timeout_s)
                    service.pid_file.path.unlink(missing_ok=True)
            raise
        return list(started)


def _check_ports_free(service: LocalService) -> None:
    for setting, port in service.ports().items():
        if not port_is_free(port):
            location = tuple(setting.split("."))
            raise ServiceError(
                f"{service.name}: port {port} on 127.0.0.1 ({setting}) is already in use by "
                f"a process twinflow did not start. Stop that process, or pick a free port "
                f"with {env_name(location)}=<port>."
            )


def _wait_healthy(settings: Settings, pending: list[LocalService], progress: Progress) -> None:
    deadline = time.monotonic() + settings.services.start_timeout_s
    remaining = list(pending)
    while remaining:
        for service in list(remaining):
            pid = service.pid_file.live_pid()
            if pid is None:
                raise ServiceError(
                    f"{service.name} exited during start-up; last lines of "
                    f"{service.log_file}:\n{log_tail(service.log_file)}"
                )
            if service.healthy():
                progress(f"{service.name}: healthy at {', '.join(service.endpoints())}")
                remaining.remove(service)
        if remaining and time.monotonic() > deadline:
            names = ", ".join(service.name for service in remaining)
            tails = "\n".join(
                f"--- {service.log_file}:\n{log_tail(service.log_file)}" for service in remaining
            )
            raise ServiceError(
                f"{names} not healthy after {settings.services.start_timeout_s:.0f} s "
                f"(TWINFLOW_SERVICES__START_TIMEOUT_S raises the limit)\n{tails}"
            )
        if remaining:
            time.sleep(0.25)


def down(settings: Settings, names: Sequence[str], progress: Progress) -> list[str]:
    """Stop exactly the processes ``up`` started (by their recorded PIDs)."""
    with _state_lock(settings):
        stopped = []
        # Reverse start order: clients of a broker go before the broker.
        for service in reversed(services(settings, names, running_optional=True)):
            pid = service.pid_file.live_pid()
            if pid is None:
                progress(f"{service.name}: not running")
                continue
            terminate(pid, settings.services.stop_timeout_s)
            service.pid_file.path.unlink(missing_ok=True)
            progress(f"{service.name}: stopped (pid {pid})")
            stopped.append(service.name)
        return stopped
