"""``twinflow demo``: the whole pipeline running, with a live view and a summary.

The simulator replays the last hours of the plant faster than real time, so the
per-entity models finish their warm-up and the injected faults show up within a few
minutes; its readings are timestamped in the past and end at "now". The summary grades
the run's alarms (read back from the ``alarms`` table) against the simulator's ground
truth with the matcher of :mod:`twinflow.sim.scoring`, the detection benchmark's.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from connectors.questdb import QuestDBError, QuestDBHttp
from twinflow.bridges.mqtt import MqttBridge
from twinflow.errors import TwinflowError
from twinflow.runner import prepare_outputs
from twinflow.settings import Settings
from twinflow.sim import scoring
from twinflow.sim.messages import DataFaultPlan
from twinflow.sim.run import SimulateOptions, simulate
from twinflow.sim.scenario import ScenarioConfig
from twinflow.tables import Tables, tables
from twinflow.twin_model import TwinModel

VIEW_EVERY_S = 3.0
DRAIN_S = 20.0
"""After the plant stops: time for the last windows to close (idle close is 15 s)."""
ALARM_COLUMNS = ("ts", "entity", "alarm_id", "event", "start", '"end"', "top_sensors")
"""What the summary reads of each alarm transition (``end`` is an SQL keyword)."""
ACTIVE_SHOWN = 3
"""Active alarms the live view lists (the newest)."""


def run_demo(
    settings: Settings,
    model: TwinModel,
    *,
    hours: float,
    speed: float,
    entities: int,
    console: Console,
) -> str:
    """Run plant, bridge and flow until the simulated hours are played; return a summary."""
    prepare_outputs(settings)
    names = tables(settings.questdb.table_prefix)
    log_dir = settings.state_dir / "demo"
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "flow.log").open("w") as flow_log:
        flow = subprocess.Popen(
            [sys.executable, "-m", "twinflow", "run"],
            stdout=flow_log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    bridge = MqttBridge(settings, model)
    stop = threading.Event()
    bridging = threading.Thread(target=bridge.run, args=(stop,), name="mqtt-bridge")
    bridging.start()
    truth: dict[str, Any] = {}
    try:
        if not bridge.subscribed.wait(30):
            raise TwinflowError("the MQTT bridge did not subscribe within 30 s")
        start = datetime.now(UTC) - timedelta(hours=hours)
        plant = threading.Thread(
            target=lambda: truth.update(
                simulate(
                    settings,
                    model,
                    ScenarioConfig(
                        start_ms=int(start.timestamp() * 1000),
                        duration_s=hours * 3600,
                        rate=entities * 5 / 2.0,  # a reading per sensor every 2 s
                        entities=min(entities, len(model.entities)),
                    ),
                    DataFaultPlan(),
                    SimulateOptions(
                        speed=speed,
                        ground_truth_file=settings.state_dir / "sim" / "demo-truth.json",
                    ),
                )
            ),
            name="plant",
        )
        console.print(
            f"simulating {entities} machines, {hours:g} h of plant time at {speed:g}x "
            f"(about {hours * 3600 / speed:.0f} s); flow log: {log_dir / 'flow.log'}"
        )
        plant.start()
        sql = QuestDBHttp(settings.questdb, timeout_s=10)
        drained_at: float | None = None
        while drained_at is None or time.monotonic() < drained_at:
            if flow.poll() is not None:
                raise TwinflowError(f"the twin flow stopped; see {log_dir / 'flow.log'}")
            time.sleep(VIEW_EVERY_S)
            console.print(_view(sql, names, bridge, start))
            if drained_at is None and not plant.is_alive():
                drained_at = time.monotonic() + DRAIN_S
    finally:
        stop.set()
        bridging.join()
        if flow.poll() is None:
            os.kill(flow.pid, signal.SIGINT)
            try:
                flow.wait(60)
            except subprocess.TimeoutExpired:
                flow.kill()  # by its PID; never leave a flow running behind the demo
                flow.wait()
                raise TwinflowError(
                    f"the twin flow did not stop within 60 s of SIGINT and was killed; "
                    f"see {log_dir / 'flow.log'}"
                ) from None
    alarm_rows, unread = _alarm_rows(QuestDBHttp(settings.questdb, timeout_s=10), names, start)
    return summarize(
        truth,
        alarm_rows,
        forwarded=bridge.stats.forwarded,
        dead_lettered=bridge.stats.dead_lettered,
        window_ms=round(settings.flow.window_s * 1000),
        warmup_windows=settings.detection.detector_config().warmup_windows,
        truth_file=settings.state_dir / "sim" / "demo-truth.json",
        unread=unread,
    )


def summarize(
    truth: Mapping[str, Any],
    alarm_rows: Sequence[Sequence[Any]],
    *,
    forwarded: int,
    dead_lettered: int,
    window_ms: int,
    warmup_windows: int,
    truth_file: Path,
    unread: str | None = None,
) -> str:
    """The demo's closing summary: what was played, bridged, and found.

    ``truth``: the simulator's ground truth (:func:`~twinflow.sim.run.simulate`);
    ``alarm_rows``: the run's alarm transitions as :data:`ALARM_COLUMNS` (timestamps as
    QuestDB's ISO strings, or epoch milliseconds); ``unread``: why they could not be
    read, if they could not. Faults are detected by an alarm overlapping them, false
    alarms counted after the detector's warm-up (``warmup_windows`` windows of
    ``window_ms``), as :mod:`twinflow.sim.scoring` defines them.
    """
    counts = truth.get("counts", {})
    lines = [
        f"plant: {counts.get('messages', 0)} MQTT messages, {counts.get('valid_readings', 0)} "
        f"valid readings; bridge: {forwarded} to Kafka, {dead_lettered} dead letters."
    ]
    scenario = truth.get("scenario")
    if unread is not None:
        lines.append(f"detection: alarms not read ({unread}).")
    elif scenario:
        lines.append(_detection(truth["faults"], scenario, alarm_rows, window_ms, warmup_windows))
    lines.append(f"Ground truth: {truth_file}")
    return "\n".join(lines)


def _detection(
    faults: Sequence[Mapping[str, Any]],
    scenario: Mapping[str, Any],
    alarm_rows: Sequence[Sequence[Any]],
    window_ms: int,
    warmup_windows: int,
) -> str:
    start_ms = int(scenario["start_ms"])
    warmup_ms = warmup_windows * window_ms
    transitions = [
        scoring.Transition(
            alarm_id=str(alarm_id),
            entity_id=str(entity),
            event=str(event),
            ts_ms=_epoch_ms(ts),
            start_ms=_epoch_ms(begin),
            end_ms=None if end is None else _epoch_ms(end),
            top_sensor=str(top).split(",")[0] if top else None,
        )
        for ts, entity, alarm_id, event, begin, end, top in alarm_rows
    ]
    result = scoring.score(
        faults,
        scoring.fold_alarms(transitions),
        scenario["entities"],
        monitored_from_ms=start_ms + warmup_ms,
        end_ms=start_ms + round(float(scenario["duration_s"]) * 1000),
        window_ms=window_ms,
    )
    injected = sum(result.injected.values())
    text = f"detection: {injected} process fault{_s(injected)} injected"
    skipped = sum(result.before_monitoring.values())
    if skipped:
        text += f" ({skipped} more during the {warmup_ms / 60_000:g}-min warm-up, not scored)"
    if injected:
        by_kind = ", ".join(f"{k} {result.detected[k]}/{n}" for k, n in result.injected.items())
        delays = [delay for kind in result.delays_ms.values() for delay in kind]
        median = f"; median delay {statistics.median(delays) / 1000:.0f} s" if delays else ""
        text += f", {sum(result.detected.values())} detected by an alarm ({by_kind}{median})"
    rate = result.false_alarms_per_entity_hour
    text += f", {result.false_alarms} false alarm{_s(result.false_alarms)}"
    text += f" ({rate:.2f} per entity-hour)" if rate is not None else " (no monitored time)"
    return (
        f"{text}; alarms raised: {result.alarms} ({sum(result.in_sensor.values())} in sensor "
        f"faults, {result.in_margin} in recovery margins)."
    )


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _epoch_ms(value: str | int) -> int:
    """Epoch milliseconds of a QuestDB timestamp (ISO text) or of a number of them."""
    if isinstance(value, int):
        return value
    return round(datetime.fromisoformat(value).timestamp() * 1000)


def _since(start: datetime) -> str:
    """The filter on a run's rows: from its simulated start on (tables keep older runs)."""
    return f"WHERE ts >= '{start.isoformat().replace('+00:00', 'Z')}'"


