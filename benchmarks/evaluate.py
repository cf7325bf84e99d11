"""``make evaluate``: the default detector on NAB, SKAB and the plant simulator, one table.

Runs the three detection-quality harnesses with ``DetectorConfig()`` only (their
neighbour configurations are for the harnesses' own reports) and prints one Markdown
table, dataset | metric | measured | target | met:

- NAB (:mod:`benchmarks.nab_evaluation`): the standard, reward-low-FP and reward-low-FN
  scores, and the largest share of a file's scored rows spent in alarm;
- SKAB (:mod:`benchmarks.skab_evaluation`): pooled F1 and FAR over the labeled runs,
  and the share of the anomaly-free run flagged;
- the simulator (:mod:`benchmarks.detection_on_simulator`, seeds 3 to 6): recall per
  process-fault kind (faults found by an alarm) and false alarms raised per clean
  entity-hour;
- the cost per row or window where a harness measures it.

A dataset whose data folder is absent (NAB, SKAB) is skipped with a message. Writes
``evaluate.md`` and ``evaluate.json`` to ``--out`` (default ``.twinflow/bench/``), and
each harness's own files beside them (``nab/``, ``skab/``, ``simulator/``). Exits 1 when
a harness could not run (not for a missed target: this is a report, not a test).

Run: ``.venv/bin/python -m benchmarks.evaluate [--nab-data DIR] [--skab-data DIR]
[--no-plots] [--jobs J]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import detection_on_simulator, nab_evaluation
from benchmarks.results import plain, write_results
from twinflow.detection import DetectorConfig
from twinflow.replay import ReplayOptions

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".twinflow" / "bench"
NAB_DATA = nab_evaluation.DEFAULT_DATA
SKAB_DATA = ROOT.parent / "shared" / "data" / "skab-dev"


@dataclass(frozen=True)
class Target:
    """One row of the table: where its figure is in the results, and what it must reach."""

    dataset: str
    key: str
    """The figure's key in ``results[dataset]``."""
    metric: str
    op: str | None = None
    """``">="``, ``"<="`` or None (reported, no target)."""
    bound: float | None = None
    unit: str = ""
    """``"%"`` shows a share as a percentage; otherwise the figure as it is."""
    digits: int = 1


TARGETS = (
    Target("NAB", "standard", "score, standard profile", ">=", 60.0),
    Target("NAB", "reward_low_FP", "score, reward_low_FP profile", ">=", 50.0),
    Target("NAB", "reward_low_FN", "score, reward_low_FN profile"),
    Target(
        "NAB", "largest_in_alarm_share", "largest share of scored rows in alarm", "<=", 0.2, "%"
    ),
    Target("NAB", "us_per_row", "µs per row (replay, CSV in and out)", digits=0),
    Target("SKAB", "f1", "F1 (pooled)", ">=", 0.82, digits=3),
    Target("SKAB", "far", "FAR (pooled)", "<=", 0.10, "%"),
    Target("SKAB", "anomaly_free_flagged", "anomaly-free rows flagged", "<=", 0.03, "%", 2),
    Target("SKAB", "us_per_row", "µs per row (replay, CSV in and out)", digits=0),
    Target("simulator", "recall", "recall", ">=", 1.0, digits=2),
    Target(
        "simulator",
        "false_alarms_per_entity_hour",
        "false alarms (raised) per entity-hour",
        "<=",
        0.1,
        digits=3,
    ),
    Target("simulator", "us_per_window", "µs per window (monitor only)", digits=0),
    Target("simulator", "monitor_pickle_kib", "pickled monitor, largest entity (KiB)", digits=0),
)
"""The table's rows, in order; ``recall`` expands to one row per process-fault kind."""


def met(value: float | None, op: str | None, bound: float | None) -> bool | None:
    """Whether ``value`` reaches the target (None: no target; a missing value misses).

    >>> met(0.1, "<=", 0.1), met(59.9, ">=", 60), met(None, ">=", 60), met(3.0, None, None)
    (True, False, False, None)
    """
    if op is None or bound is None:
        return None
    if value is None:
        return False
    return value >= bound if op == ">=" else value <= bound


