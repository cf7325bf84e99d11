"""The NAB evaluation harness on two real files: replay, windows, scoring and report fit."""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from benchmarks.nab_evaluation import DEFAULT_DATA, LABELS, main
from benchmarks.nab_scoring import PROFILES

# ec2_request_latency repeats 03:00 eleven times (a clock set back); load_balancer_spikes
# is in another group, so groups are summed separately.
FILES = (
    "realKnownCause/ec2_request_latency_system_failure.csv",
    "artificialWithAnomaly/art_load_balancer_spikes.csv",
)


def copy_nab(target: Path) -> Path:
    """The two files, linked, and their labels only, under ``target``."""
    if (
        not all((DEFAULT_DATA / "data" / name).is_file() for name in FILES)
        or not (DEFAULT_DATA / LABELS).is_file()
    ):
        pytest.skip(f"NAB data not found under {DEFAULT_DATA}")
    for name in FILES:
        (target / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (target / "data" / name).symlink_to(DEFAULT_DATA / "data" / name)
    labels = json.loads((DEFAULT_DATA / LABELS).read_text())
    (target / LABELS).parent.mkdir(parents=True)
    (target / LABELS).write_text(json.dumps({name: labels[name] for name in FILES}))
    return target


@dataclass
class Run:
    data: Path
    out: Path
    results: dict[str, Any]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    base = tmp_path_factory.mktemp("nab")
    data, out = copy_nab(base / "nab"), base / "out"
    assert main(["--data", str(data), "--out", str(out)]) == 0
    return Run(data, out, json.loads((out / "nab.json").read_text()))


def test_every_row_is_replayed_and_scored_once(run: Run) -> None:
    entries = {entry["file"]: entry for entry in run.results["per_file"]}
    assert sorted(entries) == sorted(FILES)
    for name in FILES:
        source = pd.read_csv(run.data / "data" / name, dtype={"timestamp": str})
        replayed = pd.read_csv(run.out / "replays" / name, dtype={"timestamp": str})
        entry = entries[name]
        probation = min(math.floor(0.15 * len(source)), 750)
        assert (entry["rows"], entry["probationary_rows"]) == (len(source), probation)
        assert replayed["timestamp"].tolist() == source["timestamp"].tolist()
        assert replayed["score"].notna().all()
        alarms = replayed.index[replayed["alarm_raised"] == 1].tolist()
        assert entry["alarm_rows"] == alarms
        assert entry["alarms_raised"] == len(alarms)
        assert all(row >= probation for row in alarms)  # the warm-up never alarms
        # Every alarm after probation is either in a window or a false positive, once.
        assert (
            entry["alarms_in_windows"]
            + entry["false_positive_alarms"]
            + entry["alarms_in_probation"]
            == entry["alarms_raised"]
        )
        in_alarm = replayed["is_anomaly"][probation:]
        assert entry["in_alarm_share"] == pytest.approx(in_alarm.mean(), abs=1e-4)
        assert entry["windows_detected"] + entry["windows_missed"] == len(entry["windows"])


def test_window_rows_are_the_label_timestamps(run: Run) -> None:
    labels = json.loads((run.data / LABELS).read_text())
    for entry in run.results["per_file"]:
        timestamps = pd.read_csv(run.data / "data" / entry["file"], dtype={"timestamp": str})[
            "timestamp"
        ]
        limits = labels[entry["file"]]
        assert len(entry["windows"]) == len(limits) > 0
        for (left, right), (start, end) in zip(entry["windows"], limits, strict=True):
            assert timestamps[left] == start.split(".")[0]
            assert timestamps[right] == end.split(".")[0]
            assert left < right


def test_the_corpus_score_is_nabs_normalization_of_the_files(run: Run) -> None:
    results = run.results
    for name, profile in PROFILES.items():
        raw = sum(entry["raw"][name] for entry in results["per_file"])
        windows = sum(len(entry["windows"]) for entry in results["per_file"])
        null, perfect = -profile.fn_weight * windows, profile.tp_weight * windows
        assert results["totals"][name]["null"] == pytest.approx(null)
        assert results["scores"][name] == pytest.approx(
            100 * (raw - null) / (perfect - null), abs=0.01
        )
    assert sorted(results["groups"]) == ["artificialWithAnomaly", "realKnownCause"]
    busiest = results["largest_in_alarm_share"]
    assert busiest["share"] == max(e["in_alarm_share"] for e in results["per_file"])
    assert all(entry["seconds"] > 0 for entry in results["per_file"])


def test_json_markdown_and_plots_are_written(run: Run) -> None:
    out = run.out
    report = (out / "nab.md").read_text()
    assert "| twinflow default |" in report
    assert "| scoreboard: Numenta HTM | 70.5 |" in report
    for name in FILES:
        assert f"| {name} |" in report
        assert (out / "plots" / name.replace(".csv", ".png")).stat().st_size > 10_000


def test_no_plots_writes_none(tmp_path: Path) -> None:
    nab, out = copy_nab(tmp_path / "nab"), tmp_path / "out"
    assert main(["--data", str(nab), "--out", str(out), "--no-plots"]) == 0
    assert (out / "nab.json").is_file()
    assert not (out / "plots").exists()


def test_a_file_without_labels_stops_the_run(tmp_path: Path) -> None:
    nab = copy_nab(tmp_path / "nab")
    (nab / LABELS).write_text(json.dumps({FILES[0]: []}))
    with pytest.raises(ValueError, match="no entry"):
        main(["--data", str(nab), "--out", str(tmp_path / "out"), "--no-plots"])


def test_absent_data_is_skipped_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 0
    assert "skipped: no NAB files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
