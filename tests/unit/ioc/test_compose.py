"""The compose file describes the production topology (no Docker engine is needed to check it),
with its secrets, published ports and TLS, and the deployment's scripts."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from ioc_core.settings import PLACEHOLDER
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
        "grafana",
    }
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    for broker in KAFKA_BROKERS:
        assert services[broker]["image"].startswith("apache/kafka:3.9")
        assert services[broker]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    # Timescale's HA image: community TimescaleDB with PostGIS, for areas on the map.
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb-ha:pg17-ts2.29")
    assert "timescaledb-data:/home/postgres/pgdata" in services["timescaledb"]["volumes"]


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


# -- secrets, published ports and TLS ---------------------------------------------------------

SECRET_VARIABLES = (
    "POSTGRES_PASSWORD",
    "MQTT_ADMIN_PASSWORD",
    "MQTT_GATEWAY_PASSWORD",
    "MQTT_SIMULATOR_PASSWORD",
    "IOC_ADMIN_API_KEY",
    "IOC_SECRETS_KEY",
    "IOC_READER_DB_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
)
_INTERPOLATION = re.compile(r"\$\{([A-Z_]+)(:?[-?])?([^}]*)\}")


def _interpolations() -> list[tuple[str, str, str]]:
    """Every `${NAME...}` of the compose file: (name, operator, default or message)."""
    return [
        (m[1], m[2] or "", m[3]) for m in _INTERPOLATION.finditer((ROOT / "docker-compose.yml").read_text())
    ]


def _example_env() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {name: value for name, value in pairs}


def test_secrets_have_no_defaults_and_compose_refuses_to_start_without_them() -> None:
    used = {name for name, _, _ in _interpolations()}
    assert set(SECRET_VARIABLES) <= used
    for name, operator, text in _interpolations():
        if name in SECRET_VARIABLES:
            # `:?` stops `docker compose up` with this message when the variable is unset or empty.
            assert operator == ":?" and name in text, (name, operator, text)
    assert not PLACEHOLDER.search((ROOT / "docker-compose.yml").read_text())


def test_the_example_env_file_names_every_secret_with_a_placeholder_that_is_refused() -> None:
    example = _example_env()
    assert set(SECRET_VARIABLES) <= set(example)
    for name in SECRET_VARIABLES:
        assert PLACEHOLDER.search(example[name]), name
    assert example["IOC_SECRETS_OLD_KEYS"] == ""
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()


def test_only_tls_ports_are_published_on_the_host() -> None:
    services = load()["services"]
    published = {name: service.get("ports") for name, service in services.items() if service.get("ports")}
    # Grafana serves the host's loopback only (an SSH tunnel or the city's TLS proxy in front).
    assert published == {"mosquitto": ["8883:8883"], "api": ["8443:8443"], "grafana": ["127.0.0.1:3000:3000"]}
    for name in (*KAFKA_BROKERS, "timescaledb"):
        assert "ports" not in services[name] and "network_mode" not in services[name], name


def test_the_api_serves_https_with_mounted_certificate_files() -> None:
    api = load()["services"]["api"]
    env = api["environment"]
    assert env["IOC_API_PORT"] == 8443
    mounts = {volume.split(":")[1]: volume for volume in api["volumes"]}
    for setting in ("IOC_API_TLS_CERT_FILE", "IOC_API_TLS_KEY_FILE"):
        directory = str(Path(env[setting]).parent)
        assert mounts[directory] == f"./deploy/tls:{directory}:ro", setting
    assert "https://127.0.0.1:8443/ready" in " ".join(api["healthcheck"]["test"])


def _listeners() -> dict[str, dict[str, str]]:
    """Each `listener` of the broker's configuration with the options that follow it up to the
    next one (as Mosquitto reads them: a listener's options are those after its line)."""
    listeners: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            current = listeners.setdefault(value, {})
        elif current is not None:
            current[key] = value
    return listeners


def test_the_broker_listens_with_tls_for_devices() -> None:
    listeners = _listeners()
    assert set(listeners) == {"1883", "8883"}
    tls = listeners["8883"]
    assert tls["certfile"] == "/mosquitto/certs/mqtt.crt" and tls["keyfile"] == "/mosquitto/certs/mqtt.key"
    assert "certfile" not in listeners["1883"]
    # Per listener: the devices' port has the contract's QoS limit as well.
    assert listeners["1883"]["max_qos"] == listeners["8883"]["max_qos"] == "1"
    mosquitto = load()["services"]["mosquitto"]
    assert "./deploy/tls:/mosquitto/certs:ro" in mosquitto["volumes"]
    # The devices' port is published; the plain one serves the compose network only.
    assert mosquitto["ports"] == ["8883:8883"]


def test_the_database_image_refuses_a_placeholder_before_it_initialises() -> None:
    timescaledb = load()["services"]["timescaledb"]
    entrypoint = timescaledb["entrypoint"]
    assert entrypoint[:2] == ["sh", "/usr/local/bin/refuse-placeholders.sh"]
    assert entrypoint[2:] == ["POSTGRES_PASSWORD", "--", "docker-entrypoint.sh"]
    assert timescaledb["command"] == ["postgres"]
    assert (
        "./deploy/refuse-placeholders.sh:/usr/local/bin/refuse-placeholders.sh:ro" in timescaledb["volumes"]
    )


def _sh(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MQTT_"))}
    return subprocess.run(
        ["sh", str(script), *args], env={**clean, **env}, capture_output=True, text=True, timeout=30
    )


def test_the_placeholder_guard_runs_the_command_only_with_real_secrets() -> None:
    guard = ROOT / "deploy" / "refuse-placeholders.sh"
    ran = _sh(guard, "POSTGRES_PASSWORD", "--", "echo", "started", POSTGRES_PASSWORD="Xq7.r9-k2")
    assert (ran.returncode, ran.stdout) == (0, "started\n")
    for value in ("change-me", "CHANGE_ME", "changeme-please"):
        refused = _sh(guard, "POSTGRES_PASSWORD", "--", "echo", "started", POSTGRES_PASSWORD=value)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.splitlines() == [
            "refuse-placeholders: POSTGRES_PASSWORD still holds a placeholder secret (change-me...):"
            " set a real one before starting"
        ]
    unset = _sh(guard, "POSTGRES_PASSWORD", "--", "echo", "started")
    assert (
        unset.returncode == 1 and unset.stderr.strip() == "refuse-placeholders: POSTGRES_PASSWORD is not set"
    )
    hostile = _sh(guard, "X;true", "--", "echo")
    assert hostile.returncode == 1 and "is not a variable name" in hostile.stderr


def test_the_broker_entrypoint_refuses_placeholder_passwords_before_anything_else() -> None:
    refused = _sh(
        ROOT / "deploy" / "mosquitto" / "entrypoint.sh",
        MQTT_ADMIN_PASSWORD="real-one-1",
        MQTT_GATEWAY_PASSWORD="change-me-gateway",
        MQTT_SIMULATOR_PASSWORD="real-one-2",
        MOSQUITTO_CONF="/nonexistent",
    )
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        "mosquitto entrypoint: MQTT_GATEWAY_PASSWORD still holds a placeholder secret (change-me...):"
        " set a real one before starting"
    ]


def test_the_self_signed_certificates_are_for_the_hosts_and_keys_stay_private(tmp_path: Path) -> None:
    made = _sh(
        ROOT / "deploy" / "tls" / "self-signed.sh", "ioc.example.vn", "10.0.0.5", TLS_DIR=str(tmp_path)
    )
    assert made.returncode == 0, made.stderr
    for name in ("mqtt", "api"):
        certificate = x509.load_pem_x509_certificate((tmp_path / f"{name}.crt").read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["ioc.example.vn"]
        assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
        assert (tmp_path / f"{name}.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    ignored = (ROOT / "deploy" / "tls" / ".gitignore").read_text().splitlines()
    assert "*" in ignored and "!self-signed.sh" in ignored


def test_grafana_is_provisioned_with_the_read_only_role_and_the_generated_dashboards() -> None:
    grafana = load()["services"]["grafana"]
    assert grafana["image"].startswith("grafana/grafana-oss:")
    assert grafana["entrypoint"][:2] == ["sh", "/usr/local/bin/refuse-placeholders.sh"]
    assert grafana["entrypoint"][-2:] == ["--", "/run.sh"]
    mounts = {volume.split(":")[1]: volume for volume in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro"
    assert mounts["/etc/grafana/dashboards"] == "./deploy/grafana/dashboards:/etc/grafana/dashboards:ro"
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "timescaledb.yaml").read_text())
    (source,) = datasources["datasources"]
    assert (source["uid"], source["user"], source["url"]) == (
        "ioc-timescaledb",
        "ioc_reader",
        "timescaledb:5432",
    )
    assert source["secureJsonData"]["password"] == "$IOC_READER_DB_PASSWORD"
    assert "IOC_READER_DB_PASSWORD" in grafana["environment"]
    providers = yaml.safe_load((provisioning / "dashboards" / "ioc.yaml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/etc/grafana/dashboards"
    # `ioc migrate` gives the read-only role its password.
    assert "IOC_READER_DB_PASSWORD" in load()["services"]["migrate"]["environment"]
