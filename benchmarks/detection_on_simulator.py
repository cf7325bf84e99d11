"""Detection quality on the plant simulator: event recall per process fault, false alarms.

Builds 10-second tumbling windows per entity straight from ``Scenario(...).samples()``
of the example plant (all entities; per-sensor count/mean/min/max/std/last/slope with
numpy, nothing excluded: sensor faults such as spikes reach the features), runs one
:class:`~twinflow.detection.EntityDetector` per entity over the windows in time order,
and scores the anomalies against the scenario's ground truth:

- recall per process-fault kind: the fraction of faults with at least one anomalous
  window overlapping ``[start, end + one window)``; also the median delay from the
  fault's start to the end of its first anomalous window, and the sensor that window's
  explanation put first;
- false alarms: anomalous windows outside every fault interval of their entity
  (process and sensor faults, each widened by one window on both sides), per
  entity-hour of monitored time (after the warm-up, outside those intervals and their
  recovery margins). Anomalies within ``--margin`` seconds after a fault (temperatures
  lag their cause by minutes) are counted apart, as "in recovery margin";
- anomalies inside sensor-fault intervals are counted on their own: neither hits nor
  false alarms (a stuck or drifting sensor is not a process fault, but flagging it is
  not wrong either).

Thresholds come from the detector's own rule (warm-up, quantiles of its own scores,
floor, persistence); the labels are only read here, after the run. The defaults of
:class:`~twinflow.detection.DetectorConfig` were chosen on seeds 1 and 2; the default
run uses seeds 3 to 6, which played no part in that.

Run: ``.venv/bin/python -m benchmarks.detection_on_simulator [--duration S] [--seed N]
[--runs R] [--out DIR]``. Writes JSON and Markdown to ``--out`` (default
``.twinflow/bench/``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.results import plain
from schemas.outputs import SensorWindow
from twinflow.detection import Aggregate, DetectorConfig, EntityDetector, Kind
from twinflow.sim.faults import Category, Fault
from twinflow.sim.scenario import Scenario, ScenarioConfig
from twinflow.twin_model import TwinModel, load_twin_model

MODEL = Path(__file__).resolve().parents[1] / "infra" / "twin-model" / "example-plant.yaml"
START_MS = 1_793_000_000_000
"""A Monday 2026-10-26 00:53:20 UTC; a multiple of the window length."""
WINDOW_MS = 10_000

EntityWindowsList = list[tuple[int, dict[str, SensorWindow]]]
"""Closed windows of one entity: ``(window start, features by sensor)``, in time order."""


def build_windows(scenario: Scenario, window_ms: int = WINDOW_MS) -> dict[str, EntityWindowsList]:
    """Tumbling windows per entity, aligned to the epoch, from the scenario's samples."""
    ts: dict[tuple[str, str], list[int]] = defaultdict(list)
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for sample in scenario.samples():
        for sensor, value in sample.values.items():
            key = (sample.entity_id, sensor)
            ts[key].append(sample.ts_ms)
            values[key].append(value)
    per_entity: dict[str, dict[int, dict[str, SensorWindow]]] = defaultdict(dict)
    for (entity_id, sensor), stamps in ts.items():
        for start, window in _sensor_windows(
            entity_id, sensor, stamps, values[entity_id, sensor], window_ms
        ):
            per_entity[entity_id].setdefault(start, {})[sensor] = window
    return {
        entity.id: sorted(per_entity.get(entity.id, {}).items()) for entity in scenario.entities
    }


def _sensor_windows(
    entity_id: str, sensor: str, stamps: list[int], readings: list[float], window_ms: int
) -> Iterator[tuple[int, SensorWindow]]:
    t = np.asarray(stamps, dtype=np.int64)
    v = np.asarray(readings, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    starts_of = t - t % window_ms
    starts, first, counts = np.unique(starts_of, return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(starts)), counts)
    mean = np.bincount(group, weights=v) / counts
    std = np.sqrt(np.bincount(group, weights=(v - mean[group]) ** 2) / counts)
    low = np.minimum.reduceat(v, first)
    high = np.maximum.reduceat(v, first)
    last = v[first + counts - 1]
    seconds = (t - starts_of) / 1000.0
    centred = seconds - (np.bincount(group, weights=seconds) / counts)[group]
    sxx = np.bincount(group, weights=centred**2)
    sxy = np.bincount(group, weights=centred * (v - mean[group]))
    slope = np.divide(sxy, sxx, out=np.zeros_like(sxy), where=(counts >= 2) & (sxx > 0))
    for i, start in enumerate(starts.tolist()):
        yield (
            start,
            SensorWindow(
                entity_id=entity_id,
                sensor=sensor,
                window_start_ms=start,
                window_end_ms=start + window_ms,
                count=int(counts[i]),
                mean=float(mean[i]),
                min=float(low[i]),
                max=float(high[i]),
                std=float(std[i]),
                last=float(last[i]),
                slope=float(slope[i]),
                flagged=0,
            ),
        )


