"""Small helpers shared by tests."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
from asyncua.crypto import cert_gen
from confluent_kafka import Consumer, Message
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client.parser import text_string_to_metric_families

from connectors.kafka import client_config
from connectors.questdb import QuestDBHttp
from schemas.outputs import Flag
from twinflow.errors import caused_by
from twinflow.services.process import port_is_free
from twinflow.settings import KafkaSettings, Settings


def free_ports(count: int) -> list[int]:
    """Distinct ports that are free right now on 127.0.0.1, below the ephemeral range.

    A port from the ephemeral range can be taken by a client while its server is down:
    reconnecting to 127.0.0.1:P, the kernel may pick P itself as the source port and
    connect the socket to itself. Tests that restart servers would then find the port
    "in use".
    """
    low, _high = (
        int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    )
    candidates = list(range(max(1024, low - 12_000), low))
    random.shuffle(candidates)
    ports = [port for port in candidates[: count * 20] if port_is_free(port)][:count]
    assert len(ports) == count, "no free ports below the ephemeral range"
    return ports


def isolated_settings(base: Settings, state_dir: Path) -> Settings:
    """Settings for a second local stack: own state folder and free ports, shared jars.

    Tests that restart, kill or secure a service use one so the session's stack and the
    other tests never notice.
    """
    (kafka, controller, http, pg, ilp, min_http, mqtt, prometheus) = free_ports(8)
    return base.model_copy(
        update={
            "state_dir": state_dir,
            "lib_dir": base.jar_dir,
            "kafka": base.kafka.model_copy(
                update={"port": kafka, "controller_port": controller, "heap": "512m"}
            ),
            "questdb": base.questdb.model_copy(
                update={
                    "http_port": http,
                    "pg_port": pg,
                    "ilp_tcp_port": ilp,
                    "min_http_port": min_http,
                    "heap": "512m",
                }
            ),
            "mqtt": base.mqtt.model_copy(update={"port": mqtt}),
            "metrics": base.metrics.model_copy(update={"prometheus_port": prometheus}),
        }
    )


def isolated_env(base: Settings, state_dir: Path) -> dict[str, str]:
    """:func:`isolated_settings` as the environment of a ``twinflow`` process."""
    settings = isolated_settings(base, state_dir)
    env = clean_env(
        state_dir=str(settings.state_dir),
        lib_dir=str(settings.jar_dir),
        kafka__heap=settings.kafka.heap,
        questdb__heap=settings.questdb.heap,
    )
    env.update(
        {
            f"TWINFLOW_{name.upper().replace('.', '__')}": str(port)
            for name, port in settings.local_ports().items()
        }
    )
    return env


def refusal_row(fault: str, exit_code: int, elapsed_s: float) -> dict[str, object]:
    """A chaos table row for security recipe 10: what was refused, how, how fast.

    A refusal moves no data, so there is nothing to lose, repeat or mismatch: the data
    columns say n/a rather than a zero nobody counted.
    """
    return {
        "fault": f"10. {fault}",
        "runs": 1,
        "lost": "n/a",
        "duplicates": "n/a",
        "mismatches": "n/a",
        "notes": f"refused: exit code {exit_code} after {elapsed_s:.1f} s",
    }


def cause_of(exc: BaseException, kind: type[BaseException]) -> BaseException:
    """The ``kind`` exception Bytewax wrapped (BytewaxRuntimeError chains the original)."""
    found = caused_by(exc, kind)
    if found is None:
        raise AssertionError(f"no {kind.__name__} in the chain of {exc!r}")
    return found


def wait_for_wal(sql: QuestDBHttp, names: list[str], timeout_s: float = 30) -> dict[str, int]:
    """Each table's sequencer txn, once its WAL has been applied up to it.

    Fails at once on a suspended table, and after ``timeout_s`` on a lagging one.
    """
    deadline = time.monotonic() + timeout_s
    quoted = ", ".join(f"'{name}'" for name in names)
    while True:
        rows = sql.exec(
            f"SELECT name, suspended, writerTxn, sequencerTxn, errorMessage "
            f"FROM wal_tables() WHERE name IN ({quoted})"
        ).rows
        assert not [row for row in rows if row[1]], f"suspended WAL tables: {rows}"
        if len(rows) == len(names) and all(row[2] == row[3] for row in rows):
            return {row[0]: row[3] for row in rows}
        assert time.monotonic() < deadline, f"WAL not applied after {timeout_s} s: {rows}"
        time.sleep(0.1)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""Prometheus samples by (name, labels)."""


