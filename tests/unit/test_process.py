import json
import socket
import time
from pathlib import Path

from twinflow.services.process import (
    PidFile,
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
