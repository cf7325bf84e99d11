"""Recipe 14: recovery stores as deployed, one per process of a cluster.

The Kubernetes StatefulSet gives every flow pod its own recovery volume. Here three
``twinflow run -w 1 -i I -a ...`` processes run on loopback, each with its own store
directory, and the cluster is SIGKILLed (one process, then all), then stopped and
rescaled 3 -> 2: what lands in QuestDB must equal the golden run's, and every restart
must resume where the stores say, not start over. The negative control keeps a copy of
every partition in every store, as earlier twinflows did. Last, a store of another
format must stop ``twinflow run`` before it reads anything.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.chaos.harness import PARTITIONS, ChaosRow, FlowRun, Outcome, Workload, judge
from tests.helpers import free_ports, snapshot_epoch
from twinflow.recovery_store import PARTITIONS as RECOVERY_PARTITIONS
from twinflow.recovery_store import init_db_dir

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
FIRST_BATCH = "first batch from offset"
_POLL_S = 0.25


class Cluster:
    """The processes of one flow cluster over a :class:`FlowRun`'s workload and tables.

    Process ``i`` keeps its recovery store in ``store(i)``, as pod ``i`` keeps it on its
    own volume.
    """

    def __init__(self, run: FlowRun) -> None:
        self.run = run
        self.processes: list[subprocess.Popen[bytes]] = []
        self.starts = 0
        self.exits: list[int | None] = []
        self.logs: list[Path] = []

    def store(self, index: int) -> Path:
        return self.run.work / f"recovery-{index}"

    def start(self, count: int) -> None:
        """Start ``count`` processes, process i on store i, on fresh loopback ports."""
        assert not self.processes, "the cluster is still running"
        addresses = ";".join(f"127.0.0.1:{port}" for port in free_ports(count))
        argv = [sys.executable, "-m", "twinflow", "run", "-w", "1", "-a", addresses]
        for index in range(count):
            env = self.run.env | {
                "TWINFLOW_FLOW__RECOVERY_DIR": str(self.store(index)),
                # Three processes on one host cannot share the metrics port; not tested here.
                "TWINFLOW_METRICS__ENABLED": "false",
                # Slower batches, quicker snapshots: three faults must land mid-stream
                # of a workload one process reads in about 8 s.
                "TWINFLOW_FLOW__BATCH_SIZE": "100",
                "TWINFLOW_FLOW__SNAPSHOT_INTERVAL_S": "0.25",
            }
            log = self.run.work / f"cluster-{self.starts}-p{index}.log"
            self.logs.append(log)
            with log.open("wb") as out:
                self.processes.append(
                    subprocess.Popen(
                        [*argv, "-i", str(index)],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        self.starts += 1

    def alive(self) -> list[bool]:
        return [process.poll() is None for process in self.processes]

    def kill(self, index: int) -> None:
        """SIGKILL one process, by PID."""
        self.processes[index].send_signal(signal.SIGKILL)
        self.processes[index].wait(30)

    def end(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every live process, SIGKILL what is left after 30 s, forget them."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(sig)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
        self.exits.extend(process.returncode for process in self.processes)
        self.processes = []

    def snapshot_epoch(self) -> int:
        return max(snapshot_epoch(self.store(i)) for i in range(3))

    def log_tail(self, chars: int = 2000) -> str:
        tails = [f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in self.logs]
        return "\n".join(tails[-3:])

    def wait_for_first_batches(self, timeout_s: float = 120) -> dict[int, int]:
        """Until every partition of the raw topic was read from; its first offsets."""
        deadline = time.monotonic() + timeout_s
        while len(offsets := self.resumed_at(self.starts - 1)) < PARTITIONS:
            assert all(self.alive()), f"a process exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"no batch in {timeout_s} s:\n{self.log_tail()}"
            time.sleep(0.05)
        return offsets

    def resumed_at(self, start: int) -> dict[int, int]:
        """The raw topic's first offset per Kafka partition in the ``start``-th start."""
        pattern = re.compile(rf"{re.escape(self.run.workload.topic)}#(\d+): {FIRST_BATCH} (\d+)")
        found: dict[int, int] = {}
        for log in self.logs:
            if log.name.startswith(f"cluster-{start}-"):
                text = log.read_text(errors="replace")
                found |= {int(p): int(o) for p, o in pattern.findall(text)}
        return dict(sorted(found.items()))

    def wait_for_snapshot(self, timeout_s: float = 60) -> None:
        """Until two epochs newer than the stores' newest so far are snapshotted.

        Two: right after the first, not every worker's progress is in the stores yet
        and a restart begins at the start of the topic, which would test nothing.
        """
        before = self.snapshot_epoch()
        deadline = time.monotonic() + timeout_s
        while self.snapshot_epoch() <= before + 1:
            assert all(self.alive()), f"a process exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"no snapshot in {timeout_s} s"
            time.sleep(0.02)

    def wait_for_all_to_exit(self, timeout_s: float) -> float | None:
        """Seconds until every process exited on its own, or None after ``timeout_s``."""
        began = time.monotonic()
        while any(self.alive()):
            if time.monotonic() - began > timeout_s:
                return None
            time.sleep(0.1)
        return time.monotonic() - began

    def supervise(self, count: int, timeout_s: float = 420) -> None:
        """Run ``count`` processes until complete; restart the whole cluster if one exits."""
        deadline = time.monotonic() + timeout_s
        if not self.processes:
            self.start(count)
        while not self.run.complete():
            assert time.monotonic() < deadline, (
                f"incomplete after {timeout_s} s: {self.run.counts()}; exits {self.exits}\n"
                f"{self.log_tail()}"
            )
            if not all(self.alive()):
                self.end(signal.SIGKILL)
                self.start(count)
            time.sleep(_POLL_S)


