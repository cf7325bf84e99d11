"""Security settings: refused when incomplete, and no secret ever printed or logged."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from tests.helpers import clean_env, isolated_env, twinflow_cli
from twinflow.errors import ConfigError
from twinflow.services.mosquitto import MosquittoService
from twinflow.services.provision import find_executable
from twinflow.settings import KafkaSettings, Settings, env_name, load_settings

SecretPath = tuple[str, ...]
KNOWN_SECRETS = {("mqtt", "password"), ("opcua", "password"), ("questdb", "pg_password")}


@pytest.fixture(autouse=True)
def _no_developer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TWINFLOW_"):
            monkeypatch.delenv(name)


# --- OPC UA: an unpinned server is refused ------------------------------------------------


def _secure_opcua(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "opcua__security": "basic256sha256",
        "opcua__username": "bridge",
        "opcua__client_cert_file": str(tmp_path / "client.der"),
        "opcua__client_key_file": str(tmp_path / "client.pem"),
        **extra,
    }


def test_basic256sha256_without_a_pinned_server_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TWINFLOW_OPCUA__SERVER_CERT_FILE") as refused:
        load_settings(opcua=_opcua_section(_secure_opcua(tmp_path)))
    assert "pinned" in str(refused.value)
    pinned = _secure_opcua(tmp_path, opcua__server_cert_file=str(tmp_path / "server.der"))
    settings = load_settings(opcua=_opcua_section(pinned))
    assert settings.opcua.server_cert_file == tmp_path / "server.der"
    # No security needs no pinning.
    assert load_settings().opcua.server_cert_file is None


def _opcua_section(values: dict[str, str]) -> dict[str, str]:
    return {key.removeprefix("opcua__"): value for key, value in values.items()}


def test_the_cli_refuses_an_unpinned_server_at_once(tmp_path: Path) -> None:
    password = f"opcua-{uuid.uuid4().hex}"
    env = clean_env(**_secure_opcua(tmp_path), opcua__password=password)
    result = twinflow_cli(env, "config", timeout=60)
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "needs server_cert_file" in message and "TWINFLOW_OPCUA__SERVER_CERT_FILE" in message
    assert password not in "".join((result.stdout + result.stderr).split())


# --- MQTT: the local broker's password file and ACL -----------------------------------------


def test_password_and_acl_files_must_exist(tmp_path: Path) -> None:
    login = {"username": "bridge", "password": "pw"}
    with pytest.raises(ConfigError, match=r"TWINFLOW_MQTT__PASSWORD_FILE=.*nope.* not an existing"):
        load_settings(mqtt={**login, "password_file": tmp_path / "nope"})
    passwd = tmp_path / "passwd"
    passwd.write_text("bridge:$7$hash\n")
    with pytest.raises(ConfigError, match=r"TWINFLOW_MQTT__ACL_FILE=.*acl.* not an existing"):
        load_settings(mqtt={**login, "password_file": passwd, "acl_file": tmp_path / "acl"})
    spaced = tmp_path / "with space"
    spaced.write_text("")
    with pytest.raises(ConfigError, match=r"TWINFLOW_MQTT__ACL_FILE=.*spaces"):
        load_settings(mqtt={**login, "password_file": passwd, "acl_file": spaced})


def test_acl_needs_a_password_file_and_a_password_file_needs_a_login(tmp_path: Path) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text("bridge:$7$hash\n")
    acl.write_text("user bridge\ntopic readwrite plant/#\n")
    with pytest.raises(ConfigError, match=r"TWINFLOW_MQTT__ACL_FILE needs TWINFLOW_MQTT__PASSWORD"):
        load_settings(mqtt={"acl_file": acl})
    with pytest.raises(
        ConfigError, match=r"refuses anonymous.*TWINFLOW_MQTT__USERNAME and TWINFLOW_MQTT__PASS"
    ):
        load_settings(mqtt={"password_file": passwd})


def test_mosquitto_conf_refuses_anonymous_clients_with_a_password_file(tmp_path: Path) -> None:
    open_conf = MosquittoService(load_settings(state_dir=tmp_path))._config()
    assert "allow_anonymous true" in open_conf.splitlines()
    assert "password_file" not in open_conf and "acl_file" not in open_conf

    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text("bridge:$7$hash\n")
    acl.write_text("user bridge\ntopic readwrite plant/#\n")
    settings = load_settings(
        state_dir=tmp_path,
        mqtt={"username": "bridge", "password": "pw", "password_file": passwd, "acl_file": acl},
    )
    lines = MosquittoService(settings)._config().splitlines()
    assert "allow_anonymous false" in lines and "allow_anonymous true" not in lines
    assert f"password_file {passwd.resolve()}" in lines
    assert f"acl_file {acl.resolve()}" in lines


# --- secrets: found by walking the settings model, never printed ----------------------------


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ())


def _secret_paths(model: type[BaseModel], prefix: SecretPath = ()) -> list[SecretPath]:
    """Every SecretStr field of ``model``, nested sections included."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if _is_secret(annotation):
            found.append((*prefix, name))
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.extend(_secret_paths(annotation, (*prefix, name)))
    return found


def _login_of(path: SecretPath) -> SecretPath | None:
    """The user field that goes with a password field, if its section has one."""
    *section, name = path
    fields = Settings.model_fields
    model: Any = Settings
    for part in section:
        model = fields[part].annotation
        fields = model.model_fields
    stem = name.removesuffix("password")
    for candidate in (f"{stem}username", f"{stem}user", "username"):
        if candidate in fields and fields[candidate].default is None:
            return (*section, candidate)
    return None


