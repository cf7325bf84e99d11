"""Detection quality on NAB: ``twinflow replay`` over the Numenta Anomaly Benchmark, NAB's scoring.

NAB (Numenta Anomaly Benchmark) is a corpus of univariate streams (machine temperatures,
CPU, latencies, taxi demand, synthetic series) with labeled anomaly windows. Its score
rewards raising an alarm early in a window, charges a missed window and every alarm
outside the windows, and is normalized so that a detector that never fires scores 0 and
a perfect one 100 (:mod:`benchmarks.nab_scoring`). The data is MIT-licensed and read from
``--data`` at run time (``data/<group>/<file>.csv`` and
``labels/combined_windows.json``), never copied into twinflow.

Every file goes through :func:`twinflow.replay.replay_file` exactly as ``twinflow replay
FILE --out OUT --warmup P`` would, with ``P`` the file's probationary rows (15 %, at most
750): the detector's defaults, no per-file or per-group setting, its threshold fixed from
its own warm-up scores. The labels are read only afterwards, to score. A detection is a
row where the replay raised a new alarm (``alarm_raised``); NAB scores alerts, not states,
so the rows an alarm stays active (``is_anomaly``) are reported as a share, not scored.

The published scoreboard (:data:`SCOREBOARD`) is not a like-for-like comparison: there,
each detector's threshold was tuned on the labels by NAB's optimizer, over all 58 files.

Writes ``nab.json``, ``nab.md`` and, unless ``--no-plots``, one PNG per file (value,
label windows, alarms, score, threshold) to ``--out`` (default ``.twinflow/bench/nab/``).
Run: ``.venv/bin/python -m benchmarks.nab_evaluation``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.nab_scoring import (
    PROFILES,
    FileScore,
    Window,
    corpus_score,
    probationary_rows,
    score_file,
)
from benchmarks.results import plain, write_results
from twinflow.detection import DetectorConfig
from twinflow.replay import ReplayOptions, replay_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "nab-dev"
DEFAULT_OUT = ROOT / ".twinflow" / "bench" / "nab"
LABELS = Path("labels") / "combined_windows.json"
WINDOW_ROWS = 1
"""NAB streams are scored row by row, so every row is its own feature window."""
SCOREBOARD = {
    "ARTime": 74.9,
    "Numenta HTM": 70.5,
    "CAD-OSE": 69.9,
    "KNN-CAD": 58.0,
    "Windowed Gaussian": 39.6,
}
"""NAB's published standard-profile scores, thresholds tuned on the labels."""


def data_files(data: Path) -> list[Path]:
    """NAB's series under ``data``: ``data/<group>/<file>.csv``, sorted."""
    return sorted(data.glob("data/*/*.csv"))


def load_labels(data: Path) -> dict[str, list[tuple[str, str]]]:
    """Each file's anomaly windows, ``"<group>/<file>.csv"`` → ``[(start, end), ...]``."""
    raw = json.loads((data / LABELS).read_text())
    return {name: [(str(start), str(end)) for start, end in limits] for name, limits in raw.items()}


def window_rows(timestamps: pd.Series, limits: list[tuple[str, str]]) -> list[Window]:
    """The label windows as inclusive row ranges of ``timestamps``, as NAB's sweeper finds them.

    A window runs, in file order, from the first row whose time equals its start to the
    first row from there whose time equals its end; NAB's windows start and end on rows
    of their file, and a bound that matches no row is an error. File order, not time
    order, because NAB's files are not always sorted: ``machine_temperature`` goes back
    an hour on 2014-01-07 and ``ec2_request_latency`` repeats 03:00 eleven times.
    Timestamps are compared parsed, because NAB's labels carry microseconds
    (``.000000``) that its CSVs do not.

    >>> ts = pd.Series(["2014-04-10 07:10:00", "2014-04-10 07:15:00", "2014-04-10 07:20:00"])
    >>> window_rows(ts, [("2014-04-10 07:15:00.000000", "2014-04-10 07:20:00.000000")])
    [(1, 2)]
    """
    times = pd.to_datetime(timestamps).to_numpy()
    windows = []
    for start, end in limits:
        begin, finish = (pd.Timestamp(bound).to_datetime64() for bound in (start, end))
        starts = np.flatnonzero(times == begin)
        if not len(starts):
            raise ValueError(f"window start {start} is no row's timestamp")
        ends = np.flatnonzero(times[starts[0] :] == finish)
        if not len(ends):
            raise ValueError(f"window end {end} is no row's timestamp after its start {start}")
        windows.append((int(starts[0]), int(starts[0] + ends[0])))
    return windows


