"""Predictive maintenance on the plant simulator: degradations forecast before their limit.

Protocol. Per seed, the first ``--entities`` entities of the example plant run for
``--days`` days of event time (at full speed, no services): every entity ticks once per
10 s (one reading per sensor and window), each machine's load carries a 24-hour cycle
(``daily_load`` 0.15: day and night shifts) on top of its own, and the usual process and
sensor faults are off. A :class:`~twinflow.sim.faults.DegradationPlan` makes about 30 %
of the machines degrade: bearing wear growing as ``((t - start) / ramp) ** shape`` (ramp
12 h to 4 days, shape 1 to 1.5) from after a 6-h warm-up until a repair 2 to 6 h after
severity 1. Operators move the machines, healthy and degrading alike, through the
setpoints (:class:`~twinflow.sim.actuators.Actuators`, as commands would): every pump's
``speed`` is set anew within 1200..1800 rpm at exponential gaps (mean 6 h), and now and
then (exponential gaps, mean 36 h) a motor is stopped (``enable`` false) for 10 to 30 min.

Each degradation's ground truth is where its limit was crossed:
:func:`twinflow.sim.degradation.with_crossings`, the end of the first 10-s window
during the fault whose mean of a sensor with an alarm limit reached it (vibration,
mostly; emergent, not planned). One :class:`~twinflow.maintenance.MaintenanceMonitor`
per entity (the flow's forecaster, default configuration) reads the entity's 10-s
windows in time order. The labels are read only to score, after the fact:

- faults: degradations whose limit was crossed; alerted before the limit: those for
  which a ``maintenance_due`` alarm was raised in ``[start, crossing)``; lead: crossing
  minus that raise (median over the alerted, and over those whose start-to-crossing time,
  the ramp here, is 24 h or more);
- APE at half: at ``start + (crossing - start) / 2``, the crossing sensor's forecast
  current then (re-expressed to that instant with ``LimitForecast.at``) against the
  true remaining time, ``|forecast - truth| / truth``; a missing forecast counts as 1.0
  (and in ``missing_at_half``);
- false alerts: alarms raised on entities that do not degrade, or outside
  ``[start, repair + 6 h]`` on those that do, per entity-day of that clean time (all of
  it, warm-up included);
- cost: µs per ``process_window`` call, and the pickled monitor (its recovery
  snapshot) at the end of the run.

Targets: every fault alerted before its crossing, a median lead of 12 h or more for
ramps of 24 h or more, a median APE at half of 0.25 or less, 0.05 false alerts or fewer
per entity-day. The forecaster runs with its defaults; nothing here feeds back into it.

Run: ``.venv/bin/python -m benchmarks.maintenance_on_simulator [--seeds 11,12,13]
[--entities 20] [--days 5] [--jobs J] [--out DIR]``; one process per seed. Writes
``maintenance.json``, ``maintenance.md`` and ``png/<seed>-<entity>.png`` (one per
degradation: its sensor, the limit, the forecast time to limit with its bounds against
the truth, the alert) to ``--out`` (default ``.twinflow/bench/maintenance``).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import pickle
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.results import plain, write_results
from benchmarks.simulator_windows import START_MS, WINDOW_MS
from schemas.control import Command
from schemas.outputs import AlarmEvent, LimitForecast, SensorWindow
from twinflow.maintenance import MaintenanceConfig, MaintenanceMonitor
from twinflow.sim.actuators import Actuators
from twinflow.sim.degradation import WindowMeans, with_crossings
from twinflow.sim.faults import DegradationPlan, Fault, FaultKind, FaultPlan
from twinflow.sim.physics import ENABLE, SPEED
from twinflow.sim.scenario import Scenario, ScenarioConfig
from twinflow.twin_model import SensorSpec, TwinModel, load_twin_model

MODEL = Path(__file__).resolve().parents[1] / "infra" / "twin-model" / "example-plant.yaml"
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

TARGET_ALERTED = 1.0
"""Share of the faults alerted before their limit."""
TARGET_LEAD_H = 12.0
"""Median lead for ramps of 24 h or more."""
LONG_RAMP_H = 24.0
TARGET_APE = 0.25
"""Median APE of the time to limit at half the ramp."""
TARGET_FALSE_ALERTS = 0.05
"""False alerts per clean entity-day."""
AFTER_REPAIR_MS = 6 * HOUR_MS
"""After a repair, this long is still the fault's (the forecaster needs to see it go)."""

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Operations:
    """How operators move the machines through their setpoints (random, from the seed)."""

    speed_gap_h: float = 6.0
    """Mean gap between two ``speed`` changes of a pump (exponential)."""
    speed_range: tuple[float, float] = (1200.0, 1800.0)
    stop_gap_h: float = 36.0
    """Mean gap between two stops of a motor (exponential)."""
    stop_s: tuple[float, float] = (600.0, 1800.0)
    """How long a stop lasts (uniform)."""


