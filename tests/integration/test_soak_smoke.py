"""A one-minute soak at a low rate: the whole pipeline on its own stack, then the report.

One minute is too short for the memory verdict (the processes are still warming up);
what this holds the soak to is that it starts and stops every process, counts what the
producer and the simulator sent against what QuestDB holds, and writes its report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import clean_env
from twinflow.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.soak]


@pytest.mark.timeout(600)
def test_a_one_minute_soak_loses_nothing_and_writes_its_report(
    stack: Settings, tmp_path: Path
) -> None:
    soak = ["--minutes", "1", "--rate", "600", "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", *soak],
        env=clean_env(state_dir=str(stack.state_dir)),
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((tmp_path / "soak.json").read_text())
    counts = doc["counts"]
    assert doc["errors"] == [], doc["errors"]
    assert counts["lost"] == 0 and counts["extra_rows"] == 0, counts
    # Both sources ran: the paced workload and the simulator over MQTT.
    assert counts["workload_valid_readings"] > 20_000 and counts["simulator_valid_readings"] > 5_000
    assert counts["workload_dead_letters"] == counts["workload_expected_dead_letters"] > 0
    names = set(doc["processes"])
    assert {"flow", "serve", "mqtt bridge", "opcua bridge", "simulator", "producer"} <= names
    assert {"kafka", "questdb", "mosquitto"} <= names
    assert len(doc["samples"]) >= 10
    assert doc["verdicts"]["lag_bounded"] and doc["verdicts"]["errors"] == 0
    assert "| lost |" in (tmp_path / "soak.md").read_text()
    assert (tmp_path / "soak.png").stat().st_size > 10_000