def _show(value: float | None, target: Target) -> str:
    if value is None:
        return "n/a"
    if target.unit == "%":
        return f"{100 * value:.{target.digits}f} %"
    return f"{value:.{target.digits}f}"


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """``(dataset, metric, measured, target, met)`` for every row of the table.

    ``results`` maps a dataset to its figures (:data:`TARGETS` names the keys), or to
    ``{"skipped": why}`` / ``{"error": why}``.
    """
    table: list[tuple[str, str, str, str, bool | None]] = []
    for dataset in dict.fromkeys(t.dataset for t in TARGETS):
        figures = results.get(dataset) or {"skipped": "not run"}
        if "skipped" in figures or "error" in figures:
            why = figures.get("error") or figures["skipped"]
            status = "error" if "error" in figures else "skipped"
            table.append(
                (dataset, "-", f"{status}: {why}", "-", False if "error" in figures else None)
            )
            continue
        for target in (t for t in TARGETS if t.dataset == dataset):
            expanded: list[tuple[str, float | None]]
            if target.key == "recall":
                expanded = [(f"recall {kind}", r) for kind, r in sorted(figures["recall"].items())]
            else:
                expanded = [(target.metric, figures.get(target.key))]
            for metric, value in expanded:
                wanted = "-" if target.op is None else f"{target.op} {_show(target.bound, target)}"
                table.append(
                    (
                        dataset,
                        metric,
                        _show(value, target),
                        wanted,
                        met(value, target.op, target.bound),
                    )
                )
    return table


def table(results: dict[str, Any]) -> str:
    """The Markdown table of :func:`rows`.

    >>> print(table({"NAB": {"skipped": "no data"}, "SKAB": {"f1": 0.9, "far": 0.2,
    ...     "anomaly_free_flagged": 0.01, "us_per_row": None}, "simulator": {"error": "boom"}}))
    | dataset | metric | measured | target | met |
    |---|---|---|---|---|
    | NAB | - | skipped: no data | - | - |
    | SKAB | F1 (pooled) | 0.900 | >= 0.820 | met |
    | SKAB | FAR (pooled) | 20.0 % | <= 10.0 % | missed |
    | SKAB | anomaly-free rows flagged | 1.00 % | <= 3.00 % | met |
    | SKAB | µs per row (replay, CSV in and out) | n/a | - | - |
    | simulator | - | error: boom | - | missed |
    """
    lines = ["| dataset | metric | measured | target | met |", "|---|---|---|---|---|"]
    for dataset, metric, measured, wanted, ok in rows(results):
        verdict = "-" if ok is None else "met" if ok else "missed"
        lines.append(f"| {dataset} | {metric} | {measured} | {wanted} | {verdict} |")
    return "\n".join(lines)


def run_nab(data: Path, out: Path, plots: bool) -> dict[str, Any]:
    """NAB's figures for the table (the harness writes ``nab.json``/``nab.md`` to ``out``)."""
    results = nab_evaluation.evaluate(data, out, plots=plots)
    if results is None:
        return {"skipped": f"no NAB files (data/<group>/<file>.csv) under {data}"}
    write_results(out, "nab", results, nab_evaluation.report(results))
    rows_total = sum(entry["rows"] for entry in results["per_file"])
    busiest = results["largest_in_alarm_share"]
    return {
        **results["scores"],
        "largest_in_alarm_share": None if busiest is None else busiest["share"],
        "largest_in_alarm_file": None if busiest is None else busiest["file"],
        "files": results["files"],
        "us_per_row": 1e6 * results["seconds"] / rows_total if rows_total else None,
    }


def run_skab(data: Path, out: Path, plots: bool) -> dict[str, Any]:
    """SKAB's figures for the table, the default detector only."""
    from benchmarks import skab_evaluation as skab

    files = skab.runs(data)
    if not files:
        return {"skipped": f"no SKAB runs (<group>/<run>.csv) under {data}"}
    config = DetectorConfig()
    window, warmup = ReplayOptions().window_rows, skab.TRAIN_ROWS
    results = skab.evaluate(config, files, out / "replays", window, warmup)
    summary = skab.summarize(results)
    free = data / skab.ANOMALY_FREE
    flagged = (
        skab.false_alarm_share(config, free, out / "replays", window, warmup)
        if free.is_file()
        else None
    )
    if plots:
        for path, result in zip(files, results, strict=True):
            target = out / "plots" / path.parent.name / f"{path.stem}.png"
            skab.plot_run(path, result.replayed, result.threshold, target)
    rows_total = sum(_data_rows(path) for path in files)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skab-default.json").write_text(
        json.dumps(
            {"data": str(data), "config": plain(asdict(config)), "anomaly_free_flagged": flagged}
            | summary,
            indent=2,
        )
        + "\n"
    )
    pooled = summary["pooled"]
    return {
        "f1": pooled["f1"],
        "far": pooled["far"],
        "mar": pooled["mar"],
        "anomaly_free_flagged": flagged,
        "runs": len(files),
        "us_per_row": 1e6 * summary["seconds"] / rows_total if rows_total else None,
    }


