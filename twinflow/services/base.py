"""What every local service provides to the manager."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from twinflow.services.process import PidFile
from twinflow.services.provision import Progress
from twinflow.settings import Settings


class LocalService(ABC):
    """One server run on loopback from the state folder."""

    name: str

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.state_dir / self.name
        self.pid_file = PidFile(self.home / f"{self.name}.pid")
        self.log_file = self.home / f"{self.name}.log"

    @abstractmethod
    def ports(self) -> dict[str, int]:
        """Ports this service binds on 127.0.0.1, keyed by their setting name."""

    @abstractmethod
    def prepare(self, progress: Progress) -> list[str]:
        """Install what is missing, write the config; return the argv that starts it."""

    @abstractmethod
    def healthy(self) -> bool:
        """Whether the service answers a real request now (never raises)."""

    @abstractmethod
    def endpoints(self) -> list[str]:
        """Human-readable addresses where clients reach the service."""

    @property
    def workdir(self) -> Path:
        """Folder the process is started in."""
        return self.home
