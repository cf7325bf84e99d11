"""Simulator -> MQTT -> bridge -> Kafka -> twin flow -> QuestDB and output topics.

Everything runs as the user would run it (separate processes, real brokers, real
QuestDB); every figure is checked against an independent recomputation from the input.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pandas as pd
import pytest
import yaml

from connectors.questdb import QuestDBError, QuestDBHttp
from schemas.raw import SchemaError, decode_raw
from tests.grafana import dashboards, panel_queries, promql_queries, render, render_promql
from tests.helpers import (
    Samples,
    clean_env,
    consume_all,
    free_ports,
    recompute_windows,
    sample,
    scrape,
    twinflow_cli,
    wait_for_line,
    wait_for_wal,
)
from twinflow.services import manager
from twinflow.settings import Settings
from twinflow.twin_model import TwinModel, load_twin_model

pytestmark = pytest.mark.integration
log = logging.getLogger("tests.e2e")

ROOT = Path(__file__).resolve().parents[2]
ENTITIES = 6
RECOVERY_MS = 120_000
HOURS = 2.0
RATE = 15.0  # readings/s for 6 entities x 5 sensors: one reading per sensor every 2 s


@dataclass
class Run:
    """One isolated pipeline: topics, tables, MQTT prefix and bridge session."""

    env: dict[str, str]
    suffix: str
    workdir: Path
    model: TwinModel
    start: datetime
    expected: set[tuple[str, str, int]] = field(default_factory=set)
    """(entity, sensor, ts) of every valid reading, recomputed from twin.raw."""
    flow_rejects: Counter[str] = field(default_factory=Counter)
    raw_messages: int = 0
    prometheus: Settings | None = None
    """A Prometheus of its own, scraping this run's flow and bridge every second."""
    began: float = field(default_factory=time.time)

    def topic(self, name: str) -> str:
        return f"e2e.{name}.{self.suffix}"

    @property
    def prefix(self) -> str:
        return f"e2e_{self.suffix}_"


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "twinflow", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


def _env_for(
    run_suffix: str,
    workdir: Path,
    model_file: Path,
    stack: Settings,
    table_prefix: str,
    outputs: str,
) -> dict[str, str]:
    return clean_env(
        twin_model=str(model_file),
        state_dir=str(stack.state_dir),
        topics__raw=f"e2e.raw.{run_suffix}",
        topics__deadletter=f"e2e.deadletter.{run_suffix}",
        topics__state=f"e2e.state.{outputs}",
        topics__anomalies=f"e2e.anomalies.{outputs}",
        topics__late=f"e2e.late.{outputs}",
        topics__alarms=f"e2e.alarms.{outputs}",
        topics__feedback=f"e2e.feedback.{run_suffix}",
        topics__commands=f"e2e.commands.{run_suffix}",
        questdb__table_prefix=table_prefix,
        flow__recovery_dir=str(workdir / f"recovery-{outputs}"),
        mqtt__bridge_client_id=f"e2e-bridge-{run_suffix}",
        mqtt__session_expiry_s="120",
    )