def _alarm_rows(
    sql: QuestDBHttp, names: Tables, since: datetime
) -> tuple[tuple[tuple[Any, ...], ...], str | None]:
    """The run's alarm transitions, or why they could not be read."""
    try:
        return sql.exec(
            f"SELECT {', '.join(ALARM_COLUMNS)} FROM '{names.alarms.name}' {_since(since)}"  # noqa: S608
        ).rows, None
    except QuestDBError as exc:
        return (), str(exc)


def _view(sql: QuestDBHttp, names: Tables, bridge: MqttBridge, since: datetime) -> Table:
    """Figures of the current run: rows from its simulated start on (tables keep older runs)."""
    after = _since(since)
    table = Table(title=f"twinflow live — {datetime.now(UTC):%H:%M:%S} UTC", show_lines=False)
    table.add_column("what")
    table.add_column("now")
    try:
        readings = sql.exec(f"SELECT count() FROM '{names.readings.name}' {after}").rows[0][0]  # noqa: S608
        statuses = sql.exec(
            "SELECT status, count() FROM "  # noqa: S608
            f"(SELECT * FROM '{names.twin_state.name}' {after} LATEST ON ts PARTITION BY entity) "
            "GROUP BY status ORDER BY status"
        ).rows
        latest = sql.exec(
            f"SELECT ts, entity, score, threshold, top_sensors FROM '{names.anomalies.name}' "  # noqa: S608
            f"{after} ORDER BY ts DESC LIMIT 4"
        ).rows
        # An entity has one incident at a time: its latest transition says if it is active.
        active = sql.exec(
            "SELECT entity, start, top_sensors FROM "  # noqa: S608
            f"(SELECT * FROM '{names.alarms.name}' {after} LATEST ON ts PARTITION BY entity) "
            "WHERE active ORDER BY start DESC"
        ).rows
    except QuestDBError as exc:
        table.add_row("QuestDB", f"not answering: {exc}")
        return table
    table.add_row("bridged to Kafka", f"{bridge.stats.forwarded} messages")
    table.add_row("readings in QuestDB", str(readings))
    table.add_row("entities by status", ", ".join(f"{s}: {n}" for s, n in statuses) or "-")
    table.add_row("active alarms", _active(active))
    for ts, entity, score, threshold, top in latest:
        table.add_row("anomaly", f"{ts[:19]} {entity} score {score:.1f} > {threshold:.1f}: {top}")
    return table


def _active(rows: Sequence[Sequence[Any]]) -> str:
    """Active alarms: how many, and the newest with their entity and top sensors.

    >>> _active([("pump-003", "2026-10-26T01:40:00.000000Z", "vibration_rms,bearing_temp")])
    '1: pump-003 since 01:40:00 (vibration_rms,bearing_temp)'
    >>> _active([])
    '0'
    """
    newest = [
        f"{entity} since {str(start)[11:19]} ({top or '-'})"
        for entity, start, top in rows[:ACTIVE_SHOWN]
    ]
    more = f", {len(rows) - ACTIVE_SHOWN} more" if len(rows) > ACTIVE_SHOWN else ""
    return f"{len(rows)}: " + "; ".join(newest) + more if rows else "0"