@dataclass
class FileResult:
    """The default detector on one NAB file."""

    file: str
    """``<group>/<file>.csv``, the key of NAB's labels."""
    source: Path
    replayed: Path
    """The replay's output CSV."""
    rows: int
    probationary_rows: int
    limits: list[tuple[str, str]]
    """The label windows as NAB gives them (timestamps)."""
    windows: list[Window]
    """The same windows as inclusive row ranges."""
    alarm_rows: list[int]
    """Rows at which an alarm was raised: NAB's detections."""
    in_alarm_share: float | None
    """Share of the rows after probation inside an active alarm (None: no such rows)."""
    threshold: float | None
    scores: dict[str, FileScore]
    """Per profile name."""
    seconds: float
    """Replay and scoring."""


def evaluate_file(path: Path, key: str, limits: list[tuple[str, str]], out: Path) -> FileResult:
    """Replay ``path`` into ``out`` with the default detector and score it on every profile."""
    began = time.perf_counter()
    n_rows = len(pd.read_csv(path, usecols=["timestamp"]))
    probation = probationary_rows(n_rows)
    target = out / "replays" / key
    summary = replay_file(
        path, target, ReplayOptions(warmup_rows=probation, window_rows=WINDOW_ROWS)
    )
    replayed = pd.read_csv(target, dtype={"timestamp": str})
    if len(replayed) != n_rows:
        raise ValueError(f"{path}: replay wrote {len(replayed)} rows for {n_rows}")
    windows = window_rows(replayed["timestamp"], limits)
    alarms = [int(row) for row in np.flatnonzero(replayed["alarm_raised"].to_numpy() == 1)]
    in_alarm = replayed["is_anomaly"].to_numpy()[probation:] == 1
    scores = {
        name: score_file(alarms, n_rows, windows, profile) for name, profile in PROFILES.items()
    }
    return FileResult(
        file=key,
        source=path,
        replayed=target,
        rows=n_rows,
        probationary_rows=probation,
        limits=limits,
        windows=windows,
        alarm_rows=alarms,
        in_alarm_share=round(float(in_alarm.mean()), 4) if len(in_alarm) else None,
        threshold=summary.threshold,
        scores=scores,
        seconds=time.perf_counter() - began,
    )