@pytest.fixture(scope="module")
def pipeline(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Bridge and flow running; the simulator has published two hours of the plant."""
    workdir = tmp_path_factory.mktemp("e2e")
    suffix = f"{int(time.time())}{random.randrange(1000):03d}"
    document = yaml.safe_load((ROOT / "infra" / "twin-model" / "example-plant.yaml").read_text())
    document["mqtt_topic_prefix"] = f"e2e{suffix}"
    model_file = workdir / "plant.yaml"
    model_file.write_text(yaml.safe_dump(document))
    env = _env_for(suffix, workdir, model_file, stack, f"e2e_{suffix}_", suffix)
    # Hours in the past, at a second no other run uses: QuestDB rows cannot collide.
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(
        hours=HOURS + 2, seconds=random.randrange(3600)
    )
    run = Run(env, suffix, workdir, load_twin_model(model_file), start)
    run.prometheus = _prometheus_for(stack, env, workdir / "prometheus")
    manager.up(run.prometheus, ["prometheus"], log.info)
    bridge = _spawn(["bridge", "mqtt"], env, workdir / "bridge.log")
    flow = _spawn(["run"], env, workdir / "flow.log")
    try:
        wait_for_line(workdir / "bridge.log", "subscribed to")
        result = twinflow_cli(
            env,
            "simulate",
            "--max-speed",
            "--entities",
            str(ENTITIES),
            "--rate",
            str(RATE),
            "--duration",
            str(HOURS * 3600),
            "--fault-share",
            "1.0",
            "--seed",
            "5",
            "--start",
            start.isoformat(),
            "--ground-truth",
            str(workdir / "truth.json"),
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        run.expected, run.flow_rejects, run.raw_messages = _expected(run, stack)
        _wait_rows(stack, run, run.expected)
        yield run
    finally:
        _stop(flow)
        _stop(bridge)
        manager.down(run.prometheus, ["prometheus"], log.info)


def _prometheus_for(stack: Settings, env: dict[str, str], state_dir: Path) -> Settings:
    (port,) = free_ports(1)
    metrics = stack.metrics.model_copy(
        update={
            "prometheus_port": port,
            "scrape_interval_s": 1,
            "flow_port": int(env["TWINFLOW_METRICS__FLOW_PORT"]),
            "mqtt_bridge_port": int(env["TWINFLOW_METRICS__MQTT_BRIDGE_PORT"]),
            "opcua_bridge_port": int(env["TWINFLOW_METRICS__OPCUA_BRIDGE_PORT"]),
        }
    )
    return stack.model_copy(
        update={"state_dir": state_dir, "lib_dir": stack.jar_dir, "metrics": metrics}
    )


def _expected(run: Run, stack: Settings) -> tuple[set[tuple[str, str, int]], Counter[str], int]:
    """Valid reading keys, the flow's own rejects and the message count of twin.raw."""
    keys: set[tuple[str, str, int]] = set()
    rejects: Counter[str] = Counter()
    messages = consume_all(stack.kafka, run.topic("raw"), idle_s=5)
    for message in messages:
        try:
            raw = decode_raw(message.value())
        except SchemaError as exc:
            rejects[exc.reason.value] += 1
            continue
        for sensor, value, unit in raw.readings():
            spec = run.model.sensors_of(raw.entity_id)[sensor]
            conversion = spec.conversion(unit)
            assert conversion is not None
            low, high = spec.range
            if low <= conversion.to_canonical(value) <= high:
                keys.add((raw.entity_id, sensor, raw.ts_ms))
            else:
                rejects["out_of_range"] += 1
    return keys, rejects, len(messages)


def _wait_rows(
    stack: Settings, run: Run, expected: set[tuple[str, str, int]], prefix: str | None = None
) -> None:
    sql = QuestDBHttp(stack.questdb)
    table = f"{prefix or run.prefix}readings"
    deadline = time.monotonic() + 300
    count = -1
    while time.monotonic() < deadline:
        try:
            count = sql.exec(f"SELECT count() FROM '{table}'").rows[0][0]
        except QuestDBError:  # the table appears once the flow has started
            count = -1
        if count >= len(expected):
            return
        time.sleep(1)
    raise AssertionError(f"{table} has {count} rows, expected {len(expected)}; see {run.workdir}")


def _frame(stack: Settings, query: str) -> pd.DataFrame:
    result = QuestDBHttp(stack.questdb, timeout_s=120).exec(query)
    return pd.DataFrame(list(result.rows), columns=list(result.column_names))


def _epoch_ms(column: pd.Series) -> np.ndarray:
    return (pd.to_datetime(column, utc=True).dt.tz_convert(None) - pd.Timestamp(0)) // pd.Timedelta(
        milliseconds=1
    )


def test_every_valid_reading_lands_exactly_once(stack: Settings, pipeline: Run) -> None:
    expected = pipeline.expected
    readings = _frame(stack, f"SELECT entity, sensor, ts FROM '{pipeline.prefix}readings'")
    got = list(zip(readings["entity"], readings["sensor"], _epoch_ms(readings["ts"]), strict=True))
    assert len(got) == len(set(got))
    assert set(got) == expected
    truth = json.loads((pipeline.workdir / "truth.json").read_text())
    # The simulator's valid readings, less the ones out of physical range (spikes).
    assert (
        len(expected) + pipeline.flow_rejects["out_of_range"] == truth["counts"]["valid_readings"]
    )