def _data_rows(path: Path) -> int:
    with path.open("rb") as lines:
        return max(0, sum(1 for _ in lines) - 1)


def run_simulator(out: Path, jobs: int | None) -> dict[str, Any]:
    """The simulator's figures for the table: default detector, default seeds."""
    sim = detection_on_simulator
    results = sim.evaluate({sim.DEFAULT_NAME: DetectorConfig()}, jobs=jobs)
    write_results(out, "detection", results, sim.report(results))
    figures = results["configs"][sim.DEFAULT_NAME]["result"]
    pickled = figures["monitor_pickle_bytes"]["max"]
    return {
        "recall": figures["recall"],
        "false_alarms_per_entity_hour": figures["false_alarms_per_entity_hour"],
        "false_alarms": figures["false_alarms"],
        "alarms_raised": figures["alarms_raised"],
        "clean_entity_hours": figures["clean_entity_hours"],
        "median_delay_s": figures["median_delay_s"],
        "us_per_window": figures["us_per_window"],
        "monitor_pickle_kib": None if pickled is None else pickled / 1024,
        "seeds": [s["seed"] for s in results["scenarios"]],
    }


def _timed(
    name: str, run: Callable[[], dict[str, Any]], seconds: dict[str, float]
) -> dict[str, Any]:
    print(f"== {name}", flush=True)
    began = time.perf_counter()
    try:
        figures = run()
    except ImportError as exc:  # a harness that does not import is reported, not fatal
        figures = {"error": f"{type(exc).__name__}: {exc}"}
    seconds[name] = round(time.perf_counter() - began, 1)
    if "skipped" in figures:
        print(f"skipped: {figures['skipped']}", file=sys.stderr, flush=True)
    return figures


def report(results: dict[str, Any], seconds: dict[str, float]) -> str:
    """The Markdown report: the table, then the run times."""
    times = ", ".join(f"{name} {s:g} s" for name, s in seconds.items())
    misses = [f"{d} {m}" for d, m, _, _, ok in rows(results) if ok is False]
    return (
        "# Detection quality, default detector\n\n"
        "`DetectorConfig()` on NAB (each file's probationary rows as warm-up), SKAB (400 "
        "training rows per run) and the plant simulator (seeds 3-6, 3 h, all entities); "
        "thresholds from each detector's own warm-up scores, labels read only to score.\n\n"
        f"{table(results)}\n\n"
        + (f"Missed: {'; '.join(misses)}." if misses else "Every target met.")
        + f"\n\nRun times: {times}.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run every harness, print and write the table; 1 when a harness could not run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nab-data", type=Path, default=NAB_DATA, help="NAB folder")
    parser.add_argument("--skab-data", type=Path, default=SKAB_DATA, help="SKAB folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="no per-file plots")
    parser.add_argument("--jobs", type=int, default=None, help="simulator processes")
    args = parser.parse_args(argv)
    plots = not args.no_plots
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    results = {
        "NAB": _timed("NAB", lambda: run_nab(args.nab_data, args.out / "nab", plots), seconds),
        "SKAB": _timed("SKAB", lambda: run_skab(args.skab_data, args.out / "skab", plots), seconds),
        "simulator": _timed(
            "simulator", lambda: run_simulator(args.out / "simulator", args.jobs), seconds
        ),
    }
    seconds["total"] = round(time.perf_counter() - began, 1)
    text = report(results, seconds)
    print()
    print(text)
    document = {
        "benchmark": "evaluate",
        "detector": plain(asdict(DetectorConfig())),
        "results": results,
        "rows": [
            {"dataset": d, "metric": m, "measured": v, "target": t, "met": ok}
            for d, m, v, t, ok in rows(results)
        ],
        "seconds": seconds,
    }
    data, markdown = write_results(args.out, "evaluate", document, text)
    print(f"wrote {markdown} and {data}", flush=True)
    return 1 if any("error" in figures for figures in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
