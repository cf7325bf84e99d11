"""The local Prometheus: its scrape config, its argv, and how its binary is obtained."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import free_ports
from twinflow.errors import ProvisionError
from twinflow.services import prometheus, provision
from twinflow.services.prometheus import PrometheusService
from twinflow.settings import Settings, load_settings


def _settings(tmp_path: Path, **metrics: Any) -> Settings:
    return load_settings(state_dir=tmp_path / "state", metrics=metrics)


def _targets(config: dict[str, Any]) -> dict[str, list[str]]:
    return {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }


def test_config_scrapes_flow_processes_bridges_serve_and_itself(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        flow_port=19250,
        mqtt_bridge_port=19261,
        opcua_bridge_port=19262,
        modbus_bridge_port=19264,
        coap_bridge_port=19265,
        serve_port=19263,
        prometheus_port=19090,
        scrape_interval_s=7,
    )
    config = PrometheusService(settings)._config()
    assert config["global"] == {"scrape_interval": "7s", "evaluation_interval": "7s"}
    assert _targets(config) == {
        "twinflow-flow": [f"127.0.0.1:{port}" for port in (19250, 19251, 19252, 19253)],
        "twinflow-bridges": [f"127.0.0.1:{port}" for port in (19261, 19262, 19264, 19265)],
        "twinflow-serve": ["127.0.0.1:19263"],
        "prometheus": ["127.0.0.1:19090"],
    }


def test_config_without_per_process_ports_scrapes_one_flow_endpoint(tmp_path: Path) -> None:
    settings = _settings(tmp_path, flow_port=19250, per_process_port=False)
    assert _targets(PrometheusService(settings)._config())["twinflow-flow"] == ["127.0.0.1:19250"]


@pytest.mark.parametrize(
    ("bind", "scraped"),
    [("0.0.0.0", "127.0.0.1"), ("::", "127.0.0.1"), ("10.1.2.3", "10.1.2.3"), ("::1", "[::1]")],
)
def test_endpoints_are_scraped_where_they_bind(tmp_path: Path, bind: str, scraped: str) -> None:
    settings = _settings(tmp_path, host=bind, flow_port=19250, per_process_port=False)
    targets = _targets(PrometheusService(settings)._config())
    assert targets["twinflow-flow"] == [f"{scraped}:19250"]
    assert all(t.startswith(f"{scraped}:") for t in targets["twinflow-bridges"])
    assert targets["prometheus"][0].startswith("127.0.0.1:")  # itself: always loopback


def _cached_binary(settings: Settings) -> Path:
    binary = settings.jar_dir / "prometheus" / "usr" / "bin" / "prometheus"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return binary


def test_prepare_writes_the_config_and_returns_a_loopback_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prometheus, "find_executable", lambda _name: None)
    settings = _settings(tmp_path, prometheus_port=19090, retention="12h", scrape_interval_s=1)
    binary = _cached_binary(settings)
    service = PrometheusService(settings)

    argv = service.prepare(lambda _line: None)

    home = settings.state_dir / "prometheus"
    assert argv == [
        str(binary),
        f"--config.file={home / 'prometheus.yml'}",
        f"--storage.tsdb.path={home / 'data'}",
        "--storage.tsdb.retention.time=12h",
        "--web.listen-address=127.0.0.1:19090",
    ]
    assert (home / "data").is_dir()
    written = yaml.safe_load((home / "prometheus.yml").read_text())
    assert written == service._config()
    assert written["global"]["scrape_interval"] == "1s"


def test_an_installed_prometheus_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prometheus, "find_executable", lambda _name: "/usr/bin/prometheus")
    argv = PrometheusService(_settings(tmp_path)).prepare(lambda _line: None)
    assert argv[0] == "/usr/bin/prometheus"


def test_healthy_is_false_when_nothing_listens(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    assert PrometheusService(_settings(tmp_path, prometheus_port=port)).healthy() is False


# --- extract_debian_package against a fake apt-get and a real (tiny) .deb ---------------------

FAKE_APT = """#!/bin/sh
echo "$*" >> "{calls}"
case "$1" in
  update) touch "{lists}"; echo "Get:1 fake bookworm InRelease" ;;
  download)
    if [ ! -e "{lists}" ] || [ "$2" != fakeprom ]; then
      echo "E: Unable to locate package $2"; exit 100
    fi
    echo "Get:1 fake bookworm/main amd64 $2 1.0 [1 kB]"
    cp "{deb}" "./$2_1.0_amd64.deb" ;;
  *) exit 1 ;;
esac
"""


def _fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH whose apt-get serves a tiny built .deb, once `update` has run."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb")
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: fakeprom\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: t <t@example.org>\nDescription: test\n"
    )
    # postinst must never run: it would leave this file behind.
    (tree / "DEBIAN" / "postinst").write_text(f"#!/bin/sh\ntouch {tmp_path}/postinst-ran\n")
    (tree / "DEBIAN" / "postinst").chmod(0o755)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "fakeprom").write_text("#!/bin/sh\necho fake\n")
    (tree / "usr" / "bin" / "fakeprom").chmod(0o755)
    deb = tmp_path / "fakeprom.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    calls = tmp_path / "apt-calls"
    apt.write_text(FAKE_APT.format(calls=calls, lists=tmp_path / "lists", deb=deb))
    apt.chmod(apt.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_a_package_is_unpacked_not_installed_after_one_list_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_apt(tmp_path, monkeypatch)
    dest = tmp_path / "lib" / "fakeprom"
    lines: list[str] = []

    assert provision.extract_debian_package("fakeprom", dest, lines.append) == dest

    assert os.access(dest / "usr" / "bin" / "fakeprom", os.X_OK)
    assert not (tmp_path / "postinst-ran").exists()
    assert not dest.with_name("fakeprom.partial").exists()
    assert calls.read_text().splitlines() == ["download fakeprom", "update", "download fakeprom"]
    assert any("apt-get update" in line for line in lines)
    # Once unpacked, nothing is fetched again.
    provision.extract_debian_package("fakeprom", dest, lines.append)
    assert len(calls.read_text().splitlines()) == 3


def test_an_unknown_package_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_apt(tmp_path, monkeypatch)
    dest = tmp_path / "lib" / "nothing"
    with pytest.raises(ProvisionError, match=r"(?s)could not fetch Debian's nothing.*Unable"):
        provision.extract_debian_package("nothing", dest, lambda _line: None)
    assert not dest.exists() and not dest.with_name("nothing.partial").exists()
    assert calls.read_text().splitlines() == ["download nothing", "update", "download nothing"]
