"""The compose file describes the production topology (no Docker engine is needed to check it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_every_part_of_the_topology_is_there() -> None:
    services = load()["services"]
    assert set(services) == {
        "mosquitto",
        "kafka",
        "timescaledb",
        "migrate",
        "gateway",
        "processor",
        "api",
        "simulator",
    }
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["kafka"]["image"].startswith("apache/kafka:3.9")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert "-ha" not in services["timescaledb"]["image"]


def test_dependencies_wait_for_health() -> None:
    services = load()["services"]
    for name in ("mosquitto", "kafka", "timescaledb", "api"):
        assert "healthcheck" in services[name], name
    for name in ("gateway", "processor", "api", "simulator", "migrate"):
        conditions = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        for dependency, condition in conditions.items():
            assert condition in ("service_healthy", "service_completed_successfully", "service_started")
            if dependency in ("mosquitto", "kafka", "timescaledb"):
                assert condition == "service_healthy", (name, dependency)
        if name != "migrate":
            assert conditions.get("migrate") == "service_completed_successfully", name


def test_components_are_configured_through_ioc_settings() -> None:
    services = load()["services"]
    for name in ("migrate", "gateway", "processor", "api", "simulator"):
        environment = services[name]["environment"]
        assert {"IOC_MQTT_URL", "IOC_KAFKA_BOOTSTRAP", "IOC_DATABASE_URL"} <= set(environment), name
        assert services[name]["command"][0] in ("migrate", "gateway", "processor", "api", "simulate")


def _broker_config() -> dict[str, str]:
    lines = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    pairs = (line.split(None, 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key: value for key, value in pairs}


def test_broker_enforces_device_credentials() -> None:
    config = _broker_config()
    assert config["allow_anonymous"] == "false"
    assert config["plugin"].endswith("/mosquitto_dynamic_security.so")
    # On the data volume: the plugin rewrites its file on every account change.
    assert config["plugin_opt_config_file"].startswith("/mosquitto/data/")
    assert config["max_queued_messages"] == "0" and config["max_queued_bytes"] == "0"
    mosquitto = load()["services"]["mosquitto"]
    entrypoint = "/mosquitto/config/entrypoint.sh"
    assert mosquitto["command"][-1] == entrypoint
    assert any(v.startswith("./deploy/mosquitto/entrypoint.sh:" + entrypoint) for v in mosquitto["volumes"])
    assert "dynsec init" in (ROOT / "deploy" / "mosquitto" / "entrypoint.sh").read_text()
    assert {"MQTT_ADMIN_PASSWORD", "MQTT_GATEWAY_PASSWORD", "MQTT_SIMULATOR_PASSWORD"} <= set(
        mosquitto["environment"]
    )
    # Anonymous clients are refused, so the health check must log in.
    assert "-u admin" in " ".join(mosquitto["healthcheck"]["test"])


def test_each_component_connects_with_its_own_account() -> None:
    services = load()["services"]
    assert services["api"]["environment"]["IOC_MQTT_ADMIN_URL"].startswith("mqtt://admin:")
    assert services["gateway"]["environment"]["IOC_MQTT_URL"].startswith("mqtt://ioc-gateway:")
    assert services["simulator"]["environment"]["IOC_MQTT_URL"].startswith("mqtt://ioc-simulator:")
    for name in ("gateway", "processor", "migrate", "simulator"):
        assert "IOC_MQTT_ADMIN_URL" not in services[name]["environment"], name
