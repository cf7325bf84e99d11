"""QuestDB: SQL over its HTTP endpoint and tables declared up front.

Tables are never left to ILP auto-creation: each is a :class:`TableSpec` created as a
WAL table with a designated event-time timestamp and ``DEDUP UPSERT KEYS``, so a replay
after a crash rewrites identical rows instead of duplicating them. A table created by
an older twinflow gets the columns added since (older rows read NULL there); one whose
keys or column types differ is refused, naming the fix.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import pandas as pd

from twinflow.errors import TwinflowError
from twinflow.settings import QuestDBSettings

log = logging.getLogger("twinflow.questdb")


class QuestDBError(TwinflowError):
    """QuestDB refused a statement or could not be reached."""


class QuestDBAuthError(QuestDBError):
    """QuestDB refused the HTTP basic auth credentials (or their absence); not transient."""


AUTH_SETTINGS = "TWINFLOW_QUESTDB__HTTP_USERNAME and TWINFLOW_QUESTDB__HTTP_PASSWORD"


def auth_failure(settings: QuestDBSettings, what: str, status: int | str) -> str:
    """The message for a 401/403 from QuestDB's HTTP endpoint: what failed, what to set.

    It names the user, never the password.
    """
    where = f"QuestDB at {settings.http_url}"
    if settings.http_username is None:
        return (
            f"authentication failed: {where} requires HTTP basic auth for {what} "
            f"(HTTP {status}) and no credentials are set. Set {AUTH_SETTINGS} "
            "(questdb.http_username / questdb.http_password) to its http.user / http.password."
        )
    return (
        f"authentication failed: {where} refused user {settings.http_username!r} for {what} "
        f"(HTTP {status}). Check {AUTH_SETTINGS} (questdb.http_username / "
        "questdb.http_password) against the server's http.user / http.password."
    )


@dataclass(frozen=True)
class QueryResult:
    """Columns (name, type) and rows of one SQL statement."""

    columns: tuple[tuple[str, str], ...]
    rows: tuple[tuple[Any, ...], ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        """The result's column names, in order."""
        return tuple(name for name, _ in self.columns)


