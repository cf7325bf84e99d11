"""QuestDB with HTTP basic auth (``http.user`` / ``http.password``), on a server of its own.

With the credentials, SQL over REST and the Bytewax sink (ILP over HTTP) work. Without
them, or with a wrong password, every path is refused at once with an error that says
authentication failed and names the settings: REST, the sink (which raises instead of
retrying, and writes nothing), and ``twinflow run`` (non-zero exit, no password shown).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import bytewax.operators as op
import numpy as np
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, run_main
from pydantic import SecretStr

from connectors.questdb import QuestDBAuthError, QuestDBHttp, TableBatch, TableSpec, ensure_table
from connectors.questdb_sink import QuestDBSink, QuestDBSinkAuthError, table_frame
from tests.helpers import (
    cause_of,
    clean_env,
    isolated_settings,
    refusal_row,
    twinflow_cli,
    wait_for_wal,
)
from twinflow.services import manager
from twinflow.services.questdb import QuestDBService
from twinflow.settings import QuestDBSettings, Settings, env_name
from twinflow.tables import READINGS

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

log = logging.getLogger("tests.chaos.questdb_auth")
USER = "twinflow"
# ';' is the client config separator, '\' the properties escape, ':' and '=' separators
# too, 'é' non-ASCII: the password reaches server.conf, basic auth and ILP intact.
PASSWORD = f"pw;{uuid.uuid4().hex}:a=b\\c é\U0001f600"
WRONG = f"wrong{uuid.uuid4().hex}"
T0_MS = 1_700_000_000_000
REFUSED_WITHIN_S = 5.0
"""The client's default retry_timeout is 10 s: a retried 401 would take longer."""


def _with_login(
    questdb: QuestDBSettings, user: str | None, password: str | None
) -> QuestDBSettings:
    values = questdb.model_dump() | {
        "http_username": user,
        "http_password": None if password is None else SecretStr(password),
    }
    return QuestDBSettings.model_validate(values)  # validated, unlike model_copy