@dataclass(frozen=True)
class Plan:
    """What every seed of a run shares."""

    model: Path = MODEL
    entities: int = 20
    days: float = 5.0
    daily_load: float = 0.15
    degradation: DegradationPlan = field(default_factory=DegradationPlan)
    operations: Operations = field(default_factory=Operations)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    png: Path | None = None
    """Folder for the per-fault plots (None: no plots)."""


# -- simulation ----------------------------------------------------------------------------


def operations_schedule(
    scenario: Scenario, operations: Operations, rng: np.random.Generator
) -> list[tuple[int, Command]]:
    """Setpoint commands for every entity with a ``speed`` or ``enable``, in time order."""
    start = scenario.config.start_ms
    end = start + scenario.duration_ms
    commands: list[tuple[int, Command]] = []

    def command(entity_id: str, setpoint: str, value: float | bool, at_ms: int) -> None:
        commands.append(
            (
                at_ms,
                Command(
                    command_id=f"{entity_id}/{setpoint}/{at_ms}",
                    entity_id=entity_id,
                    setpoint=setpoint,
                    value=value,
                    issued_ms=at_ms,
                    expires_ms=at_ms + 60_000,
                    user="harness",
                ),
            )
        )

    for entity in scenario.entities:
        specs = scenario.model.setpoints_of(entity.id)
        speed = specs.get(SPEED)
        if speed is not None and speed.type != "bool":
            low, high = operations.speed_range
            if speed.range is not None:
                low, high = max(low, speed.range[0]), min(high, speed.range[1])
            at = start + _gap(rng, operations.speed_gap_h)
            while at < end:
                command(entity.id, SPEED, round(float(rng.uniform(low, high)), -1), at)
                at += _gap(rng, operations.speed_gap_h)
        if ENABLE in specs and specs[ENABLE].type == "bool":
            at = start + _gap(rng, operations.stop_gap_h)
            while at < end:
                back = at + round(1000 * rng.uniform(*operations.stop_s))
                command(entity.id, ENABLE, False, at)
                command(entity.id, ENABLE, True, back)
                at = back + _gap(rng, operations.stop_gap_h)
    commands.sort(key=lambda item: item[0])
    return commands


def _gap(rng: np.random.Generator, mean_h: float) -> int:
    return max(1, round(float(rng.exponential(mean_h)) * HOUR_MS))


@dataclass
class Readings:
    """One entity's samples as numpy columns (NaN where a sensor was dropped)."""

    sensors: list[str]
    ts: Ints
    values: Floats
    """Samples x sensors."""
    n: int = 0


def simulate(scenario: Scenario, commands: Sequence[tuple[int, Command]]) -> dict[str, Readings]:
    """Every entity's samples, with each command applied at its time (from the next sample)."""
    actuators = Actuators(scenario.model, [entity.id for entity in scenario.entities])
    capacity = scenario.duration_ms // scenario.tick_ms + 2
    readings = {
        entity.id: Readings(
            sensors=(names := list(scenario.model.sensors_of(entity.id))),
            ts=np.zeros(capacity, dtype=np.int64),
            values=np.full((capacity, len(names)), np.nan),
        )
        for entity in scenario.entities
    }
    pending = 0
    for sample in scenario.samples(actuators):
        record = readings[sample.entity_id]
        row = record.n
        record.ts[row] = sample.ts_ms
        values = sample.values
        record.values[row] = [values.get(name, math.nan) for name in record.sensors]
        record.n = row + 1
        while pending < len(commands) and commands[pending][0] <= sample.ts_ms:
            at_ms, command = commands[pending]
            actuators.apply(command, at_ms)
            pending += 1
    for record in readings.values():
        record.ts, record.values = record.ts[: record.n], record.values[: record.n]
    return readings


@dataclass
class Features:
    """One entity's tumbling-window features: a column per sensor and feature."""

    starts: Ints
    count: Ints
    """Sensors x windows; 0 where a sensor had no reading in a window."""
    mean: Floats
    low: Floats
    high: Floats
    std: Floats
    last: Floats
    slope: Floats


