"""The SKAB evaluation harness on two real runs: replay, scoring and report fit together."""

import json
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.skab_evaluation import DEFAULT_DATA, TRAIN_ROWS, main

RUNS = ("0.csv", "1.csv")


@pytest.fixture
def skab(tmp_path: Path) -> Path:
    source = DEFAULT_DATA / "valve1"
    if not all((source / name).is_file() for name in RUNS):
        pytest.skip(f"SKAB data not found under {DEFAULT_DATA}")
    data = tmp_path / "skab"
    (data / "valve1").mkdir(parents=True)
    for name in RUNS:
        (data / "valve1" / name).symlink_to(source / name)
    return data


def test_the_harness_scores_every_row_after_training_once(skab: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--data", str(skab), "--out", str(out), "--default-only"]) == 0
    results = json.loads((out / "skab.json").read_text())
    default = results["configs"]["twinflow default"]
    scored = sum(len(pd.read_csv(skab / "valve1" / name, sep=";")) - TRAIN_ROWS for name in RUNS)
    pooled = default["pooled"]
    assert pooled["tp"] + pooled["fp"] + pooled["fn"] + pooled["tn"] == scored
    assert pooled["tp"] + pooled["fn"] == sum(
        int(pd.read_csv(skab / "valve1" / name, sep=";")["anomaly"][TRAIN_ROWS:].sum())
        for name in RUNS
    )
    assert 0 <= pooled["f1"] <= 1
    for name in RUNS:
        replayed = pd.read_csv(out / "replays" / "twinflow-default" / "valve1" / name)
        assert len(replayed) == len(pd.read_csv(skab / "valve1" / name, sep=";"))
        assert (out / "plots" / "valve1" / name.replace(".csv", ".png")).stat().st_size > 10_000
    assert "| twinflow default |" in (out / "skab.md").read_text()


def test_absent_data_is_skipped_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 0
    assert "skipped: no SKAB runs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
