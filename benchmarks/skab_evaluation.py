"""Detection quality on real labeled data: ``twinflow replay`` over SKAB, SKAB's protocol.

SKAB (Skoltech Anomaly Benchmark) records a water-pump testbed at ~1 Hz; each labeled
run starts normal, then a fault (on ``valve1``: the outlet valve partly closed) holds for
several minutes, then the run ends normal again. The data is GPL-3.0 and is read from
``--data`` at run time, never copied into twinflow.

For every ``<group>/<run>.csv`` under ``--data`` (``valve1/0.csv`` …; any other group
dropped beside it, e.g. ``valve2/`` or ``other/``, is evaluated the same way), each
configuration is run through :func:`twinflow.replay.replay_file` exactly as
``twinflow replay RUN.csv --out OUT.csv --exclude-columns anomaly,changepoint --warmup
400`` would, and the output CSV is scored against the run's ``anomaly`` column:

- SKAB's outlier protocol: per run the first 400 rows are training only; over the
  remaining rows of all runs pooled, ``F1 = TP / (TP + (FP + FN) / 2)``,
  ``FAR = FP / (FP + TN)``, ``MAR = FN / (FN + TP)``;
- per run the same figures and the delay from the fault's first row to the first
  flagged row inside it.

Thresholds: every configuration fixes its own from the scores of its warm-up (the
first 400 rows of the run, all normal by the protocol) with the detector's rule
(:mod:`twinflow.detection.thresholds`); the labels are read only here, after the
replay. The label columns never reach the model (``--exclude-columns``).

Writes ``skab.json``, ``skab.md`` and, for the default configuration, one PNG per run
(signals, score, threshold, true anomaly span, flagged rows) to ``--out`` (default
``.twinflow/bench/skab/``). Run: ``.venv/bin/python -m benchmarks.skab_evaluation``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.results import plain, write_results
from twinflow.detection import DetectorConfig
from twinflow.replay import ReplayOptions, replay_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "skab-dev"
LABELS = ("anomaly", "changepoint")
TRAIN_ROWS = 400
"""SKAB's protocol: the first rows of each run are training only, never scored."""
DEFAULT_NAME = "twinflow default"
CONFIGS: dict[str, DetectorConfig] = {
    DEFAULT_NAME: DetectorConfig(),
    "one slow time scale": DetectorConfig(smoothing=(0.05,)),
    "no daily or weekly cycles": DetectorConfig(periods=()),
    "one operating point": DetectorConfig(regimes=1),
    "fence 2": DetectorConfig(fence=2.0),
    "no re-baselining": DetectorConfig(rebaseline_after=None),
    "clear after 3 windows": DetectorConfig(clear_windows=3),
}
"""The default and its neighbours, each differing from it in the named settings only."""
ANOMALY_FREE = "anomaly-free.csv"
"""SKAB's long normal run: every row flagged after its warm-up is a false alarm."""
LEADERBOARD = {
    "Conv-AE": (0.78, 0.136),
    "MSET": (0.78, None),
    "T²+Q (PCA)": (0.76, None),
    "Isolation Forest": (0.29, None),
}
"""SKAB's published outlier-detection leaderboard (F1, FAR), all SKAB runs."""


@dataclass
class Counts:
    """Confusion counts over scored rows."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, other: Counts) -> None:
        """Pool ``other`` into these counts."""
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.tn += other.tn

    def metrics(self) -> dict[str, float | None]:
        """F1, FAR and MAR as SKAB defines them (None where undefined).

        >>> Counts(tp=30, fp=10, fn=10, tn=50).metrics()
        {'f1': 0.75, 'far': 0.1667, 'mar': 0.25}
        """

        def ratio(num: float, den: float) -> float | None:
            return round(num / den, 4) if den else None

        return {
            "f1": ratio(self.tp, self.tp + (self.fp + self.fn) / 2),
            "far": ratio(self.fp, self.fp + self.tn),
            "mar": ratio(self.fn, self.fn + self.tp),
        }


def score_run(flags: np.ndarray, labels: np.ndarray, train_rows: int = TRAIN_ROWS) -> Counts:
    """Confusion counts of one run, leaving out its first ``train_rows`` rows.

    >>> score_run(np.array([1, 0, 1, 1, 0]), np.array([1, 1, 1, 0, 0]), train_rows=1)
    Counts(tp=1, fp=1, fn=1, tn=1)
    """
    if flags.shape != labels.shape:
        raise ValueError(f"{len(flags)} verdicts for {len(labels)} labeled rows")
    predicted, actual = flags[train_rows:].astype(bool), labels[train_rows:].astype(bool)
    return Counts(
        tp=int((predicted & actual).sum()),
        fp=int((predicted & ~actual).sum()),
        fn=int((~predicted & actual).sum()),
        tn=int((~predicted & ~actual).sum()),
    )


def first_delay(flags: np.ndarray, labels: np.ndarray) -> int | None:
    """Rows from the first anomalous row to the first flagged one at or after it.

    >>> first_delay(np.array([0, 0, 0, 1, 1]), np.array([0, 1, 1, 1, 1]))
    2
    """
    actual = np.flatnonzero(labels.astype(bool))
    if not len(actual):
        return None
    hits = np.flatnonzero(flags.astype(bool) & labels.astype(bool))
    return int(hits[0] - actual[0]) if len(hits) else None


def runs(data: Path) -> list[Path]:
    """Labeled runs under ``data``, grouped by folder, in numeric order."""

    def order(path: Path) -> tuple[str, int, str]:
        return (path.parent.name, int(path.stem) if path.stem.isdigit() else -1, path.stem)

    return sorted((p for p in data.glob("*/*.csv")), key=order)


@dataclass
class RunResult:
    """One configuration on one run."""

    run: str
    replayed: Path
    """The replay's output CSV."""
    counts: Counts
    threshold: float | None
    delay_rows: int | None
    seconds: float


