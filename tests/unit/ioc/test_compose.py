"""The compose file describes the production topology (no Docker engine is needed to check it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ioc_core.telemetry import MAX_PAYLOAD_BYTES

ROOT = Path(__file__).resolve().parents[3]
KAFKA_BROKERS = ("kafka-1", "kafka-2", "kafka-3")


def load() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_every_part_of_the_topology_is_there() -> None:
    services = load()["services"]
    assert set(services) == {
        "mosquitto",
        "kafka-1",
        "kafka-2",
        "kafka-3",
        "timescaledb",
        "migrate",
        "gateway",
        "processor",
        "api",
        "simulator",
    }
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    for broker in KAFKA_BROKERS:
        assert services[broker]["image"].startswith("apache/kafka:3.9")
        assert services[broker]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert "-ha" not in services["timescaledb"]["image"]


def test_dependencies_wait_for_health() -> None:
    services = load()["services"]
    for name in ("mosquitto", *KAFKA_BROKERS, "timescaledb", "api"):
        assert "healthcheck" in services[name], name
    for name in ("gateway", "processor", "api", "simulator", "migrate"):
        conditions = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        for dependency, condition in conditions.items():
            assert condition in ("service_healthy", "service_completed_successfully", "service_started")
            if dependency in ("mosquitto", *KAFKA_BROKERS, "timescaledb"):
                assert condition == "service_healthy", (name, dependency)
        if name != "migrate":
            assert conditions.get("migrate") == "service_completed_successfully", name


def test_components_are_configured_through_ioc_settings() -> None:
    services = load()["services"]
    for name in ("migrate", "gateway", "processor", "api", "simulator"):
        environment = services[name]["environment"]
        assert {"IOC_MQTT_URL", "IOC_KAFKA_BOOTSTRAP", "IOC_DATABASE_URL"} <= set(environment), name
        assert services[name]["command"][0] in ("migrate", "gateway", "processor", "api", "simulate")


def test_kafka_is_a_three_broker_cluster_that_keeps_two_copies_of_every_write() -> None:
    services = load()["services"]
    environments = [services[broker]["environment"] for broker in KAFKA_BROKERS]
    voters = "1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"
    for node_id, (broker, env) in enumerate(zip(KAFKA_BROKERS, environments, strict=True), start=1):
        assert env["KAFKA_NODE_ID"] == node_id
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{broker}:9092"
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == voters
        assert env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
        assert any(v.endswith(":/var/lib/kafka/data") for v in services[broker]["volumes"]), broker
        for setting, value in {
            "KAFKA_DEFAULT_REPLICATION_FACTOR": 3,
            "KAFKA_MIN_INSYNC_REPLICAS": 2,
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": 3,
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": 3,
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": 2,
        }.items():
            assert env[setting] == value, (broker, setting)
    # One cluster: every node formats its storage with the same id, and each has its own volume.
    assert len({env["CLUSTER_ID"] for env in environments}) == 1
    assert len({services[b]["volumes"][0].split(":")[0] for b in KAFKA_BROKERS}) == 3
    for name in ("migrate", "gateway", "processor", "api", "simulator"):
        env = services[name]["environment"]
        assert env["IOC_KAFKA_BOOTSTRAP"] == "kafka-1:9092,kafka-2:9092,kafka-3:9092", name
        assert (env["IOC_KAFKA_REPLICATION_FACTOR"], env["IOC_KAFKA_MIN_INSYNC_REPLICAS"]) == (3, 2), name
    for name in ("gateway", "processor"):
        assert set(KAFKA_BROKERS) <= set(services[name]["depends_on"]), name


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
    # The contract's QoS, and a packet limit above its payload limit, whose dead letter the gateway
    # makes; no message_size_limit, whose PUBACK code paho takes for a protocol error.
    assert config["max_qos"] == "1" and "message_size_limit" not in config
    assert MAX_PAYLOAD_BYTES < int(config["max_packet_size"]) <= 256 * 1024
    # Bounded per client, far above Mosquitto's default of 1000 that drops a gateway's backlog.
    assert int(config["max_queued_messages"]) >= 1_000_000 and int(config["max_queued_bytes"]) >= 2**30
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
