import os
import subprocess
import sys
from pathlib import Path

import pytest

from twinflow.errors import ConfigError
from twinflow.settings import load_settings


def test_defaults_are_loopback_and_standard_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TWINFLOW_KAFKA__PORT", "TWINFLOW_CONFIG", "TWINFLOW_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.kafka.bootstrap == "127.0.0.1:9092"
    assert settings.questdb.http_url == "http://127.0.0.1:9000"
    assert settings.mqtt.port == 1883
    assert settings.state_dir.is_absolute()
    assert settings.jar_dir == settings.state_dir / "lib"


def test_environment_overrides_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINFLOW_KAFKA__PORT", "19092")
    monkeypatch.setenv("TWINFLOW_QUESTDB__HEAP", "2g")
    settings = load_settings()
    assert settings.kafka.bootstrap == "127.0.0.1:19092"
    assert settings.questdb.heap == "2g"


def test_config_file_below_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "twinflow.toml"
    config.write_text('[kafka]\nport = 29092\nheap = "512m"\n[mqtt]\nport = 21883\n')
    monkeypatch.delenv("TWINFLOW_CONFIG", raising=False)
    monkeypatch.setenv("TWINFLOW_MQTT__PORT", "31883")
    settings = load_settings(config)
    assert settings.kafka.port == 29092
    assert settings.kafka.heap == "512m"
    assert settings.mqtt.port == 31883


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("TWINFLOW_KAFKA__PORT", "70000", r"kafka\.port \(env TWINFLOW_KAFKA__PORT\).*65535"),
        ("TWINFLOW_MQTT__PORT", "abc", r"mqtt\.port \(env TWINFLOW_MQTT__PORT\).*integer"),
        ("TWINFLOW_QUESTDB__HEAP", "lots", r"questdb\.heap.*512m or 2g.*'lots'"),
        ("TWINFLOW_LOG_LEVEL", "LOUD", r"log_level \(env TWINFLOW_LOG_LEVEL\)"),
    ],
)
def test_bad_values_fail_fast_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_unknown_setting_in_file_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "twinflow.toml"
    config.write_text("[kafka]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"kafka\.prot"):
        load_settings(config)


def test_two_services_on_one_port_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINFLOW_MQTT__PORT", "9000")
    with pytest.raises(ConfigError, match=r"mqtt\.port and questdb\.http_port are both .*9000"):
        load_settings()


def test_secrets_are_masked_when_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINFLOW_MQTT__USERNAME", "plant")
    monkeypatch.setenv("TWINFLOW_MQTT__PASSWORD", "s3cret-value")
    settings = load_settings()
    printed = repr(settings.masked()) + repr(settings)
    assert "s3cret-value" not in printed
    assert settings.masked()["mqtt"]["password"] == "**********"
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "s3cret-value"


def test_detection_defaults_are_the_detectors_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from twinflow.detection import DetectorConfig

    for name in ("TWINFLOW_DETECTION__CLEAR_WINDOWS", "TWINFLOW_DETECTION__REBASELINE_AFTER"):
        monkeypatch.delenv(name, raising=False)
    detection = load_settings().detection
    assert detection.detector_config() == DetectorConfig()
    assert detection.effective() == {
        "clear_windows": DetectorConfig().clear_windows,
        "rebaseline_after": DetectorConfig().rebaseline_after,
    }
    assert load_settings().masked()["detection"] == detection.effective()


def test_detection_settings_reach_the_detector_and_none_means_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TWINFLOW_DETECTION__CLEAR_WINDOWS", "5")
    monkeypatch.setenv("TWINFLOW_DETECTION__REBASELINE_AFTER", "none")
    config = load_settings().detection.detector_config(warmup_windows=90)
    assert (config.clear_windows, config.rebaseline_after, config.warmup_windows) == (5, None, 90)
    assert config.alarm_policy.rebaseline_windows is None
    monkeypatch.setenv("TWINFLOW_DETECTION__REBASELINE_AFTER", "2.5")
    config = load_settings().detection.detector_config(warmup_windows=90)
    assert config.alarm_policy.rebaseline_windows == 225


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"TWINFLOW_DETECTION__CLEAR_WINDOWS": "0"},
            r"detection\.clear_windows \(env TWINFLOW_DETECTION__CLEAR_WINDOWS\).*1",
        ),
        (
            {"TWINFLOW_DETECTION__REBASELINE_AFTER": "soon"},
            r"detection\.rebaseline_after \(env TWINFLOW_DETECTION__REBASELINE_AFTER\)",
        ),
        (
            {"TWINFLOW_DETECTION__REBASELINE_AFTER": "0"},
            r"detection\.rebaseline_after \(env TWINFLOW_DETECTION__REBASELINE_AFTER\)",
        ),
        (
            {
                "TWINFLOW_DETECTION__CLEAR_WINDOWS": "200",
                "TWINFLOW_DETECTION__REBASELINE_AFTER": "1",
            },
            r"rebaseline_after=1.0 warm-ups is 180 windows, not more than clear_windows=200.*"
            r"TWINFLOW_DETECTION__CLEAR_WINDOWS.*TWINFLOW_DETECTION__REBASELINE_AFTER",
        ),
    ],
)
def test_bad_detection_settings_name_the_setting_and_its_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_loading_the_settings_does_not_load_the_detection_models() -> None:
    # River takes about a second and 80 MiB; the bridges and service commands need neither.
    probe = "import sys; from twinflow.settings import load_settings; load_settings(); "
    probe += "print('river' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINFLOW_DETECTION__")}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env
    )
    assert result.stdout.strip() == "False"


def test_serve_off_loopback_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINFLOW_SERVE__HOST", "0.0.0.0")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert "serve.host 0.0.0.0 is reachable from other machines: set serve.token" in str(
        refused.value
    )
    monkeypatch.setenv("TWINFLOW_SERVE__TOKEN", "s3cret-operator-token")
    assert load_settings().serve.secured


def test_serve_tokens_are_never_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINFLOW_SERVE__USERS__ANN__TOKEN", "tooshort")
    monkeypatch.setenv("TWINFLOW_SERVE__USERS__ANN__ROLE", "viewer")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "serve.users.ann.token (env TWINFLOW_SERVE__USERS__ANN__TOKEN)" in message
    assert "tooshort" not in message and "**********" in message
    monkeypatch.setenv("TWINFLOW_SERVE__USERS__ANN__ROLE", "admin")
    monkeypatch.setenv("TWINFLOW_SERVE__USERS__ANN__TOKEN", "a-long-enough-token")
    with pytest.raises(ConfigError, match=r"serve\.users\.ann\.role"):
        load_settings()
