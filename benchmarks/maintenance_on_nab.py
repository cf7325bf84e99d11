"""What the maintenance forecaster would have said on NAB's machine temperature before its failure.

Descriptive, not scored. NAB's ``realKnownCause/machine_temperature_system_failure.csv``
(an industrial machine's temperature sensor, one reading every 5 minutes from 2013-12-02
to 2014-02-19, four labeled anomaly windows, the last one its failure) is fed, row by
row, to one :class:`~twinflow.maintenance.MaintenanceMonitor` with its default
:class:`~twinflow.maintenance.MaintenanceConfig`, as the flow would feed it a sensor's
5-minute windows: row ``ts, value`` is the window ``[ts, ts + 5 min)`` with ``count`` 1,
``mean``, ``min``, ``max`` and ``last`` the value, ``std`` and ``slope`` 0, ``flagged``
0. The file goes back an hour once (2014-01-07 02:55 is followed by 02:00); those 12
rows arrive after their windows closed and are skipped, as the flow drops late readings.

The limits the forecaster forecasts are fixed by a rule stated before looking at the
failure (:func:`limits_rule`): ``alarm_low = m - 6 s`` and ``alarm_high = m + 6 s``,
with ``m`` and ``s`` the mean and (population) standard deviation of the file's NAB
probationary rows: the first 15 % of its rows, at most 750
(:func:`benchmarks.nab_scoring.probationary_rows`; 750 rows, 2.6 days, here). The run
checks that the probation holds no label window. The literal 15 % of this file (3404
rows, to 2013-12-14) would take in the first label window (2013-12-10 to 12-12), so the
rule is NAB's capped probation, which NAB's own scoring uses. The sensor's valid
``range`` is ``[min(alarm_low, data min) - 10, max(alarm_high, data max) + 10]``: any
range holding the limits and the data would do, the range only decides validity.

The labels are read only to describe: for each label window, what the forecaster said in
the 48 h before its start (whether a forecast stood, towards which limit, its time to
limit and 95 % bounds at 48, 24, 12, 6 and 0 h before the start, whether a
``maintenance_due`` alarm was active and since when) and when the series first crossed
either limit from 48 h before the window to its end. Every ``maintenance_due`` alarm and
every excursion past a limit (consecutive rows outside it) are listed too. Nothing here
feeds back into the forecaster, the rule or the limits.

Run: ``.venv/bin/python -m benchmarks.maintenance_on_nab [--data DIR] [--out DIR]``.
Writes ``nab_maintenance.json``, ``nab_maintenance.md`` and ``nab_maintenance.png`` (the
series, the limits, the label windows, the alarms; below, the forecast time to limit and
its bounds) to ``--out`` (default ``.twinflow/bench/maintenance-nab``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from benchmarks.nab_evaluation import DEFAULT_DATA, LABELS, load_labels, window_rows
from benchmarks.nab_scoring import probationary_rows
from benchmarks.results import plain, write_results
from schemas.outputs import Alarm, AlarmEvent, LimitForecast, SensorWindow
from twinflow.maintenance import MaintenanceConfig, MaintenanceMonitor
from twinflow.twin_model import OperatingLimits, SensorSpec

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".twinflow" / "bench" / "maintenance-nab"
FILE = "realKnownCause/machine_temperature_system_failure.csv"
"""The file, as NAB's labels name it (``data/<group>/<file>.csv`` under the data folder)."""
STEM = "nab_maintenance"
ENTITY = "machine"
SENSOR = "temperature"
SIGMAS = 6.0
"""The limits lie this many standard deviations of the probation from its mean."""
RANGE_MARGIN = 10.0
"""The valid range reaches this far past the limits and the data."""
ROW_MS = 300_000
"""NAB's rows here are 5 minutes apart: one window each."""
HOUR_MS = 3_600_000
LOOKBACK_H = 48.0
"""What the forecaster said is described over this long before each window's start."""
CHECKPOINTS_H = (48.0, 24.0, 12.0, 6.0, 0.0)
"""Hours before a window's start at which its current forecast is reported."""
PLOT_CAP_H = 96.0
RULE = (
    "alarm_low = m - 6 s, alarm_high = m + 6 s; m and s the mean and population standard "
    "deviation of the file's NAB probationary rows (the first 15 %, at most 750); fixed "
    "before looking at the failure"
)

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Reference:
    """The probation's statistics and the limits the rule gives."""

    rows: int
    mean: float
    std: float
    alarm_low: float
    alarm_high: float