def window_features(record: Readings, window_ms: int = WINDOW_MS) -> Features:
    """The features :mod:`benchmarks.simulator_windows` computes, for all sensors at once."""
    t = record.ts
    order = np.argsort(t, kind="stable")
    t, values = t[order], record.values[order]
    starts_of = t - t % window_ms
    starts, first, counts = np.unique(starts_of, return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(starts)), counts)
    seconds = (t - starts_of) / 1000.0
    positions = np.arange(len(t))
    shape = (len(record.sensors), len(starts))
    out = Features(
        starts=starts.astype(np.int64),
        count=np.zeros(shape, dtype=np.int64),
        mean=np.full(shape, np.nan),
        low=np.full(shape, np.nan),
        high=np.full(shape, np.nan),
        std=np.full(shape, np.nan),
        last=np.full(shape, np.nan),
        slope=np.full(shape, np.nan),
    )
    for k in range(len(record.sensors)):
        v = values[:, k]
        valid = ~np.isnan(v)
        weight = valid.astype(np.float64)
        n = np.bincount(group, weights=weight, minlength=len(starts))
        some = n > 0
        filled = np.where(valid, v, 0.0)
        mean = np.divide(
            np.bincount(group, weights=filled, minlength=len(starts)),
            n,
            out=np.full(len(starts), np.nan),
            where=some,
        )
        deviation = np.where(valid, v - np.nan_to_num(mean[group]), 0.0)
        variance = np.bincount(group, weights=deviation**2, minlength=len(starts))
        centre = np.bincount(group, weights=seconds * weight, minlength=len(starts))
        centre = np.divide(centre, n, out=np.zeros(len(starts)), where=some)
        centred = np.where(valid, seconds - centre[group], 0.0)
        sxx = np.bincount(group, weights=centred**2, minlength=len(starts))
        sxy = np.bincount(group, weights=centred * deviation, minlength=len(starts))
        last_at = np.maximum.reduceat(np.where(valid, positions, -1), first)
        out.count[k] = n.astype(np.int64)
        out.mean[k] = mean
        out.std[k] = np.sqrt(np.divide(variance, n, out=np.full(len(starts), np.nan), where=some))
        out.low[k] = np.fmin.reduceat(v, first)
        out.high[k] = np.fmax.reduceat(v, first)
        out.last[k] = np.where(last_at >= 0, v[np.maximum(last_at, 0)], np.nan)
        out.slope[k] = np.divide(sxy, sxx, out=np.zeros(len(starts)), where=(n >= 2) & (sxx > 0))
    return out


def iter_windows(
    entity_id: str, sensors: Sequence[str], features: Features, window_ms: int = WINDOW_MS
) -> Iterator[tuple[int, dict[str, SensorWindow]]]:
    """``(window start, features by sensor)`` in time order, built one window at a time."""
    columns = [
        (
            k,
            name,
            features.count[k].tolist(),
            features.mean[k].tolist(),
            features.low[k].tolist(),
            features.high[k].tolist(),
            features.std[k].tolist(),
            features.last[k].tolist(),
            features.slope[k].tolist(),
        )
        for k, name in enumerate(sensors)
    ]
    for i, start in enumerate(features.starts.tolist()):
        by_sensor = {}
        for _, name, count, mean, low, high, std, last, slope in columns:
            if count[i]:
                by_sensor[name] = SensorWindow(
                    entity_id,
                    name,
                    start,
                    start + window_ms,
                    count[i],
                    mean[i],
                    low[i],
                    high[i],
                    std[i],
                    last[i],
                    slope[i],
                    0,
                )
        yield start, by_sensor


# -- the monitors --------------------------------------------------------------------------


@dataclass
class Track:
    """The forecasts of one sensor over time: a point whenever it changes."""

    ts_ms: list[int] = field(default_factory=list)
    time_to_limit_s: list[float] = field(default_factory=list)
    low_s: list[float] = field(default_factory=list)
    high_s: list[float] = field(default_factory=list)
    """NaN: no forecast; inf: unbounded."""

    def add(self, ts_ms: int, forecast: LimitForecast | None) -> None:
        """Note the forecast current at ``ts_ms`` (None: there is none)."""
        self.ts_ms.append(ts_ms)
        if forecast is None:
            self.time_to_limit_s.append(math.nan)
            self.low_s.append(math.nan)
            self.high_s.append(math.nan)
            return
        self.time_to_limit_s.append(forecast.time_to_limit_s)
        self.low_s.append(forecast.time_to_limit_low_s)
        high = forecast.time_to_limit_high_s
        self.high_s.append(math.inf if high is None else high)