def evaluate(
    config: DetectorConfig, files: list[Path], out: Path, window: int, warmup: int
) -> list[RunResult]:
    """Replay every run with ``config`` into ``out`` and score it."""
    results = []
    for path in files:
        target = out / path.parent.name / f"{path.stem}.csv"
        options = ReplayOptions(
            exclude_columns=LABELS, warmup_rows=warmup, window_rows=window, detector=config
        )
        began = time.perf_counter()
        summary = replay_file(path, target, options)
        seconds = time.perf_counter() - began
        labels = pd.read_csv(path, sep=";", usecols=["anomaly"])["anomaly"].to_numpy()
        flags = pd.read_csv(target)["is_anomaly"].to_numpy()
        results.append(
            RunResult(
                run=f"{path.parent.name}/{path.name}",
                replayed=target,
                counts=score_run(flags, labels),
                threshold=summary.threshold,
                delay_rows=first_delay(flags, labels),
                seconds=seconds,
            )
        )
    return results


def false_alarm_share(
    config: DetectorConfig, path: Path, out: Path, window: int, warmup: int
) -> float:
    """Share of the rows after the warm-up flagged in an unlabeled, all-normal run."""
    target = out / f"{path.stem}.csv"
    options = ReplayOptions(warmup_rows=warmup, window_rows=window, detector=config)
    replay_file(path, target, options)
    flags = pd.read_csv(target)["is_anomaly"].to_numpy()
    return round(float(flags[warmup:].mean()), 4)