def plot_file(result: FileResult, target: Path) -> None:
    """Value with label windows, alarm onsets and in-alarm rows; score and threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = pd.read_csv(result.source, usecols=["value"])["value"].to_numpy()
    verdicts = pd.read_csv(result.replayed)
    rows = np.arange(result.rows)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 6), height_ratios=(3, 2))
    top.plot(rows, values, lw=0.6, color="tab:blue")
    top.set_ylabel("value")
    bottom.plot(rows, verdicts["score"], lw=0.6, color="black", label="score")
    if result.threshold is not None:
        bottom.axhline(
            result.threshold, color="red", lw=1, ls="--", label=f"threshold {result.threshold:.2f}"
        )
    # Linear near 0, logarithmic above: quiet rows and scores far over the threshold both show.
    bottom.set_yscale("symlog", linthresh=1.0)
    bottom.set_ylabel("score (symlog)")
    bottom.set_xlabel("row")
    in_alarm = verdicts["is_anomaly"].to_numpy() == 1
    for axis in (top, bottom):
        axis.axvspan(0, result.probationary_rows, color="grey", alpha=0.15, lw=0)
        for left, right in result.windows:
            axis.axvspan(left, right + 1, color="orange", alpha=0.3, lw=0)
        for start, end in _spans(in_alarm):
            axis.axvspan(start, end, color="tab:purple", alpha=0.15, lw=0)
        # The x-axis transform spans the full height whatever the data's range.
        axis.vlines(
            result.alarm_rows, 0, 1, transform=axis.get_xaxis_transform(), color="red", lw=0.9
        )
    bottom.legend(loc="upper left", fontsize=7)
    standard = result.scores["standard"]
    top.set_title(
        f"{result.file}: grey = probation, orange = label window, red line = alarm raised, "
        f"purple = in alarm; standard raw score {standard.raw:.2f}",
        fontsize=9,
    )
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=90)
    plt.close(fig)


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _file_entry(result: FileResult) -> dict[str, Any]:
    # Counts do not depend on the weights; any profile's score has them.
    counts = result.scores["standard"]
    return {
        "file": result.file,
        "rows": result.rows,
        "probationary_rows": result.probationary_rows,
        "windows": [list(w) for w in result.windows],
        "window_timestamps": [list(limit) for limit in result.limits],
        "windows_detected": counts.windows_detected,
        "windows_missed": counts.windows_missed,
        "first_alarm_in_window": list(counts.first_detections),
        "false_positive_alarms": counts.false_positives,
        "alarms_in_windows": counts.detections_in_windows,
        "alarms_in_probation": counts.ignored,
        "alarms_raised": len(result.alarm_rows),
        "alarm_rows": result.alarm_rows,
        "in_alarm_share": result.in_alarm_share,
        "threshold": result.threshold,
        "raw": {name: round(score.raw, 4) for name, score in result.scores.items()},
        "seconds": round(result.seconds, 3),
    }


def summarize(data: Path, results: list[FileResult]) -> dict[str, Any]:
    """The results dictionary: corpus, per-group and per-file figures."""

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    def scores(selected: list[FileResult]) -> dict[str, float | None]:
        return {name: rounded(corpus_score(r.scores[name] for r in selected)) for name in PROFILES}

    def totals(selected: list[FileResult]) -> dict[str, Any]:
        counts = [r.scores["standard"] for r in selected]
        return {
            "files": len(selected),
            "windows": sum(c.windows for c in counts),
            "windows_detected": sum(c.windows_detected for c in counts),
            "false_positive_alarms": sum(c.false_positives for c in counts),
            "alarms_raised": sum(len(r.alarm_rows) for r in selected),
            "scores": scores(selected),
        }

    groups: dict[str, list[FileResult]] = {}
    for result in results:
        groups.setdefault(result.file.split("/")[0], []).append(result)
    shares = [r for r in results if r.in_alarm_share is not None]
    busiest = max(shares, key=lambda r: r.in_alarm_share or 0.0, default=None)
    seconds = sum(r.seconds for r in results)
    return {
        "benchmark": "nab_evaluation",
        "data": str(data),
        "window_rows": WINDOW_ROWS,
        "detector": plain(asdict(DetectorConfig())),
        "warmup": "per file, its probationary rows (in place of the detector's warmup_windows)",
        "profiles": {name: asdict(profile) for name, profile in PROFILES.items()},
        **totals(results),
        "totals": {
            name: {
                "raw": round(sum(r.scores[name].raw for r in results), 4),
                "null": sum(r.scores[name].null for r in results),
                "perfect": sum(r.scores[name].perfect for r in results),
            }
            for name in PROFILES
        },
        "largest_in_alarm_share": None
        if busiest is None
        else {"file": busiest.file, "share": busiest.in_alarm_share},
        "groups": {name: totals(members) for name, members in sorted(groups.items())},
        "scoreboard": SCOREBOARD,
        "seconds": round(seconds, 2),
        "seconds_per_file": round(seconds / len(results), 3) if results else None,
        "per_file": [_file_entry(r) for r in results],
    }


def evaluate(
    data: Path = DEFAULT_DATA, out: Path = DEFAULT_OUT, plots: bool = True
) -> dict[str, Any] | None:
    """Replay and score every NAB file under ``data``; None when there is none.

    Replays go to ``out/replays/<group>/<file>.csv`` and, with ``plots``, one PNG per
    file to ``out/plots/<group>/<file>.png``. A file without an entry in NAB's labels
    stops the run: scoring it as anomaly-free would be a guess.
    """
    files = data_files(data)
    if not files:
        return None
    labels = load_labels(data)
    results = []
    for path in files:
        key = f"{path.parent.name}/{path.name}"
        if key not in labels:
            raise ValueError(f"{path}: no entry {key!r} in {data / LABELS}")
        result = evaluate_file(path, key, labels[key], out)
        counts = result.scores["standard"]
        print(
            f"{key}: {len(result.alarm_rows)} alarms, {counts.windows_detected}/"
            f"{counts.windows} windows, {counts.false_positives} false positive(s), "
            f"standard {counts.raw:.3f} ({result.seconds:.1f} s)",
            flush=True,
        )
        if plots:
            plot_file(result, out / "plots" / key.replace(".csv", ".png"))
        results.append(result)
    return summarize(data, results)


def report(results: dict[str, Any]) -> str:
    """The Markdown report."""

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    names = list(PROFILES)
    profile_header = " | ".join(names)
    busiest = results["largest_in_alarm_share"]
    lines = [
        "# Detection on NAB (Numenta Anomaly Benchmark)",
        "",
        f"{results['files']} files from `{results['data']}`, each replayed with "
        f"`twinflow replay FILE --warmup P --window {results['window_rows']}` (P = the "
        "file's probationary rows, 15 % capped at 750), the default detector, its "
        "threshold from its own warm-up scores; the labels are read only to score. A "
        "detection is a row where an alarm was raised; NAB scores alerts, not states. "
        "Normalized score: 0 = never fires, 100 = one alarm at each window's first row. "
        "The scoreboard's detectors had their thresholds tuned on the labels by NAB's "
        "optimizer, over the full 58-file corpus.",
        "",
        f"| detector | {profile_header} | windows detected | false-positive alarms "
        "| alarms raised |",
        "|---|" + "---|" * (len(names) + 3),
        "| twinflow default | "
        + " | ".join(num(results["scores"][n]) for n in names)
        + f" | {results['windows_detected']}/{results['windows']} | "
        f"{results['false_positive_alarms']} | {results['alarms_raised']} |",
    ]
    for detector, score in results["scoreboard"].items():
        lines.append(
            f"| scoreboard: {detector} | {num(score)} | "
            + " | ".join(["-"] * (len(names) + 2))
            + " |"
        )
    lines += [
        "",
        "Largest share of scored rows in alarm: "
        + ("-" if busiest is None else f"{pct(busiest['share'])} (`{busiest['file']}`)")
        + f". Time: {results['seconds']} s, {results['seconds_per_file']} s per file.",
        "",
        f"| group | files | {profile_header} | windows detected | false-positive alarms |",
        "|---|---|" + "---|" * (len(names) + 2),
    ]
    for group, totals in results["groups"].items():
        lines.append(
            f"| {group} | {totals['files']} | "
            + " | ".join(num(totals["scores"][n]) for n in names)
            + f" | {totals['windows_detected']}/{totals['windows']} | "
            f"{totals['false_positive_alarms']} |"
        )
    lines += [
        "",
        f"| file | rows | probation | windows detected | FP alarms | alarms | in alarm "
        f"| raw {' | raw '.join(names)} | s |",
        "|---|" + "---|" * (len(names) + 7),
    ]
    for entry in results["per_file"]:
        lines.append(
            f"| {entry['file']} | {entry['rows']} | {entry['probationary_rows']} | "
            f"{entry['windows_detected']}/{len(entry['windows'])} | "
            f"{entry['false_positive_alarms']} | {entry['alarms_raised']} | "
            f"{pct(entry['in_alarm_share'])} | "
            + " | ".join(num(entry["raw"][n], 3) for n in names)
            + f" | {entry['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="NAB folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run, write JSON, Markdown and plots; 0 also when the data is absent (skipped)."""
    args = parse_args(argv)
    results = evaluate(args.data, args.out, plots=not args.no_plots)
    if results is None:
        print(
            f"skipped: no NAB files (data/<group>/<file>.csv) under {args.data}; "
            "pass --data DIR to point at a copy",
            file=sys.stderr,
        )
        return 0
    text = report(results)
    print(text)
    data, markdown = write_results(args.out, "nab", results, text)
    print(f"wrote {data}, {markdown} and plots/", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