@pytest.fixture(scope="module")
def secured(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A second QuestDB (own state folder and ports) that requires HTTP basic auth."""
    base = isolated_settings(stack, tmp_path_factory.mktemp("questdb-auth") / "state")
    settings = base.model_copy(update={"questdb": _with_login(base.questdb, USER, PASSWORD)})
    try:
        manager.up(settings, ["questdb"], log.info)  # its health check logs in
        yield settings
    finally:
        manager.down(settings, ["questdb"], log.info)


@pytest.fixture
def table(secured: Settings) -> Iterator[TableSpec]:
    sql = QuestDBHttp(secured.questdb)
    spec = dataclasses.replace(READINGS, name=f"auth_{uuid.uuid4().hex[:10]}_readings")
    ensure_table(sql, spec)  # CREATE TABLE and the catalogue queries, logged in
    yield spec
    sql.exec(f'DROP TABLE IF EXISTS "{spec.name}"')


def _readings(spec: TableSpec, start: int, count: int) -> TableBatch:
    i = np.arange(start, start + count)
    return table_frame(
        spec,
        {
            "ts": T0_MS + i * 100,
            "entity": [f"pump-{k % 3}" for k in i],
            "sensor": ["flow"] * count,
            "value": i * 0.5,
            "flags": np.zeros(count, dtype=np.int64),
        },
    )


def _run(items: list[TableBatch], questdb: QuestDBSettings) -> None:
    flow = Dataflow("questdb_auth")
    op.output("out", op.input("in", flow, TestingSource(items)), QuestDBSink(questdb, give_up_s=60))
    run_main(flow)


def _count(sql: QuestDBHttp, spec: TableSpec) -> int:
    """Rows in ``spec`` once its WAL is applied up to the last committed transaction."""
    wait_for_wal(sql, [spec.name])
    count: int = sql.exec(f'SELECT count() FROM "{spec.name}"').rows[0][0]
    return count


def _squeezed(text: str) -> str:
    # Rich wraps lines anywhere; compare with all whitespace gone.
    return "".join(text.split())


def test_with_credentials_sql_and_the_sink_write(secured: Settings, table: TableSpec) -> None:
    conf = QuestDBService(secured).home / "conf" / "server.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    assert f"http.user={USER}\n" in conf.read_text()

    sql = QuestDBHttp(secured.questdb)
    assert sql.exec("SELECT 1").rows == ((1,),)
    _run([_readings(table, 0, 300), _readings(table, 300, 200)], secured.questdb)
    assert _count(sql, table) == 500
    total = sql.exec(f'SELECT sum(value) FROM "{table.name}"').rows[0][0]
    assert total == float((np.arange(500) * 0.5).sum())


def test_rest_without_or_with_wrong_credentials_gets_401(secured: Settings) -> None:
    # The server itself: SQL and both ILP-over-HTTP endpoints want a login.
    base = secured.questdb.http_url
    for path, body in (("/exec?query=SELECT%201", None), ("/write", b"t v=1\n")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(base + path, data=body), timeout=10)
        assert refused.value.code == 401, path
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            urllib.request.Request(base + "/api/v2/write", data=b"t v=1\n"), timeout=10
        )
    assert refused.value.code == 401

    anonymous = QuestDBHttp(_with_login(secured.questdb, None, None))
    with pytest.raises(QuestDBAuthError) as missing:
        anonymous.exec("SELECT 1")
    message = str(missing.value)
    assert message.startswith("authentication failed: ")
    assert "HTTP 401" in message and "no credentials are set" in message
    assert "TWINFLOW_QUESTDB__HTTP_USERNAME" in message
    assert "TWINFLOW_QUESTDB__HTTP_PASSWORD" in message

    wrong = QuestDBHttp(_with_login(secured.questdb, USER, WRONG))
    with pytest.raises(QuestDBAuthError) as refused_login:
        wrong.exec("SELECT 1")
    message = str(refused_login.value)
    assert f"refused user {USER!r}" in message and "HTTP 401" in message
    assert "TWINFLOW_QUESTDB__HTTP_PASSWORD" in message
    assert WRONG not in message and WRONG not in repr(wrong)


@pytest.mark.parametrize("login", ["none", "wrong password"])
def test_the_sink_is_refused_at_once_and_writes_nothing(
    secured: Settings, table: TableSpec, login: str
) -> None:
    questdb = _with_login(secured.questdb, *((None, None) if login == "none" else (USER, WRONG)))
    sql = QuestDBHttp(secured.questdb)
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        _run([_readings(table, 0, 40), _readings(table, 40, 10)], questdb)
    elapsed = time.monotonic() - started
    assert elapsed < REFUSED_WITHIN_S, f"refused only after {elapsed:.1f} s (retried?)"
    error = cause_of(raised.value, QuestDBSinkAuthError)
    message = str(error)
    assert message.startswith("authentication failed: ")
    assert "[code: 401]" not in message and "(HTTP 401)" in message
    assert "TWINFLOW_QUESTDB__HTTP_USERNAME" in message
    assert "TWINFLOW_QUESTDB__HTTP_PASSWORD" in message
    # The sink flushes each write batch once; Bytewax hands it the first item alone.
    assert f"did not take 40 rows ({table.name}: 40)" in message
    assert "recovery replays them" in message
    assert WRONG not in message and PASSWORD not in message
    assert _count(sql, table) == 0


def test_twinflow_run_with_a_wrong_password_exits_at_once(
    stack: Settings, secured: Settings, tmp_path: Path, chaos_table: list[dict[str, object]]
) -> None:
    suffix = uuid.uuid4().hex[:10]
    env = clean_env(
        state_dir=str(tmp_path / "run"),
        lib_dir=str(stack.jar_dir),
        questdb__http_port=str(secured.questdb.http_port),
        questdb__table_prefix=f"auth_{suffix}_",
        questdb__http_username=USER,
        questdb__http_password=WRONG,
        flow__recovery="false",
    )
    # The session's Kafka, however it is set up (port, SASL, ...).
    for name, value in stack.kafka.model_dump(exclude_defaults=True).items():
        if value is not None:
            secret = value.get_secret_value() if isinstance(value, SecretStr) else value
            env[env_name(("kafka", name))] = str(secret)
    for topic in ("raw", "deadletter", "ground_truth", "state", "anomalies", "alarms", "late"):
        env[env_name(("topics", topic))] = f"test.qdbauth.{suffix}.{topic}"

    started = time.monotonic()
    result = twinflow_cli(env, "run", timeout=60)
    elapsed = time.monotonic() - started
    chaos_table.append(
        refusal_row("twinflow run, QuestDB basic auth, wrong password", result.returncode, elapsed)
    )
    output = _squeezed(result.stdout + result.stderr)
    assert result.returncode == 1, result.stderr[-3000:]
    assert elapsed < 60
    message = " ".join(result.stderr.split())
    assert "error: authentication failed:" in message, message
    assert f"refused user {USER!r}" in message
    assert "TWINFLOW_QUESTDB__HTTP_PASSWORD" in _squeezed(result.stderr)
    assert "Traceback" not in result.stderr
    assert WRONG not in output and _squeezed(PASSWORD) not in output
    # Nothing was created: the run stopped at its first QuestDB request.
    tables = QuestDBHttp(secured.questdb).exec(
        f"SELECT table_name FROM tables() WHERE table_name LIKE 'auth_{suffix}_%'"
    )
    assert tables.rows == ()