def limits_rule(values: Floats, rows: int) -> Reference:
    """``m -/+ 6 s`` over the first ``rows`` values only.

    >>> ref = limits_rule(np.array([1.0, 3.0, 1.0, 3.0, 100.0]), 4)
    >>> ref.mean, ref.std, ref.alarm_low, ref.alarm_high
    (2.0, 1.0, -4.0, 8.0)
    """
    if not 2 <= rows <= len(values):
        raise ValueError(f"the reference needs 2 to {len(values)} rows, got {rows}")
    head = values[:rows]
    mean, std = float(np.mean(head)), float(np.std(head))
    return Reference(rows, mean, std, mean - SIGMAS * std, mean + SIGMAS * std)


def sensor_spec(reference: Reference, values: Floats) -> SensorSpec:
    """The temperature sensor with the rule's limits and a range holding limits and data."""
    low = min(reference.alarm_low, float(values.min())) - RANGE_MARGIN
    high = max(reference.alarm_high, float(values.max())) + RANGE_MARGIN
    return SensorSpec(
        unit="degF",
        range=(low, high),
        max_rate=1e6,
        stuck_after_s=1e9,
        limits=OperatingLimits(alarm_low=reference.alarm_low, alarm_high=reference.alarm_high),
        description="NAB machine temperature; limits from the probation (m -/+ 6 s)",
    )


@dataclass
class Run:
    """The monitor's output over the file: per bucket close, and its alarm transitions."""

    made_ms: list[int]
    """End of each bucket at whose close the forecasts were remade."""
    forecasts: list[LimitForecast | None]
    """The sensor's forecast current after each close (None: none)."""
    alarms: list[Alarm]
    fed: int
    skipped: list[int]
    """Rows skipped as late (their window starts before the last fed window's end)."""