def plot_run(source: Path, replayed: Path, threshold: float | None, target: Path) -> None:
    """Signals (standardized on the training rows), score, threshold, truth and flags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.read_csv(source, sep=";")
    verdicts = pd.read_csv(replayed)
    sensors = [c for c in frame.columns[1:] if c not in LABELS]
    rows = np.arange(len(frame))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 7), height_ratios=(3, 2))
    train = frame[sensors].iloc[:TRAIN_ROWS]
    for sensor in sensors:
        spread = float(train[sensor].std()) or 1.0
        top.plot(rows, (frame[sensor] - train[sensor].mean()) / spread, lw=0.7, label=sensor)
    top.set_ylabel("signal (z vs training rows)")
    top.set_ylim(-12, 12)
    top.legend(loc="upper left", fontsize=7, ncol=4)
    bottom.plot(rows, verdicts["score"], lw=0.8, color="black", label="score")
    if threshold is not None:
        bottom.axhline(threshold, color="red", lw=1, ls="--", label=f"threshold {threshold:.2f}")
    flagged = verdicts["is_anomaly"].to_numpy().astype(bool)
    bottom.scatter(
        rows[flagged], verdicts["score"][flagged], s=4, color="red", label="flagged", zorder=3
    )
    bottom.set_yscale("symlog", linthresh=1.0)  # faults score 10-100x the threshold
    bottom.set_ylabel("score (symlog)")
    bottom.set_xlabel("row")
    bottom.legend(loc="upper left", fontsize=7)
    for axis in (top, bottom):
        axis.axvspan(0, TRAIN_ROWS, color="grey", alpha=0.12, lw=0)
        anomalous = frame["anomaly"].to_numpy().astype(bool)
        for start, end in _spans(anomalous):
            axis.axvspan(start, end, color="orange", alpha=0.25, lw=0)
    top.set_title(
        f"{source.parent.name}/{source.name}: grey = training rows, orange = labeled anomaly"
    )
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=90)
    plt.close(fig)


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def summarize(results: list[RunResult]) -> dict[str, Any]:
    """Pooled and per-group metrics of one configuration."""
    pooled, groups = Counts(), {}
    for result in results:
        pooled.add(result.counts)
        groups.setdefault(result.run.split("/")[0], Counts()).add(result.counts)
    delays = [r.delay_rows for r in results if r.delay_rows is not None]
    return {
        "pooled": {**pooled.metrics(), **asdict(pooled)},
        "groups": {name: {**c.metrics(), **asdict(c)} for name, c in sorted(groups.items())},
        "runs_detected": f"{len(delays)}/{len(results)}",
        "median_delay_rows": float(np.median(delays)) if delays else None,
        "seconds": round(sum(r.seconds for r in results), 2),
        "runs": [
            {
                "run": r.run,
                **r.counts.metrics(),
                **asdict(r.counts),
                "threshold": r.threshold,
                "delay_rows": r.delay_rows,
            }
            for r in results
        ],
    }


def report(results: dict[str, Any]) -> str:
    """The Markdown report."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "# Detection on SKAB (real labeled pump data)",
        "",
        f"{results['runs']} runs from `{results['data']}`, replayed with "
        f"`--window {results['window_rows']} --warmup {results['warmup_rows']}`; SKAB's "
        f"outlier protocol (first {TRAIN_ROWS} rows of each run are training only, metrics "
        "pooled over the rest). Thresholds come from each run's own warm-up scores; labels "
        "are only read to score. *Anomaly-free rows flagged*: the same replay over SKAB's "
        "unlabeled normal run, every flag a false alarm.",
        "",
        "| configuration | F1 | FAR | MAR | anomaly-free rows flagged | runs detected "
        "| median delay (rows) | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results["configs"].items():
        pooled = result["pooled"]
        lines.append(
            f"| {name} | {num(pooled['f1'])} | {pct(pooled['far'])} | {pct(pooled['mar'])} | "
            f"{pct(result.get('anomaly_free_flagged'))} | {result['runs_detected']} | "
            f"{result['median_delay_rows']} | {result['seconds']} |"
        )
    for name, (f1, far) in LEADERBOARD.items():
        lines.append(f"| leaderboard: {name} | {f1:.2f} | {pct(far)} | - | - | - | - | - |")
    default = results["configs"][DEFAULT_NAME]
    if len(default["groups"]) > 1:
        lines += ["", "| group (default) | F1 | FAR | MAR |", "|---|---|---|---|"]
        for group, metrics in default["groups"].items():
            lines.append(
                f"| {group} | {num(metrics['f1'])} | {pct(metrics['far'])} | "
                f"{pct(metrics['mar'])} |"
            )
    lines += [
        "",
        "| run (default) | F1 | FAR | MAR | threshold | delay (rows) |",
        "|---|---|---|---|---|---|",
    ]
    for run in default["runs"]:
        lines.append(
            f"| {run['run']} | {num(run['f1'])} | {pct(run['far'])} | {pct(run['mar'])} | "
            f"{num(run['threshold'])} | {run['delay_rows']} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Evaluate every configuration; None when the data is absent."""
    files = runs(args.data)
    if not files:
        return None
    configs = {}
    for name, config in CONFIGS.items():
        if args.default_only and name != DEFAULT_NAME:
            continue
        slug = name.replace(" ", "-").replace(",", "")
        results = evaluate(config, files, args.out / "replays" / slug, args.window, args.warmup)
        configs[name] = {"config": plain(asdict(config)), **summarize(results)}
        free = args.data / ANOMALY_FREE
        if free.is_file():
            configs[name]["anomaly_free_flagged"] = false_alarm_share(
                config, free, args.out / "replays" / slug, args.window, args.warmup
            )
        pooled = configs[name]["pooled"]
        print(
            f"{name}: F1 {pooled['f1']} FAR {pooled['far']} MAR {pooled['mar']} "
            f"anomaly-free flagged {configs[name].get('anomaly_free_flagged')}",
            flush=True,
        )
        if name == DEFAULT_NAME and not args.no_plots:
            for path, result in zip(files, results, strict=True):
                plot_run(
                    path,
                    result.replayed,
                    result.threshold,
                    args.out / "plots" / path.parent.name / f"{path.stem}.png",
                )
    return {
        "benchmark": "skab_evaluation",
        "data": str(args.data),
        "runs": len(files),
        "window_rows": args.window,
        "warmup_rows": args.warmup,
        "train_rows": TRAIN_ROWS,
        "configs": configs,
        "leaderboard": {k: {"f1": f1, "far": far} for k, (f1, far) in LEADERBOARD.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SKAB folder")
    parser.add_argument("--out", type=Path, default=ROOT / ".twinflow" / "bench" / "skab")
    parser.add_argument(
        "--window", type=int, default=ReplayOptions().window_rows, help="rows per window"
    )
    parser.add_argument("--warmup", type=int, default=TRAIN_ROWS, help="warm-up rows")
    parser.add_argument("--default-only", action="store_true", help="only the default config")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run, write JSON, Markdown and plots; 0 also when the data is absent (skipped)."""
    args = parse_args(argv)
    results = run(args)
    if results is None:
        print(
            f"skipped: no SKAB runs (<group>/<run>.csv) under {args.data}; "
            "pass --data DIR to point at a copy",
            file=sys.stderr,
        )
        return 0
    text = report(results)
    print(text)
    data, markdown = write_results(args.out, "skab", results, text)
    print(f"wrote {data}, {markdown} and plots/", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