@pytest.fixture(scope="module")
def canaries() -> dict[SecretPath, str]:
    """A unique value for every secret setting, to look for in every output."""
    paths = _secret_paths(Settings)
    assert set(paths) >= KNOWN_SECRETS, "the walk misses secrets it should find"
    return {path: f"canary{index}{uuid.uuid4().hex}" for index, path in enumerate(paths)}


def _canary_env(canaries: dict[SecretPath, str]) -> dict[str, str]:
    """TWINFLOW_* for every secret (and the user each needs to be accepted)."""
    env = {}
    for path, value in canaries.items():
        env[env_name(path)] = value
        login = _login_of(path)
        if login is not None:
            env[env_name(login)] = f"user{len(env)}"
    return env


def _leaks(text: str, canaries: dict[SecretPath, str]) -> list[SecretPath]:
    # Consoles wrap lines anywhere; compare with all whitespace gone.
    squeezed = "".join(text.split())
    return [path for path, value in canaries.items() if value in squeezed]


def _dig(data: dict[str, Any], path: SecretPath) -> Any:
    for part in path:
        data = data[part]
    return data


def test_every_secret_is_masked_in_repr_str_and_masked(
    monkeypatch: pytest.MonkeyPatch, canaries: dict[SecretPath, str]
) -> None:
    for name, value in _canary_env(canaries).items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    for path, value in canaries.items():
        secret = _dig(settings.model_dump(), path)
        assert isinstance(secret, SecretStr) and secret.get_secret_value() == value, path
    masked = settings.masked()
    for path in canaries:
        assert _dig(masked, path) == "**********", path
    sections = [getattr(settings, name) for name in Settings.model_fields]
    texts = [
        repr(settings),
        str(settings),
        f"{settings}",
        json.dumps(masked),
        settings.model_dump_json(),
        *(repr(section) for section in sections),
        *(str(section) for section in sections),
    ]
    assert not _leaks("\n".join(texts), canaries)


def test_twinflow_config_prints_no_secret(canaries: dict[SecretPath, str]) -> None:
    result = twinflow_cli(clean_env() | _canary_env(canaries), "config", timeout=60)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    for path in canaries:
        assert _dig(printed, path) == "**********", path
    assert not _leaks(result.stdout + result.stderr, canaries)


def test_invalid_settings_errors_print_no_secret(
    tmp_path: Path, canaries: dict[SecretPath, str]
) -> None:
    # Section validators fail with their whole section as the input: secrets included.
    acl = tmp_path / "acl"
    acl.write_text("user bridge\ntopic read #\n")
    env = clean_env() | _canary_env(canaries)
    env["TWINFLOW_MQTT__ACL_FILE"] = str(acl)  # without a password file
    env["TWINFLOW_OPCUA__SECURITY"] = "basic256sha256"  # without certificates
    # A mistyped name is no field, so nothing says it is a secret; an unknown field
    # fails its section before the section's validator, hence another section.
    env["TWINFLOW_QUESTDB__PG_PASWORD"] = canaries["questdb", "pg_password"]
    result = twinflow_cli(env, "config", timeout=60)
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "mqtt (env TWINFLOW_MQTT): TWINFLOW_MQTT__ACL_FILE needs" in message
    assert "opcua (env TWINFLOW_OPCUA): security basic256sha256 needs" in message
    assert "questdb.pg_pasword (env TWINFLOW_QUESTDB__PG_PASWORD): Extra inputs" in message
    assert "'password': '**********'" in message  # the input is shown, masked
    assert not _leaks(result.stdout + result.stderr, canaries)


# --- starting the services logs no secret ---------------------------------------------------


@pytest.fixture
def canary_stack(
    stack: Settings, tmp_path: Path, canaries: dict[SecretPath, str]
) -> Iterator[dict[str, str]]:
    """The environment of a second stack, every secret a canary; stopped afterwards."""
    tool = find_executable("mosquitto_passwd")
    assert tool is not None
    env = clean_env() | _canary_env(canaries)
    passwd = tmp_path / "passwd"
    user = env["TWINFLOW_MQTT__USERNAME"]
    subprocess.run(
        [tool, "-b", "-c", str(passwd), user, canaries["mqtt", "password"]],
        check=True,
        capture_output=True,
    )
    env["TWINFLOW_MQTT__PASSWORD_FILE"] = str(passwd)
    if "security_protocol" in KafkaSettings.model_fields:
        # The broker's SCRAM setup (credentials in its storage, JAAS) logs nothing secret.
        env["TWINFLOW_KAFKA__SECURITY_PROTOCOL"] = "SASL_PLAINTEXT"
    env.update(isolated_env(stack, tmp_path / "state"))
    yield env
    twinflow_cli(env, "down")  # never leave a process behind, even when an assert failed


@pytest.mark.integration
def test_starting_the_services_logs_no_secret(
    canary_stack: dict[str, str], canaries: dict[SecretPath, str]
) -> None:
    outputs = []
    for command in (("up",), ("status",), ("down",)):
        result = twinflow_cli(canary_stack, *command)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
        outputs.append(result.stdout + result.stderr)
    assert "mosquitto: healthy" in outputs[0]  # the health check logged in
    logs = sorted(Path(canary_stack["TWINFLOW_STATE_DIR"]).rglob("*.log"))
    assert {log.name for log in logs} >= {"kafka.log", "questdb.log", "mosquitto.log"}
    for log in logs:
        leaked = _leaks(log.read_text(errors="replace"), canaries)
        assert not leaked, f"{log} holds {leaked}"
    leaked = _leaks("\n".join(outputs), canaries)
    assert not leaked, f"the CLI printed {leaked}"
