"""The ``twinflow`` command line: one entry point for every job."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from twinflow import smoke
from twinflow.errors import ConfigError, TwinflowError
from twinflow.services import manager
from twinflow.settings import Settings, load_settings

app = typer.Typer(
    help="twinflow: stream processing for industrial digital twins.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ServiceNames = Annotated[
    list[str] | None,
    typer.Argument(help=f"services to act on (default: all of {', '.join(manager.SERVICE_NAMES)})"),
]


class _Context:
    config_file: Path | None = None
    settings: Settings | None = None


_context = _Context()


def _settings() -> Settings:
    if _context.settings is None:
        _context.settings = load_settings(_context.config_file)
        level = _context.settings.log_level
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        # librdkafka warns about every retry it recovers from by itself (a broker still
        # loading, a coordinator moving); those are worth seeing only when debugging.
        logging.getLogger("twinflow.librdkafka").setLevel(
            logging.DEBUG if level == "DEBUG" else logging.ERROR
        )
    return _context.settings


def _progress(message: str) -> None:
    err.print(f"[dim]•[/dim] {message}", highlight=False)


@app.callback()
def _root(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML settings file (or TWINFLOW_CONFIG)")
    ] = None,
) -> None:
    _context.config_file = config
    _context.settings = None


@app.command()
def config() -> None:
    """Print the effective settings, secrets masked."""
    out.print_json(json.dumps(_settings().masked()))


@app.command()
def setup() -> None:
    """Install what the local services need (Debian packages, Kafka and QuestDB jars)."""
    settings = _settings()
    manager.ensure_private_dir(settings.state_dir)
    for service in manager.services(settings):
        service.prepare(_progress)
    out.print("setup complete")


@app.command()
def up(names: ServiceNames = None) -> None:
    """Start the local services on 127.0.0.1 and wait until they are healthy."""
    settings = _settings()
    with err.status("starting services…"):
        manager.up(settings, names or [], _progress)
    _print_status(manager.status(settings, names or []))


@app.command()
def down(names: ServiceNames = None) -> None:
    """Stop the local services that `up` started (by PID)."""
    manager.down(_settings(), names or [], _progress)


@app.command()
def status(
    names: ServiceNames = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show each local service: health, PID, memory, ports. Exit 1 unless all are healthy."""
    rows = manager.status(_settings(), names or [])
    if as_json:
        out.print_json(json.dumps([_status_dict(row) for row in rows]))
    else:
        _print_status(rows)
    if any(row.state is not manager.State.HEALTHY for row in rows):
        raise typer.Exit(1)


@app.command()
def demo() -> None:
    """Bring the services up and prove each with a real round trip."""
    settings = _settings()
    with err.status("starting services…"):
        manager.up(settings, [], _progress)
    run_id = uuid.uuid4().hex[:12]
    smoke.kafka_round_trip(settings, "twinflow.smoke", run_id.encode())
    _progress("Kafka: produced and consumed a message on twinflow.smoke")
    lag_ms = smoke.questdb_round_trip(settings, run_id, 42.0)
    _progress(f"QuestDB: row written over ILP/HTTP, visible to SQL after {lag_ms} ms")
    smoke.mqtt_round_trip(settings, f"twinflow/smoke/{run_id}", run_id.encode())
    _progress("MQTT: QoS 1 message published and received")
    _print_status(manager.status(settings))
    out.print(
        f"QuestDB console: {settings.questdb.http_url}   "
        "Services keep running; stop them with `twinflow down` (or `make down`)."
    )


def _status_dict(row: manager.ServiceStatus) -> dict[str, object]:
    return {
        "name": row.name,
        "state": row.state.value,
        "pid": row.pid,
        "rss_bytes": row.rss_bytes,
        "ports": row.ports,
        "endpoints": row.endpoints,
        "log_file": row.log_file,
    }


def _print_status(rows: list[manager.ServiceStatus]) -> None:
    table = Table(title="twinflow services")
    for column in ("service", "state", "pid", "RSS", "listening on"):
        table.add_column(column)
    colours = {"healthy": "green", "unhealthy": "yellow", "stopped": "red"}
    for row in rows:
        rss = f"{row.rss_bytes / 2**20:.0f} MiB" if row.rss_bytes else "-"
        table.add_row(
            row.name,
            f"[{colours[row.state.value]}]{row.state.value}[/]",
            str(row.pid or "-"),
            rss,
            "\n".join(row.endpoints),
        )
    out.print(table)
    if rows:
        out.print(f"logs: {Path(rows[0].log_file).parent.parent}/<service>/<service>.log")


def main() -> None:
    """Run the CLI; expected failures print one clear message and exit non-zero."""
    try:
        app()
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc}", highlight=False)
        raise SystemExit(2) from None
    except TwinflowError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise SystemExit(1) from None
