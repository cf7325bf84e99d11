import json
import socket
import time
from pathlib import Path

from twinflow.services.process import (
    PidFile,
    cpu_seconds,
    log_tail,
    port_is_free,
    process_start_ticks,
    spawn,
    terminate,
)


def test_pid_file_tracks_a_live_process_and_terminate_stops_it(tmp_path: Path) -> None:
    pid_file = PidFile(tmp_path / "svc.pid")
    pid = spawn(["sleep", "60"], cwd=tmp_path, log_file=tmp_path / "svc.log", pid_file=pid_file)
    assert pid_file.live_pid() == pid
    terminate(pid, timeout_s=5)
    assert process_start_ticks(pid) is None
    assert pid_file.live_pid() is None
    assert not pid_file.path.exists()


def test_a_recycled_pid_is_not_mistaken_for_the_service(tmp_path: Path) -> None:
    pid_file = PidFile(tmp_path / "svc.pid")
    pid = spawn(["sleep", "60"], cwd=tmp_path, log_file=tmp_path / "svc.log", pid_file=pid_file)
    try:
        record = json.loads(pid_file.path.read_text())
        record["start_ticks"] -= 1  # as if the PID now belonged to another process
        pid_file.path.write_text(json.dumps(record))
        assert pid_file.live_pid() is None
        assert process_start_ticks(pid) is not None  # and it was left alone
    finally:
        terminate(pid, timeout_s=5)


def test_terminate_escalates_to_sigkill(tmp_path: Path) -> None:
    pid_file = PidFile(tmp_path / "stubborn.pid")
    pid = spawn(
        ["bash", "-c", "trap '' TERM; echo ready; sleep 60 & wait"],
        cwd=tmp_path,
        log_file=tmp_path / "stubborn.log",
        pid_file=pid_file,
    )
    deadline = time.monotonic() + 5
    while "ready" not in log_tail(tmp_path / "stubborn.log") and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    terminate(pid, timeout_s=0.5)
    assert process_start_ticks(pid) is None
    assert time.monotonic() - started < 10


def test_port_is_free_sees_a_listener() -> None:

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_is_free(port)
    assert port_is_free(port)


def test_cpu_seconds_grow_while_a_process_works_and_end_with_it(tmp_path: Path) -> None:
    pid_file = PidFile(tmp_path / "busy.pid")
    log_file = tmp_path / "busy.log"
    pid = spawn(
        ["python3", "-c", "while True: pass"], cwd=tmp_path, log_file=log_file, pid_file=pid_file
    )
    try:
        # A loaded machine may give it little of a core: wait for its first 0.2 s.
        deadline = time.monotonic() + 20
        while (used := cpu_seconds(pid)) is not None and used < 0.2:
            assert time.monotonic() < deadline, f"{used} CPU s in 20 s"
            time.sleep(0.1)
        assert used is not None
    finally:
        terminate(pid, timeout_s=5)
    assert cpu_seconds(pid) is None
