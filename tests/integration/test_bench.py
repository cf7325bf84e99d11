"""``twinflow bench --smoke`` on the real services: every variant runs and is checked.

The smoke workload is tiny, so its figures mean nothing; what this test holds the
harness to is that every variant consumed the same workload and that its outputs were
counted against what the workload must produce.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.throughput import VARIANTS
from tests.helpers import clean_env, twinflow_cli
from twinflow.settings import Settings


# Seven variants, each with a 30-s latency warm-up, and the peer's virtualenv on first use.
@pytest.mark.timeout(900)
def test_smoke_run_checks_every_variant_and_writes_the_report(
    stack: Settings, tmp_path: Path
) -> None:
    result = twinflow_cli(
        clean_env(state_dir=str(stack.state_dir)),
        "bench",
        "--smoke",
        "--out",
        str(tmp_path),
        timeout=880,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    expected = report["expected"]
    assert expected["malformed_messages"] and expected["out_of_range_readings"]
    assert expected["late_readings"]
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {v.name for v in VARIANTS}
    for name, variant in results.items():
        assert variant["correct"], f"{name}: {variant['problems']}"
        assert variant["readings_per_s"] > 0 and variant["peak_rss_mib"] > 0
        assert variant["latency"].get("p50_ms") is not None, name
    assert results["limit A: Kafka consume"]["counts"] == {"messages": expected["messages"]}
    for name in ("twinflow 1 worker", "twinflow 2 workers", "twinflow 2 processes x 1"):
        assert results[name]["counts"] == {
            "readings": expected["valid_readings"],
            "sensor_windows": results[name]["counts"]["sensor_windows"],
            "deadletters": expected["malformed_messages"] + expected["out_of_range_readings"],
        }
    for name in ("peer 1: tutorial Bytewax", "peer 2: Quix Streams"):
        assert results[name]["counts"]["readings"] == expected["valid_readings"]
    markdown = (tmp_path / "throughput.md").read_text()
    assert all(v.name in markdown for v in VARIANTS) and "## Targets" in markdown
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
