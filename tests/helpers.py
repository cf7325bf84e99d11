"""Small helpers shared by tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Message

from connectors.kafka import client_config
from twinflow.settings import KafkaSettings


def free_ports(count: int) -> list[int]:
    """Ports that are free right now on 127.0.0.1 (distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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
    """This process's environment without TWINFLOW_* variables, plus ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TWINFLOW_")}
    env.update({f"TWINFLOW_{key.upper()}": value for key, value in settings.items()})
    return env


def wait_for_line(log_file: Path, needle: str, timeout_s: float = 30.0) -> None:
    """Block until ``needle`` appears in ``log_file``; fail with the log otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_file.exists() and needle in log_file.read_text(errors="replace"):
            return
        time.sleep(0.1)
    text = log_file.read_text(errors="replace") if log_file.exists() else "(no log)"
    raise AssertionError(f"{needle!r} not in {log_file} after {timeout_s} s:\n{text[-3000:]}")
