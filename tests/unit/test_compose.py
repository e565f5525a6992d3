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
