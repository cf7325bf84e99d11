"""One root exception, so the CLI can turn any expected failure into a clear message."""


class TwinflowError(Exception):
    """A failure the user can act on; its message says what to do next."""


class ConfigError(TwinflowError):
    """A setting is missing or invalid; the message names it and how to fix it."""


class ProvisionError(TwinflowError):
    """A tool, package or jar twinflow needs could not be installed or found."""


class ServiceError(TwinflowError):
    """A local service could not be started, checked or stopped."""