def test_every_bad_payload_is_a_dead_letter_with_its_reason(stack: Settings, pipeline: Run) -> None:
    truth = json.loads((pipeline.workdir / "truth.json").read_text())
    flow_rejects = pipeline.flow_rejects
    deadline = time.monotonic() + 60
    while True:
        letters = _frame(
            stack, f"SELECT source_kind, source, reason FROM '{pipeline.prefix}deadletters'"
        )
        bridge = Counter(letters[letters["source_kind"] == "mqtt"]["reason"])
        flow = Counter(letters[letters["source"] == pipeline.topic("raw")]["reason"])
        if (bridge, flow) == (
            Counter(truth["counts"]["expected_rejects"]),
            flow_rejects,
        ) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert bridge == Counter(truth["counts"]["expected_rejects"])
    assert flow == flow_rejects
    assert sum(bridge.values()) > 0


def test_window_features_equal_a_recomputation_from_readings(
    stack: Settings, pipeline: Run
) -> None:
    readings = _frame(
        stack, f"SELECT entity, sensor, ts, value, flags FROM '{pipeline.prefix}readings'"
    )
    windows = _frame(
        stack,
        "SELECT entity, sensor, ts, count, mean, min, max, std "
        f"FROM '{pipeline.prefix}sensor_windows'",
    )
    late = {
        (m["entity_id"], m["sensor"], m["ts_ms"])
        for m in (
            json.loads(x.value())
            for x in consume_all(stack.kafka, pipeline.topic("late"), idle_s=3)
        )
    }
    readings["ts_ms"] = _epoch_ms(readings["ts"])
    recomputed = recompute_windows(readings, late, 10_000)
    windows["start"] = _epoch_ms(windows["ts"])
    joined = windows.set_index(["entity", "sensor", "start"]).join(recomputed, how="left")
    assert len(joined) > ENTITIES * 5 * 600  # two hours of 10 s windows, most of them
    assert (joined["count"] == joined["count_re"]).all()
    for column in ("mean", "min", "max", "std"):
        np.testing.assert_allclose(joined[column], joined[f"{column}_re"], rtol=1e-9, atol=1e-9)


def _fault_report(run: Run, anomalies: pd.DataFrame) -> dict[str, Any]:
    truth = json.loads((run.workdir / "truth.json").read_text())
    starts = _epoch_ms(anomalies["ts"]).to_numpy()
    entities = anomalies["entity"].to_numpy()
    report: dict[str, Any] = {}
    covered = np.zeros(len(starts), dtype=bool)
    for category in ("process", "sensor"):
        for fault in (f for f in truth["faults"] if f["category"] == category):
            inside = (
                (entities == fault["entity_id"])
                & (starts >= fault["start_ms"] - 10_000)
                & (starts < fault["end_ms"] + 10_000)
            )
            # As in benchmarks/detection_on_simulator.py: flags up to RECOVERY_MS after a
            # fault are no hits but no false alarms either (temperatures lag, smoothed
            # features decay).
            covered |= (
                (entities == fault["entity_id"])
                & (starts >= fault["start_ms"] - 10_000)
                & (starts < fault["end_ms"] + RECOVERY_MS)
            )
            if category == "process":
                hits, total = report.get(fault["kind"], (0, 0))
                report[fault["kind"]] = (hits + bool(inside.any()), total + 1)
    hours = ENTITIES * HOURS
    report["false_alarms_per_entity_hour"] = float((~covered).sum() / hours)
    return report


def test_process_faults_raise_explained_anomalies(stack: Settings, pipeline: Run) -> None:
    anomalies = _frame(
        stack,
        "SELECT entity, ts, score, threshold, top_sensors, explanation "
        f"FROM '{pipeline.prefix}anomalies'",
    )
    report = _fault_report(pipeline, anomalies)
    print(f"\nanomaly report (hits, faults) per kind: {report}")
    process = [value for key, value in report.items() if key != "false_alarms_per_entity_hour"]
    hits, total = map(sum, zip(*process, strict=True))
    assert total >= ENTITIES
    assert hits / total >= 0.8, report
    assert report["false_alarms_per_entity_hour"] <= 1.0, report
    assert (anomalies["score"] > anomalies["threshold"]).all()
    for explanation in anomalies["explanation"]:
        contributions = json.loads(explanation)
        assert contributions and all(
            c["sensor"] and c["expected_low"] <= c["expected_high"] for c in contributions
        )


