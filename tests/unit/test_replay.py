"""``twinflow replay``: the flow's detection over a CSV, one verdict per input row."""

import csv
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import clean_env, twinflow_cli
from twinflow.detection import DetectorConfig
from twinflow.replay import ReplayError, ReplayOptions, replay_csv, replay_file

WARMUP = 200


def signal_rows(n: int = 400, shift_from: int = 300, seed: int = 0) -> list[list[str]]:
    """``time;flow;pressure;label``: flow drops by 5 sigma from ``shift_from`` on."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        flow = rng.normal(30.0 - (5.0 if i >= shift_from else 0.0), 1.0)
        rows.append(
            [
                f"2026-01-01 00:{i // 60:02d}:{i % 60:02d}",
                f"{flow:.4f}",
                f"{rng.normal(2.0, 0.1):.4f}",
                str(int(i >= shift_from)),
            ]
        )
    return rows


def write(
    path: Path,
    rows: list[list[str]],
    header: str = "time;flow;pressure;label",
    delimiter: str = ";",
) -> Path:
    lines = [header.replace(";", delimiter)] + [delimiter.join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def replay(path: Path, **options: object) -> list[dict[str, str]]:
    out = path.with_suffix(".out.csv")
    replay_file(path, out, ReplayOptions(**options))  # type: ignore[arg-type]
    with out.open() as f:
        return list(csv.DictReader(f))


LABELLED = {"exclude_columns": ("label",), "warmup_rows": WARMUP}


def test_one_row_per_input_row_in_order_with_the_timestamp_copied(tmp_path: Path) -> None:
    rows = signal_rows()
    out = replay(write(tmp_path / "in.csv", rows), **LABELLED)
    assert [r["timestamp"] for r in out] == [row[0] for row in rows]
    assert list(out[0]) == ["timestamp", "score", "is_anomaly", "alarm_raised"]
    assert {r["is_anomaly"] for r in out} <= {"0", "1"}
    assert all(math.isfinite(float(r["score"])) for r in out)


def test_the_warm_up_never_flags_and_a_clear_shift_is_found(tmp_path: Path) -> None:
    out = replay(write(tmp_path / "in.csv", signal_rows()), **LABELLED)
    flags = [r["is_anomaly"] == "1" for r in out]
    assert not any(flags[:WARMUP])
    assert not any(flags[WARMUP:300])  # normal after the warm-up: no false alarm
    assert sum(flags[300:]) > 80  # the smoothed shift is flagged within a few rows


def test_the_same_input_gives_the_same_output(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", signal_rows())
    for config in (DetectorConfig(), DetectorConfig(periods=(), smoothing=(0.05,))):
        options = {**LABELLED, "detector": config}
        assert replay(path, **options) == replay(path, **options)


def test_one_alarm_is_raised_per_incident_and_its_rows_are_marked(tmp_path: Path) -> None:
    rows = signal_rows(n=700, shift_from=300)
    for i in range(450, 700):  # the flow comes back at row 450
        rows[i][1] = rows[i - 400][1]
    out = replay(write(tmp_path / "in.csv", rows), **LABELLED)
    raised = [i for i, r in enumerate(out) if r["alarm_raised"] == "1"]
    inside = [i for i, r in enumerate(out) if r["is_anomaly"] == "1"]
    assert len(raised) == 1 and 300 <= raised[0] < 320  # one incident, one alarm
    assert inside[0] == raised[0]  # in alarm from the row that raised it
    assert inside == list(range(inside[0], inside[-1] + 1))  # one span: no flapping
    assert 450 <= inside[-1] < 450 + 60  # cleared soon after the flow came back
    assert all(r["alarm_raised"] == "0" for r in out[:WARMUP])


def test_a_lasting_new_level_is_rebaselined(tmp_path: Path) -> None:
    rows = signal_rows(n=1200, shift_from=300)
    out = replay(write(tmp_path / "in.csv", rows), **LABELLED)
    inside = [i for i, r in enumerate(out) if r["is_anomaly"] == "1"]
    assert inside and inside[-1] - inside[0] + 1 <= WARMUP  # ended after one warm-up
    assert sum(r["alarm_raised"] == "1" for r in out) == 1  # the new level is normal now


def test_dates_in_the_time_column_place_windows_in_their_day(tmp_path: Path) -> None:
    # A daily shift pattern: busy by day, quiet at night, 15-minute rows for 14 days,
    # then a day without the shift.
    hour = 4
    rows = []
    rng = np.random.default_rng(1)
    for i in range(15 * 24 * hour):
        day, hour_of_day = divmod(i // hour, 24)
        busy = 8 <= hour_of_day < 18 and day != 14
        stamp = f"2026-03-{1 + day:02d} {hour_of_day:02d}:{i % hour * 15:02d}:00"
        rows.append([stamp, f"{(90.0 if busy else 20.0) + rng.normal(0, 1.0):.3f}"])
    path = write(tmp_path / "days.csv", rows, header="time;load")
    dated = replay(path, warmup_rows=400)
    assert not any(r["alarm_raised"] == "1" for r in dated[400 : 14 * 24 * hour])
    assert any(r["alarm_raised"] == "1" for r in dated[14 * 24 * hour :])
    numbered = [[str(i), value] for i, (_, value) in enumerate(rows)]
    counted = replay(write(tmp_path / "rows.csv", numbered, header="time;load"), warmup_rows=400)
    # Row numbers are no clock: no cycle is learned, and a quiet day looks like a night.
    assert not any(r["alarm_raised"] == "1" for r in counted[14 * 24 * hour :])
    assert [r["timestamp"] for r in counted] == [str(i) for i in range(len(rows))]


def test_a_time_column_that_stops_being_dates_is_refused(tmp_path: Path) -> None:
    rows = signal_rows(n=260)
    rows[100][0] = "soon"
    with pytest.raises(ReplayError, match="line 102, column 'time': 'soon' is not a date"):
        replay(write(tmp_path / "in.csv", rows), **LABELLED)


def test_excluded_columns_never_reach_the_model(tmp_path: Path) -> None:
    rows = signal_rows()
    scrambled = [[*row[:3], str(i % 7)] for i, row in enumerate(rows)]
    first = replay(write(tmp_path / "a.csv", rows), **LABELLED)
    second = replay(write(tmp_path / "b.csv", scrambled), **LABELLED)
    assert first == second
    # Not excluded, the label is a sensor, and the scores change.
    assert replay(write(tmp_path / "c.csv", rows), warmup_rows=WARMUP) != first


def test_time_column_and_delimiters(tmp_path: Path) -> None:
    rows = signal_rows(n=260)
    semicolons = replay(write(tmp_path / "a.csv", rows), **LABELLED)
    commas = replay(write(tmp_path / "b.csv", rows, delimiter=","), **LABELLED)
    assert commas == semicolons  # detected
    pipes = replay(write(tmp_path / "c.csv", rows, delimiter="|"), delimiter="|", **LABELLED)
    assert pipes == semicolons
    # The time column need not come first; it never reaches the model either.
    moved = [[row[1], row[0], *row[2:]] for row in rows]
    out = replay(
        write(tmp_path / "d.csv", moved, header="flow;time;pressure;label"),
        time_column="time",
        **LABELLED,
    )
    assert out == semicolons


def test_rows_of_one_window_share_its_verdict(tmp_path: Path) -> None:
    # 60 windows of warm-up at least (the threshold's calibration needs them).
    rows = signal_rows(n=905, shift_from=700)
    out = replay(
        write(tmp_path / "in.csv", rows),
        window_rows=10,
        exclude_columns=("label",),
        warmup_rows=600,
    )
    assert len(out) == 905
    for start in range(0, 905, 10):
        window = out[start : start + 10]
        assert len({(r["score"], r["is_anomaly"]) for r in window}) == 1
    assert not any(r["is_anomaly"] == "1" for r in out[:700])
    assert sum(r["is_anomaly"] == "1" for r in out[700:]) > 150


def test_missing_cells_are_missing_readings(tmp_path: Path) -> None:
    rows = signal_rows(n=260)
    for i in range(0, 260, 7):
        rows[i][2] = ""  # no pressure reading
    for i in (10, 11, 250):
        rows[i][1] = rows[i][2] = "NaN"  # no reading at all at these instants
    out = replay(write(tmp_path / "in.csv", rows), **LABELLED)
    assert len(out) == 260
    empty = [i for i, r in enumerate(out) if r["score"] == ""]
    assert empty == [10, 11, 250]
    assert all(r["is_anomaly"] == "0" for r in out)


def test_the_defaults_are_the_flows(tmp_path: Path) -> None:
    assert ReplayOptions().detector == DetectorConfig()
    assert ReplayOptions().detector_config().warmup_windows == DetectorConfig().warmup_windows


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        ("", {}, "empty file"),
        ("time;flow\n", {}, "no rows after the header"),
        ("time;flow\n1;2\n2;x\n", {}, "line 3, column 'flow': 'x' is not a number"),
        ("time;flow\n1;2\n2;inf\n", {}, "line 3, column 'flow': 'inf' is not finite"),
        ("time;flow\n1;2;3\n", {}, "line 2 has 3 fields, the header has 2"),
        ("time;flow\n1;2\n", {"time_column": "ts"}, "no column(s) ['ts']"),
        ("time;flow\n1;2\n", {"exclude_columns": ("label",)}, "no column(s) ['label']"),
        ("time;flow\n1;2\n", {"exclude_columns": ("flow",)}, "no sensor columns"),
        ("time;flow;flow\n1;2;3\n", {}, "repeats column(s) ['flow']"),
        ("time;flow\n1;2\n", {"warmup_rows": 10}, "--warmup 10 rows is 10 window(s)"),
        ("time;flow\n1;2\n", {"window_rows": 0}, "--window must be at least 1"),
        ("time;flow\n1;2\n", {"delimiter": ";;"}, "--delimiter must be one character"),
    ],
)
def test_bad_input_is_refused_with_the_row_and_column(
    content: str, options: dict[str, object], message: str
) -> None:
    source = io.StringIO(content)
    with pytest.raises(ReplayError) as error:
        replay_csv(source, io.StringIO(), ReplayOptions(**options))  # type: ignore[arg-type]
    assert message in str(error.value)


def test_a_failed_replay_leaves_no_output(tmp_path: Path) -> None:
    rows = signal_rows(n=260)
    rows[250][1] = "broken"
    out = tmp_path / "out.csv"
    with pytest.raises(ReplayError, match="line 252"):
        replay_file(write(tmp_path / "in.csv", rows), out, ReplayOptions(**LABELLED))  # type: ignore[arg-type]
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", signal_rows())
    out = tmp_path / "out.csv"
    env = clean_env()
    done = twinflow_cli(
        env,
        "replay",
        str(path),
        "--out",
        str(out),
        "--exclude-columns",
        "label",
        "--warmup",
        str(WARMUP),
    )
    assert done.returncode == 0, done.stderr
    assert "replayed 400 rows of 2 sensors" in done.stderr
    assert list(csv.DictReader(out.open())) == replay(path, **LABELLED)
    shutil.copy(path, tmp_path / "bad.csv")
    with (tmp_path / "bad.csv").open("a") as f:
        f.write("later;1.0;oops;0\n")
    failed = twinflow_cli(
        env,
        "replay",
        str(tmp_path / "bad.csv"),
        "--out",
        str(out),
        "--exclude-columns",
        "label",
        "--warmup",
        str(WARMUP),
    )
    assert failed.returncode == 1
    message = " ".join(failed.stderr.split())  # the console wraps long lines
    assert "line 402, column 'pressure': 'oops' is not a number" in message
