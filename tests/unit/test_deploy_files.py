"""The deployment files, checked statically (no container engine runs here): they parse,
pin their images, name only real settings with valid values, and agree on ports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from tests.grafana import dashboards
from twinflow.settings import (
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    MetricsSettings,
    QuestDBSettings,
    Settings,
    load_settings,
)

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "compose.yaml"
K8S = sorted((INFRA / "k8s").glob("*.yaml"))
PINNED = re.compile(r"^[\w./-]+:v?\d+(\.\d+)+([\w.-]*)$")


def _documents() -> list[dict[str, Any]]:
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _documents() if doc["kind"] == kind]


def _containers() -> list[dict[str, Any]]:
    return [
        container
        for doc in _documents()
        if doc["kind"] in ("Deployment", "StatefulSet")
        for container in doc["spec"]["template"]["spec"]["containers"]
    ]


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return compose


def _is_setting(name: str) -> bool:
    """Whether ``TWINFLOW_A__B`` names a field of the settings object."""
    model: type[BaseModel] | None = Settings
    for part in name.removeprefix(ENV_PREFIX).lower().split(ENV_NESTED_DELIMITER):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return True


def _twinflow_env() -> dict[str, dict[str, str]]:
    """Every place that sets TWINFLOW_* variables, with what it sets."""
    places = {
        f"compose {name}": dict(service.get("environment", {}))
        for name, service in _compose()["services"].items()
    }
    for doc in _kind("ConfigMap"):
        places[f"ConfigMap {doc['metadata']['name']}"] = doc["data"]
    for doc in _kind("Secret"):
        places[f"Secret {doc['metadata']['name']}"] = doc["stringData"]
    for container in _containers():
        places[f"container {container['name']}"] = {
            item["name"]: item["value"] for item in container.get("env", [])
        }
    return {
        place: {key: str(value) for key, value in env.items() if key.startswith(ENV_PREFIX)}
        for place, env in places.items()
    }


def test_every_image_is_pinned_to_a_version() -> None:
    images = [service["image"] for service in _compose()["services"].values()]
    images += [container["image"] for container in _containers()]
    images += re.findall(r"^FROM (\S+)", (INFRA / "Dockerfile").read_text(), re.MULTILINE)
    assert len(images) >= 10
    unpinned = [image for image in images if not PINNED.match(image)]
    assert not unpinned, f"images without a version tag: {unpinned}"


def test_every_twinflow_variable_is_a_setting() -> None:
    env = _twinflow_env()
    assert sum(len(values) for values in env.values()) >= 20
    unknown = {
        place: [name for name in values if not _is_setting(name)] for place, values in env.items()
    }
    assert not any(unknown.values()), unknown
    assert _is_setting("TWINFLOW_KAFKA__SASL_PASSWORD")
    assert not _is_setting("TWINFLOW_KAFKA__SASL_PASWORD")


def test_the_settings_they_give_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _twinflow_env()
    k8s = env["ConfigMap twinflow-settings"] | env["Secret twinflow-credentials"]
    for values in (env["compose flow"], k8s):
        with monkeypatch.context() as patch:
            for name, value in values.items():
                patch.setenv(name, value)
            settings = load_settings()
        assert settings.kafka.bootstrap == values["TWINFLOW_KAFKA__BOOTSTRAP_SERVERS"]
    assert settings.kafka.sasl and settings.questdb.http_auth is not None


def test_compose_ports_agree_with_the_settings() -> None:
    services = _compose()["services"]
    env = services["flow"]["environment"]
    host, port = env["TWINFLOW_KAFKA__BOOTSTRAP_SERVERS"].split(":")
    assert host == "kafka"
    assert (
        f"PLAINTEXT://kafka:{port}"
        in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    )
    assert env["TWINFLOW_QUESTDB__HOST"] in services
    assert any(
        p.endswith(f":{env['TWINFLOW_QUESTDB__HTTP_PORT']}") for p in services["questdb"]["ports"]
    )
    assert env["TWINFLOW_MQTT__HOST"] in services
    assert any(p.endswith(f":{env['TWINFLOW_MQTT__PORT']}") for p in services["mosquitto"]["ports"])
    # Published ports stay on loopback: a laptop's demo is not the network's.
    for service in services.values():
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", []))


def test_the_flow_statefulset_addresses_every_pod_by_its_stable_name() -> None:
    (statefulset,) = _kind("StatefulSet")
    (service,) = [doc for doc in _kind("Service") if doc["spec"].get("clusterIP") == "None"]
    name = statefulset["metadata"]["name"]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert int(env["FLOW_PROCESSES"]) == statefulset["spec"]["replicas"]
    script = container["args"][0]
    port = container["ports"][0]["containerPort"]
    assert f"{name}-$i.{service['metadata']['name']}:{port}" in script
    assert service["spec"]["ports"][0]["port"] == port
    assert '-i "${HOSTNAME##*-}"' in script
    # Each pod its own recovery store, where the settings put it.
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    state_dir = _kind("ConfigMap")[0]["data"]["TWINFLOW_STATE_DIR"]
    assert mount["mountPath"] == state_dir


def test_the_image_copies_only_what_exists() -> None:
    root = INFRA.parent
    # Files from the build context; a COPY --from takes them from an earlier stage.
    sources = re.findall(r"^COPY (?!--from)(.+) \S+$", (INFRA / "Dockerfile").read_text(), re.M)
    missing = [s for line in sources for s in line.split() if not (root / s).exists()]
    assert sources and not missing, missing


def test_compose_mounts_only_files_that_exist() -> None:
    mounts = [
        volume.split(":")[0]
        for service in _compose()["services"].values()
        for volume in service.get("volumes", [])
        if volume.startswith("./")
    ]
    assert mounts
    missing = [mount for mount in mounts if not (INFRA / mount).exists()]
    assert not missing, missing


def test_the_grafana_data_source_is_the_compose_questdb() -> None:
    (source,) = yaml.safe_load(
        (INFRA / "grafana" / "provisioning" / "datasources" / "questdb.yaml").read_text()
    )["datasources"]
    host, port = source["url"].split(":")
    questdb = _compose()["services"][host]
    assert any(str(p).endswith(f":{port}") for p in questdb["ports"])
    defaults = QuestDBSettings()  # the defaults, whatever this shell exports
    assert int(port) == defaults.pg_port
    # The login comes from Grafana's environment, under the settings' names; compose
    # gives QuestDB and Grafana the same values.
    assert source["user"] == "${TWINFLOW_QUESTDB__PG_USER}"
    assert source["secureJsonData"]["password"] == "${TWINFLOW_QUESTDB__PG_PASSWORD}"
    grafana = _compose()["services"]["grafana"]["environment"]
    assert grafana["TWINFLOW_QUESTDB__PG_USER"] == questdb["environment"]["QDB_PG_USER"]
    assert grafana["TWINFLOW_QUESTDB__PG_PASSWORD"] == questdb["environment"]["QDB_PG_PASSWORD"]
    assert questdb["environment"]["QDB_PG_USER"].endswith(f":-{defaults.pg_user}}}")


def _data_sources() -> dict[str, dict[str, Any]]:
    folder = INFRA / "grafana" / "provisioning" / "datasources"
    return {
        source["uid"]: source
        for path in sorted(folder.glob("*.yaml"))
        for source in yaml.safe_load(path.read_text())["datasources"]
    }


def test_dashboards_are_well_formed_and_use_the_provisioned_data_sources() -> None:
    sources = _data_sources()
    assert {source["type"] for source in sources.values()} == {
        "grafana-postgresql-datasource",
        "prometheus",
    }
    boards = dashboards()
    assert {"plant-overview.json", "entity.json", "pipeline.json"} <= boards.keys()
    assert len({board["uid"] for board in boards.values()}) == len(boards)
    for name, board in boards.items():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        variables = {variable["name"] for variable in board["templating"]["list"]}
        for panel in board["panels"]:
            where = f"{name} / {panel['title']}"
            uids = {panel["datasource"]["uid"]} | {t["datasource"]["uid"] for t in panel["targets"]}
            assert len(uids) == 1 and uids <= sources.keys(), f"{where}: data source {uids}"
            (uid,) = uids
            assert panel["datasource"]["type"] == sources[uid]["type"], where
            query_field = "expr" if sources[uid]["type"] == "prometheus" else "rawSql"
            for target in panel["targets"]:
                used = set(re.findall(r"\$(?!__)(\w+)", target[query_field]))
                assert used <= variables, f"{where}: undefined {used}"
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] in sources


def test_the_grafana_prometheus_is_the_compose_prometheus() -> None:
    (source,) = [s for s in _data_sources().values() if s["type"] == "prometheus"]
    host, port = source["url"].removeprefix("http://").split(":")
    prometheus = _compose()["services"][host]
    assert any(str(p).endswith(f":{port}") for p in prometheus["ports"])
    assert int(port) == MetricsSettings().prometheus_port
    provider = yaml.safe_load(
        (INFRA / "grafana" / "provisioning" / "dashboards" / "twinflow.yaml").read_text()
    )["providers"][0]
    grafana = _compose()["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]


def test_prometheus_scrapes_every_twinflow_process_on_its_metrics_port() -> None:
    defaults = MetricsSettings()
    ports = {
        "flow": defaults.flow_port,
        "bridge-mqtt": defaults.mqtt_bridge_port,
        "bridge-opcua": defaults.opcua_bridge_port,
        "serve": defaults.serve_port,
    }
    # The Modbus and CoAP bridges share the field simulator's network (its address is
    # the one the field devices' model gives), so Prometheus reaches them through it.
    shared = {
        "bridge-modbus": defaults.modbus_bridge_port,
        "bridge-coap": defaults.coap_bridge_port,
    }
    config = yaml.safe_load((INFRA / "prometheus" / "compose.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    services = _compose()["services"]
    assert {f"{name}:{port}" for name, port in ports.items()} <= targets
    assert {f"field-simulator:{port}" for port in shared.values()} <= targets
    for name in [*ports, *shared]:
        # Scraped across the compose network, so the endpoint must not bind loopback.
        assert services[name]["environment"]["TWINFLOW_METRICS__HOST"] == "0.0.0.0"
    for name in shared:
        assert services[name]["network_mode"] == "service:field-simulator"
    ports |= shared
    workloads = _kind("StatefulSet") + _kind("Deployment")
    assert len(workloads) == len(ports)
    for doc in workloads:
        component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
        template = doc["spec"]["template"]
        (container,) = template["spec"]["containers"]
        named = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert named["metrics"] == ports[component]
        assert int(template["metadata"]["annotations"]["prometheus.io/port"]) == ports[component]
