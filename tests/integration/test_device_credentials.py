"""Per-device MQTT credentials against a real Mosquitto with the dynamic-security plugin.

The module runs a broker of its own, configured as the compose deployment's (anonymous clients
refused, the plugin loaded, its file in a temporary directory), and an `ioc api` whose
IOC_MQTT_ADMIN_URL points at it; devices, the gateway and the simulator connect to that broker as
the compose deployment has them connect.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.device_accounts import DeviceAccounts
from tests.integration.conftest import ADMIN_KEY, System, free_port
from tests.integration.dynsec import (
    ACCEPTED,
    ADMINISTRATIVE_ACTION,
    NOT_AUTHORIZED,
    REFUSED_AT_CONNECT,
    ROOT,
    Broker,
    connack,
    connected,
    shipped_config,
    wait_for_port,
)
from tests.integration.harness import ComponentProcess, unique, wait_until

PROBLEM = "application/problem+json"
GATEWAY_USER = "ioc-gateway"
GATEWAY_PASSWORD = secrets.token_urlsafe(18)
CITY = unique("cred")[:32]
OTHER_CITY = unique("other")[:32]


def telemetry(device_id: str, city: str = CITY, domain: str = "flood") -> str:
    return f"ioc/v1/{city}/{domain}/{device_id}/telemetry"


def status(device_id: str, city: str = CITY, domain: str = "flood") -> str:
    return f"ioc/v1/{city}/{domain}/{device_id}/status"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("dynsec-broker"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
async def accounts(broker: Broker) -> AsyncIterator[DeviceAccounts]:
    async with DeviceAccounts(broker.admin_url) as accounts:
        assert accounts.connected, accounts.problem
        await accounts.ensure_gateway_account(GATEWAY_USER, GATEWAY_PASSWORD)
        yield accounts


@pytest.fixture(scope="module")
async def credentials_api(
    system: System, broker: Broker, accounts: DeviceAccounts, log_dir: Path
) -> AsyncIterator[str]:
    port = free_port()
    env = {**system.env, "IOC_API_PORT": str(port), "IOC_MQTT_ADMIN_URL": broker.admin_url}
    process = ComponentProcess("api", env, log_dir, name="api-device-credentials")
    process.start()
    try:
        await process.wait_for_log("API listening")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture
async def api(credentials_api: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=credentials_api, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    ) as client:
        yield client


def device_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "id": unique("cred-dev"),
        "city": CITY,
        "domain": "flood",
        "name": "Trạm đo mực nước Hoàn Kiếm",
        "district": "Hoàn Kiếm",
        "location": {"lat": 21.0285, "lon": 105.8542},
    }
    body.update(overrides)
    return body


async def register(api: httpx.AsyncClient, **overrides: object) -> tuple[str, str]:
    """Register a device; its id and password."""
    body = device_body(**overrides)
    response = await api.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text
    credentials = response.json()["credentials"]
    assert credentials["username"] == body["id"]
    return str(body["id"]), str(credentials["password"])


# -- tests ------------------------------------------------------------------------------------


async def test_registration_returns_credentials_once(api: httpx.AsyncClient, broker: Broker) -> None:
    body = device_body()
    created = await api.post("/v1/devices", json=body)
    assert created.status_code == 201, created.text
    credentials = created.json()["credentials"]
    assert credentials["username"] == credentials["client_id"] == body["id"]
    assert len(credentials["password"]) >= 32
    shown = await api.get(f"/v1/devices/{body['id']}")
    assert shown.status_code == 200
    assert "credentials" not in shown.json() and credentials["password"] not in shown.text
    # A second registration of the same id is refused and leaves the account as it was.
    again = await api.post("/v1/devices", json=body)
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM
    assert "credentials" not in again.text
    assert connack(broker.port, credentials["username"], credentials["password"]) == 0
    schema = (await api.get("/openapi.json")).json()
    registered = schema["components"]["schemas"]["RegisteredDevice"]
    assert "credentials" in registered["properties"] and "credentials" not in registered.get("required", [])


async def test_a_device_publishes_under_its_own_topics_only(api: httpx.AsyncClient, broker: Broker) -> None:
    device, password = await register(api)
    neighbour, _ = await register(api)
    group = unique("gw")
    with connected(broker.port, GATEWAY_USER, GATEWAY_PASSWORD) as gateway:
        # The gateway's own subscriptions, shared ones included, and a plain one.
        assert gateway.subscribe(
            f"$share/{group}/ioc/v1/{CITY}/+/+/telemetry",
            f"$share/{group}/ioc/v1/{CITY}/+/+/status",
            "ioc/v1/#",
        ) == [1, 1, 1]
        with connected(broker.port, device, password, will=status(device)) as session:
            assert session.publish(telemetry(device), b'{"currentLevel": 1.2}') in ACCEPTED
            assert session.publish(status(device), b"online", retain=True) in ACCEPTED
            forbidden = [
                telemetry(neighbour),
                status(neighbour),
                telemetry(device, city=OTHER_CITY),
                telemetry(device, domain="water"),
                f"ioc/v1/{CITY}/flood/{device}x/telemetry",
                # Under its own id, only its telemetry and status topics.
                f"ioc/v1/{CITY}/flood/{device}/anything-else",
                f"ioc/v1/{CITY}/flood/{device}/telemetry/more",
                f"ioc/v1/{CITY}/flood/{device}",
                "$CONTROL/dynamic-security/v1",
                "elsewhere",
            ]
            for topic in forbidden:
                assert session.publish(topic, b'{"currentLevel": 9.9}') == NOT_AUTHORIZED, topic
            # Devices read nothing, not even their own topics.
            assert session.subscribe("ioc/v1/#", telemetry(device)) == [NOT_AUTHORIZED, NOT_AUTHORIZED]
            # Sent last: once it arrives, anything the broker let through before it has arrived too.
            marker = b'{"currentLevel": 1.3}'
            assert session.publish(telemetry(device), marker) in ACCEPTED
        received = gateway.receive_until(telemetry(device), marker)
        topics = {topic for topic, _ in received}
        assert {telemetry(device), status(device)} <= topics
        assert not topics & set(forbidden), topics


async def test_wrong_or_missing_credentials_are_refused_at_connect(
    api: httpx.AsyncClient, broker: Broker
) -> None:
    device, password = await register(api)
    assert connack(broker.port, device, password) == 0
    assert connack(broker.port, device, password + "x") in REFUSED_AT_CONNECT
    assert connack(broker.port, unique("nobody"), password) in REFUSED_AT_CONNECT
    assert connack(broker.port, None, None) in REFUSED_AT_CONNECT


async def test_rotation_disconnects_the_old_password_at_once(api: httpx.AsyncClient, broker: Broker) -> None:
    device, old = await register(api)
    with connected(broker.port, device, old) as session:
        rotated = await api.post(f"/v1/devices/{device}/credentials")
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()
        assert new["username"] == new["client_id"] == device and new["password"] != old
        assert session.disconnects.get(timeout=10).value == ADMINISTRATIVE_ACTION
    assert connack(broker.port, device, old) in REFUSED_AT_CONNECT
    with connected(broker.port, device, new["password"]) as session:
        assert session.publish(telemetry(device), b'{"currentLevel": 1.0}') in ACCEPTED
    assert "credentials" not in (await api.get(f"/v1/devices/{device}")).json()


async def test_revocation_disconnects_and_refuses_until_rotated(
    api: httpx.AsyncClient, broker: Broker, accounts: DeviceAccounts
) -> None:
    device, password = await register(api)
    with connected(broker.port, device, password) as session:
        revoked = await api.delete(f"/v1/devices/{device}/credentials")
        assert revoked.status_code == 204, revoked.text
        assert session.disconnects.get(timeout=10).value == ADMINISTRATIVE_ACTION
    assert connack(broker.port, device, password) in REFUSED_AT_CONNECT
    assert (await accounts.get_client(device) or {}).get("disabled") is True
    # Revoking again is no error; the device stays registered.
    assert (await api.delete(f"/v1/devices/{device}/credentials")).status_code == 204
    assert (await api.get(f"/v1/devices/{device}")).status_code == 200
    restored = await api.post(f"/v1/devices/{device}/credentials")
    assert restored.status_code == 200
    assert connack(broker.port, device, restored.json()["password"]) == 0
    missing = await api.delete(f"/v1/devices/{unique('nobody')}/credentials")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM


async def test_removing_a_device_removes_its_account(
    api: httpx.AsyncClient, broker: Broker, accounts: DeviceAccounts
) -> None:
    device, password = await register(api)
    with connected(broker.port, device, password) as session:
        removed = await api.delete(f"/v1/devices/{device}")
        assert removed.status_code == 204, removed.text
        assert session.disconnects.get(timeout=10).value == ADMINISTRATIVE_ACTION
    assert await accounts.get_client(device) is None
    assert connack(broker.port, device, password) in REFUSED_AT_CONNECT
    assert (await api.get(f"/v1/devices/{device}")).status_code == 404
    again = await api.delete(f"/v1/devices/{device}")
    assert again.status_code == 404 and again.headers["content-type"] == PROBLEM
    # The id is free again, with a new account.
    _, fresh = await register(api, id=device)
    assert connack(broker.port, device, fresh) == 0


async def test_the_gateway_account_reads_and_cannot_publish(broker: Broker, accounts: DeviceAccounts) -> None:
    with connected(broker.port, GATEWAY_USER, GATEWAY_PASSWORD) as gateway:
        assert gateway.publish(telemetry(unique("any")), b'{"currentLevel": 1.0}') == NOT_AUTHORIZED
        assert gateway.publish("$CONTROL/dynamic-security/v1", b'{"commands": []}') == NOT_AUTHORIZED
        assert gateway.publish("elsewhere", b"x") == NOT_AUTHORIZED
        assert (
            gateway.subscribe("#", "$share/g/#", "$CONTROL/dynamic-security/#", "$SYS/#")
            == [NOT_AUTHORIZED] * 4
        )


async def test_a_device_id_cannot_take_over_another_account(
    api: httpx.AsyncClient, broker: Broker, accounts: DeviceAccounts
) -> None:
    # Another account's name, or the prefix of the system's own client ids (see test_mqtt_abuse).
    for taken in (GATEWAY_USER, "admin", unique("ioc-gateway")):
        response = await api.post("/v1/devices", json=device_body(id=taken))
        assert response.status_code == 409, response.text
        assert response.headers["content-type"] == PROBLEM
        assert (await api.get(f"/v1/devices/{taken}")).status_code == 404
    assert connack(broker.port, GATEWAY_USER, GATEWAY_PASSWORD) == 0
    assert connack(broker.port, "admin", broker.admin_password) == 0


async def test_changing_a_device(api: httpx.AsyncClient) -> None:
    device, _ = await register(api)
    changed = await api.patch(
        f"/v1/devices/{device}",
        json={
            "name": "Trạm mới",
            "district": None,
            "location": {"lat": 21.03, "lon": 105.85},
            "thresholds": {"currentLevel": {"warn_above": 2.5, "crit_above": 4.0}},
        },
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["name"] == "Trạm mới" and body["district"] is None
    assert body["location"] == {"lat": 21.03, "lon": 105.85}
    assert body["thresholds"] == {"currentLevel": {"warn_above": 2.5, "crit_above": 4.0}}
    assert body["city"] == CITY and "credentials" not in body
    only_name = await api.patch(f"/v1/devices/{device}", json={"name": "Trạm"})
    assert only_name.json()["thresholds"] == body["thresholds"] and only_name.json()["name"] == "Trạm"
    for bad in (
        {"thresholds": {"voltage": {"warn_above": 1}}},
        {"thresholds": {"currentLevel": {"too_high": 1}}},
        {"location": None},
        {"location": {"lat": 91, "lon": 0}},
        {"city": "da-nang"},
    ):
        response = await api.patch(f"/v1/devices/{device}", json=bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.headers["content-type"] == PROBLEM
    missing = await api.patch(f"/v1/devices/{unique('nobody')}", json={"name": "x"})
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM


async def test_without_device_accounts_registration_has_no_credentials(admin: httpx.AsyncClient) -> None:
    body = device_body()
    created = await admin.post("/v1/devices", json=body)
    assert created.status_code == 201 and "credentials" not in created.json()
    for method in ("POST", "DELETE"):
        response = await admin.request(method, f"/v1/devices/{body['id']}/credentials")
        assert response.status_code == 404 and "IOC_MQTT_ADMIN_URL" in response.json()["detail"]
    assert (await admin.delete(f"/v1/devices/{body['id']}")).status_code == 204


async def test_telemetry_flows_through_a_read_only_gateway(
    api: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    broker: Broker,
    accounts: DeviceAccounts,
    gateways: Callable[..., ComponentProcess],
) -> None:
    city = unique("gwcred")[:32]
    gateway = gateways(
        unique("gateway-credentials"),
        IOC_MQTT_URL=f"mqtt://{GATEWAY_USER}:{GATEWAY_PASSWORD}@127.0.0.1:{broker.port}",
        IOC_GATEWAY_CITIES=json.dumps([city]),
        IOC_GATEWAY_CLIENT_ID=unique("ioc-gateway"),
        IOC_GATEWAY_SHARE_GROUP=unique("gw"),
    )
    await gateway.wait_for_log("gateway health listening")
    device, password = await register(api, city=city)
    with connected(broker.port, device, password) as session:
        assert (
            session.publish(telemetry(device, city=city), b'{"currentLevel": 2.25, "rainfall": 3}')
            in ACCEPTED
        )

    async def latest() -> dict[str, Any] | None:
        found: dict[str, Any] | None = (await admin.get(f"/v1/devices/{device}")).json()["latest"]
        return found

    reading = await wait_until(latest, timeout=60, what="the reading through the read-only gateway")
    assert reading["metrics"]["currentLevel"] == 2.25


async def test_the_compose_broker_entrypoint(tmp_path: Path) -> None:
    """deploy/mosquitto/entrypoint.sh with a configuration of this machine: the admin is created
    once, the gateway and simulator accounts on every start with the passwords of that start."""
    port, provision_port = free_port(), free_port()
    dynsec = tmp_path / "dynamic-security.json"
    config = tmp_path / "mosquitto.conf"
    (tmp_path / "data").mkdir()
    config.write_text(shipped_config(port, dynsec, tmp_path / "data"))
    log = tmp_path / "entrypoint.log"
    env = {
        **os.environ,
        "MOSQUITTO_CONF": str(config),
        "MQTT_PROVISION_PORT": str(provision_port),
        "MQTT_ADMIN_PASSWORD": "admin-secret",
        "MQTT_SIMULATOR_PASSWORD": "sim-secret",
        "MQTT_SIMULATOR_CITY": CITY,
    }
    script = str(ROOT / "deploy" / "mosquitto" / "entrypoint.sh")

    def start(gateway_password: str) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["sh", script],
                env={**env, "MQTT_GATEWAY_PASSWORD": gateway_password},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(port, process, log, timeout=40)
        return process

    def stop(process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        process.wait(timeout=20)

    process = await asyncio.to_thread(start, "gw-one")
    try:
        with connected(port, "ioc-gateway", "gw-one") as gateway:
            assert gateway.subscribe(f"$share/g/ioc/v1/{CITY}/+/+/telemetry") == [1]
            assert gateway.publish(telemetry("x"), b"{}") == NOT_AUTHORIZED
            with connected(port, "ioc-simulator", "sim-secret") as simulator:
                assert simulator.publish(telemetry("sim-1"), b'{"currentLevel": 1}') in ACCEPTED
                assert simulator.publish(telemetry("sim-1", city=OTHER_CITY), b"{}") == NOT_AUTHORIZED
            assert gateway.receive_until(telemetry("sim-1"), b'{"currentLevel": 1}')
        assert connack(port, None, None) in REFUSED_AT_CONNECT
        assert connack(port, "admin", "admin-secret") == 0
    finally:
        stop(process)
    process = await asyncio.to_thread(start, "gw-two")
    try:
        assert connack(port, "ioc-gateway", "gw-one") in REFUSED_AT_CONNECT
        assert connack(port, "ioc-gateway", "gw-two") == 0
        assert connack(port, "admin", "admin-secret") == 0
    finally:
        stop(process)


async def test_registration_while_the_broker_is_down(
    api: httpx.AsyncClient, broker: Broker, credentials_api: str
) -> None:
    broker.stop()
    try:
        body = device_body()
        started = time.monotonic()
        refused = await api.post("/v1/devices", json=body)
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == PROBLEM and "not registered" in refused.json()["detail"]
        assert time.monotonic() - started < 20
        assert (await api.get(f"/v1/devices/{body['id']}")).status_code == 404
        ready = (await api.get("/ready")).json()
        assert ready["status"] == "degraded" and ready["checks"]["database"] == "ok"
        assert ready["checks"]["device_accounts"].startswith("unavailable")
    finally:
        broker.start()

    async def recovered() -> bool | None:
        return True if (await api.get("/ready")).json()["status"] == "ok" else None

    await wait_until(recovered, timeout=30, what="the API to reconnect to the broker", interval=0.2)
    device, password = await register(api, id=body["id"])
    assert connack(broker.port, device, password) == 0