@dataclass
class EntityRun:
    """What one entity's monitor did, and what it cost."""

    entity_id: str
    raised_ms: list[int] = field(default_factory=list)
    """When each ``maintenance_due`` alarm was raised."""
    raised_sensor: list[str | None] = field(default_factory=list)
    windows: int = 0
    seconds: float = 0.0
    """In ``process_window`` only."""
    pickle_bytes: int = 0
    track: Track | None = None
    at_half: LimitForecast | None = None


def run_monitor(
    entity_id: str,
    sensors: Mapping[str, SensorSpec],
    windows: Iterator[tuple[int, dict[str, SensorWindow]]],
    config: MaintenanceConfig,
    watch: tuple[str, int | None] | None = None,
) -> EntityRun:
    """One fresh monitor over the entity's windows in time order.

    ``watch``: a sensor whose forecasts to keep (per bucket) and an instant at which to
    keep the forecast current then (the last made at or before it).
    """
    monitor = MaintenanceMonitor(entity_id, sensors, config)
    run = EntityRun(entity_id, track=None if watch is None else Track())
    sensor, half_ms = watch if watch is not None else (None, None)
    clock = time.perf_counter
    last: LimitForecast | None = None
    for start, by_sensor in windows:
        end = start + WINDOW_MS
        began = clock()
        verdict = monitor.process_window(by_sensor, start, end)
        run.seconds += clock() - began
        run.windows += 1
        for alarm in verdict.alarms:
            if alarm.event is AlarmEvent.RAISED:
                run.raised_ms.append(alarm.ts_ms)
                run.raised_sensor.append(None if alarm.forecast is None else alarm.forecast.sensor)
        if sensor is not None:
            forecast = verdict.forecasts.get(sensor)
            if forecast is not last and run.track is not None:
                run.track.add(end, forecast)  # a new forecast (or none any more)
                last = forecast
            if half_ms is not None and end <= half_ms:
                run.at_half = forecast
    run.pickle_bytes = len(pickle.dumps(monitor))
    return run


# -- one seed ------------------------------------------------------------------------------


@dataclass
class SeedRun:
    """One seed: its degradations (with their crossings) and every entity's monitor."""

    seed: int
    start_ms: int
    end_ms: int
    faults: list[Fault]
    runs: dict[str, EntityRun]
    info: dict[str, Any]


def scenario_config(plan: Plan, seed: int, model: TwinModel) -> ScenarioConfig:
    """The simulator's settings for one seed: one tick of every entity per window."""
    entities = model.entities[: plan.entities]
    sensors = sum(len(model.sensors_of(entity.id)) for entity in entities)
    return ScenarioConfig(
        start_ms=START_MS,
        duration_s=plan.days * 86_400,
        rate=sensors * 1000 / WINDOW_MS,
        entities=plan.entities,
        seed=seed,
        faults=FaultPlan(process_fault_share=0.0, sensor_fault_share=0.0),
        daily_load=plan.daily_load,
        degradation=plan.degradation,
    )


def run_seed(plan: Plan, seed: int) -> SeedRun:
    """Simulate one seed, find its crossings, run every entity's monitor, plot its faults."""
    began = time.perf_counter()
    model = load_twin_model(plan.model)
    scenario = Scenario(model, scenario_config(plan, seed, model))
    assert scenario.tick_ms == WINDOW_MS, scenario.tick_ms
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1 << 41,)))
    commands = operations_schedule(scenario, plan.operations, rng)
    readings = simulate(scenario, commands)
    simulated_s = time.perf_counter() - began
    # Only the means are kept for every entity; the other features are remade per entity
    # when its monitor runs (all of them at once would take ~14 MB an entity).
    means = {entity_id: _means(record) for entity_id, record in readings.items()}
    specs = {entity.id: model.sensors_of(entity.id) for entity in scenario.entities}
    faults = [
        f for f in with_crossings(scenario.faults, means, specs) if f.kind is FaultKind.DEGRADATION
    ]
    by_entity = {fault.entity_id: fault for fault in faults}
    runs = {}
    for entity in scenario.entities:
        fault = by_entity.get(entity.id)
        watch = None
        if fault is not None:
            sensor = fault.crossing_sensor or _closest_to_limit(means[entity.id], specs[entity.id])
            half = (
                None
                if fault.crossing_ms is None
                else fault.start_ms + (fault.crossing_ms - fault.start_ms) // 2
            )
            watch = (sensor, half)
        runs[entity.id] = run_monitor(
            entity.id,
            specs[entity.id],
            iter_windows(
                entity.id, readings[entity.id].sensors, window_features(readings[entity.id])
            ),
            plan.maintenance,
            watch,
        )
        if fault is not None and plan.png is not None and watch is not None:
            plot_fault(
                plan.png / f"{seed}-{entity.id}.png",
                seed,
                fault,
                watch[0],
                means[entity.id],
                specs[entity.id][watch[0]],
                runs[entity.id],
                START_MS,
            )
    info = {
        "seed": seed,
        "degradations": len(faults),
        "commands": len(commands),
        "windows": sum(run.windows for run in runs.values()),
        "simulate_s": round(simulated_s, 1),
        "elapsed_s": round(time.perf_counter() - began, 1),
    }
    print(
        f"seed {seed}: {len(faults)} degradations, {info['windows']} windows, "
        f"{info['elapsed_s']} s",
        flush=True,
    )
    return SeedRun(seed, START_MS, START_MS + scenario.duration_ms, faults, runs, info)


