"""The soak's pure parts: series summaries, verdicts, the rate it runs at, its report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.soak import (
    LAG_MARGIN_S,
    RSS_GROWTH_LIMIT,
    SENSORS,
    chart,
    default_rate,
    growth_per_hour,
    markdown,
    max_rate,
    merged_model,
    split_rate,
    summarize,
    verdicts,
)
from benchmarks.workload import WorkloadConfig
from twinflow.errors import ConfigError
from twinflow.settings import DEFAULT_TWIN_MODEL
from twinflow.twin_model import load_twin_model

HOUR = 3600.0


def _doc(
    flow_mib: list[float],
    lag: list[int],
    *,
    errors: int = 0,
    lost: int = 0,
    wal: list[int] | None = None,
) -> dict[str, Any]:
    """A run of one process sampled at even times over an hour."""
    step = HOUR / (len(flow_mib) - 1)
    samples = [
        {
            "t": i * step,
            "rss_mib": {"flow": mib + 80},
            "anon_mib": {"flow": mib},
            "flow_memory": {"malloc in use MiB": mib / 2, "malloc free MiB": mib / 4 + i},
            "lag": lag[i],
            "wal_lag": (wal or [0] * len(lag))[i],
            "produced": i * 1000,
            "accepted": i * 990,
        }
        for i, mib in enumerate(flow_mib)
    ]
    return {
        "created": "2026-12-01T12:00:00+00:00",
        "config": {
            "minutes": 60,
            "seconds": HOUR,
            "total_rate": 600.0,
            "simulator_rate": 150.0,
            "producer_entities": 75,
            "sensors": SENSORS,
            "readings_per_message": SENSORS,
            "every_s": step,
            "run_folder": "/tmp/run",
            "interrupted": False,
        },
        "processes": ["flow"],
        "samples": samples,
        "errors": [{"t": 1.0, "kind": "exit", "detail": "flow exited"}] * errors,
        "counts": {"lost": lost},
    }


def test_a_summary_holds_start_end_and_extremes() -> None:
    summary = summarize([200.0, 180.0, 260.0, 210.0])
    assert summary is not None
    assert (summary.start, summary.end, summary.min, summary.max) == (200, 210, 180, 260)
    assert summary.mean == pytest.approx(212.5)
    assert summarize([]) is None


def test_growth_is_measured_after_the_warm_up_only() -> None:
    times = [0, 600, 1200, 1800, 2400, 3000, 3600]
    # Fast growth while warming up, then flat: flat.
    values = [50, 150, 190, 200, 200, 200, 200]
    assert growth_per_hour(times, values, 1800) == pytest.approx(0.0)
    assert growth_per_hour(times, values, 0) > 0.5
    # 10 % of 200 MiB in the half hour after warm-up is 20 %/h.
    leaking = [50, 150, 190, 200, 206.67, 213.33, 220]
    growth = growth_per_hour(times, leaking, 1800)
    assert growth == pytest.approx(0.19, abs=0.01)


def test_a_steady_run_passes_every_verdict() -> None:
    doc = _doc([100, 140, 150, 150, 150], lag=[500, 800, 300, 700, 400], wal=[3, 1, 2, 0, 0])
    result = verdicts(doc)
    assert result["memory_flat"] and result["lag_bounded"] and result["wal_bounded"]
    assert result["memory"]["flow"]["growth_per_hour"] == pytest.approx(0.0)
    assert result["passed"]


def test_memory_growing_in_the_second_half_is_not_flat() -> None:
    # The second half grows by 15 MiB over 30 min on about 160 MiB: about 19 %/h.
    doc = _doc([100, 140, 150, 157.5, 165], lag=[0] * 5)
    result = verdicts(doc)
    assert result["memory"]["flow"]["growth_per_hour"] > RSS_GROWTH_LIMIT
    assert not result["memory_flat"] and not result["passed"]


def test_lag_growing_past_the_first_half_and_its_margin_is_unbounded() -> None:
    margin = 600.0 / SENSORS * LAG_MARGIN_S  # messages of input in the margin
    within = _doc([150] * 5, lag=[400, 900, 0, 900 + int(margin), 0])
    assert verdicts(within)["lag_bounded"]
    growing = _doc([150] * 5, lag=[100, 200, 300, 400, 900 + int(margin) + 1])
    result = verdicts(growing)
    assert not result["lag_bounded"] and not result["passed"]
    assert result["lag"]["first_max"] == 200 and result["lag"]["second_max"] > 900


def test_an_error_or_a_lost_reading_fails_the_run() -> None:
    assert not verdicts(_doc([150] * 5, lag=[0] * 5, errors=1))["passed"]
    lost = verdicts(_doc([150] * 5, lag=[0] * 5, lost=3))
    assert lost["lost"] == 3 and not lost["passed"]


def test_the_rate_is_half_the_correct_sustained_one_worker_twinflow(tmp_path: Path) -> None:
    def result(
        workers: int, processes: int, rate: int, *, seconds: float = 150, correct: bool = True
    ) -> dict[str, Any]:
        return {
            "kind": "twinflow",
            "workers": workers,
            "processes": processes,
            "readings_per_s": rate,
            "seconds": seconds,
            "correct": correct,
        }

    # The soak runs one worker in one process: the layouts with more cores do not count,
    # nor a run too short to hold its share of snapshots (4 intervals of 30 s).
    report = {
        "results": [
            result(1, 1, 82_370),
            result(1, 1, 120_000, seconds=22),
            result(1, 1, 95_000, correct=False),
            result(2, 1, 110_000),
            result(1, 2, 120_000),
        ]
    }
    assert max_rate(report, min_seconds=120) == 82_370
    folder = tmp_path / "bench" / "throughput"
    folder.mkdir(parents=True)
    (folder / "throughput.json").write_text(json.dumps(report))
    assert default_rate(tmp_path, snapshot_interval_s=30) == 41_185
    # With only short runs the soak names the bench that measures a sustained maximum.
    report["results"] = [result(1, 1, 120_000, seconds=22)]
    (folder / "throughput.json").write_text(json.dumps(report))
    with pytest.raises(ConfigError, match=r"at least 120 s: run `twinflow bench --variants"):
        default_rate(tmp_path, snapshot_interval_s=30)


def test_without_a_bench_report_the_soak_asks_for_a_rate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--rate"):
        default_rate(tmp_path, snapshot_interval_s=30)


def test_the_producer_and_simulator_add_up_to_the_rate() -> None:
    sim, entities = split_rate(41_185)
    assert sim == 300 and abs(sim + entities * SENSORS - 41_185) <= SENSORS / 2
    sim, entities = split_rate(100)
    assert sim == 25 and entities == 12


def test_the_flow_model_holds_the_plant_first_then_the_machines(tmp_path: Path) -> None:
    config = WorkloadConfig(entities=12, sensors=SENSORS, readings=12 * SENSORS * 30)
    path = tmp_path / "model.yaml"
    plant = merged_model(DEFAULT_TWIN_MODEL, config, path)
    model = load_twin_model(path)
    ids = [entity.id for entity in model.entities]
    original = yaml.safe_load(DEFAULT_TWIN_MODEL.read_text())["entities"]
    assert plant == len(original) and ids[:plant] == [e["id"] for e in original]
    assert ids[plant:] == config.entity_ids()


def test_the_report_states_each_verdict_and_draws_its_panels(tmp_path: Path) -> None:
    doc = _doc([100, 140, 150, 157.5, 165], lag=[0, 10, 0, 5, 0])
    doc["verdicts"] = verdicts(doc)
    text = markdown(doc)
    assert "**FAILED**" in text and "| memory flat |" in text and "**no**" in text
    assert "| anon RSS MiB: flow | 100.0 | 165.0 | 100.0 | 165.0 |" in text
    # Where the flow's memory went is told, with its growth, but is no verdict.
    assert "| flow malloc in use MiB | 50.0 | 82.5 | 50.0 | 82.5 |" in text
    free_row = next(line for line in text.splitlines() if "flow malloc free MiB" in line)
    assert free_row.endswith("(info) |") and "+" in free_row
    chart(doc, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000