def run_monitor(times_ms: npt.NDArray[np.int64], values: Floats, spec: SensorSpec) -> Run:
    """Feed every row, in file order, as one window to a default monitor."""
    config = MaintenanceConfig()
    monitor = MaintenanceMonitor(ENTITY, {SENSOR: spec}, config)
    run = Run([], [], [], 0, [])
    last_end = -1
    for row, (start, value) in enumerate(zip(times_ms.tolist(), values.tolist(), strict=True)):
        end = start + ROW_MS
        if start < last_end:
            run.skipped.append(row)
            continue
        last_end = end
        window = SensorWindow(
            ENTITY, SENSOR, start, end, 1, value, value, value, 0.0, value, 0.0, 0
        )
        verdict = monitor.process_window({SENSOR: window}, start, end)
        run.fed += 1
        run.alarms.extend(verdict.alarms)
        if verdict.updated:
            run.made_ms.append(end // config.bucket_ms * config.bucket_ms)
            run.forecasts.append(verdict.forecasts.get(SENSOR))
    return run


@dataclass(frozen=True)
class Incident:
    """One ``maintenance_due`` alarm: raised, and ended (or not) by a later transition."""

    alarm_id: str
    raised_ms: int
    ended_ms: int | None
    """Time of the transition that ended it; None: still active at the end of the file."""
    end_event: str | None
    raised_forecast: LimitForecast | None


def incidents(alarms: list[Alarm]) -> list[Incident]:
    """The alarm transitions folded into incidents, in order."""
    raised: dict[str, Alarm] = {}
    ended: dict[str, Alarm] = {}
    for alarm in alarms:
        if alarm.event is AlarmEvent.RAISED:
            raised[alarm.alarm_id] = alarm
        elif not alarm.active:
            ended[alarm.alarm_id] = alarm
    return [
        Incident(
            alarm_id,
            alarm.ts_ms,
            ended[alarm_id].ts_ms if alarm_id in ended else None,
            str(ended[alarm_id].event) if alarm_id in ended else None,
            alarm.forecast,
        )
        for alarm_id, alarm in raised.items()
    ]


def stamp(ms: int | None) -> str | None:
    """``ms`` (naive file time as epoch ms) as ``YYYY-MM-DD HH:MM``."""
    return None if ms is None else pd.Timestamp(ms, unit="ms").strftime("%Y-%m-%d %H:%M")


def hours(ms: float | None) -> float | None:
    """Milliseconds as hours, rounded to 0.01."""
    return None if ms is None else round(ms / HOUR_MS, 2)


def forecast_entry(
    forecast: LimitForecast | None, at_ms: int | None = None
) -> dict[str, Any] | None:
    """A forecast's figures, times in hours; with ``at_ms``, also told from then.

    The monitor keeps a forecast until a later fit decides, so the one current at a
    time may have been made buckets earlier: ``time_to_limit_from_at_h`` counts from
    ``at_ms`` (:meth:`~schemas.outputs.LimitForecast.at`, 0 once its crossing passed).
    """
    if forecast is None:
        return None
    later = None if at_ms is None else forecast.at(at_ms)
    return {
        "made": stamp(forecast.ts_ms),
        "limit": forecast.limit,
        "limit_value": round(forecast.limit_value, 3),
        "level": round(forecast.level, 3),
        "slope_per_h": round(forecast.slope_per_h, 4),
        "time_to_limit_h": hours(forecast.time_to_limit_s * 1000),
        "time_to_limit_low_h": hours(forecast.time_to_limit_low_s * 1000),
        "time_to_limit_high_h": None
        if forecast.time_to_limit_high_s is None
        else hours(forecast.time_to_limit_high_s * 1000),
        "predicted_crossing": stamp(forecast.crossing_ms()),
        "fitted_since": stamp(forecast.since_ms),
        **(
            {}
            if later is None
            else {"time_to_limit_from_at_h": hours(later.time_to_limit_s * 1000)}
        ),
    }


def excursions(
    times_ms: npt.NDArray[np.int64], values: Floats, reference: Reference
) -> list[dict[str, Any]]:
    """Runs of consecutive rows (file order) outside a limit: when, which side, how far."""
    side = np.where(values > reference.alarm_high, 1, np.where(values < reference.alarm_low, -1, 0))
    runs: list[dict[str, Any]] = []
    row = 0
    while row < len(side):
        if side[row] == 0:
            row += 1
            continue
        end = row
        while end + 1 < len(side) and side[end + 1] == side[row]:
            end += 1
        chunk = values[row : end + 1]
        runs.append(
            {
                "first_row": row,
                "last_row": end,
                "first": stamp(int(times_ms[row])),
                "last": stamp(int(times_ms[end])),
                "first_ms": int(times_ms[row]),
                "limit": "alarm_high" if side[row] > 0 else "alarm_low",
                "rows": end - row + 1,
                "extreme": round(float(chunk.max() if side[row] > 0 else chunk.min()), 3),
            }
        )
        row = end + 1
    return runs


def describe_window(
    index: int,
    bounds: tuple[str, str],
    rows: tuple[int, int],
    times_ms: npt.NDArray[np.int64],
    run: Run,
    folded: list[Incident],
    outside: list[dict[str, Any]],
) -> dict[str, Any]:
    """What the forecaster said in the 48 h before one label window; the first crossing."""
    start_ms, end_ms = int(times_ms[rows[0]]), int(times_ms[rows[1]])
    look_ms = start_ms - round(LOOKBACK_H * HOUR_MS)
    made = np.asarray(run.made_ms, dtype=np.int64)

    def current(at_ms: int) -> LimitForecast | None:
        k = int(np.searchsorted(made, at_ms, side="right")) - 1
        return run.forecasts[k] if k >= 0 else None

    def active(at_ms: int) -> Incident | None:
        for incident in folded:
            if incident.raised_ms <= at_ms and (
                incident.ended_ms is None or incident.ended_ms > at_ms
            ):
                return incident
        return None

    checkpoints = []
    for before_h in CHECKPOINTS_H:
        at = start_ms - round(before_h * HOUR_MS)
        incident = active(at)
        checkpoints.append(
            {
                "hours_before": before_h,
                "at": stamp(at),
                "forecast": forecast_entry(current(at), at),
                "alarm_active": incident is not None,
                "alarm_since": None if incident is None else stamp(incident.raised_ms),
            }
        )
    closes = [k for k, t in enumerate(run.made_ms) if look_ms <= t <= start_ms]
    said = [run.forecasts[k] for k in closes]
    present = [f for f in said if f is not None]
    first = next((run.made_ms[k] for k in closes if run.forecasts[k] is not None), None)
    lows = [f.time_to_limit_low_s / 3600 for f in present]
    crossing = next(
        (e for e in outside if look_ms <= e["first_ms"] <= end_ms),
        None,
    )
    at_start = active(start_ms)
    return {
        "window": index,
        "start": stamp(start_ms),
        "end": stamp(end_ms),
        "timestamps": list(bounds),
        "rows": list(rows),
        "lookback_start": stamp(look_ms),
        "bucket_closes_in_lookback": len(closes),
        "forecast_share_in_lookback": round(len(present) / len(closes), 3) if closes else None,
        "forecasts_towards": {
            name: sum(f.limit == name for f in present) for name in ("alarm_high", "alarm_low")
        },
        "first_forecast_in_lookback": stamp(first),
        "min_time_to_limit_low_h_in_lookback": round(min(lows), 2) if lows else None,
        "checkpoints": checkpoints,
        "alarm_active_at_start": at_start is not None,
        "alarm_since": None if at_start is None else stamp(at_start.raised_ms),
        "alarms_raised_in_lookback": [
            stamp(i.raised_ms) for i in folded if look_ms <= i.raised_ms < start_ms
        ],
        "alarms_raised_in_window": [
            stamp(i.raised_ms) for i in folded if start_ms <= i.raised_ms <= end_ms
        ],
        "first_crossing": None
        if crossing is None
        else {
            "at": crossing["first"],
            "hours_from_start": hours(crossing["first_ms"] - start_ms),
            "limit": crossing["limit"],
            "rows": crossing["rows"],
            "extreme": crossing["extreme"],
        },
    }


def relation(at_ms: int, spans: list[tuple[int, int]]) -> str:
    """Where ``at_ms`` lies against the label windows (``spans``: start, end ms)."""
    for k, (start, end) in enumerate(spans, start=1):
        if start - LOOKBACK_H * HOUR_MS <= at_ms < start:
            return f"{(start - at_ms) / HOUR_MS:.1f} h before window {k}"
        if start <= at_ms <= end:
            return f"in window {k}"
    return "outside"


@dataclass
class Report:
    """Everything the JSON, the Markdown and the plot are made from."""

    results: dict[str, Any]
    times_ms: npt.NDArray[np.int64]
    values: Floats
    reference: Reference
    spans: list[tuple[int, int]]
    run: Run
    folded: list[Incident]


def evaluate(data: Path = DEFAULT_DATA) -> Report | None:
    """Run the forecaster over the file under ``data``; None when it is absent."""
    path = data / "data" / FILE
    if not path.is_file() or not (data / LABELS).is_file():
        return None
    began = time.perf_counter()
    frame = pd.read_csv(path, dtype={"timestamp": str})
    times_ms = (
        pd.to_datetime(frame["timestamp"]).to_numpy().astype("datetime64[ms]").astype(np.int64)
    )
    values = frame["value"].to_numpy(dtype=np.float64)
    n_rows = len(frame)
    probation = probationary_rows(n_rows)
    limits = load_labels(data)[FILE]
    windows = window_rows(frame["timestamp"], limits)
    overlap = [k + 1 for k, (left, _) in enumerate(windows) if left < probation]
    if overlap:
        raise ValueError(f"the probation ({probation} rows) holds label window(s) {overlap}")
    literal = int(0.15 * n_rows)
    reference = limits_rule(values, probation)
    spec = sensor_spec(reference, values)
    run = run_monitor(times_ms, values, spec)
    folded = incidents(run.alarms)
    outside = excursions(times_ms, values, reference)
    spans = [(int(times_ms[left]), int(times_ms[right])) for left, right in windows]
    described = [
        describe_window(k, bounds, rows, times_ms, run, folded, outside)
        for k, (bounds, rows) in enumerate(zip(limits, windows, strict=True), start=1)
    ]
    with_forecast = sum(f is not None for f in run.forecasts)
    seconds = time.perf_counter() - began
    results: dict[str, Any] = {
        "benchmark": "maintenance_on_nab",
        "data": str(data),
        "file": FILE,
        "rows": n_rows,
        "first": stamp(int(times_ms[0])),
        "last": stamp(int(times_ms[-1])),
        "rows_fed": run.fed,
        "late_rows_skipped": run.skipped,
        "rule": RULE,
        "reference": {
            "rows": reference.rows,
            "first": stamp(int(times_ms[0])),
            "last": stamp(int(times_ms[reference.rows - 1])),
            "mean": round(reference.mean, 6),
            "std": round(reference.std, 6),
        },
        "probation_holds_label_window": False,
        "literal_15_percent": {
            "rows": literal,
            "last": stamp(int(times_ms[literal - 1])),
            "label_windows_inside": [
                k + 1 for k, (left, _) in enumerate(windows) if left < literal
            ],
        },
        "limits": {
            "alarm_low": round(reference.alarm_low, 6),
            "alarm_high": round(reference.alarm_high, 6),
        },
        "range": list(spec.range),
        "data_min": float(values.min()),
        "data_max": float(values.max()),
        "config": plain(asdict(MaintenanceConfig())),
        "bucket_closes": len(run.made_ms),
        "bucket_closes_with_forecast": with_forecast,
        "first_forecast": stamp(
            next((t for t, f in zip(run.made_ms, run.forecasts, strict=True) if f), None)
        ),
        "label_windows": described,
        "alarms": [
            {
                "alarm_id": i.alarm_id,
                "raised": stamp(i.raised_ms),
                "ended": stamp(i.ended_ms),
                "end_event": i.end_event,
                "duration_h": None if i.ended_ms is None else hours(i.ended_ms - i.raised_ms),
                "relation": relation(i.raised_ms, spans),
                "forecast_at_raise": forecast_entry(i.raised_forecast),
            }
            for i in folded
        ],
        "alarm_transitions": len(run.alarms),
        "excursions": [{k: v for k, v in e.items() if k != "first_ms"} for e in outside],
        "first_crossing": None if not outside else outside[0]["first"],
        "seconds": round(seconds, 2),
    }
    return Report(results, times_ms, values, reference, spans, run, folded)


def plot(report: Report, target: Path) -> None:
    """The series with limits, windows and alarms; below, time to limit and bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def dates(ms: Any) -> Any:
        return pd.to_datetime(np.asarray(ms, dtype=np.int64), unit="ms")

    ref, run = report.reference, report.run
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(14, 7), height_ratios=(3, 2))
    top.plot(dates(report.times_ms), report.values, lw=0.5, color="tab:blue", label="value")
    top.axhline(
        ref.alarm_high, color="red", lw=1, ls="--", label=f"alarm_high {ref.alarm_high:.1f}"
    )
    top.axhline(ref.alarm_low, color="red", lw=1, ls=":", label=f"alarm_low {ref.alarm_low:.1f}")
    top.set_ylabel("temperature")
    made = dates(run.made_ms)

    def column(pick: Any) -> Floats:
        return np.asarray(
            [np.nan if f is None else pick(f) for f in run.forecasts], dtype=np.float64
        )

    ttl = column(lambda f: f.time_to_limit_s / 3600)
    low = column(lambda f: f.time_to_limit_low_s / 3600)
    high = column(
        lambda f: PLOT_CAP_H if f.time_to_limit_high_s is None else f.time_to_limit_high_s / 3600
    )
    towards_low = column(lambda f: 1.0 if f.limit == "alarm_low" else 0.0) == 1.0
    bottom.fill_between(
        made,
        np.minimum(low, PLOT_CAP_H),
        np.minimum(high, PLOT_CAP_H),
        color="tab:green",
        alpha=0.25,
        lw=0,
        label=f"95 % bounds (clipped at {PLOT_CAP_H:.0f} h)",
    )
    bottom.plot(
        made,
        np.where(towards_low, np.nan, np.minimum(ttl, PLOT_CAP_H)),
        color="tab:green",
        lw=0.8,
        label="to alarm_high",
    )
    bottom.plot(
        made,
        np.where(towards_low, np.minimum(ttl, PLOT_CAP_H), np.nan),
        color="tab:red",
        lw=0.8,
        label="to alarm_low",
    )
    bottom.axhline(48.0, color="grey", lw=0.8, ls=":", label="48-h horizon")
    bottom.set_ylim(0, PLOT_CAP_H + 4)
    bottom.set_ylabel("forecast time to limit (h)")
    start, end = dates([report.times_ms[0]])[0], dates([report.times_ms[ref.rows - 1]])[0]
    for axis in (top, bottom):
        axis.axvspan(start, end, color="grey", alpha=0.15, lw=0)
        for left, right in report.spans:
            axis.axvspan(*dates([left, right]), color="orange", alpha=0.3, lw=0)
        for incident in report.folded:
            stop = incident.ended_ms if incident.ended_ms is not None else run.made_ms[-1]
            axis.axvspan(*dates([incident.raised_ms, stop]), color="tab:purple", alpha=0.15, lw=0)
            axis.axvline(dates([incident.raised_ms])[0], color="tab:purple", lw=1, ls="-.")
    top.legend(loc="lower left", fontsize=7)
    bottom.legend(loc="upper left", fontsize=7)
    top.set_title(
        f"{FILE}: grey = probation (limits m -/+ 6 s from it), orange = label window, "
        "purple = maintenance_due active (dash-dot: raised)",
        fontsize=9,
    )
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=80)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report."""

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    ref, limits = results["reference"], results["limits"]
    literal = results["literal_15_percent"]
    lines = [
        "# Predictive maintenance on NAB's machine temperature (descriptive)",
        "",
        f"`{results['file']}` from `{results['data']}`: {results['rows']} rows, "
        f"{results['first']} to {results['last']}, one 5-minute window per row, fed in file "
        f"order to one `MaintenanceMonitor` with its default configuration ("
        f"{results['rows_fed']} rows fed; {len(results['late_rows_skipped'])} late rows, "
        "where the file goes back an hour, skipped as the flow drops late readings). "
        "Not scored: what the forecaster said, next to the labels.",
        "",
        f"**Limit rule, fixed in advance**: {results['rule']}. The probation is "
        f"{ref['rows']} rows ({ref['first']} to {ref['last']}) and holds no label window "
        "(checked). The literal first 15 % of the file would be "
        f"{literal['rows']} rows, to {literal['last']}, and would hold label window(s) "
        f"{literal['label_windows_inside']}: so NAB's capped probation is used.",
        "",
        f"m = {ref['mean']:.3f}, s = {ref['std']:.3f}: **alarm_low = "
        f"{limits['alarm_low']:.3f}, alarm_high = {limits['alarm_high']:.3f}** (data "
        f"{results['data_min']:.2f} to {results['data_max']:.2f}; valid range "
        f"[{results['range'][0]:.2f}, {results['range'][1]:.2f}]).",
        "",
        f"Forecasts: {results['bucket_closes_with_forecast']} of {results['bucket_closes']} "
        f"15-minute bucket closes had one (first {results['first_forecast'] or '-'}). "
        f"`maintenance_due` alarms raised: {len(results['alarms'])}. Time: "
        f"{results['seconds']} s.",
        "",
        "## Label windows",
        "",
        "| window | start | end | alarm active at start (since) | alarms raised in the "
        "48 h before | share of closes with a forecast in the 48 h before | first crossing "
        "from 48 h before to the end (h from start, limit, extreme) |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in results["label_windows"]:
        crossing = w["first_crossing"]
        lines.append(
            f"| {w['window']} | {w['start']} | {w['end']} | "
            + (f"yes ({w['alarm_since']})" if w["alarm_active_at_start"] else "no")
            + f" | {', '.join(w['alarms_raised_in_lookback']) or '-'} | "
            f"{num(w['forecast_share_in_lookback'], 2)} | "
            + (
                "none"
                if crossing is None
                else f"{crossing['at']} ({crossing['hours_from_start']:+.2f} h, "
                f"{crossing['limit']}, {crossing['extreme']})"
            )
            + " |"
        )
    for w in results["label_windows"]:
        towards = w["forecasts_towards"]
        lines += [
            "",
            f"### Window {w['window']}: {w['start']} to {w['end']}",
            "",
            f"48 h before its start ({w['lookback_start']} on): "
            f"{w['bucket_closes_in_lookback']} bucket closes, a forecast at "
            f"{num(w['forecast_share_in_lookback'], 2)} of them ({towards['alarm_high']} "
            f"towards alarm_high, {towards['alarm_low']} towards alarm_low; first "
            f"{w['first_forecast_in_lookback'] or '-'}), smallest lower bound "
            f"{num(w['min_time_to_limit_low_h_in_lookback'])} h. Alarms raised inside the "
            f"window: {', '.join(w['alarms_raised_in_window']) or 'none'}.",
            "",
            "| before start | at | forecast made | limit | level | slope /h | time to limit "
            "h | low h | high h | predicted crossing | h to it from *at* "
            "| maintenance_due (since) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in w["checkpoints"]:
            f = c["forecast"]
            alarm = f"active ({c['alarm_since']})" if c["alarm_active"] else "no"
            if f is None:
                lines.append(
                    f"| {c['hours_before']:.0f} h | {c['at']} | none | - | - | - | - | - | - "
                    f"| - | - | {alarm} |"
                )
            else:
                lines.append(
                    f"| {c['hours_before']:.0f} h | {c['at']} | {f['made']} | {f['limit']} | "
                    f"{f['level']:.2f} | {f['slope_per_h']:+.3f} | "
                    f"{num(f['time_to_limit_h'])} | {num(f['time_to_limit_low_h'])} | "
                    f"{num(f['time_to_limit_high_h'])} | {f['predicted_crossing']} | "
                    f"{num(f['time_to_limit_from_at_h'])} | {alarm} |"
                )
    lines += [
        "",
        "## maintenance_due alarms",
        "",
        "| raised | ended (event) | hours | against the labels | limit | time to limit at "
        "raise h (low, high) |",
        "|---|---|---|---|---|---|",
    ]
    for a in results["alarms"]:
        f = a["forecast_at_raise"]
        lines.append(
            f"| {a['raised']} | "
            + ("still active" if a["ended"] is None else f"{a['ended']} ({a['end_event']})")
            + f" | {num(a['duration_h'])} | {a['relation']} | "
            + (
                "-"
                if f is None
                else f"{f['limit']} | {num(f['time_to_limit_h'])} "
                f"({num(f['time_to_limit_low_h'])}, {num(f['time_to_limit_high_h'])})"
            )
            + " |"
        )
    if not results["alarms"]:
        lines.append("| none | | | | | |")
    lines += [
        "",
        f"## Excursions past a limit ({len(results['excursions'])})",
        "",
        "Runs of consecutive rows outside a limit, in file order.",
        "",
        "| first | last | rows | limit | extreme |",
        "|---|---|---|---|---|",
    ]
    for e in results["excursions"]:
        lines.append(
            f"| {e['first']} | {e['last']} | {e['rows']} | {e['limit']} | {e['extreme']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="NAB folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run, write JSON, Markdown and the plot; 0 also when the data is absent (skipped)."""
    args = parse_args(argv)
    report = evaluate(args.data)
    if report is None:
        print(
            f"skipped: no {FILE} and {LABELS} under {args.data}; pass --data DIR to point "
            "at a copy of NAB",
            file=sys.stderr,
        )
        return 0
    text = markdown(report.results)
    print(text)
    data, md = write_results(args.out, STEM, report.results, text)
    image = args.out / f"{STEM}.png"
    plot(report, image)
    print(f"wrote {data}, {md} and {image}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
