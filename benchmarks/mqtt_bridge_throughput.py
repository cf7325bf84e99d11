"""MQTT bridge throughput: how fast `twinflow bridge mqtt` drains MQTT into Kafka.

Two measurements on the running local services (`twinflow up`):

- drain: the simulator publishes a burst while the bridge is offline, so the broker
  queues it in the bridge's persistent session; then the bridge starts and is timed
  until every valid message is in Kafka. This is the bridge alone.
- live: simulator and bridge run together, timed from the first publish to the last
  message in Kafka. On 2 cores they compete for CPU, so this is the lower figure.

Run: ``.venv/bin/python -m benchmarks.mqtt_bridge_throughput [--duration S --rate R]``.
Writes JSON and Markdown to ``--out`` (default: STATE_DIR/bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition

from connectors.kafka import client_config
from twinflow.settings import Settings, load_settings


def _topic_total(settings: Settings, topic: str) -> int:
    consumer = Consumer(client_config(settings.kafka, **{"group.id": "bench-watermarks"}))
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return 0
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in metadata.partitions
        )
    finally:
        consumer.close()


def _start_bridge(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("a") as out:
        bridge = subprocess.Popen(
            [sys.executable, "-m", "twinflow", "bridge", "mqtt"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while "subscribed to" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline or bridge.poll() is not None:
            raise RuntimeError(f"bridge did not subscribe; see {log}")
        time.sleep(0.05)
    return bridge


def _stop(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGTERM)
    process.wait(60)


def _simulate(env: dict[str, str], args: argparse.Namespace, truth: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "twinflow",
        "simulate",
        "--max-speed",
        "--duration",
        str(args.duration),
        "--rate",
        str(args.rate),
        "--data-faults",
        "0",
        "--ground-truth",
        str(truth),
    ]


def _wait_for(settings: Settings, topic: str, count: int, timeout_s: float = 600) -> float:
    deadline = time.monotonic() + timeout_s
    while _topic_total(settings, topic) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{topic} stalled below {count} messages")
        time.sleep(0.05)
    return time.monotonic()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both measurements; returns the result document."""
    settings = load_settings()
    workdir = Path(tempfile.mkdtemp(prefix="twinflow-bench-"))
    results: dict[str, Any] = {"duration_s": args.duration, "rate": args.rate}
    for mode in ("drain", "live"):
        suffix = uuid.uuid4().hex[:8]
        model = yaml.safe_load(settings.twin_model.read_text())
        model["mqtt_topic_prefix"] = f"bench{suffix}"
        model_file = workdir / f"plant-{suffix}.yaml"
        model_file.write_text(yaml.safe_dump(model))
        raw = f"bench.raw.{suffix}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("TWINFLOW_")}
        env.update(
            TWINFLOW_STATE_DIR=str(settings.state_dir),
            TWINFLOW_TWIN_MODEL=str(model_file),
            TWINFLOW_TOPICS__RAW=raw,
            TWINFLOW_TOPICS__DEADLETTER=f"bench.deadletter.{suffix}",
            TWINFLOW_MQTT__BRIDGE_CLIENT_ID=f"bench-bridge-{suffix}",
            TWINFLOW_MQTT__SESSION_EXPIRY_S="120",
        )
        log, truth = workdir / f"bridge-{mode}.log", workdir / f"truth-{mode}.json"
        bridge = _start_bridge(env, log)
        try:
            if mode == "drain":
                _stop(bridge)  # the session stays, subscribed: the burst queues for it
                subprocess.run(
                    _simulate(env, args, truth), env=env, check=True, capture_output=True
                )
                counts = json.loads(truth.read_text())["counts"]
                started = time.monotonic()
                bridge = _start_bridge(env, log)
            else:
                started = time.monotonic()
                simulator = subprocess.Popen(
                    _simulate(env, args, truth), env=env, stdout=subprocess.DEVNULL
                )
                if simulator.wait(3600) != 0:
                    raise RuntimeError("simulator failed")
                counts = json.loads(truth.read_text())["counts"]
            finished = _wait_for(settings, raw, counts["valid_messages"])
        finally:
            _stop(bridge)
        elapsed = finished - started
        results[mode] = {
            "messages": counts["valid_messages"],
            "readings": counts["valid_readings"],
            "elapsed_s": round(elapsed, 2),
            "messages_per_s": round(counts["valid_messages"] / elapsed),
            "readings_per_s": round(counts["valid_readings"] / elapsed),
        }
        print(f"{mode}: {results[mode]}", flush=True)
    return results


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="simulated seconds")
    parser.add_argument("--rate", type=float, default=3000.0, help="readings per simulated second")
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON and Markdown")
    args = parser.parse_args()
    results = run(args)
    out = args.out or load_settings().state_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mqtt_bridge.json").write_text(json.dumps(results, indent=2))
    rows = "\n".join(
        f"| {mode} | {r['messages']} | {r['readings']} | {r['elapsed_s']} | "
        f"{r['messages_per_s']} | {r['readings_per_s']} |"
        for mode, r in results.items()
        if isinstance(r, dict)
    )
    (out / "mqtt_bridge.md").write_text(
        "# MQTT bridge throughput\n\n"
        "| mode | messages | readings | seconds | messages/s | readings/s |\n"
        "|---|---|---|---|---|---|\n" + rows + "\n"
    )
    print(f"wrote {out / 'mqtt_bridge.json'} and {out / 'mqtt_bridge.md'}")


if __name__ == "__main__":
    main()
