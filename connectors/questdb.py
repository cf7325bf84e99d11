"""QuestDB: SQL over its HTTP endpoint and tables declared up front.

Tables are never left to ILP auto-creation: each is a :class:`TableSpec` created as a
WAL table with a designated event-time timestamp and ``DEDUP UPSERT KEYS``, so a replay
after a crash rewrites identical rows instead of duplicating them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import pandas as pd

from twinflow.errors import TwinflowError
from twinflow.settings import QuestDBSettings


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

        >>> spec = TableSpec("t", (("ts", "TIMESTAMP"), ("entity", "SYMBOL")), "ts",
        ...                  ("ts", "entity"))
        >>> print(spec.create_sql())
        CREATE TABLE IF NOT EXISTS "t" (ts TIMESTAMP, entity SYMBOL) TIMESTAMP(ts) PARTITION BY DAY WAL DEDUP UPSERT KEYS(ts, entity)
        """  # noqa: E501
        columns = ", ".join(f"{name} {kind}" for name, kind in self.columns)
        return (
            f'CREATE TABLE IF NOT EXISTS "{self.name}" ({columns}) '
            f"TIMESTAMP({self.timestamp}) PARTITION BY {self.partition_by} WAL "
            f"DEDUP UPSERT KEYS({', '.join(self.dedup_keys)})"
        )


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


def ensure_table(sql: QuestDBHttp, spec: TableSpec) -> None:
    """Create ``spec`` if missing; refuse a table that exists without its dedup keys."""
    sql.exec(spec.create_sql())
    result = sql.exec(
        f"SELECT \"column\", upsertKey, designated FROM table_columns('{spec.name}')"  # noqa: S608 - names come from code
    )
    upsert_keys = {row[0] for row in result.rows if row[1]}
    designated = [row[0] for row in result.rows if row[2]]
    wal = sql.exec(f"SELECT walEnabled FROM tables() WHERE table_name = '{spec.name}'")  # noqa: S608
    problems = []
    if upsert_keys != set(spec.dedup_keys):
        problems.append(
            f"its DEDUP UPSERT KEYS are {sorted(upsert_keys) or 'not set'}, "
            f"expected {sorted(spec.dedup_keys)}"
        )
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