@dataclass
class Flagged:
    """One anomalous window."""

    entity_id: str
    start_ms: int
    end_ms: int
    score: float
    threshold: float
    sensors: list[str]
    """Sensors of the contributions, largest weight first."""


@dataclass
class RunResult:
    """The anomalies of one configuration over one scenario, and what it cost."""

    flagged: list[Flagged] = field(default_factory=list)
    windows: int = 0
    seconds: float = 0.0


def run_detectors(windows: dict[str, EntityWindowsList], config: DetectorConfig) -> RunResult:
    """One fresh detector per entity over its windows in time order."""
    result = RunResult()
    began = time.perf_counter()
    for entity_id, entity_windows in windows.items():
        detector = EntityDetector(config)
        for start, by_sensor in entity_windows:
            detection = detector.process_window(by_sensor)
            result.windows += 1
            if detection.is_anomaly:
                assert detection.threshold is not None
                result.flagged.append(
                    Flagged(
                        entity_id,
                        start,
                        start + WINDOW_MS,
                        detection.score,
                        detection.threshold,
                        [c.sensor for c in detection.contributions],
                    )
                )
    result.seconds = time.perf_counter() - began
    return result


def _overlaps(start: int, end: int, low: int, high: int) -> bool:
    return start < high and end > low


@dataclass
class Score:
    """A configuration's quality over one or more scenarios."""

    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    events: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    delays_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    top_sensor: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    in_warmup: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Process faults that started during the warm-up (not scored)."""
    in_process: int = 0
    in_sensor: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sensor_events: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sensor_events_flagged: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    in_margin: int = 0
    false_alarms: int = 0
    false_alarm_entities: set[str] = field(default_factory=set)
    exposure_h: float = 0.0
    windows: int = 0
    seconds: float = 0.0

    def add(
        self,
        run: RunResult,
        faults: Sequence[Fault],
        entities: Sequence[str],
        monitored_from_ms: int,
        end_ms: int,
        margin_ms: int,
    ) -> None:
        """Score ``run`` against the faults of one scenario."""
        self.windows += run.windows
        self.seconds += run.seconds
        by_entity: dict[str, list[Fault]] = defaultdict(list)
        for fault in faults:
            by_entity[fault.entity_id].append(fault)
        flagged_by_entity: dict[str, list[Flagged]] = defaultdict(list)
        for item in run.flagged:
            flagged_by_entity[item.entity_id].append(item)
        for entity_id in entities:
            flagged = flagged_by_entity[entity_id]
            mine = by_entity[entity_id]
            for fault in mine:
                low, high = fault.start_ms, fault.end_ms + WINDOW_MS
                inside = [f for f in flagged if _overlaps(f.start_ms, f.end_ms, low, high)]
                if fault.category is Category.PROCESS and fault.start_ms < monitored_from_ms:
                    # Learned as normal during the warm-up: not something to be found.
                    self.in_warmup[str(fault.kind)] += 1
                elif fault.category is Category.PROCESS:
                    kind = str(fault.kind)
                    self.events[kind] += 1
                    if inside:
                        self.hits[kind] += 1
                        first = min(inside, key=lambda f: f.start_ms)
                        self.delays_s[kind].append(max(0, first.end_ms - fault.start_ms) / 1000)
                        if first.sensors:
                            self.top_sensor[kind][first.sensors[0]] += 1
                elif fault.category is Category.SENSOR:
                    self.sensor_events[str(fault.kind)] += 1
                    process = [p for p in mine if p.category is Category.PROCESS]
                    if any(
                        not any(
                            _overlaps(
                                f.start_ms, f.end_ms, p.start_ms - WINDOW_MS, p.end_ms + WINDOW_MS
                            )
                            for p in process
                        )
                        for f in inside
                    ):
                        self.sensor_events_flagged[str(fault.kind)] += 1
            covered = [
                (f.start_ms - WINDOW_MS, f.end_ms + WINDOW_MS, f)
                for f in mine
                if f.category in (Category.PROCESS, Category.SENSOR)
            ]
            for f in flagged:
                hit = [c for c in covered if _overlaps(f.start_ms, f.end_ms, c[0], c[1])]
                if any(c[2].category is Category.PROCESS for c in hit):
                    self.in_process += 1
                elif hit:
                    self.in_sensor[str(hit[0][2].kind)] += 1
                elif any(_overlaps(f.start_ms, f.end_ms, c[1], c[1] + margin_ms) for c in covered):
                    self.in_margin += 1
                else:
                    self.false_alarms += 1
                    self.false_alarm_entities.add(entity_id)
            # Exposure: monitored time outside every (widened) fault interval.
            busy = sorted(
                (max(lo, monitored_from_ms), min(hi + margin_ms, end_ms)) for lo, hi, _ in covered
            )
            clean = end_ms - monitored_from_ms
            cursor = monitored_from_ms
            for lo, hi in busy:
                lo = max(lo, cursor)
                if hi > lo:
                    clean -= hi - lo
                    cursor = hi
            self.exposure_h += max(0, clean) / 3_600_000

    def summary(self) -> dict[str, Any]:
        """Plain numbers for JSON and the tables."""
        kinds = sorted(self.events)
        return {
            "recall": {k: self.hits[k] / self.events[k] for k in kinds},
            "events": {k: self.events[k] for k in kinds},
            "hits": {k: self.hits[k] for k in kinds},
            "median_delay_s": {
                k: float(np.median(self.delays_s[k])) if self.delays_s[k] else None for k in kinds
            },
            "first_top_sensor": {k: dict(self.top_sensor[k]) for k in kinds},
            "process_faults_in_warmup_not_scored": dict(self.in_warmup),
            "false_alarms": self.false_alarms,
            "false_alarm_entities": len(self.false_alarm_entities),
            "clean_entity_hours": round(self.exposure_h, 2),
            "false_alarms_per_entity_hour": self.false_alarms / self.exposure_h
            if self.exposure_h
            else None,
            "anomalies_in_process_faults": self.in_process,
            "anomalies_in_sensor_faults": dict(self.in_sensor),
            "sensor_faults_flagged": {
                k: f"{self.sensor_events_flagged[k]}/{v}"
                for k, v in sorted(self.sensor_events.items())
            },
            "anomalies_in_recovery_margin": self.in_margin,
            "windows": self.windows,
            "us_per_window": 1e6 * self.seconds / self.windows if self.windows else None,
        }


CONFIGS: dict[str, DetectorConfig] = {
    "zscore (default)": DetectorConfig(),
    "zscore max, unsmoothed": DetectorConfig(smoothing=1.0),
    "zscore rms, unsmoothed": DetectorConfig(smoothing=1.0, aggregate=Aggregate.RMS),
    "hst": DetectorConfig(kind=Kind.HST),
}
TARGET_RECALL = 0.9
TARGET_FALSE_ALARMS = 1.0
"""Per entity-hour."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration over ``args.runs`` scenarios (seeds ``seed``, ``seed + 1``, …)."""
    model: TwinModel = load_twin_model(args.model)
    rate = args.rate or float(sum(len(model.sensors_of(e.id)) for e in model.entities))
    scores = {name: Score() for name in CONFIGS}
    began = time.perf_counter()
    scenarios = []
    for seed in range(args.seed, args.seed + args.runs):
        config = ScenarioConfig(start_ms=START_MS, duration_s=args.duration, rate=rate, seed=seed)
        scenario = Scenario(model, config)
        t0 = time.perf_counter()
        windows = build_windows(scenario)
        built_s = time.perf_counter() - t0
        entities = [entity.id for entity in scenario.entities]
        scenarios.append(
            {
                "seed": seed,
                "process_faults": sum(f.category is Category.PROCESS for f in scenario.faults),
                "sensor_faults": sum(f.category is Category.SENSOR for f in scenario.faults),
                "windows": sum(len(w) for w in windows.values()),
                "simulate_and_window_s": round(built_s, 1),
            }
        )
        for name, detector_config in CONFIGS.items():
            result = run_detectors(windows, detector_config)
            scores[name].add(
                result,
                scenario.faults,
                entities,
                START_MS + detector_config.warmup_windows * WINDOW_MS,
                START_MS + scenario.duration_ms,
                int(args.margin * 1000),
            )
            print(
                f"seed {seed}: {name}: {len(result.flagged)} anomalous windows "
                f"({result.seconds:.1f} s)",
                flush=True,
            )
    configs = {}
    for name, detector_config in CONFIGS.items():
        summary = scores[name].summary()
        fa = summary["false_alarms_per_entity_hour"]
        summary["meets_target"] = (
            all(r >= TARGET_RECALL for r in summary["recall"].values())
            and fa is not None
            and fa <= TARGET_FALSE_ALARMS
        )
        configs[name] = {"config": plain(asdict(detector_config)), "result": summary}
    return {
        "benchmark": "detection_on_simulator",
        "model": str(args.model),
        "duration_s": args.duration,
        "rate_per_s": rate,
        "window_ms": WINDOW_MS,
        "margin_s": args.margin,
        "scenarios": scenarios,
        "target": {
            "recall_per_kind": TARGET_RECALL,
            "false_alarms_per_entity_hour": TARGET_FALSE_ALARMS,
        },
        "configs": configs,
        "elapsed_s": round(time.perf_counter() - began, 1),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    kinds = sorted({k for c in results["configs"].values() for k in c["result"]["recall"]})
    head = ["configuration", *[f"recall {k}" for k in kinds], "false alarms / entity-h"]
    head += ["false alarms", "in sensor faults", "in recovery margin", "µs / window", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in results["configs"].items():
        r = entry["result"]
        cells = [name]
        cells += [f"{r['recall'][k]:.2f} ({r['hits'][k]}/{r['events'][k]})" for k in kinds]
        cells += [
            _fmt(r["false_alarms_per_entity_hour"], 3),
            f"{r['false_alarms']} ({r['false_alarm_entities']} entities)",
            str(sum(r["anomalies_in_sensor_faults"].values())),
            str(r["anomalies_in_recovery_margin"]),
            _fmt(r["us_per_window"], 0),
            "met" if r["meets_target"] else "missed",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| configuration | fault kind | median delay to first anomaly (s) "
        "| top sensor of the first anomaly |",
        "|---|---|---|---|",
    ]
    for name, entry in results["configs"].items():
        r = entry["result"]
        for k in kinds:
            sensors = ", ".join(
                f"{s} {n}" for s, n in sorted(r["first_top_sensor"][k].items(), key=lambda i: -i[1])
            )
            lines.append(f"| {name} | {k} | {_fmt(r['median_delay_s'][k], 0)} | {sensors or '-'} |")
    lines += [
        "",
        "| configuration | anomalous windows in sensor-fault intervals "
        "| sensor faults with ≥ 1 anomaly |",
        "|---|---|---|",
    ]
    for name, entry in results["configs"].items():
        r = entry["result"]
        inside = ", ".join(f"{k} {n}" for k, n in sorted(r["anomalies_in_sensor_faults"].items()))
        flagged = ", ".join(f"{k} {v}" for k, v in r["sensor_faults_flagged"].items())
        lines.append(f"| {name} | {inside or '0'} | {flagged} |")
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[str]:
    """One line per configuration: target met, or how it was missed."""
    lines = []
    for name, entry in results["configs"].items():
        r = entry["result"]
        skipped = sum(r["process_faults_in_warmup_not_scored"].values())
        if skipped:
            lines.append(
                f"- {name}: {skipped} process fault(s) started during the warm-up, not scored"
            )
        misses = [
            f"recall {k} {v:.2f} < {TARGET_RECALL}"
            for k, v in r["recall"].items()
            if v < TARGET_RECALL
        ]
        rate = r["false_alarms_per_entity_hour"]
        if rate is None or rate > TARGET_FALSE_ALARMS:
            misses.append(f"{_fmt(rate, 3)} false alarms per entity-hour > {TARGET_FALSE_ALARMS:g}")
        lines.append(
            f"- {name}: " + ("target met" if not misses else "missed: " + "; ".join(misses))
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3 * 3600.0, help="simulated seconds")
    parser.add_argument("--seed", type=int, default=3, help="seed of the first scenario")
    parser.add_argument("--runs", type=int, default=4, help="scenarios, seeds seed..seed+runs-1")
    parser.add_argument(
        "--rate", type=float, default=None, help="readings/s plant-wide (default: 1 per sensor)"
    )
    parser.add_argument(
        "--margin", type=float, default=120.0, help="seconds after a fault still not a false alarm"
    )
    parser.add_argument("--model", type=Path, default=MODEL, help="twin model YAML")
    parser.add_argument("--out", type=Path, default=Path(".twinflow/bench"), help="output folder")
    args = parser.parse_args(argv)
    warmup_s = max(c.warmup_windows for c in CONFIGS.values()) * WINDOW_MS / 1000
    if 0.3 * args.duration < warmup_s:
        print(
            f"note: faults start after 30 % of the run ({0.3 * args.duration:g} s), the warm-up "
            f"lasts {warmup_s:g} s: faults that start during it are not scored; use "
            f"--duration {warmup_s / 0.3:g} or more"
        )
    results = run(args)
    report = table(results) + "\n\n" + "\n".join(verdicts(results))
    print()
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection.json").write_text(json.dumps(results, indent=2))
    (args.out / "detection.md").write_text(
        "# Detection on the plant simulator\n\n"
        f"{args.runs} scenario(s) of {args.duration / 3600:g} h, seeds {args.seed}.."
        f"{args.seed + args.runs - 1}, all {len(load_twin_model(args.model).entities)} "
        f"entities, {WINDOW_MS // 1000}-s windows, recovery margin {args.margin:g} s. "
        f"Target: recall ≥ {TARGET_RECALL} per process-fault kind and ≤ "
        f"{TARGET_FALSE_ALARMS:g} false alarm per entity-hour.\n\n{report}\n"
    )
    print(
        f"\nwrote {args.out / 'detection.json'} and {args.out / 'detection.md'} "
        f"in {results['elapsed_s']} s"
    )


if __name__ == "__main__":
    main()
