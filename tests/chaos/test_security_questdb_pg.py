"""QuestDB's PostgreSQL wire login from settings (``pg.user`` / ``pg.password``), on a
server of its own.

``TWINFLOW_QUESTDB__PG_USER`` and ``TWINFLOW_QUESTDB__PG_PASSWORD`` reach the local
server's configuration: that login reads and writes over PG wire (Grafana's path), and a
wrong password, or QuestDB's stock ``admin``/``quest``, is refused at once with an error
that says so.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.helpers import isolated_settings
from twinflow.services import manager
from twinflow.services.questdb import QuestDBService
from twinflow.settings import QuestDBSettings, Settings, load_settings

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

log = logging.getLogger("tests.chaos.questdb_pg")
USER = "grafana_pg"
# '\' and '=' are properties-file escapes and separators, ';' and ' ' end a libpq
# keyword value unless quoted, 'é' is non-ASCII (\u escaped in server.conf, UTF-8 on the
# wire): the password reaches the server and the client intact.
PASSWORD = f"pw;{uuid.uuid4().hex}=a\\b c é"
REFUSED_WITHIN_S = 3.0


@pytest.fixture(scope="module")
def secured(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A second QuestDB (own state folder and ports) whose PG login comes from the env."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TWINFLOW_QUESTDB__PG_USER", USER)
        patch.setenv("TWINFLOW_QUESTDB__PG_PASSWORD", PASSWORD)
        from_env = load_settings().questdb
    base = isolated_settings(stack, tmp_path_factory.mktemp("questdb-pg") / "state")
    login = {"pg_user": from_env.pg_user, "pg_password": from_env.pg_password}
    settings = base.model_copy(update={"questdb": base.questdb.model_copy(update=login)})
    try:
        manager.up(settings, ["questdb"], log.info)
        yield settings
    finally:
        manager.down(settings, ["questdb"], log.info)


def _connect(questdb: QuestDBSettings, user: str, password: str) -> psycopg.Connection[TupleRow]:
    return psycopg.connect(
        host=questdb.host,
        port=questdb.pg_port,
        user=user,
        password=password,
        dbname="qdb",
        autocommit=True,
        connect_timeout=10,
    )


def _refusal(questdb: QuestDBSettings, user: str, password: str) -> tuple[str, float]:
    """The error text of a refused login, and how long the refusal took."""
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as refused:
        _connect(questdb, user, password).close()
    return str(refused.value), time.monotonic() - started


def test_the_configured_login_reads_and_writes(secured: Settings) -> None:
    q = secured.questdb
    assert (q.pg_user, q.pg_password.get_secret_value()) == (USER, PASSWORD)
    conf = QuestDBService(secured).home / "conf" / "server.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    assert f"pg.user={USER}\n" in conf.read_text()

    table = f"pg_{uuid.uuid4().hex[:10]}"
    with _connect(q, USER, PASSWORD) as conn:
        conn.execute(f'CREATE TABLE "{table}" (ts TIMESTAMP, v DOUBLE) TIMESTAMP(ts)')
        conn.execute(f"INSERT INTO \"{table}\" VALUES ('2026-01-01T00:00:00Z', 1.5)")
        rows = conn.execute(f'SELECT v FROM "{table}"').fetchall()
        conn.execute(f'DROP TABLE "{table}"')
    assert rows == [(1.5,)]


@pytest.mark.parametrize(
    ("user", "password", "what"),
    [
        pytest.param(USER, f"wrong{uuid.uuid4().hex}", "a wrong password", id="wrong-password"),
        pytest.param("admin", "quest", "QuestDB's default admin/quest", id="stock-default"),
        pytest.param("admin", PASSWORD, "the password with another user", id="other-user"),
    ],
)
def test_a_wrong_login_is_refused_at_once(
    secured: Settings,
    user: str,
    password: str,
    what: str,
    chaos_table: list[dict[str, object]],
) -> None:
    message, elapsed = _refusal(secured.questdb, user, password)
    if what == "a wrong password":
        # refusal_row's columns; a login has no exit code, so the notes quote the server.
        reason = " ".join(message.rsplit("failed: ", 1)[-1].split())
        chaos_table.append(
            {
                "fault": "13. QuestDB PG wire: wrong password",
                "runs": 1,
                # A refusal moves no data: nothing to count in the data columns.
                "lost": "n/a",
                "duplicates": "n/a",
                "mismatches": "n/a",
                "notes": f"refused: {reason} after {elapsed:.2f} s",
            }
        )
    assert "invalid username/password" in message, message
    assert elapsed < REFUSED_WITHIN_S, f"{what}: refused only after {elapsed:.1f} s"
    assert PASSWORD not in message
