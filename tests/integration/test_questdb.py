import dataclasses
import re
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from questdb import Sender, TimestampNanos

from connectors.questdb import QuestDBError, QuestDBHttp, TableSpec, ensure_table
from twinflow.settings import Settings

pytestmark = pytest.mark.integration


def _spec(name: str) -> TableSpec:
    return TableSpec(
        name=name,
        columns=(
            ("ts", "TIMESTAMP"),
            ("entity", "SYMBOL"),
            ("sensor", "SYMBOL"),
            ("value", "DOUBLE"),
        ),
        timestamp="ts",
        dedup_keys=("ts", "entity", "sensor"),
    )


def _wait_rows(sql: QuestDBHttp, query: str, expected: int) -> tuple[tuple[object, ...], ...]:
    # WAL commits become visible asynchronously; poll instead of sleeping a fixed time.
    deadline = time.monotonic() + 30
    while True:
        rows = sql.exec(query).rows
        if len(rows) == expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_wal_table_with_dedup_keys_round_trip_http_and_pg(stack: Settings, unique: str) -> None:
    sql = QuestDBHttp(stack.questdb)
    spec = _spec(f"test_readings_{unique}")
    ensure_table(sql, spec)
    ensure_table(sql, spec)  # idempotent

    columns = sql.exec(f"SELECT \"column\", type, upsertKey FROM table_columns('{spec.name}')")
    types = {row[0]: row[1] for row in columns.rows}
    assert types == {"ts": "TIMESTAMP", "entity": "SYMBOL", "sensor": "SYMBOL", "value": "DOUBLE"}
    assert {row[0] for row in columns.rows if row[2]} == {"ts", "entity", "sensor"}
    wal = sql.exec(f"SELECT walEnabled, partitionBy FROM tables() WHERE table_name='{spec.name}'")
    assert wal.rows == ((True, "DAY"),)

    start = datetime(2026, 1, 1, tzinfo=UTC)
    with Sender.from_conf(stack.questdb.ilp_conf(auto_flush="off")) as sender:
        for i in range(100):
            sender.row(
                spec.name,
                symbols={"entity": f"pump-{i % 4}", "sensor": "flow"},
                columns={"value": float(i)},
                at=TimestampNanos.from_datetime(start + timedelta(seconds=i)),
            )
        sender.flush()
        # A replay of the first ten rows with new values must upsert, not duplicate.
        for i in range(10):
            sender.row(
                spec.name,
                symbols={"entity": f"pump-{i % 4}", "sensor": "flow"},
                columns={"value": float(i) + 1000},
                at=TimestampNanos.from_datetime(start + timedelta(seconds=i)),
            )
        sender.flush()

    over_http = _wait_rows(sql, f"SELECT ts, entity, value FROM '{spec.name}' ORDER BY ts", 100)
    assert len(over_http) == 100
    assert [row[2] for row in over_http[:10]] == [float(i) + 1000 for i in range(10)]

    q = stack.questdb
    with psycopg.connect(
        host="127.0.0.1",
        port=q.pg_port,
        user=q.pg_user,
        password=q.pg_password.get_secret_value(),
        dbname="qdb",
        autocommit=True,
    ) as conn:
        rows = conn.execute(
            f"SELECT entity, count(), sum(value) FROM '{spec.name}' ORDER BY entity"
        ).fetchall()
    expected_sum = {f"pump-{k}": 0.0 for k in range(4)}
    for i in range(100):
        expected_sum[f"pump-{i % 4}"] += float(i) + (1000 if i < 10 else 0)
    assert rows == [(entity, 25, total) for entity, total in sorted(expected_sum.items())]


def test_table_without_dedup_keys_is_refused(stack: Settings, unique: str) -> None:
    sql = QuestDBHttp(stack.questdb)
    spec = _spec(f"test_nodedup_{unique}")
    sql.exec(
        f'CREATE TABLE "{spec.name}" (ts TIMESTAMP, entity SYMBOL, sensor SYMBOL, value DOUBLE) '
        "TIMESTAMP(ts) PARTITION BY DAY WAL"
    )
    with pytest.raises(QuestDBError, match=r"DEDUP UPSERT KEYS are not set.*ALTER TABLE"):
        ensure_table(sql, spec)


def test_a_table_from_an_older_twinflow_gets_the_new_columns(stack: Settings, unique: str) -> None:
    sql = QuestDBHttp(stack.questdb)
    spec = dataclasses.replace(
        _spec(f"test_older_{unique}"),
        columns=(*_spec("").columns, ("end", "TIMESTAMP"), ("alarms", "LONG")),
    )
    old = dataclasses.replace(spec, columns=spec.columns[:4])
    ensure_table(sql, old)
    sql.exec(f"INSERT INTO \"{spec.name}\" VALUES ('2026-01-01', 'pump-1', 'flow', 1.5)")
    assert ensure_table(sql, spec) == ["end", "alarms"]
    assert ensure_table(sql, spec) == []
    columns = sql.exec(f"SELECT \"column\", type FROM table_columns('{spec.name}')").rows
    assert columns[-2:] == (("end", "TIMESTAMP"), ("alarms", "LONG"))
    # The older row reads NULL in the new columns.
    row = _wait_rows(sql, f'SELECT value, "end", alarms FROM "{spec.name}"', 1)
    assert row == ((1.5, None, None),)


def test_a_column_of_another_type_is_refused_naming_the_fix(stack: Settings, unique: str) -> None:
    sql = QuestDBHttp(stack.questdb)
    spec = _spec(f"test_retyped_{unique}")
    ensure_table(sql, spec)
    sql.exec(f'ALTER TABLE "{spec.name}" ALTER COLUMN value TYPE VARCHAR')
    pattern = (
        rf"table '{spec.name}' exists with other column types.*value is VARCHAR, expected "
        rf'DOUBLE.*ALTER TABLE "{spec.name}" ALTER COLUMN "value" TYPE DOUBLE'
    )
    deadline = time.monotonic() + 30
    while True:  # the ALTER is applied asynchronously
        try:
            ensure_table(sql, spec)
        except QuestDBError as exc:
            assert re.search(pattern, str(exc)), exc
            break
        assert time.monotonic() < deadline, "the retyped column was never refused"
        time.sleep(0.1)


def test_sql_errors_carry_the_server_message(stack: Settings) -> None:
    with pytest.raises(QuestDBError, match=r"table does not exist"):
        QuestDBHttp(stack.questdb).exec("SELECT * FROM no_such_table_here")
