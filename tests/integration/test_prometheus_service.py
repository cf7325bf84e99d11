"""The local Prometheus, started alone on an isolated state folder and free ports."""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.helpers import free_ports, isolated_settings
from twinflow.services import manager
from twinflow.services.process import port_is_free, process_start_ticks
from twinflow.services.prometheus import PrometheusService
from twinflow.settings import Settings

pytestmark = pytest.mark.integration

log = logging.getLogger("tests.prometheus")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def prometheus(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Settings of a Prometheus of its own (1 s scrapes), stopped by PID after the test."""
    base = isolated_settings(settings, tmp_path / "state")
    taken = set(base.local_ports().values())
    flow_port = next(port for port in free_ports(len(taken) + 1) if port not in taken)
    own = base.model_copy(
        update={
            "metrics": base.metrics.model_copy(
                update={"flow_port": flow_port, "scrape_interval_s": 1}
            )
        }
    )
    try:
        yield own
    finally:
        manager.down(own, ["prometheus"], log.info)


def _api(settings: Settings, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{settings.metrics.prometheus_port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with _DIRECT.open(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                assert len(address) == width
                found.add("127.0.0.1" if address == "0100007F" else f"{table}:{address}")
    return found


def test_prometheus_scrapes_the_flow_endpoint_and_stops_by_pid(prometheus: Settings) -> None:
    registry = CollectorRegistry()
    Counter("twinflow_test_ticks", "a metric for Prometheus to scrape", registry=registry).inc()
    server, thread = start_http_server(
        prometheus.metrics.flow_port, addr="127.0.0.1", registry=registry
    )
    try:
        assert manager.up(prometheus, ["prometheus"], log.info) == ["prometheus"]
        service = PrometheusService(prometheus)
        assert service.healthy()
        pid = service.pid_file.live_pid()
        assert pid is not None
        port = prometheus.metrics.prometheus_port
        assert _listen_addresses(port) == {"127.0.0.1"}

        # Targets appear after the first service-discovery sync, samples after a scrape.
        flow_target = f"127.0.0.1:{prometheus.metrics.flow_port}"
        jobs: dict[str, set[str]] = {}
        up: list[Any] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs = {}
            for target in _api(prometheus, "/api/v1/targets")["activeTargets"]:
                jobs.setdefault(target["labels"]["job"], set()).add(target["labels"]["instance"])
            query = 'up{job="twinflow-flow"} == 1'
            up = _api(prometheus, "/api/v1/query", query=query)["result"]
            if up:
                break
            time.sleep(0.5)
        assert set(jobs) == {"twinflow-flow", "twinflow-bridges", "twinflow-serve", "prometheus"}, (
            jobs
        )
        assert flow_target in jobs["twinflow-flow"]
        assert [sample["metric"]["instance"] for sample in up] == [flow_target], up
        scraped = _api(prometheus, "/api/v1/query", query="twinflow_test_ticks_total")["result"]
        assert [float(sample["value"][1]) for sample in scraped] == [1.0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

    assert manager.down(prometheus, ["prometheus"], log.info) == ["prometheus"]
    assert process_start_ticks(pid) is None
    assert port_is_free(port)
    assert not service.healthy()
