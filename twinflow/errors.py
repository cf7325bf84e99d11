"""One root exception, so the CLI can turn any expected failure into a clear message."""

from __future__ import annotations

from typing import TypeVar

_E = TypeVar("_E", bound=BaseException)


def caused_by(exc: BaseException, kind: type[_E]) -> _E | None:
    """``exc`` or the first exception of ``kind`` in its chain of causes.

    Bytewax wraps what a step raised in its own errors, with the original as the cause.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class TwinflowError(Exception):
    """A failure the user can act on; its message says what to do next."""


class ConfigError(TwinflowError):
    """A setting is missing or invalid; the message names it and how to fix it."""


class ProvisionError(TwinflowError):
    """A tool, package or jar twinflow needs could not be installed or found."""


class ServiceError(TwinflowError):
    """A local service could not be started, checked or stopped."""