def _means(record: Readings) -> WindowMeans:
    features = window_features(record)
    return WindowMeans(
        features.starts,
        WINDOW_MS,
        {name: features.mean[k] for k, name in enumerate(record.sensors)},
    )


def _run_seed(task: tuple[Plan, int]) -> SeedRun:
    return run_seed(*task)


def _closest_to_limit(series: WindowMeans, sensors: Mapping[str, SensorSpec]) -> str:
    """The limited sensor whose highest mean came closest to its alarm limit (share of it)."""
    best, best_share = "", -math.inf
    for name, spec in sorted(sensors.items()):
        limits, means = spec.limits, series.means.get(name)
        if limits is None or limits.alarm_high is None or means is None:
            continue
        share = float(np.nanmax(means)) / limits.alarm_high if len(means) else -math.inf
        if share > best_share:
            best, best_share = name, share
    return best or next(iter(sorted(sensors)))


# -- scoring -------------------------------------------------------------------------------


def score(seeds: Sequence[SeedRun]) -> dict[str, Any]:
    """Every figure of the run: per fault, per seed, and pooled."""
    rows: list[dict[str, Any]] = []
    false_rows: list[dict[str, Any]] = []
    per_seed = []
    seconds = windows = 0.0
    sizes: list[int] = []
    for run in seeds:
        by_entity = {fault.entity_id: fault for fault in run.faults}
        exposure_ms = 0
        false_alerts = 0
        for entity_id, entity in run.runs.items():
            seconds += entity.seconds
            windows += entity.windows
            sizes.append(entity.pickle_bytes)
            fault = by_entity.get(entity_id)
            excluded = (
                (fault.start_ms, min(run.end_ms, fault.end_ms + AFTER_REPAIR_MS))
                if fault is not None
                else (run.end_ms, run.end_ms)
            )
            exposure_ms += run.end_ms - run.start_ms - (excluded[1] - excluded[0])
            for raised, sensor in zip(entity.raised_ms, entity.raised_sensor, strict=True):
                if not excluded[0] <= raised <= excluded[1]:
                    false_alerts += 1
                    false_rows.append(
                        {
                            "seed": run.seed,
                            "entity": entity_id,
                            "raised_h": round((raised - run.start_ms) / HOUR_MS, 2),
                            "sensor": sensor,
                            "degrades": fault is not None,
                        }
                    )
            if fault is not None:
                rows.append(_fault_row(run, fault, entity))
        scored = [r for r in rows if r["seed"] == run.seed and r["crossing_h"] is not None]
        per_seed.append(
            {
                **run.info,
                "faults": len(scored),
                "alerted_before_limit": sum(r["alert_h"] is not None for r in scored),
                "median_lead_h": _median([r["lead_h"] for r in scored]),
                "median_ape_at_half": _median([r["ape_at_half"] for r in scored]),
                "false_alerts": false_alerts,
                "clean_entity_days": round(exposure_ms / DAY_MS, 2),
            }
        )
    crossed = [r for r in rows if r["crossing_h"] is not None]
    alerted = [r for r in crossed if r["alert_h"] is not None]
    long = [r for r in alerted if r["to_crossing_h"] >= LONG_RAMP_H]
    apes = [r["ape_at_half"] for r in crossed]
    exposure_days = sum(s["clean_entity_days"] for s in per_seed)
    false_alerts = len(false_rows)
    false_rate = false_alerts / exposure_days if exposure_days else None
    lead_s = _median([r["lead_h"] * 3600 for r in alerted])
    lead_long_s = _median([r["lead_h"] * 3600 for r in long])
    ape = _median(apes)
    figures = {
        "degradations": len(rows),
        "faults": len(crossed),
        "not_reaching_limit": len(rows) - len(crossed),
        "alerted_before_limit": len(alerted),
        "median_lead_s": lead_s,
        "median_lead_s_ramps_24h": lead_long_s,
        "faults_ramps_24h": sum(r["to_crossing_h"] >= LONG_RAMP_H for r in crossed),
        "alerted_ramps_24h": len(long),
        "median_ape_at_half": ape,
        "missing_at_half": sum(r["forecast_at_half_h"] is None for r in crossed),
        "false_alerts": false_alerts,
        "clean_entity_days": round(exposure_days, 2),
        "false_alerts_per_entity_day": None if false_rate is None else round(false_rate, 4),
        "windows": int(windows),
        "us_per_window": round(1e6 * seconds / windows, 2) if windows else None,
        "monitor_pickle_bytes": {
            "median": int(statistics.median(sizes)) if sizes else None,
            "max": max(sizes, default=None),
        },
    }
    met = {
        "alerted_before_limit": bool(crossed) and len(alerted) >= TARGET_ALERTED * len(crossed),
        "median_lead_s_ramps_24h": lead_long_s is not None and lead_long_s >= TARGET_LEAD_H * 3600,
        "median_ape_at_half": ape is not None and ape <= TARGET_APE,
        "false_alerts_per_entity_day": false_rate is not None and false_rate <= TARGET_FALSE_ALERTS,
    }
    return {
        **figures,
        "met": met,
        "per_seed": per_seed,
        "per_fault": rows,
        "false_alert_rows": false_rows,
    }