def scrape(port: int) -> Samples:
    """The samples a /metrics endpoint on 127.0.0.1:``port`` serves now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (item.name, frozenset(item.labels.items())): item.value
        for family in text_string_to_metric_families(body)
        for item in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the endpoint has no such series (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def consume_all(
    kafka: KafkaSettings, topic: str, expected: int | None = None, idle_s: float = 5.0
) -> list[Message]:
    """Every message of ``topic`` from the start: until ``expected`` arrived, or idle."""
    consumer = Consumer(
        client_config(
            kafka,
            **{
                "group.id": f"test-reader-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic])
    messages: list[Message] = []
    last_seen = time.monotonic()
    try:
        while time.monotonic() - last_seen < idle_s:
            batch = consumer.consume(num_messages=10_000, timeout=0.5)
            for message in batch:
                assert message.error() is None, message.error()
                messages.append(message)
            if batch:
                last_seen = time.monotonic()
            if expected is not None and len(messages) >= expected:
                break
    finally:
        consumer.close()
    return messages


def twinflow_cli(
    env: dict[str, str], *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run ``twinflow ARGS`` as a user would, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "twinflow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without TWINFLOW_* variables, plus ``settings``.

    The /metrics endpoints get free ports unless ``settings`` name them, so a flow or
    bridge a test starts never collides with another one (or with a running demo).
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("TWINFLOW_")}
    flow, mqtt_bridge, opcua_bridge, serve = free_ports(4)
    env.update(
        {
            "TWINFLOW_METRICS__FLOW_PORT": str(flow),
            "TWINFLOW_METRICS__MQTT_BRIDGE_PORT": str(mqtt_bridge),
            "TWINFLOW_METRICS__OPCUA_BRIDGE_PORT": str(opcua_bridge),
            "TWINFLOW_METRICS__SERVE_PORT": str(serve),
        }
    )
    env.update({f"TWINFLOW_{key.upper()}": value for key, value in settings.items()})
    return env


def opcua_certificate(
    directory: Path, name: str, uri: str, usage: list[x509.ObjectIdentifier]
) -> tuple[Path, Path]:
    """A self-signed OPC UA application certificate (DER) and key (PEM) in ``directory``."""
    key = cert_gen.generate_private_key()
    certificate = cert_gen.generate_self_signed_app_certificate(
        key,
        name,
        {},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        extended=usage,
    )
    cert_file, key_file = directory / f"{name}.der", directory / f"{name}.pem"
    cert_file.write_bytes(certificate.public_bytes(Encoding.DER))
    key_file.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_file, key_file


def snapshot_epoch(recovery_dir: Path) -> int:
    """Newest epoch with a snapshot in a Bytewax recovery store (0 before the first)."""
    newest = 0
    for part in recovery_dir.glob("part-*.sqlite3"):
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(f"file:{part}?mode=ro", uri=True, timeout=1)
            try:
                (epoch,) = db.execute("SELECT max(snap_epoch) FROM snaps").fetchone()
            finally:
                db.close()
            newest = max(newest, epoch or 0)
    return newest


def wait_for_line(log_file: Path, needle: str, timeout_s: float = 30.0) -> None:
    """Block until ``needle`` appears in ``log_file``; fail with the log otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_file.exists() and needle in log_file.read_text(errors="replace"):
            return
        time.sleep(0.1)
    text = log_file.read_text(errors="replace") if log_file.exists() else "(no log)"
    raise AssertionError(f"{needle!r} not in {log_file} after {timeout_s} s:\n{text[-3000:]}")


def recompute_windows(
    readings: pd.DataFrame, late: set[tuple[str, str, int]], window_ms: int
) -> pd.DataFrame:
    """Window features recomputed from readings (columns entity, sensor, ts_ms, value,
    flags): on-time, non-spike readings grouped by (entity, sensor, window start)."""
    starts = readings["ts_ms"] - readings["ts_ms"] % window_ms
    keys = zip(readings["entity"], readings["sensor"], readings["ts_ms"], strict=True)
    on_time = pd.Series([key not in late for key in keys], index=readings.index)
    keep = on_time & ((readings["flags"] & int(Flag.SPIKE)) == 0)
    grouped = readings.assign(start=starts)[keep].groupby(["entity", "sensor", "start"])["value"]
    return pd.DataFrame(
        {
            "count": grouped.count(),
            "mean": grouped.mean(),
            "min": grouped.min(),
            "max": grouped.max(),
            "std": grouped.std(ddof=0),
        }
    ).add_suffix("_re")
