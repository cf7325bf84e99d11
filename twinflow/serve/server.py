"""Run ``twinflow serve``: the API and the viewer page under uvicorn until interrupted."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from connectors.kafka import ensure_topics
from twinflow import metrics
from twinflow.errors import ConfigError
from twinflow.serve.app import create_app, served
from twinflow.serve.live import LiveTwin
from twinflow.services.tls import local_certificates, tls_files
from twinflow.settings import Settings
from twinflow.topics import control_topics, output_topics
from twinflow.twin_model import TwinModel

log = logging.getLogger(__name__)


def viewer_assets(settings: Settings) -> Path:
    """Where ``twinflow setup`` puts the page's chart library (built from npm)."""
    return settings.state_dir / "viewer"


def url(settings: Settings) -> str:
    """The viewer page's address."""
    host = settings.serve.host
    shown = f"[{host}]" if ":" in host else host
    return f"{settings.serve.scheme}://{shown}:{settings.serve.port}/"


def tls_options(settings: Settings) -> tuple[str | None, str | None]:
    """The certificate chain and key files to serve HTTPS with; None, None for HTTP.

    Pointed at the local certificate (STATE_DIR/tls/server.pem and server.key), they are
    made or renewed here like ``twinflow up`` does for the brokers.
    """
    serve = settings.serve
    if serve.ssl_certfile is None or serve.ssl_keyfile is None:
        return None, None
    local = tls_files(settings.state_dir)
    if (serve.ssl_certfile, serve.ssl_keyfile) == (local.chain, local.key):
        local_certificates(settings.state_dir, settings.tls.server_names, log.info)
    for name, path in (("SSL_CERTFILE", serve.ssl_certfile), ("SSL_KEYFILE", serve.ssl_keyfile)):
        if not path.is_file():
            raise ConfigError(
                f"TWINFLOW_SERVE__{name}={path} is not an existing file; point it at a PEM "
                f"file, or at {local.chain} and {local.key} to have twinflow make them"
            )
    return str(serve.ssl_certfile), str(serve.ssl_keyfile)


def build_server(settings: Settings, model: TwinModel) -> uvicorn.Server:
    """A uvicorn server for the API over a live twin of ``model`` (not started)."""
    # The view reads twin.state and twin.alarms; the API writes the back channel.
    ensure_topics(
        settings.kafka, [*output_topics(settings.topics), *control_topics(settings.topics)]
    )
    certfile, keyfile = tls_options(settings)
    app = create_app(settings, LiveTwin(settings, model), viewer_assets(settings))
    config = uvicorn.Config(
        served(app),
        host=settings.serve.host,
        port=settings.serve.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="on",
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
    return uvicorn.Server(config)


def run_server(settings: Settings, model: TwinModel) -> None:
    """Serve until SIGINT or SIGTERM."""
    server = build_server(settings, model)
    log.info("twinflow serve at %s", url(settings))
    with metrics.serving(settings.metrics, settings.metrics.serve_port, "serve_port"):
        server.run()