class QuestDBHttp:
    """SQL over QuestDB's ``/exec`` endpoint."""

    def __init__(self, settings: QuestDBSettings, timeout_s: float = 30.0) -> None:
        self._settings = settings
        self._base = settings.http_url
        self._timeout_s = timeout_s
        self._headers: dict[str, str] = {}
        if settings.http_auth is not None:
            token = base64.b64encode(":".join(settings.http_auth).encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def __repr__(self) -> str:
        user = self._settings.http_username
        return f"QuestDBHttp({self._base!r}, user={user!r})"

    def exec(self, sql: str) -> QueryResult:
        """Run one statement; raise :class:`QuestDBError` with the server's message.

        A 401/403 raises :class:`QuestDBAuthError` naming the credential settings.
        """
        url = f"{self._base}/exec?" + urllib.parse.urlencode({"query": sql})
        request = urllib.request.Request(url, headers=self._headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:  # noqa: S310
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise QuestDBAuthError(auth_failure(self._settings, "SQL", exc.code)) from None
            detail = exc.read().decode(errors="replace")
            with contextlib.suppress(ValueError):
                detail = json.loads(detail).get("error", detail)
            raise QuestDBError(f"QuestDB rejected {sql!r}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise QuestDBError(f"QuestDB at {self._base} is unreachable: {exc}") from None
        columns = tuple((col["name"], col["type"]) for col in body.get("columns", ()))
        rows = tuple(tuple(row) for row in body.get("dataset", ()))
        return QueryResult(columns=columns, rows=rows)


@dataclass(frozen=True)
class TableSpec:
    """A QuestDB table as twinflow expects it to exist."""

    name: str
    columns: tuple[tuple[str, str], ...]
    timestamp: str
    dedup_keys: tuple[str, ...]
    partition_by: str = "DAY"

    def create_sql(self) -> str:
        """``CREATE TABLE IF NOT EXISTS`` for this spec.

        Column names are quoted: some (``end``) are SQL keywords.

        >>> spec = TableSpec("t", (("ts", "TIMESTAMP"), ("entity", "SYMBOL")), "ts",
        ...                  ("ts", "entity"))
        >>> print(spec.create_sql())
        CREATE TABLE IF NOT EXISTS "t" ("ts" TIMESTAMP, "entity" SYMBOL) TIMESTAMP("ts") PARTITION BY DAY WAL DEDUP UPSERT KEYS("ts", "entity")
        """  # noqa: E501
        columns = ", ".join(f'"{name}" {kind}' for name, kind in self.columns)
        return (
            f'CREATE TABLE IF NOT EXISTS "{self.name}" ({columns}) '
            f'TIMESTAMP("{self.timestamp}") PARTITION BY {self.partition_by} WAL '
            f"DEDUP UPSERT KEYS({_names(self.dedup_keys)})"
        )

    def add_column_sql(self, column: str) -> str:
        """``ALTER TABLE ... ADD COLUMN`` for one of this spec's columns.

        >>> spec = TableSpec("t", (("ts", "TIMESTAMP"), ("end", "TIMESTAMP")), "ts", ("ts",))
        >>> print(spec.add_column_sql("end"))
        ALTER TABLE "t" ADD COLUMN "end" TIMESTAMP
        """
        return f'ALTER TABLE "{self.name}" ADD COLUMN "{column}" {dict(self.columns)[column]}'


def _names(columns: tuple[str, ...]) -> str:
    return ", ".join(f'"{name}"' for name in columns)


@dataclass(frozen=True)
class TableBatch:
    """Rows for one table, written by the QuestDB sink.

    The frame's columns are the table's, ``ts`` as a UTC datetime64 column.
    """

    spec: TableSpec
    frame: pd.DataFrame

    @property
    def symbols(self) -> tuple[str, ...]:
        """The frame's columns that are SYMBOLs in the table."""
        return tuple(name for name, kind in self.spec.columns if kind == "SYMBOL")


def ensure_table(sql: QuestDBHttp, spec: TableSpec, timeout_s: float = 30.0) -> list[str]:
    """Create ``spec`` if missing, add the columns it lacks; return the added ones.

    An existing table is checked against the spec: a column the spec has and the table
    lacks (a table from an older twinflow) is added, its older rows NULL there. A table
    without the spec's DEDUP UPSERT KEYS, designated timestamp or WAL, or with a column
    of another type, is refused with a :class:`QuestDBError` that names the fix:
    changing either under the flow's feet could lose or duplicate rows. Columns the spec
    does not know are left alone.
    """
    sql.exec(spec.create_sql())
    columns = _columns(sql, spec)
    wal = sql.exec(f"SELECT walEnabled FROM tables() WHERE table_name = '{spec.name}'")  # noqa: S608
    problems = []
    upsert_keys = {name for name, column in columns.items() if column.upsert_key}
    if upsert_keys != set(spec.dedup_keys):
        problems.append(
            f"its DEDUP UPSERT KEYS are {sorted(upsert_keys) or 'not set'}, "
            f"expected {sorted(spec.dedup_keys)}"
        )
    designated = [name for name, column in columns.items() if column.designated]
    if designated != [spec.timestamp]:
        problems.append(f"its designated timestamp is {designated}, expected {spec.timestamp}")
    if not (wal.rows and wal.rows[0][0]):
        problems.append("it is not a WAL table")
    if problems:
        raise QuestDBError(
            f"table {spec.name!r} exists but {'; '.join(problems)}. Replays after a crash "
            f'would duplicate rows. Fix it with ALTER TABLE "{spec.name}" DEDUP ENABLE '
            f"UPSERT KEYS({', '.join(spec.dedup_keys)}) or drop the table."
        )
    missing = [name for name, _kind in spec.columns if name not in columns]
    for name in missing:
        try:
            sql.exec(spec.add_column_sql(name))
        except QuestDBError as exc:
            # Another process of the flow (a cluster) may have added it a moment ago.
            if "duplicate column" not in str(exc):
                raise
        else:
            log.info("table %s: added column %s %s", spec.name, name, dict(spec.columns)[name])
    if missing:
        # A WAL table applies an ALTER asynchronously; wait for it, then check the types.
        columns = _columns_once_applied(sql, spec, missing, timeout_s)
    retyped = [
        (name, columns[name].type, kind)
        for name, kind in spec.columns
        if columns[name].type != kind
    ]
    if retyped:
        found = ", ".join(f"{name} is {actual}, expected {kind}" for name, actual, kind in retyped)
        fixes = "; ".join(
            f'ALTER TABLE "{spec.name}" ALTER COLUMN "{name}" TYPE {kind}'
            for name, _actual, kind in retyped
        )
        raise QuestDBError(
            f"table {spec.name!r} exists with other column types than twinflow writes: "
            f"{found}. Rows would be rejected. Fix it with {fixes}, or drop the table."
        )
    return missing


@dataclass(frozen=True)
class _Column:
    type: str
    upsert_key: bool
    designated: bool


def _columns(sql: QuestDBHttp, spec: TableSpec) -> dict[str, _Column]:
    result = sql.exec(
        'SELECT "column", type, upsertKey, designated '  # noqa: S608 - names come from code
        f"FROM table_columns('{spec.name}')"
    )
    return {row[0]: _Column(row[1], bool(row[2]), bool(row[3])) for row in result.rows}


def _columns_once_applied(
    sql: QuestDBHttp, spec: TableSpec, added: list[str], timeout_s: float
) -> dict[str, _Column]:
    deadline = time.monotonic() + timeout_s
    while True:
        columns = _columns(sql, spec)
        if all(name in columns for name in added):
            return columns
        if time.monotonic() > deadline:
            raise QuestDBError(
                f"table {spec.name!r}: QuestDB took ALTER TABLE ADD COLUMN for {added} but "
                f"has not applied it after {timeout_s:g} s; is its WAL suspended? "
                "(see wal_tables())"
            )
        time.sleep(0.1)
