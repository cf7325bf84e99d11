"""What the field-bridge tests share: a server process, a bridge in a thread, a topic reader."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from connectors.kafka import client_config
from twinflow.settings import Settings
from twinflow.twin_model import TwinModel

BridgeRun = Callable[[Settings, TwinModel, threading.Event], None]
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ServerProcess:
    """A test server in a process of its own, and the ``start_ms`` of its tick 0."""

    process: subprocess.Popen[str]
    start_ms: int

    def send(self, command: str) -> None:
        """A line on the server's stdin (its commands: see its module)."""
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@contextmanager
def server_process(
    module: str, args: list[str], env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Start ``python -m module *args``; once it prints ``ready <start_ms>``, yield it."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        line = process.stdout.readline() if ready else ""
        assert line.startswith("ready "), f"server did not start (said {line!r})"
        yield ServerProcess(process, int(line.split()[1]))
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        for stream in (process.stdin, process.stdout):
            assert stream is not None
            stream.close()


class BridgeThread:
    """``run(settings, model, stop)`` in a thread while the block runs; it must end cleanly."""

    def __init__(self, run: BridgeRun, settings: Settings, model: TwinModel) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._run = run
        self._thread = threading.Thread(target=self._main, args=(settings, model), daemon=True)

    def _main(self, settings: Settings, model: TwinModel) -> None:
        try:
            self._run(settings, model, self.stop)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> BridgeThread:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        """Stop the bridge and wait for it; it must have stopped without an error."""
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the bridge did not stop"
        assert self.errors == []


@dataclass(frozen=True)
class TopicMessage:
    """One message of a topic: its key, its bytes and its JSON body."""

    key: str
    raw: bytes
    body: dict[str, Any]


class TopicReader:
    """Every message of ``topic`` from its beginning, read on demand."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._consumer = Consumer(
            client_config(
                settings.kafka,
                **{"group.id": f"test-{uuid.uuid4()}", "auto.offset.reset": "earliest"},
            )
        )
        self._consumer.subscribe([topic])
        self.messages: list[TopicMessage] = []

    def read(self) -> None:
        """Take what arrived within 0.2 s."""
        for message in self._consumer.consume(num_messages=1000, timeout=0.2):
            key, value = message.key(), message.value()
            assert message.error() is None and key is not None and value is not None
            self.messages.append(TopicMessage(key.decode(), value, json.loads(value)))

    def wait_for(self, done: Callable[[list[TopicMessage]], bool], timeout_s: float) -> None:
        """Read until ``done(messages)``; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not done(self.messages):
            assert time.monotonic() < deadline, f"timed out with {len(self.messages)} messages"
            self.read()

    def drain(self, expected: int, timeout_s: float = 20) -> None:
        """Read until ``expected`` messages are in, and what came with them."""
        self.wait_for(lambda got: len(got) >= expected, timeout_s)
        self.read()

    def settle(self, quiet_s: float, timeout_s: float = 20) -> None:
        """Read until no message came for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        last_change, count = time.monotonic(), len(self.messages)
        while time.monotonic() - last_change < quiet_s:
            assert time.monotonic() < deadline, "messages kept coming"
            self.read()
            if len(self.messages) != count:
                last_change, count = time.monotonic(), len(self.messages)

    def close(self) -> None:
        """Leave the topic."""
        self._consumer.close()


@contextmanager
def reading(settings: Settings, topic: str) -> Iterator[TopicReader]:
    """A :class:`TopicReader` of ``topic`` for the block."""
    reader = TopicReader(settings, topic)
    try:
        yield reader
    finally:
        reader.close()
