"""``twinflow demo``: the whole pipeline running, with a live view and a summary.

The simulator replays the last hours of the plant faster than real time, so the
per-entity models finish their warm-up and the injected faults show up within a few
minutes; its readings are timestamped in the past and end at "now".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from connectors.questdb import QuestDBError, QuestDBHttp
from twinflow.bridges.mqtt import MqttBridge
from twinflow.errors import TwinflowError
from twinflow.runner import prepare_outputs
from twinflow.settings import Settings
from twinflow.sim.messages import DataFaultPlan
from twinflow.sim.run import SimulateOptions, simulate
from twinflow.sim.scenario import ScenarioConfig
from twinflow.tables import tables
from twinflow.twin_model import TwinModel

VIEW_EVERY_S = 3.0
DRAIN_S = 20.0
"""After the plant stops: time for the last windows to close (idle close is 15 s)."""


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
            flow.wait(60)
    counts = truth.get("counts", {})
    faults = [f for f in truth.get("faults", []) if f["category"] == "process"]
    return (
        f"plant: {counts.get('messages', 0)} MQTT messages, {counts.get('valid_readings', 0)} "
        f"valid readings, {len(faults)} process faults injected "
        f"({', '.join(sorted({f['kind'] for f in faults})) or 'none'}); bridge: "
        f"{bridge.stats.forwarded} to Kafka, {bridge.stats.dead_lettered} dead letters. "
        f"Ground truth: {settings.state_dir / 'sim' / 'demo-truth.json'}"
    )


def _view(sql: QuestDBHttp, names: Any, bridge: MqttBridge, since: datetime) -> Table:
    """Figures of the current run: rows from its simulated start on (tables keep older runs)."""
    after = f"WHERE ts >= '{since.isoformat().replace('+00:00', 'Z')}'"
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
    except QuestDBError as exc:
        table.add_row("QuestDB", f"not answering: {exc}")
        return table
    table.add_row("bridged to Kafka", f"{bridge.stats.forwarded} messages")
    table.add_row("readings in QuestDB", str(readings))
    table.add_row("entities by status", ", ".join(f"{s}: {n}" for s, n in statuses) or "-")
    for ts, entity, score, threshold, top in latest:
        table.add_row("anomaly", f"{ts[:19]} {entity} score {score:.1f} > {threshold:.1f}: {top}")
    return table