def _fault_row(run: SeedRun, fault: Fault, entity: EntityRun) -> dict[str, Any]:
    def hours(ms: int | None) -> float | None:
        return None if ms is None else round((ms - run.start_ms) / HOUR_MS, 2)

    crossing = fault.crossing_ms
    alert = None
    if crossing is not None:
        alert = next((t for t in entity.raised_ms if fault.start_ms <= t < crossing), None)
    ape = predicted_h = None
    if crossing is not None:
        half = fault.start_ms + (crossing - fault.start_ms) // 2
        truth_s = (crossing - half) / 1000
        ape = 1.0
        if entity.at_half is not None:
            predicted_s = entity.at_half.at(half).time_to_limit_s
            predicted_h = round(predicted_s / 3600, 2)
            ape = abs(predicted_s - truth_s) / truth_s if truth_s > 0 else 1.0
    return {
        "seed": run.seed,
        "entity": fault.entity_id,
        "sensor": fault.crossing_sensor,
        "ramp_h": round((fault.ramp_ms or 0) / HOUR_MS, 2),
        "shape": fault.shape,
        "start_h": hours(fault.start_ms),
        "crossing_h": hours(crossing),
        "repair_h": hours(fault.end_ms),
        "to_crossing_h": None
        if crossing is None
        else round((crossing - fault.start_ms) / HOUR_MS, 2),
        "alert_h": hours(alert),
        "lead_h": None
        if alert is None or crossing is None
        else round((crossing - alert) / HOUR_MS, 2),
        "forecast_at_half_h": predicted_h,
        "ape_at_half": None if ape is None else round(ape, 4),
        "alarms_raised": len(entity.raised_ms),
    }


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


# -- the run -------------------------------------------------------------------------------