def _partitions(store: Path) -> list[str]:
    return sorted(part.name for part in store.glob("part-*.sqlite3"))


def _kills_then_stop(cluster: Cluster, row: ChaosRow) -> dict[str, dict[int, int]]:
    """(a) SIGKILL one process, restart; (b) SIGKILL all, restart; then Ctrl-C all.

    Each fault lands after two snapshots; returns the raw offsets each restart resumed at.
    """
    cluster.start(3)
    cluster.wait_for_first_batches()
    cluster.wait_for_snapshot()
    cluster.kill(1)
    # A Bytewax cluster is one dataflow: the others cannot go on without process 1.
    exited_in = cluster.wait_for_all_to_exit(60)
    cluster.end(signal.SIGKILL)
    cluster.start(3)
    resumed = {"a": cluster.wait_for_first_batches()}
    row.notes.append(
        "(a) SIGKILL process 1 after a snapshot: "
        + (
            f"the other two exited by themselves within {exited_in:.1f} s"
            if exited_in is not None
            else "the other two kept running 60 s, killed"
        )
        + f"; restart of all 3 resumed at offsets {resumed['a']}"
    )
    cluster.wait_for_snapshot()
    cluster.end(signal.SIGKILL)
    cluster.start(3)
    resumed["b"] = cluster.wait_for_first_batches()
    row.notes.append(f"(b) SIGKILL all 3 after a snapshot, restart at offsets {resumed['b']}")
    cluster.wait_for_snapshot()
    cluster.end(signal.SIGINT)
    return resumed


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_cluster_with_a_store_per_process_survives_kills_and_rescale_3_to_2(
    workload: Workload,
    golden: Outcome,
    chaos_dir: Path,
    chaos_table: list[dict[str, object]],
) -> None:
    run = FlowRun(workload, chaos_dir, "layout")
    cluster = Cluster(run)
    row = ChaosRow("14. cluster of 3, a store per process: kills, rescale 3 -> 2", runs=4)
    began = time.monotonic()
    try:
        resumed = _kills_then_stop(cluster, row)
        layout = {i: _partitions(cluster.store(i)) for i in range(3)}
        # (c) Resumed by 2 processes: process 2 and its store go away, as a scale-down
        # of the StatefulSet removes the pod of the highest ordinal.
        cluster.start(2)
        resumed["c"] = cluster.wait_for_first_batches()
        row.notes.append(f"(c) stop, rescale 3 -> 2, resume at offsets {resumed['c']}")
        cluster.supervise(2)
        row.notes.append(f"partitions per store: {layout}")
        row.notes.append(f"{time.monotonic() - began:.0f} s in all")
        problems = judge(chaos_table, row, run, golden)
    finally:
        cluster.end(signal.SIGINT)
    assert not any(problems.values()), f"{problems}; see {run.work}"
    # Equal to golden also when a restart starts over from offset 0 (outputs are
    # idempotent): resuming is what is tested.
    for phase, offsets in resumed.items():
        assert offsets and all(offsets.values()), f"({phase}) started over: {offsets}"
    # Process 0 holds every partition: a scale-down never takes one away.
    assert layout[0] == [f"part-{p}.sqlite3" for p in range(RECOVERY_PARTITIONS)], layout
    assert layout[1] == layout[2] == [], layout
    run.drop()


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_negative_control_every_store_with_every_partition_does_not_survive_a_rescale(
    workload: Workload,
    chaos_dir: Path,
    chaos_table: list[dict[str, object]],
) -> None:
    """The layout of earlier twinflows: each process made a store of all partitions.

    Each partition is written by one process only; the other copies stay empty. Once
    the process that wrote one is gone, the cluster reads an empty copy: measured, it
    either started over from offset 0 or crashed at start, every time.
    """
    run = FlowRun(workload, chaos_dir, "copies")
    cluster = Cluster(run)
    row = ChaosRow("14. negative control: every store all partitions, rescale 3 -> 2", runs=4)
    for index in range(3):
        cluster.store(index).mkdir(mode=0o700, parents=True)
        init_db_dir(cluster.store(index), RECOVERY_PARTITIONS)
    try:
        resumed = _kills_then_stop(cluster, row)
        cluster.start(2)
        deadline = time.monotonic() + 180
        while all(cluster.alive()) and len(cluster.resumed_at(3)) < PARTITIONS:
            assert time.monotonic() < deadline, f"neither ran nor failed:\n{cluster.log_tail()}"
            time.sleep(0.05)
        crashed = not all(cluster.alive())
        time.sleep(1)  # the other process's last words
        last = [log.read_text(errors="replace").strip().splitlines()[-1:] for log in cluster.logs]
        outcome = (
            f"crashed at start: {sorted({line for lines in last[-2:] for line in lines})}"
            if crashed
            else f"resumed at offsets {cluster.resumed_at(3)}"
        )
        # Counted in partitions, not rows: a crashed cluster resumes none of them.
        offsets = cluster.resumed_at(3)
        unresumed = PARTITIONS if crashed else sum(1 for offset in offsets.values() if not offset)
        row.notes.append(
            f"(c) stop, rescale 3 -> 2: {outcome}; lost: raw partitions that did not resume "
            f"from their snapshot ({unresumed} of {PARTITIONS}); rows not judged"
        )
        chaos_table.append(
            vars(row)
            | {"lost": unresumed, "duplicates": "n/a", "mismatches": "n/a"}
            | {"notes": "; ".join(row.notes)}
        )
    finally:
        cluster.end(signal.SIGINT)
    # (a) and (b) keep their processes and their partitions: those resume.
    for phase in ("a", "b"):
        assert all(resumed[phase].values()), f"({phase}) started over: {resumed[phase]}"
    assert crashed or not all(cluster.resumed_at(3).values()), (
        f"the rescale resumed where it stopped: {cluster.resumed_at(3)}; the layout of "
        "every partition in every store may now be safe (see twinflow/recovery_store.py)"
    )
    run.drop()


def test_a_store_of_another_format_stops_run_with_the_fix(
    workload: Workload, chaos_dir: Path
) -> None:
    run = FlowRun(workload, chaos_dir, "format")
    run.recovery_dir.mkdir(mode=0o700)
    marker = run.recovery_dir / "twinflow-store.json"
    marker.write_text(json.dumps({"format": 999, "written_by": "twinflow 9.9.9"}))
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "twinflow", "run"],
        env=run.env | {"TWINFLOW_METRICS__ENABLED": "false"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - began
    message = " ".join(result.stderr.split())
    assert result.returncode == 1, result.stderr[-3000:]
    assert "format 999" in message and "twinflow 9.9.9" in message, message[-2000:]
    assert str(run.recovery_dir) in message and "move" in message.lower(), message[-2000:]
    assert run.counts()["readings"] == 0, "it processed data before refusing"
    assert elapsed < 60, f"refused only after {elapsed:.0f} s"
    run.drop()
