"""The ``twinflow`` command line: one entry point for every job."""

from __future__ import annotations

import getpass
import json
import logging
import signal
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from schemas.outputs import SetpointStatus
from twinflow import smoke
from twinflow.errors import ConfigError, TwinflowError
from twinflow.log_filters import RepeatedLines
from twinflow.services import manager
from twinflow.settings import Settings, load_settings
from twinflow.twin_model import TwinModel, load_twin_model

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
    typer.Argument(
        help=f"services to act on (default: all of {', '.join(manager.SERVICE_NAMES)}; "
        f"also: {', '.join(manager.OPTIONAL_TYPES)})"
    ),
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
        librdkafka = logging.getLogger("twinflow.librdkafka")
        librdkafka.setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
        # While a broker is down each client logs each refused reconnect (measured:
        # 15,700 lines in a minute for the flow's clients).
        if level != "DEBUG":
            librdkafka.addFilter(RepeatedLines())
        # asyncua logs every publish response at INFO; at thousands of values per second
        # that costs more than the bridging itself. aiocoap and pymodbus log every ended
        # observation and reconnect at INFO; the bridges say once per gap what happened.
        for chatty in ("asyncua", "coap", "coap-server", "pymodbus"):
            logging.getLogger(chatty).setLevel(
                logging.DEBUG if level == "DEBUG" else logging.WARNING
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
    """Install what twinflow needs: packages, jars, the viewer's charts, chromium for tests."""
    from twinflow.services.provision import ensure_executables

    settings = _settings()
    manager.ensure_private_dir(settings.state_dir)
    for service in manager.services(settings, [*manager.SERVICE_NAMES, *manager.OPTIONAL_TYPES]):
        service.prepare(_progress)
    ensure_executables(["chromium"], _progress)
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
def demo(
    hours: Annotated[float, typer.Option(help="plant time to simulate, ending now")] = 2.0,
    speed: Annotated[float, typer.Option(help="simulated seconds per wall second")] = 80.0,
    entities: Annotated[int, typer.Option(help="machines to simulate")] = 20,
) -> None:
    """The whole pipeline live: plant -> MQTT -> bridge -> Kafka -> twin flow -> QuestDB."""
    from twinflow.demo import run_demo
    from twinflow.metrics import serving
    from twinflow.serve.server import url as serve_url

    if hours <= 0 or speed <= 0 or entities < 1:
        raise ConfigError("--hours and --speed must be positive, --entities at least 1")
    settings = _settings()
    twin = load_twin_model(settings.twin_model)
    with err.status("starting services…"):
        manager.up(settings, [], _progress)
    run_id = uuid.uuid4().hex[:12]
    smoke.kafka_round_trip(settings, "twinflow.smoke", run_id.encode())
    smoke.questdb_round_trip(settings, run_id, 42.0)
    smoke.mqtt_round_trip(settings, f"twinflow/smoke/{run_id}", run_id.encode())
    _progress("Kafka, QuestDB and MQTT answered a round trip each")
    with err.status("starting twinflow serve…"):
        manager.up(settings, ["serve"], _progress)
    out.print(f"twin viewer: {serve_url(settings)} (the API is under /api/v1)")
    # The bridge and flow report through the live view; their own logs would repeat it.
    for name in ("twinflow.bridge.mqtt", "twinflow.simulate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The demo bridges MQTT in this process: it serves the MQTT bridge's metrics.
    with serving(settings.metrics, settings.metrics.mqtt_bridge_port, "mqtt_bridge_port"):
        summary = run_demo(settings, twin, hours=hours, speed=speed, entities=entities, console=out)
    out.print(summary)
    _print_status(manager.status(settings))
    out.print(
        f"Twin viewer and API: {serve_url(settings)}. "
        f"QuestDB console: {settings.questdb.http_url} (tables readings, sensor_windows, "
        "twin_state, anomalies, alarms, deadletters). Pipeline metrics: Prometheus at "
        f"http://127.0.0.1:{settings.metrics.prometheus_port} (twinflow_* series). Services "
        "keep running; stop them with `twinflow down` (or `make down`)."
    )


bridge_app = typer.Typer(help="Bridges from plant protocols into Kafka.", no_args_is_help=True)
app.add_typer(bridge_app, name="bridge")

ModelOption = Annotated[
    Path | None, typer.Option("--model", help="twin model YAML (default: the settings' twin_model)")
]


def _model(path: Path | None) -> TwinModel:
    return load_twin_model(path or _settings().twin_model)


def _until_interrupted(target: Callable[[threading.Event], None]) -> None:
    """Run ``target(stop)``; SIGINT/SIGTERM set ``stop`` so it can finish cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_args: stop.set())
    target(stop)


@bridge_app.command("mqtt")
def bridge_mqtt(model: ModelOption = None) -> None:
    """Forward MQTT telemetry (QoS 1, persistent session) into Kafka's raw topic."""
    from twinflow.bridges import mqtt as mqtt_bridge

    settings, twin = _settings(), _model(model)
    _until_interrupted(lambda stop: mqtt_bridge.run(settings, twin, stop))


@bridge_app.command("opcua")
def bridge_opcua(model: ModelOption = None) -> None:
    """Subscribe to the plant's OPC UA variables and forward changes into Kafka."""
    from twinflow.bridges import opcua as opcua_bridge

    settings, twin = _settings(), _model(model)
    _until_interrupted(lambda stop: opcua_bridge.run(settings, twin, stop))


@bridge_app.command("modbus")
def bridge_modbus(model: ModelOption = None) -> None:
    """Poll the Modbus TCP devices of the twin model's maps and forward readings into Kafka."""
    from twinflow.bridges import modbus as modbus_bridge

    settings, twin = _settings(), _model(model)
    _until_interrupted(lambda stop: modbus_bridge.run(settings, twin, stop))


@bridge_app.command("coap")
def bridge_coap(model: ModelOption = None) -> None:
    """Observe the CoAP resources of the twin model's maps and forward readings into Kafka."""
    from twinflow.bridges import coap as coap_bridge

    settings, twin = _settings(), _model(model)
    _until_interrupted(lambda stop: coap_bridge.run(settings, twin, stop))


alarms_app = typer.Typer(
    help="List the twin's alarms (from QuestDB); ack, confirm or reject one.",
    invoke_without_command=True,
)
app.add_typer(alarms_app, name="alarms")
UserOption = Annotated[
    str | None, typer.Option("--user", help="who is acting (default: the login name)")
]


@alarms_app.callback()
def alarms(
    ctx: typer.Context,
    active: Annotated[bool, typer.Option("--active", help="only the active alarms")] = False,
    entity: Annotated[str | None, typer.Option("--entity", help="one entity's alarms")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List alarms, one line each, oldest first."""
    from twinflow import operations

    if ctx.invoked_subcommand is not None:
        return
    found = operations.list_alarms(_settings(), active_only=active, entity_id=entity)
    if as_json:
        out.print_json(json.dumps(operations.table_rows(found)))
        return
    table = Table(title=f"{'active ' if active else ''}alarms")
    for column in ("alarm", "state", "since", "last event", "peak", "sensors", "verdict"):
        table.add_column(column)
    for alarm in found:
        verdict = alarm.verdict or ("acknowledged" if alarm.acknowledged else "-")
        table.add_row(
            alarm.alarm_id,
            "[red]active[/]" if alarm.active else "ended",
            operations.short_time(alarm.start),
            f"{alarm.last_event} {operations.short_time(alarm.last_ts)}",
            f"{alarm.peak_score:.1f}",
            alarm.top_sensors,
            verdict + (f" by {alarm.operator}" if alarm.operator else ""),
        )
    out.print(table)


def _judge(alarm_id: str, verdict: str, note: str, user: str | None) -> None:
    from schemas.control import Verdict
    from twinflow import operations

    sent = operations.send_verdict(
        _settings(), alarm_id, Verdict(verdict), user or getpass.getuser(), note
    )
    out.print(f"sent {verdict} for {alarm_id} as {sent.user} (feedback {sent.feedback_id})")


NoteOption = Annotated[str, typer.Option("--note", help="why, for the alarm's record")]


@alarms_app.command("ack")
def alarms_ack(alarm_id: str, note: NoteOption = "", user: UserOption = None) -> None:
    """Acknowledge an active alarm: someone is on it."""
    _judge(alarm_id, "ack", note, user)


@alarms_app.command("confirm")
def alarms_confirm(alarm_id: str, note: NoteOption = "", user: UserOption = None) -> None:
    """Confirm an active alarm as a true fault: never learned, never re-baselined."""
    _judge(alarm_id, "confirm", note, user)


@alarms_app.command("reject")
def alarms_reject(alarm_id: str, note: NoteOption = "", user: UserOption = None) -> None:
    """Reject an active alarm as false: it ends and the model learns the level as normal."""
    _judge(alarm_id, "reject", note, user)


@app.command()
def command(
    entity: str,
    setpoint: str,
    value: str,
    wait: Annotated[
        bool, typer.Option("--wait", help="exit 0 once the twin reports it in sync, else 1")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds --wait waits")] = 90.0,
    expires: Annotated[
        float, typer.Option(help="seconds after which the command must not be applied")
    ] = 60.0,
    model: ModelOption = None,
    user: UserOption = None,
) -> None:
    """Set a machine's setpoint through its twin (checked against the twin model first)."""
    from twinflow import operations

    settings, twin = _settings(), _model(model)
    sent = operations.make_command(
        twin, entity, setpoint, value, user or getpass.getuser(), expires
    )
    follower = operations.state_follower(settings) if wait else None
    try:
        operations.send_command(settings, sent)
        out.print(
            f"sent {entity} {setpoint} = {sent.value} (command {sent.command_id}, "
            f"expires in {expires:g} s)"
        )
        if follower is None:
            return
        state = operations.wait_for_command(follower, sent, timeout)
    finally:
        if follower is not None:
            follower.close()
    if state is not None and state.status is SetpointStatus.IN_SYNC:
        out.print(f"in sync: {entity} reports {setpoint} = {state.reported}")
        return
    status = "no twin state for it yet" if state is None else state.status
    detail = f" ({state.detail})" if state is not None and state.detail else ""
    err.print(f"not in sync after {timeout:g} s: {status}{detail}", highlight=False)
    raise typer.Exit(1)


deadletters_app = typer.Typer(help="Dead letters: rejected input.", no_args_is_help=True)
app.add_typer(deadletters_app, name="deadletters")


@deadletters_app.command("replay")
def deadletters_replay(
    reason: Annotated[
        list[str] | None, typer.Option("--reason", help="only letters of this reason (repeatable)")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="only letters received since: RFC 3339 time, or 30m, 2h, 1d ago"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report, send nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable report")] = False,
    model: ModelOption = None,
) -> None:
    """Re-send the original payloads of dead letters to the raw topic (after a fix)."""
    from twinflow.deadletters import parse_since, replay_dead_letters

    settings, twin = _settings(), _model(model)
    report = replay_dead_letters(
        settings,
        twin,
        reasons=set(reason or ()),
        since=parse_since(since, datetime.now(UTC)) if since else None,
        dry_run=dry_run,
        progress=_progress,
    )
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    verb = "would re-send" if dry_run else "re-sent"
    out.print(
        f"{report.letters_read} dead letters read, {report.matching} matching: "
        f"{verb} {report.resent}, {report.not_kept_whole} not kept whole, "
        f"{report.repeats_skipped} repeats skipped"
    )
    for refused_reason, refused in sorted(report.still_refused.items()):
        out.print(f"  still refused, {refused_reason}: {refused.count} (e.g. {refused.example})")


@app.command()
def run(
    model: ModelOption = None,
    workers: Annotated[int, typer.Option("-w", "--workers", help="worker threads per process")] = 1,
    process_id: Annotated[
        int | None, typer.Option("-i", "--process-id", help="this process's index in a cluster")
    ] = None,
    addresses: Annotated[
        str | None,
        typer.Option("-a", "--addresses", help="host:port of every process, ';'-separated"),
    ] = None,
) -> None:
    """Run the twin dataflow (recovery on by default) until Ctrl-C."""
    from twinflow.runner import run_flow

    if (process_id is None) != (addresses is None):
        raise ConfigError("-i/--process-id and -a/--addresses go together")
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    settings, twin = _settings(), _model(model)
    run_flow(
        settings,
        twin,
        workers=workers,
        process_id=process_id,
        addresses=addresses.split(";") if addresses else None,
    )


@app.command()
def serve(model: ModelOption = None) -> None:
    """Serve the twin API and the viewer page (serve.host, serve.port) until Ctrl-C."""
    from twinflow.serve.server import run_server, url

    settings, twin = _settings(), _model(model)
    err.print(f"twinflow serve: {url(settings)} (API under /api/v1)", highlight=False)
    run_server(settings, twin)


@app.command()
def simulate(
    model: ModelOption = None,
    entities: Annotated[int | None, typer.Option(help="first N entities of the model")] = None,
    rate: Annotated[float, typer.Option(help="readings per second, whole plant")] = 1000.0,
    duration: Annotated[float, typer.Option(help="simulated seconds")] = 60.0,
    seed: Annotated[int, typer.Option(help="same seed, same readings and faults")] = 7,
    start: Annotated[
        datetime | None, typer.Option(help="event time of the first reading, UTC (default: now)")
    ] = None,
    speed: Annotated[float, typer.Option(help="simulated seconds per wall second")] = 1.0,
    max_speed: Annotated[
        bool, typer.Option("--max-speed", help="publish as fast as possible")
    ] = False,
    mqtt: Annotated[bool, typer.Option("--mqtt/--no-mqtt", help="publish over MQTT")] = True,
    opcua: Annotated[bool, typer.Option("--opcua/--no-opcua", help="serve OPC UA")] = False,
    modbus: Annotated[
        bool, typer.Option("--modbus/--no-modbus", help="serve the model's Modbus maps")
    ] = False,
    coap: Annotated[
        bool, typer.Option("--coap/--no-coap", help="serve the model's CoAP resources")
    ] = False,
    fault_share: Annotated[
        float, typer.Option(help="share of entities with a process fault and with a sensor fault")
    ] = 0.3,
    data_faults: Annotated[
        float, typer.Option(help="multiplier of the default data-fault rates (0 = none)")
    ] = 1.0,
    batched_share: Annotated[float, typer.Option(help="share of entities sending batches")] = 0.5,
    ground_truth: Annotated[
        Path | None, typer.Option(help="where to write the ground truth (default: state folder)")
    ] = None,
    publish_ground_truth: Annotated[
        bool, typer.Option("--publish-ground-truth", help="also send faults to Kafka")
    ] = False,
) -> None:
    """Simulate the plant: correlated signals with faults, over MQTT, OPC UA, Modbus, CoAP."""
    from twinflow.sim.faults import FaultPlan
    from twinflow.sim.messages import DataFaultPlan
    from twinflow.sim.run import SimulateOptions
    from twinflow.sim.run import simulate as play
    from twinflow.sim.scenario import ScenarioConfig

    settings, twin = _settings(), _model(model)
    for name, share in (("--fault-share", fault_share), ("--batched-share", batched_share)):
        if not 0 <= share <= 1:
            raise ConfigError(f"{name} must be between 0 and 1, got {share}")
    if data_faults < 0 or speed <= 0:
        raise ConfigError("--data-faults must be >= 0 and --speed > 0")
    begin = start.replace(tzinfo=UTC) if start and start.tzinfo is None else start
    defaults = DataFaultPlan()
    plan = DataFaultPlan(
        batched_share=batched_share,
        duplicate=defaults.duplicate * data_faults,
        out_of_order=defaults.out_of_order * data_faults,
        late=defaults.late * data_faults,
        malformed=defaults.malformed * data_faults,
        unknown_entity=defaults.unknown_entity * data_faults,
    )
    config = ScenarioConfig(
        start_ms=int((begin or datetime.now(UTC)).timestamp() * 1000),
        duration_s=duration,
        rate=rate,
        entities=entities,
        seed=seed,
        faults=FaultPlan(process_fault_share=fault_share, sensor_fault_share=fault_share),
    )
    truth_file = ground_truth or settings.state_dir / "sim" / f"ground-truth-{seed}.json"
    options = SimulateOptions(
        mqtt=mqtt,
        opcua=opcua,
        modbus=modbus,
        coap=coap,
        speed=None if max_speed else speed,
        ground_truth_file=truth_file,
        ground_truth_topic=publish_ground_truth,
    )
    truth = play(
        settings,
        twin,
        config,
        plan,
        options,
        progress=lambda tally: _progress(
            f"published {tally.messages} messages, {tally.valid_readings} valid readings"
        ),
    )
    counts = truth["counts"]
    out.print_json(
        json.dumps({"ground_truth": str(truth_file), "elapsed_s": truth["elapsed_s"], **counts})
    )


@app.command()
def replay(
    input_csv: Annotated[
        Path, typer.Argument(metavar="INPUT.csv", help="a time column, then one column per sensor")
    ],
    output: Annotated[
        Path, typer.Option("--out", help="where to write timestamp,score,is_anomaly,alarm_raised")
    ],
    time_column: Annotated[
        str | None, typer.Option(help="column copied as timestamp (default: the first)")
    ] = None,
    delimiter: Annotated[
        str | None, typer.Option(help="field separator (default: ';' or ',', detected)")
    ] = None,
    exclude_columns: Annotated[
        str, typer.Option(help="comma-separated columns the model never sees, e.g. labels")
    ] = "",
    warmup: Annotated[
        int | None,
        typer.Option(help="rows learned from, never flagged (default: the flow's warm-up)"),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(help="rows per feature window (default: 1, every row scored on its own)"),
    ] = None,
) -> None:
    """Run the flow's per-entity anomaly detection over a CSV, one output row per input row."""
    # Imported here, not at the top: the detection models (River) take about a second to
    # import, which every other command would pay for nothing.
    from twinflow.replay import ReplayOptions, replay_file

    options = ReplayOptions(
        time_column=time_column,
        delimiter=delimiter,
        exclude_columns=tuple(c.strip() for c in exclude_columns.split(",") if c.strip()),
        warmup_rows=warmup,
        window_rows=ReplayOptions.window_rows if window is None else window,
    )
    summary = replay_file(input_csv, output, options)
    threshold = "none (the file ended in the warm-up)"
    if summary.threshold is not None:
        threshold = f"{summary.threshold:.4g}"
    err.print(
        f"replayed {summary.rows} rows of {len(summary.sensors)} sensors in {summary.windows} "
        f"windows of {options.window_rows} row(s); warm-up {summary.warmup_windows} windows; "
        f"threshold {threshold}; {summary.alarms} alarms raised, {summary.anomalies} rows in "
        f"alarms -> {output}",
        highlight=False,
    )


@app.command()
def bench(
    readings: Annotated[
        int, typer.Option(help="readings in the workload (late ones on top)")
    ] = 2_000_000,
    entities: Annotated[int, typer.Option(help="machines in the workload")] = 1000,
    sensors: Annotated[int, typer.Option(help="sensors per machine (1-8)")] = 6,
    partitions: Annotated[int, typer.Option(help="partitions of the raw topic")] = 4,
    single: Annotated[
        bool, typer.Option("--single", help="one reading per message instead of batched")
    ] = False,
    bad_share: Annotated[
        float, typer.Option(help="share of malformed messages and of out-of-range readings")
    ] = 0.001,
    late_share: Annotated[float, typer.Option(help="share of readings re-sent late")] = 0.001,
    seed: Annotated[int, typer.Option(help="same seed, same workload")] = 1,
    variants: Annotated[
        str | None, typer.Option(help="comma-separated variant names (default: all)")
    ] = None,
    latency_rate: Annotated[float, typer.Option(help="readings/s of the latency runs")] = 3000.0,
    latency_seconds: Annotated[float, typer.Option(help="length of each latency run")] = 10.0,
    out_dir: Annotated[Path | None, typer.Option("--out", help="report folder")] = None,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="a tiny workload: checks the harness, not the speed")
    ] = False,
    profile: Annotated[
        bool, typer.Option(help="profile twinflow (py-spy) when it misses 100,000 readings/s")
    ] = True,
) -> None:
    """Measure twinflow against its peers and the raw Kafka and QuestDB limits."""
    from benchmarks.throughput import VARIANTS, BenchOptions, run_bench
    from benchmarks.workload import WorkloadConfig

    if smoke:
        readings, entities, partitions, latency_seconds = 12_000, 20, 2, 2.0
        latency_rate = min(latency_rate, 300.0)
        # Enough bad and late readings in a small workload for the checks to bite.
        bad_share, late_share = max(bad_share, 0.01), max(late_share, 0.01)
        profile = False
    try:
        workload = WorkloadConfig(
            entities=entities,
            sensors=sensors,
            readings=readings,
            batched=not single,
            malformed_share=bad_share,
            out_of_range_share=bad_share,
            late_share=late_share,
            seed=seed,
        )
    except ValueError as exc:
        raise ConfigError(f"bench workload: {exc}") from None
    names = (
        tuple(v.strip() for v in variants.split(","))
        if variants
        else tuple(v.name for v in VARIANTS)
    )
    options = BenchOptions(
        workload=workload,
        partitions=partitions,
        variants=names,
        latency_rate=latency_rate,
        latency_seconds=latency_seconds,
        out=out_dir,
        profile=profile,
    )
    settings = _settings()
    with err.status("starting services…"):
        manager.up(settings, [], _progress)
    try:
        report = run_bench(settings, options, _progress)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out.print(report.read_text())
    _progress(f"report: {report} (+ .json, .png)")


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
