"""Prometheus from Debian's package (unpacked, not installed), scraping twinflow's /metrics."""

from __future__ import annotations

import http.client
import os
import urllib.request
from typing import Any

import yaml

from twinflow.errors import ProvisionError
from twinflow.services.base import LocalService
from twinflow.services.provision import Progress, extract_debian_package, find_executable

# Processes of a local cluster (`twinflow run -i 0..3`) serve on flow_port + i when
# per_process_port is on; a process that is not running is just a "down" target.
LOCAL_CLUSTER_PROCESSES = 4
_WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104  (addresses to bind, never to scrape)
# Health checks go to 127.0.0.1 itself, never through an http_proxy of the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusService(LocalService):
    """A Prometheus on loopback that scrapes the flow, the bridges and itself."""

    name = "prometheus"

    def ports(self) -> dict[str, int]:
        """The UI/API listener."""
        return {"metrics.prometheus_port": self.settings.metrics.prometheus_port}

    def endpoints(self) -> list[str]:
        """The UI and HTTP API URL."""
        return [f"http://127.0.0.1:{self.settings.metrics.prometheus_port}"]

    def _config(self) -> dict[str, Any]:
        metrics = self.settings.metrics
        # The endpoints bind metrics.host; a wildcard bind is reached on loopback.
        host = "127.0.0.1" if metrics.host in _WILDCARDS else metrics.host
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal in host:port
        bridge_ports = [
            metrics.mqtt_bridge_port,
            metrics.opcua_bridge_port,
            metrics.modbus_bridge_port,
            metrics.coap_bridge_port,
        ]
        serve_ports = [metrics.serve_port]
        flow_ports = [metrics.flow_port]
        if metrics.per_process_port:
            flow_ports += [metrics.flow_port + i for i in range(1, LOCAL_CLUSTER_PROCESSES)]
        interval = f"{metrics.scrape_interval_s}s"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                _job("twinflow-flow", [f"{host}:{port}" for port in flow_ports]),
                _job("twinflow-bridges", [f"{host}:{port}" for port in bridge_ports]),
                _job("twinflow-serve", [f"{host}:{port}" for port in serve_ports]),
                _job("prometheus", [f"127.0.0.1:{metrics.prometheus_port}"]),
            ],
        }

    def _binary(self, progress: Progress) -> str:
        found = find_executable("prometheus")
        if found:
            return found
        # Installing the package would run its postinst, which may start a system-wide
        # Prometheus on 0.0.0.0:9090; the unpacked binary is all we run.
        root = self.settings.jar_dir / "prometheus"
        binary = extract_debian_package("prometheus", root, progress) / "usr" / "bin" / "prometheus"
        if not os.access(binary, os.X_OK):
            raise ProvisionError(f"{binary} is missing; delete {root} to fetch it again")
        return str(binary)

    def prepare(self, progress: Progress) -> list[str]:
        """Fetch the binary if missing and write prometheus.yml."""
        binary = self._binary(progress)
        data_dir = (self.home / "data").resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        config = self.home / "prometheus.yml"
        config.write_text(yaml.safe_dump(self._config(), sort_keys=False))
        metrics = self.settings.metrics
        return [
            binary,
            f"--config.file={config.resolve()}",
            f"--storage.tsdb.path={data_dir}",
            f"--storage.tsdb.retention.time={metrics.retention}",
            f"--web.listen-address=127.0.0.1:{metrics.prometheus_port}",
        ]

    def healthy(self) -> bool:
        """``/-/ready`` answers 200 (the TSDB is open and the config loaded)."""
        url = f"http://127.0.0.1:{self.settings.metrics.prometheus_port}/-/ready"
        try:
            with _DIRECT.open(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, http.client.HTTPException):
            return False


def _job(name: str, targets: list[str]) -> dict[str, Any]:
    return {"job_name": name, "static_configs": [{"targets": targets}]}
