"""QuestDB HTTP basic auth: settings, the client config string, server.conf, messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from questdb import QuestDBError as ClientError
from questdb import QuestDBErrorCode, Sender

from connectors.questdb import QuestDBHttp, auth_failure
from connectors.questdb_sink import QuestDBSinkAuthError, QuestDBSinkError, _auth_error
from twinflow.errors import ConfigError
from twinflow.services.questdb import QuestDBService, _property
from twinflow.settings import QuestDBSettings, load_settings

PASSWORD = "pa;ss;;w=rd\\é"  # a test value


@pytest.fixture(autouse=True)
def _no_developer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TWINFLOW_"):
            monkeypatch.delenv(name)


def _questdb(**values: object) -> QuestDBSettings:
    return load_settings(questdb=values).questdb


def test_ilp_conf_without_credentials_is_unchanged() -> None:
    conf = _questdb().ilp_conf(auto_flush="off", retry_timeout=0)
    assert conf == "http::addr=127.0.0.1:9000;auto_flush=off;retry_timeout=0;"


def test_ilp_conf_escapes_semicolons_and_the_client_reads_it() -> None:
    settings = _questdb(http_username="ingest", http_password=PASSWORD)
    conf = settings.ilp_conf(auto_flush="off")
    assert conf == (
        "http::addr=127.0.0.1:9000;username=ingest;password=pa;;ss;;;;w=rd\\é;auto_flush=off;"
    )
    Sender.from_conf(conf)  # parses (connects only on establish/flush)
    unescaped = conf.replace(";;", ";")
    with pytest.raises(ClientError, match="bad separator"):
        Sender.from_conf(unescaped)


def test_credentials_come_both_or_neither() -> None:
    names = "TWINFLOW_QUESTDB__HTTP_USERNAME and TWINFLOW_QUESTDB__HTTP_PASSWORD"
    with pytest.raises(ConfigError) as only_user:
        _questdb(http_username="ingest")
    assert f"both or neither of {names}" in str(only_user.value)
    with pytest.raises(ConfigError) as only_password:
        _questdb(http_password=PASSWORD)
    assert f"both or neither of {names}" in str(only_password.value)
    assert PASSWORD not in str(only_password.value)
    assert _questdb().http_auth is None
    assert _questdb(http_username="ingest", http_password=PASSWORD).http_auth == (
        "ingest",
        PASSWORD,
    )


def test_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINFLOW_QUESTDB__HTTP_USERNAME", "ingest")
    monkeypatch.setenv("TWINFLOW_QUESTDB__HTTP_PASSWORD", PASSWORD)
    settings = load_settings()
    assert settings.questdb.http_auth == ("ingest", PASSWORD)
    assert settings.masked()["questdb"]["http_password"] == "**********"
    for text in (repr(settings), str(settings), repr(settings.questdb), str(settings.questdb)):
        assert PASSWORD not in text
    monkeypatch.delenv("TWINFLOW_QUESTDB__HTTP_USERNAME")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert "TWINFLOW_QUESTDB__HTTP_USERNAME" in str(refused.value)
    assert PASSWORD not in str(refused.value)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"http_username": "ingest", "http_password": ""}, "must not be empty"),
        ({"http_username": "", "http_password": PASSWORD}, "must be non-empty"),
        ({"http_username": "in:gest", "http_password": PASSWORD}, "without ':'"),
        ({"http_username": "in\ngest", "http_password": PASSWORD}, "control characters"),
    ],
)
def test_bad_credentials_are_refused(values: dict[str, str], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as refused:
        _questdb(**values)
    assert PASSWORD not in str(refused.value)


def test_server_conf_holds_the_credentials_only_when_set(tmp_path: Path) -> None:
    plain = load_settings(state_dir=tmp_path)
    assert "http.user" not in QuestDBService(plain)._server_conf()
    secured = plain.model_copy(
        update={"questdb": _questdb(http_username="ingest", http_password=PASSWORD)}
    )
    lines = QuestDBService(secured)._server_conf().splitlines()
    assert "http.user=ingest" in lines
    assert "http.password=pa;ss;;w=rd\\\\\\u00e9" in lines


def test_properties_escaping() -> None:
    assert _property("plain") == "plain"
    assert _property("a\\b") == "a\\\\b"
    assert _property(" lead") == "\\ lead"
    assert _property("tab\there") == "tab\\u0009here"
    assert _property("\U0001f600") == "\\ud83d\\ude00"  # a surrogate pair, as Java reads it


def test_auth_messages_name_the_settings_and_the_user_never_the_password() -> None:
    anonymous = _questdb()
    message = auth_failure(anonymous, "SQL", 401)
    assert message.startswith("authentication failed: ")
    assert "no credentials are set" in message
    assert "TWINFLOW_QUESTDB__HTTP_USERNAME and TWINFLOW_QUESTDB__HTTP_PASSWORD" in message

    secured = _questdb(http_username="ingest", http_password=PASSWORD)
    message = auth_failure(secured, "ILP", 403)
    assert "refused user 'ingest' for ILP (HTTP 403)" in message
    assert PASSWORD not in message
    assert PASSWORD not in repr(QuestDBHttp(secured))

    refused = ClientError(
        QuestDBErrorCode.AuthError,
        "Could not flush buffer: HTTP endpoint authentication error: Unauthorized\r\n [code: 401]",
    )
    error = _auth_error(secured, refused, "Nothing was written.")
    assert isinstance(error, QuestDBSinkAuthError) and isinstance(error, QuestDBSinkError)
    assert "(HTTP 401)" in str(error) and str(error).endswith("Nothing was written.")
