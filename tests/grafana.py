"""The Grafana dashboards' panel queries, rendered as Grafana renders them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parents[1] / "infra" / "grafana" / "dashboards"
TABLES = (
    "readings",
    "sensor_windows",
    "twin_state",
    "anomalies",
    "alarms",
    "deadletters",
    "setpoints",
    "forecasts",
)


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, panel title, SQL) of every QuestDB panel target."""
    for name, dashboard in dashboards().items():
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                if "rawSql" in target:
                    yield name, panel["title"], target["rawSql"]


def promql_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, panel title and legend, PromQL) of every Prometheus panel target."""
    for name, dashboard in dashboards().items():
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                if "expr" in target:
                    yield name, f"{panel['title']} / {target['legendFormat']}", target["expr"]


def render_promql(expr: str, rate_interval_s: int) -> str:
    """``expr`` as Grafana sends it: ``$__rate_interval`` replaced by a duration.

    >>> render_promql("rate(x_total[$__rate_interval])", 4)
    'rate(x_total[4s])'
    """
    return expr.replace("$__rate_interval", f"{rate_interval_s}s")


def render(
    sql: str, start: datetime, end: datetime, variables: dict[str, str], table_prefix: str
) -> str:
    """``sql`` as Grafana's SQL data source sends it, on tables with ``table_prefix``.

    >>> from datetime import UTC
    >>> t0, t1 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    >>> print(render("SELECT * FROM readings WHERE entity = '$entity' AND $__timeFilter(ts)",
    ...              t0, t1, {"entity": "p1"}, "x_"))
    SELECT * FROM "x_readings" WHERE entity = 'p1' AND ts BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-02T00:00:00Z'
    """  # noqa: E501
    begin, finish = (moment.strftime("%Y-%m-%dT%H:%M:%SZ") for moment in (start, end))
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)", lambda m: f"{m[1]} BETWEEN '{begin}' AND '{finish}'", sql
    )
    sql = sql.replace("$__timeFrom()", f"'{begin}'").replace("$__timeTo()", f"'{finish}'")
    for name, value in variables.items():
        sql = sql.replace(f"${name}", value)
    tables = "|".join(TABLES)
    return re.sub(rf"\b(FROM|JOIN)\s+({tables})\b", rf'\1 "{table_prefix}\2"', sql)
