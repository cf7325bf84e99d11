"""Run ``twinflow serve``: the API and the viewer page under uvicorn until interrupted."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from connectors.kafka import ensure_topics
from twinflow import metrics
from twinflow.serve.app import create_app, served
from twinflow.serve.live import LiveTwin
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
    return f"http://{shown}:{settings.serve.port}/"


def build_server(settings: Settings, model: TwinModel) -> uvicorn.Server:
    """A uvicorn server for the API over a live twin of ``model`` (not started)."""
    # The view reads twin.state and twin.alarms; the API writes the back channel.
    ensure_topics(
        settings.kafka, [*output_topics(settings.topics), *control_topics(settings.topics)]
    )
    app = create_app(settings, LiveTwin(settings, model), viewer_assets(settings))
    config = uvicorn.Config(
        served(app),
        host=settings.serve.host,
        port=settings.serve.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="on",
    )
    return uvicorn.Server(config)


def run_server(settings: Settings, model: TwinModel) -> None:
    """Serve until SIGINT or SIGTERM."""
    server = build_server(settings, model)
    log.info("twinflow serve at %s", url(settings))
    with metrics.serving(settings.metrics, settings.metrics.serve_port, "serve_port"):
        server.run()