_ALARM_COLUMNS = 'alarm_id, event, entity, ts, start, "end", active, peak_score, anomalous_windows'


def _alarm_events(stack: Settings, run: Run) -> pd.DataFrame:
    """The alarms table in event order, timestamps as epoch ms (``end`` None while active)."""
    table = _frame(stack, f"SELECT {_ALARM_COLUMNS} FROM '{run.prefix}alarms' ORDER BY ts")
    for column in ("ts", "start"):
        table[column] = _epoch_ms(table[column])
    ends = pd.to_datetime(table["end"], utc=True)
    table["end"] = pd.Series(
        [None if pd.isna(end) else end.value // 1_000_000 for end in ends],
        index=table.index,
        dtype=object,
    )
    return table


def _active_at(events: pd.DataFrame, at_ms: int) -> set[str]:
    """Alarm ids whose latest event at or before ``at_ms`` leaves them active."""
    seen = events[events["ts"] <= at_ms].drop_duplicates("alarm_id", keep="last")
    return set(seen[seen["active"]]["alarm_id"])


def test_alarms_follow_their_lifecycle_in_the_table_and_on_the_topic(
    stack: Settings, pipeline: Run
) -> None:
    """The alarms table and twin.alarms hold the same events; each alarm is raised once
    and ended at most once, an entity's alarms never overlap, the twin states agree,
    and the simulator's process faults raised alarms."""
    fields = ("alarm_id", "event", "entity", "ts", "start", "end", "active", "anomalous_windows")
    tables = [f"{pipeline.prefix}alarms", f"{pipeline.prefix}twin_state"]
    # The last windows close once the entities are idle; wait until both sides settled.
    deadline = time.monotonic() + 60
    while True:
        wait_for_wal(QuestDBHttp(stack.questdb), tables)
        events = _alarm_events(stack, pipeline)
        messages = [
            json.loads(m.value())
            for m in consume_all(stack.kafka, pipeline.topic("alarms"), idle_s=3)
        ]
        from_topic = sorted(
            (m["alarm_id"], m["event"], m["entity_id"], m["ts_ms"], m["start_ms"], m["end_ms"],
             m["active"], m["anomalous_windows"])
            for m in {m["msg_id"]: m for m in messages}.values()
        )  # fmt: skip
        from_table = sorted(tuple(row) for row in events[list(fields)].itertuples(index=False))
        if from_table == from_topic or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert from_table == from_topic
    assert len(from_table) == len(messages), "an alarm event was emitted twice"

    for entity, alarms in events.groupby("entity"):
        ended_ms = None
        for alarm_id, lifecycle in alarms.groupby("alarm_id", sort=False):
            kinds = list(lifecycle["event"])
            assert kinds[0] == "raised" and kinds[1:] in ([], ["cleared"], ["rebaselined"]), (
                alarm_id,
                kinds,
            )
            raised = lifecycle.iloc[0]
            assert raised["start"] < raised["ts"] and raised["end"] is None
            # The entity's previous alarm had ended before this one was raised.
            assert ended_ms is None or ended_ms <= raised["ts"], (entity, alarm_id)
            if len(kinds) == 2:
                end = lifecycle.iloc[1]
                assert not end["active"] and raised["start"] < end["end"] <= end["ts"]
                assert end["anomalous_windows"] >= raised["anomalous_windows"]
                ended_ms = end["ts"]
            else:
                ended_ms = None
                assert alarm_id == alarms["alarm_id"].iloc[-1], f"{alarm_id} never ended"

    # A state is ALARM exactly while it names an active alarm, one the table knows.
    states = _frame(
        stack, f"SELECT ts, entity, status, active_alarms FROM '{pipeline.prefix}twin_state'"
    )
    states = states[states["status"] != "STALE"]
    named = states["active_alarms"].fillna("") != ""
    assert ((states["status"] == "ALARM") == named).all()
    assert named.any()
    for at, active_ids in zip(_epoch_ms(states["ts"]), states["active_alarms"], strict=True):
        assert set(filter(None, (active_ids or "").split(","))) <= _active_at(events, at), at

    truth = json.loads((pipeline.workdir / "truth.json").read_text())
    raised = events[events["event"] == "raised"]
    alarmed = [
        fault
        for fault in truth["faults"]
        if fault["category"] == "process"
        and (
            (raised["entity"] == fault["entity_id"])
            & (raised["start"] >= fault["start_ms"] - 10_000)
            & (raised["start"] < fault["end_ms"] + 10_000)
        ).any()
    ]
    print(f"\nalarms: {Counter(events['event'])}; process faults alarmed: {len(alarmed)}")
    assert alarmed


def test_output_topics_carry_valid_keyed_messages(stack: Settings, pipeline: Run) -> None:
    schema_dir = ROOT / "schemas" / "json"
    for topic, schema_file in (
        ("state", "twin_state"),
        ("anomalies", "anomaly"),
        ("late", "late_reading"),
        ("alarms", "alarm"),
    ):
        schema = json.loads((schema_dir / f"{schema_file}.v1.schema.json").read_text())
        messages = consume_all(stack.kafka, pipeline.topic(topic), idle_s=3)
        assert messages, f"nothing on {pipeline.topic(topic)}"
        for message in messages:
            document = json.loads(message.value())
            jsonschema.validate(document, schema)
            assert message.key().decode() == document["entity_id"]


def test_two_processes_write_what_one_process_wrote(stack: Settings, pipeline: Run) -> None:
    prefix = f"e2e_{pipeline.suffix}_x2_"
    base = _env_for(
        pipeline.suffix,
        pipeline.workdir,
        Path(pipeline.env["TWINFLOW_TWIN_MODEL"]),
        stack,
        prefix,
        f"{pipeline.suffix}x2",
    )
    addresses = ";".join(f"127.0.0.1:{port}" for port in free_ports(2))
    processes = [
        _spawn(
            ["run", "-i", str(index), "-a", addresses],
            base,
            pipeline.workdir / f"cluster-{index}.log",
        )
        for index in range(2)
    ]
    try:
        _wait_rows(stack, pipeline, pipeline.expected, prefix)
        time.sleep(20)  # idle windows close after 15 s of silence
    finally:
        for process in processes:
            _stop(process)
    for table, columns in (
        ("readings", "entity, sensor, ts, value, flags"),
        ("sensor_windows", "entity, sensor, ts, count, mean, std, slope"),
        ("anomalies", "entity, ts, score, threshold"),
        ("alarms", "entity, alarm_id, event, ts, start, peak_score, anomalous_windows"),
        ("twin_state", "entity, ts, status, health, readings, alarms, active_alarms"),
    ):
        stale = " WHERE status != 'STALE'" if table == "twin_state" else ""
        one = _frame(
            stack, f"SELECT {columns} FROM '{pipeline.prefix}{table}'{stale} ORDER BY {columns}"
        )
        two = _frame(stack, f"SELECT {columns} FROM '{prefix}{table}'{stale} ORDER BY {columns}")
        assert len(one) > 0, table
        pd.testing.assert_frame_equal(one, two, obj=table)


PANEL_COLUMNS = {
    "Entities by status": ("status", "entities"),
    "Health by entity (latest)": ("entity", "health", "status"),
    "Anomalies": ("time", "entity", "score", "threshold", "top_sensors", "explanation"),
    "Dead letters by reason": ("reason", "letters"),
    "Late readings per entity (latest count)": ("entity", "late"),
    "Ingest rate (readings/s, event time)": ("time", "readings_per_s"),
    "Clean readings (10 s mean per sensor)": ("time", "sensor", "value"),
    "Window mean, min and max per sensor": ("time", "sensor", "mean", "min", "max"),
    "Anomalies and their explanation": ("time", "score", "threshold", "top_sensors", "explanation"),
    "Status and health": ("time", "status", "health"),
    "Active alarms": ("entity", "alarm_id", "start", "peak_score", "threshold", "top_sensors"),
    "Machines by time to limit": ("entity", "sensor", "lower_h", "expected_h", "as_of"),
    "Alarms": (
        "time",
        "event",
        "alarm_id",
        "start",
        "end",
        "peak_score",
        "threshold",
        "anomalous_windows",
        "top_sensors",
        "verdict",
        "operator",
        "note",
    ),
    "Setpoints: desired vs reported": (
        "time",
        "setpoint",
        "status",
        "desired",
        "reported",
        "command_id",
        "expires",
        "detail",
    ),
}


def test_every_dashboard_panel_query_runs_on_the_flow_output(
    stack: Settings, pipeline: Run
) -> None:
    """Each panel's SQL, rendered as Grafana would for a range from the run's first
    reading to now and an entity with anomalies, succeeds with the columns the panel
    shows and at least one row. (Dead letters carry their arrival time, which is now
    for this backfilled plant; live, event time and arrival time are close.) "Active
    alarms" must list exactly the alarms the alarm events leave active at the range's
    end, now and at a moment of the run when some were."""
    sql = QuestDBHttp(stack.questdb)
    wait_for_wal(sql, [f"{pipeline.prefix}alarms"])
    events = _alarm_events(stack, pipeline)
    start, end = pipeline.start, datetime.now(UTC) + timedelta(minutes=1)
    (entity,) = sql.exec(f'SELECT entity FROM "{pipeline.prefix}anomalies" LIMIT 1').rows[0]
    variables = {"entity": entity}
    queries = list(panel_queries())
    assert {title for _board, title, _sql in queries} == PANEL_COLUMNS.keys()
    problems = []
    for board, title, query in queries:
        rendered = render(query, start, end, variables, pipeline.prefix)
        try:
            result = sql.exec(rendered)
        except QuestDBError as exc:
            problems.append(f"{board} / {title}: {exc}")
            continue
        if result.column_names != PANEL_COLUMNS[title]:
            problems.append(f"{board} / {title}: columns {result.column_names}")
        if title == "Active alarms":
            problems += _active_alarm_problems(sql, query, pipeline, events, start, end)
        elif title == "Machines by time to limit":
            pass  # minutes of plant forecast nothing; test_maintenance_e2e has its rows
        elif not result.rows:
            problems.append(f"{board} / {title}: no rows\n{rendered}")
    for board, dashboard in dashboards().items():
        for variable in dashboard["templating"]["list"]:
            rendered = render(variable["query"], start, end, variables, pipeline.prefix)
            values = [row[0] for row in sql.exec(rendered).rows]
            if entity not in values:
                problems.append(f"{board}: variable {variable['name']} offers {values}")
    assert not problems, "\n".join(problems)


def _active_alarm_problems(
    sql: QuestDBHttp,
    query: str,
    run: Run,
    events: pd.DataFrame,
    start: datetime,
    end: datetime,
) -> list[str]:
    """The active-alarms panel at ``end`` and at the first raise, against the events."""
    first_raise = datetime.fromtimestamp(events["ts"].min() / 1000, UTC)
    problems = []
    for at in (end, first_raise):
        rendered = render(query, start, at, {}, run.prefix)
        shown = {row[1] for row in sql.exec(rendered).rows}
        expected = _active_at(events, int(at.timestamp() * 1000))
        if shown != expected:
            problems.append(f"Active alarms at {at}: {sorted(shown)}, expected {sorted(expected)}")
    if not _active_at(events, int(first_raise.timestamp() * 1000)):
        problems.append(f"Active alarms: none active at the first raise, {first_raise}")
    return problems


def _by(samples: Samples, name: str, label: str, **fixed: str) -> Counter[str]:
    """``name``'s non-zero samples, by the value of ``label`` (others fixed to ``fixed``)."""
    found: Counter[str] = Counter()
    for (series, labels), value in samples.items():
        others = {key: val for key, val in labels if key != label}
        if series == name and others == fixed and value:
            found[dict(labels)[label]] = int(value)
    return found


def _count(stack: Settings, table: str) -> int:
    count: int = QuestDBHttp(stack.questdb).exec(f'SELECT count() FROM "{table}"').rows[0][0]
    return count


def test_the_metrics_endpoints_count_what_the_run_did(stack: Settings, pipeline: Run) -> None:
    """Scraped from the running flow and bridge: every counter equals a count taken
    independently, from the simulator's ground truth, twin.raw and the tables."""
    truth = json.loads((pipeline.workdir / "truth.json").read_text())["counts"]
    env, prefix, raw = pipeline.env, pipeline.prefix, pipeline.topic("raw")
    bridge = scrape(int(env["TWINFLOW_METRICS__MQTT_BRIDGE_PORT"]))
    rejects = sum(truth["expected_rejects"].values())
    assert (
        sample(bridge, "twinflow_bridge_messages_received_total", bridge="mqtt")
        == (truth["messages"])
    )
    assert sample(bridge, "twinflow_bridge_messages_forwarded_total", bridge="mqtt") == (
        truth["messages"] - rejects
    )
    assert _by(bridge, "twinflow_bridge_dead_letters_total", "reason", bridge="mqtt") == (
        Counter(truth["expected_rejects"])
    )
    assert sample(bridge, "twinflow_bridge_connected", bridge="mqtt") == 1

    # The flow's dead letters and windows are final once the readings are in and the
    # idle windows closed; poll until they are (or report the last difference).
    deadline = time.monotonic() + 90
    while True:
        flow = scrape(int(env["TWINFLOW_METRICS__FLOW_PORT"]))
        tables = {
            name: _count(stack, f"{prefix}{name}")
            for name in (
                "readings",
                "sensor_windows",
                "twin_state",
                "anomalies",
                "alarms",
                "setpoints",
            )
        }
        events = QuestDBHttp(stack.questdb).exec(f'SELECT event, count() FROM "{prefix}alarms"')
        alarm_events = Counter(dict(events.rows))
        observed = {
            "consumed raw": sample(flow, "twinflow_messages_consumed_total", topic=raw),
            "dead letters": _by(flow, "twinflow_dead_letters_total", "reason"),
            "rows written": _by(flow, "twinflow_questdb_rows_written_total", "table"),
            "windows": sample(flow, "twinflow_windows_closed_total"),
            "lag observations": sample(flow, "twinflow_window_close_lag_seconds_count"),
            "anomalies": sample(flow, "twinflow_anomalies_total"),
            "alarms": _by(flow, "twinflow_alarms_total", "event"),
            "raw lag": {
                dict(labels)["partition"]: value
                for (name, labels), value in flow.items()
                if name == "twinflow_kafka_consumer_lag" and ("topic", raw) in labels
            },
        }
        wanted = {
            "consumed raw": pipeline.raw_messages,
            "dead letters": pipeline.flow_rejects,
            "rows written": Counter(
                {
                    **{f"{prefix}{name}": count for name, count in tables.items() if count},
                    f"{prefix}deadletters": rejects + sum(pipeline.flow_rejects.values()),
                }
            ),
            "windows": tables["sensor_windows"],
            "lag observations": tables["sensor_windows"],
            "anomalies": tables["anomalies"],
            "alarms": alarm_events,
            "raw lag": {str(p): 0 for p in range(stack.topics.raw_partitions)},
        }
        if observed == wanted or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert observed == wanted
    assert sample(flow, "twinflow_readings_accepted_total") == tables["readings"]
    assert sample(flow, "twinflow_sink_failures_total", sink="questdb") == 0


def test_every_pipeline_panel_query_runs_on_the_run_metrics(pipeline: Run) -> None:
    """Each PromQL query of the pipeline dashboard, as Grafana sends it, over the run's
    wall-clock span on a Prometheus that scraped the run's flow and bridge every second:
    it succeeds and returns at least one series with a number in it."""
    assert pipeline.prometheus is not None
    api = f"http://127.0.0.1:{pipeline.prometheus.metrics.prometheus_port}/api/v1/query_range"
    queries = list(promql_queries())
    assert len(queries) >= 15
    problems = []
    for board, title, expr in queries:
        params = urllib.parse.urlencode(
            {
                "query": render_promql(expr, rate_interval_s=5),
                "start": f"{pipeline.began:.3f}",
                "end": f"{time.time():.3f}",
                "step": "1",
            }
        )
        try:
            with urllib.request.urlopen(f"{api}?{params}", timeout=30) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # a query Prometheus cannot parse: 400
            problems.append(f"{board} / {title}: {exc.read().decode()}")
            continue
        series = answer["data"]["result"]
        numbers = [
            float(value)
            for one in series
            for _at, value in one["values"]
            if value not in ("NaN", "+Inf", "-Inf")
        ]
        if not numbers:
            problems.append(f"{board} / {title}: no numbers in {len(series)} series\n{expr}")
    assert not problems, "\n".join(problems)
