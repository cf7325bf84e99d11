"""Recipes 4 and 6: QuestDB down for 30 s and for 5 min, and the Kafka broker SIGKILLed
and restarted, while the flow runs with no supervisor: it must wait the outage out in
one run (its sinks retry with back-off, its sources wait for the broker), and its tables
must equal the golden run's.

These run on a second stack (own Kafka and QuestDB, own ports) so killing a server
never disturbs the session's other tests; the workload is reproduced there exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosRow, FlowRun, Outcome, Workload, judge, produce
from tests.helpers import isolated_settings
from twinflow.services import manager
from twinflow.services.process import crash, port_is_free
from twinflow.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.soak]
log = logging.getLogger("tests.chaos.outages")


@pytest.fixture(scope="module")
def second_stack(
    stack: Settings, workload: Workload, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workload]:
    """Kafka and QuestDB of their own, holding the session's workload."""
    settings = isolated_settings(stack, tmp_path_factory.mktemp("outages") / "state")
    manager.up(settings, ["kafka", "questdb"], log.info)
    try:
        yield produce(settings, settings.state_dir / "chaos", workload.start_ms)
    finally:
        manager.down(settings, ["kafka", "questdb"], log.info)


def _sigkill(settings: Settings, name: str) -> None:
    (service,) = manager.services(settings, [name])
    pid = service.pid_file.live_pid()
    assert pid is not None, f"{name} is not running"
    crash(pid)
    service.pid_file.path.unlink(missing_ok=True)
    # The kernel tears the dead server's listener down a moment after the process.
    deadline = time.monotonic() + 30
    while not all(port_is_free(port) for port in service.ports().values()):
        assert time.monotonic() < deadline, f"{name}'s ports still taken after SIGKILL"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("service", "down_s"),
    [
        pytest.param("questdb", 30, id="questdb-30s"),
        pytest.param("questdb", 300, id="questdb-5min"),
        pytest.param("kafka", 0, id="kafka-restart"),
    ],
)
@pytest.mark.timeout(1200)
def test_a_server_outage_mid_run_loses_nothing(
    service: str,
    down_s: int,
    second_stack: Workload,
    golden: Outcome,
    chaos_dir: Path,
    chaos_table: list[dict[str, object]],
) -> None:
    settings = second_stack.settings
    run = FlowRun(second_stack, chaos_dir, f"{service}{down_s}")
    what = f"SIGKILL, down {down_s} s, restart" if down_s else "SIGKILL, restart at once"
    number = "4" if service == "questdb" else "6"
    row = ChaosRow(f"{number}. {service} {what}; no supervisor", runs=0)
    try:
        run.start()
        run.wait_for_log("first batch from offset")
        run.wait_for_snapshot()
        _sigkill(settings, service)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < down_s:
            assert run.running(), f"the flow stopped during the outage:\n{run.log_tail()}"
            time.sleep(0.5)
        manager.up(settings, [service], log.info)
        back_at = time.monotonic()
        run.supervise(timeout_s=600, restart=False)
        row.notes.append(f"complete {time.monotonic() - back_at:.0f} s after {service} was back")
        log_text = run.logs[-1].read_text(errors="replace")
        waits = log_text.count("is unavailable (")
        row.notes.append(f"sink outage waits logged: {waits}")
        row.runs = run.starts
        problems = judge(chaos_table, row, run, golden)
        assert run.running() and run.starts == 1, f"the flow stopped: exits {run.exits}"
    finally:
        run.stop()
    assert not any(problems.values()), f"{problems}; see {run.work}"
    if service == "questdb":
        assert waits >= 1, "the QuestDB sink never logged that it waited"
    run.drop()