def evaluate(plan: Plan, seeds: Sequence[int], jobs: int | None = None) -> dict[str, Any]:
    """Every seed (in ``jobs`` processes), scored together."""
    began = time.perf_counter()
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(seeds)))
    tasks = [(plan, seed) for seed in seeds]
    if jobs == 1:
        runs = [_run_seed(task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            runs = pool.map(_run_seed, tasks, chunksize=1)
    return {
        "benchmark": "maintenance_on_simulator",
        "model": str(plan.model),
        "seeds": list(seeds),
        "entities": plan.entities,
        "days": plan.days,
        "window_ms": WINDOW_MS,
        "daily_load": plan.daily_load,
        "degradation": plain(asdict(plan.degradation)),
        "operations": asdict(plan.operations),
        "maintenance_config": asdict(plan.maintenance),
        "jobs": jobs,
        "target": {
            "alerted_before_limit_share": TARGET_ALERTED,
            "median_lead_h_ramps_24h": TARGET_LEAD_H,
            "median_ape_at_half": TARGET_APE,
            "false_alerts_per_entity_day": TARGET_FALSE_ALERTS,
        },
        **score(runs),
        "elapsed_s": round(time.perf_counter() - began, 1),
    }


def _fmt(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}f}"


def report(results: dict[str, Any]) -> str:
    """The Markdown report: the figures against their targets, per seed, per fault."""
    met = results["met"]

    def verdict(name: str) -> str:
        return "met" if met[name] else "missed"

    pickled = results["monitor_pickle_bytes"]
    lines = [
        "# Predictive maintenance on the plant simulator",
        "",
        f"Seeds {', '.join(map(str, results['seeds']))}: the first {results['entities']} "
        f"entities of `{Path(results['model']).name}`, {results['days']:g} days each, 10-s "
        f"windows, daily load cycle {results['daily_load']:g}, setpoint changes (speed, "
        f"stops), one MaintenanceMonitor per entity (default config). "
        f"{results['degradations']} degradations, {results['faults']} crossed their limit "
        f"({results['not_reaching_limit']} repaired before). Run time {results['elapsed_s']} s "
        f"with {results['jobs']} process(es).",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        f"| faults alerted before the limit | {results['alerted_before_limit']}/"
        f"{results['faults']} | all | {verdict('alerted_before_limit')} |",
        f"| median lead, all alerted (h) | {_fmt(results['median_lead_s'], 1, 3600)} | - | |",
        f"| median lead, ramps ≥ 24 h (h) | {_fmt(results['median_lead_s_ramps_24h'], 1, 3600)}"
        f" ({results['alerted_ramps_24h']}/{results['faults_ramps_24h']} alerted) "
        f"| ≥ {TARGET_LEAD_H:g} | {verdict('median_lead_s_ramps_24h')} |",
        f"| median APE of time to limit at half the ramp | "
        f"{_fmt(results['median_ape_at_half'], 3)} ({results['missing_at_half']} without a "
        f"forecast) | ≤ {TARGET_APE:g} | {verdict('median_ape_at_half')} |",
        f"| false alerts per clean entity-day | "
        f"{_fmt(results['false_alerts_per_entity_day'], 3)} ({results['false_alerts']} in "
        f"{results['clean_entity_days']:g}) | ≤ {TARGET_FALSE_ALERTS:g} | "
        f"{verdict('false_alerts_per_entity_day')} |",
        f"| µs per window (process_window) | {_fmt(results['us_per_window'], 1)} | - | |",
        f"| pickled monitor, median / max (bytes) | {pickled['median']} / {pickled['max']} | - | |",
        "",
        "| seed | degradations | crossed | alerted | median lead (h) | median APE at half "
        "| false alerts | clean entity-days | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["per_seed"]:
        lines.append(
            f"| {s['seed']} | {s['degradations']} | {s['faults']} | "
            f"{s['alerted_before_limit']} | {_fmt(s['median_lead_h'], 1)} | "
            f"{_fmt(s['median_ape_at_half'], 3)} | {s['false_alerts']} | "
            f"{s['clean_entity_days']:g} | {s['elapsed_s']} |"
        )
    lines += [
        "",
        "Per fault (hours since the start of the run; ramp: to severity 1; to crossing: "
        "start to crossing, the ramp the lead and APE targets mean):",
        "",
        "| seed | entity | sensor | ramp (h) | shape | to crossing (h) | start | crossing "
        "| repair | alert | lead (h) | forecast at half (h) | APE at half |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["per_fault"]:
        truth_half = None if r["to_crossing_h"] is None else r["to_crossing_h"] / 2
        cells = [
            r["seed"],
            r["entity"],
            r["sensor"] or "-",
            r["ramp_h"],
            r["shape"],
            _fmt(r["to_crossing_h"], 1),
            r["start_h"],
            _fmt(r["crossing_h"], 2),
            r["repair_h"],
            _fmt(r["alert_h"], 2),
            _fmt(r["lead_h"], 1),
            f"{_fmt(r['forecast_at_half_h'], 1)} (true {_fmt(truth_half, 1)})",
            _fmt(r["ape_at_half"], 3),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if results["false_alert_rows"]:
        lines += ["", "False alerts:", ""]
        lines += [
            f"- seed {r['seed']} {r['entity']} at {r['raised_h']} h ({r['sensor']}"
            f"{', degrading entity' if r['degrades'] else ''})"
            for r in results["false_alert_rows"]
        ]
    return "\n".join(lines) + "\n"


def plot_fault(
    target: Path,
    seed: int,
    fault: Fault,
    sensor: str,
    series: WindowMeans,
    spec: SensorSpec,
    run: EntityRun,
    origin_ms: int,
) -> None:
    """The sensor's means and limit; the forecast time to limit and bounds vs the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def hours(ms: float) -> float:
        return (ms - origin_ms) / HOUR_MS

    step = 30  # 5-minute means of the 10-s windows
    means = series.means[sensor]
    usable = len(means) // step * step
    t = (series.starts_ms[:usable].reshape(-1, step).mean(axis=1) - origin_ms) / HOUR_MS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        m = np.nanmean(means[:usable].reshape(-1, step), axis=1)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 7), height_ratios=(1, 1))
    top.plot(t, m, lw=0.6, color="tab:blue", label=f"{sensor} (5-min means)")
    limits = spec.limits
    if limits is not None and limits.alarm_high is not None:
        top.axhline(limits.alarm_high, color="red", lw=1, ls="--", label="alarm limit")
    if limits is not None and limits.warn_high is not None:
        top.axhline(limits.warn_high, color="orange", lw=0.8, ls=":", label="warn limit")
    top.set_ylabel(f"{sensor} ({spec.unit})")
    track = run.track or Track()
    ts = np.asarray([hours(x) for x in track.ts_ms])
    ttl = np.asarray(track.time_to_limit_s) / 3600
    low = np.asarray(track.low_s) / 3600
    high = np.asarray(track.high_s) / 3600
    cap = 96.0
    bottom.fill_between(
        ts,
        np.minimum(low, cap),
        np.minimum(high, cap),
        color="tab:green",
        alpha=0.25,
        lw=0,
        label="95 % bounds (clipped at 96 h)",
    )
    bottom.plot(ts, np.minimum(ttl, cap), color="tab:green", lw=1, label="forecast time to limit")
    bottom.axhline(48.0, color="grey", lw=0.8, ls=":", label="48-h horizon")
    if fault.crossing_ms is not None:
        truth_t = np.asarray([hours(fault.start_ms), hours(fault.crossing_ms)])
        truth = (fault.crossing_ms - origin_ms) / HOUR_MS - truth_t
        bottom.plot(
            truth_t,
            np.minimum(truth, cap),
            color="black",
            lw=1,
            ls="--",
            label="true time to limit",
        )
        half = fault.start_ms + (fault.crossing_ms - fault.start_ms) // 2
        if run.at_half is not None:
            bottom.plot(
                [hours(half)],
                [min(run.at_half.at(half).time_to_limit_s / 3600, cap)],
                "o",
                color="tab:green",
                ms=5,
                label="forecast at half the ramp (APE)",
            )
    bottom.set_ylim(0, cap + 4)
    bottom.set_ylabel("time to limit (h)")
    bottom.set_xlabel("hours since the start of the run")
    for axis in (top, bottom):
        axis.axvspan(hours(fault.start_ms), hours(fault.end_ms), color="orange", alpha=0.12, lw=0)
        if fault.crossing_ms is not None:
            axis.axvline(hours(fault.crossing_ms), color="red", lw=1)
        for raised in run.raised_ms:
            axis.axvline(hours(raised), color="tab:purple", lw=1, ls="-.")
    top.legend(loc="upper left", fontsize=7)
    bottom.legend(loc="upper right", fontsize=7)
    crossing = "none" if fault.crossing_ms is None else f"{hours(fault.crossing_ms):.1f} h"
    top.set_title(
        f"seed {seed} {fault.entity_id}: degradation (orange, ramp "
        f"{(fault.ramp_ms or 0) / HOUR_MS:.1f} h, shape {fault.shape}), crossing (red) "
        f"{crossing}, maintenance_due raised (purple)",
        fontsize=9,
    )
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="11,12,13", help="comma-separated seeds")
    parser.add_argument("--entities", type=int, default=20, help="first N entities of the model")
    parser.add_argument("--days", type=float, default=5.0, help="simulated days per seed")
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--model", type=Path, default=MODEL, help="twin model YAML")
    parser.add_argument(
        "--out", type=Path, default=Path(".twinflow/bench/maintenance"), help="output folder"
    )
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    plan = Plan(model=args.model, entities=args.entities, days=args.days, png=args.out / "png")
    results = evaluate(plan, seeds, args.jobs)
    text = report(results)
    print()
    print(text)
    data, markdown = write_results(args.out, "maintenance", results, text)
    print(f"wrote {data}, {markdown} and {args.out / 'png'} in {results['elapsed_s']} s")


if __name__ == "__main__":
    main()
