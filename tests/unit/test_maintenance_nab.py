"""The maintenance forecaster's report on NAB's machine temperature: keys, limits, plot."""

import csv
import json
import math
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from benchmarks.maintenance_on_nab import CHECKPOINTS_H, FILE, STEM, main
from benchmarks.nab_evaluation import DEFAULT_DATA, LABELS

TOP_KEYS = {
    "benchmark",
    "data",
    "file",
    "rows",
    "rows_fed",
    "late_rows_skipped",
    "rule",
    "reference",
    "probation_holds_label_window",
    "literal_15_percent",
    "limits",
    "range",
    "config",
    "bucket_closes",
    "bucket_closes_with_forecast",
    "first_forecast",
    "label_windows",
    "alarms",
    "excursions",
    "first_crossing",
    "seconds",
}
WINDOW_KEYS = {
    "window",
    "start",
    "end",
    "rows",
    "lookback_start",
    "forecast_share_in_lookback",
    "first_forecast_in_lookback",
    "min_time_to_limit_low_h_in_lookback",
    "checkpoints",
    "alarm_active_at_start",
    "alarm_since",
    "alarms_raised_in_lookback",
    "alarms_raised_in_window",
    "first_crossing",
}
ALARM_KEYS = {"alarm_id", "raised", "ended", "end_event", "relation", "forecast_at_raise"}


@dataclass
class Run:
    out: Path
    results: dict[str, Any]
    rows: list[tuple[datetime, float]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    source = DEFAULT_DATA / "data" / FILE
    if not source.is_file() or not (DEFAULT_DATA / LABELS).is_file():
        pytest.skip(f"NAB data not found under {DEFAULT_DATA}")
    out = tmp_path_factory.mktemp("maintenance-nab")
    assert main(["--data", str(DEFAULT_DATA), "--out", str(out)]) == 0
    with source.open(newline="") as handle:
        rows = [
            (datetime.fromisoformat(row["timestamp"]), float(row["value"]))
            for row in csv.DictReader(handle)
        ]
    return Run(out, json.loads((out / f"{STEM}.json").read_text()), rows)


def test_files_and_documented_keys(run: Run) -> None:
    assert (run.out / f"{STEM}.md").read_text().startswith("# Predictive maintenance on NAB")
    assert (run.out / f"{STEM}.png").stat().st_size > 10_000
    results = run.results
    assert set(results) >= TOP_KEYS
    assert results["file"] == FILE
    assert results["rows"] == len(run.rows)
    assert results["rows_fed"] + len(results["late_rows_skipped"]) == len(run.rows)
    windows = results["label_windows"]
    assert len(windows) == len(json.loads((DEFAULT_DATA / LABELS).read_text())[FILE])
    for window in windows:
        assert set(window) >= WINDOW_KEYS
        assert [c["hours_before"] for c in window["checkpoints"]] == list(CHECKPOINTS_H)
    for alarm in results["alarms"]:
        assert set(alarm) >= ALARM_KEYS


def test_limits_come_from_the_probation_only(run: Run) -> None:
    probation = min(math.floor(0.15 * len(run.rows)), 750)
    head = [value for _, value in run.rows[:probation]]
    mean, std = statistics.fmean(head), statistics.pstdev(head)
    results = run.results
    assert results["reference"]["rows"] == probation
    assert results["limits"]["alarm_low"] == pytest.approx(mean - 6 * std, abs=1e-5)
    assert results["limits"]["alarm_high"] == pytest.approx(mean + 6 * std, abs=1e-5)
    everything = [value for _, value in run.rows]
    assert results["limits"]["alarm_low"] != pytest.approx(
        statistics.fmean(everything) - 6 * statistics.pstdev(everything), abs=1e-3
    )
    low, high = results["range"]
    assert low < results["limits"]["alarm_low"] < results["limits"]["alarm_high"] < high
    assert low < min(everything) and max(everything) < high


def test_the_probation_holds_no_label_window(run: Run) -> None:
    labels = json.loads((DEFAULT_DATA / LABELS).read_text())[FILE]
    end_of_probation = run.rows[run.results["reference"]["rows"] - 1][0]
    assert all(datetime.fromisoformat(start) > end_of_probation for start, _ in labels)
    assert run.results["probation_holds_label_window"] is False


def test_excursions_lie_past_the_limits(run: Run) -> None:
    limits = run.results["limits"]
    outside = [
        k
        for k, (_, value) in enumerate(run.rows)
        if not limits["alarm_low"] <= value <= limits["alarm_high"]
    ]
    covered = [
        k
        for entry in run.results["excursions"]
        for k in range(entry["first_row"], entry["last_row"] + 1)
    ]
    assert covered == outside
