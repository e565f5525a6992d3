"""Per-device MQTT credentials against a real Mosquitto with the dynamic-security plugin.

The module runs a broker of its own (anonymous clients refused, the plugin loaded, its file in a
temporary directory) and an `ioc api` whose IOC_MQTT_ADMIN_URL points at it; devices, the gateway
and the simulator connect to that broker as the compose deployment has them connect.
"""

from __future__ import annotations

import asyncio
import getpass
import glob
import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from api.device_accounts import DeviceAccounts
from tests.integration.conftest import ADMIN_KEY, System, free_port
from tests.integration.harness import ComponentProcess, unique, wait_until

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "application/problem+json"
NOT_AUTHORIZED = 135
# PUBACK reason codes of an accepted message: "success", "no matching subscribers".
ACCEPTED = {0, 16}
# Refusals of a CONNECT for bad credentials: "bad user name or password" or "not authorized".
REFUSED_AT_CONNECT = {134, 135}
ADMINISTRATIVE_ACTION = 152
GATEWAY_USER = "ioc-gateway"
GATEWAY_PASSWORD = secrets.token_urlsafe(18)
CITY = unique("cred")[:32]
OTHER_CITY = unique("other")[:32]


def _plugin() -> str:
    candidates = [*sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"))]
    candidates.append("/usr/lib/mosquitto_dynamic_security.so")
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    pytest.fail("Mosquitto's dynamic-security plugin is not installed (`make services` installs it)")


def _program(name: str) -> str:
    found = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if found is None:
        pytest.fail(f"{name} is not installed (`make services` installs it)")
    return found


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the broker exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the broker did not listen on {port} within {timeout}s:\n{log.read_text()}")


def _broker_config(port: int, dynsec: Path) -> str:
    # `user`: run as whoever runs the tests; as root the broker would otherwise switch to the
    # mosquitto user, which may not rewrite the plugin's file (the plugin only logs that).
    return "\n".join(
        [
            f"listener {port} 127.0.0.1",
            "allow_anonymous false",
            f"plugin {_plugin()}",
            f"plugin_opt_config_file {dynsec}",
            f"user {getpass.getuser()}",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "",
        ]
    )


class Broker:
    """A Mosquitto of our own with the dynamic-security plugin; restartable, state kept."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.admin_password = secrets.token_urlsafe(18)
        self.directory = directory
        self.log = directory / "broker.log"
        self._config = directory / "mosquitto.conf"
        dynsec = directory / "dynamic-security.json"
        initialised = subprocess.run(
            [_program("mosquitto_ctrl"), "dynsec", "init", str(dynsec), "admin", self.admin_password],
            capture_output=True,
            text=True,
            timeout=30,
        )
        output = initialised.stdout + initialised.stderr
        assert dynsec.exists(), f"mosquitto_ctrl dynsec init failed:\n{output}"
        self._config.write_text(_broker_config(self.port, dynsec))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"mqtt://admin:{self.admin_password}@127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [_program("mosquitto"), "-c", str(self._config)], stdout=log, stderr=subprocess.STDOUT
            )
        _wait_for_port(self.port, self._process, self.log)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=20)
            self._process = None


class Session:
    """One MQTT v5 connection: its CONNACK, the broker's PUBACK reason codes, what it receives."""

    def __init__(
        self, port: int, username: str | None, password: str | None, *, will: str | None = None
    ) -> None:
        self.port = port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("cred"), protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will, b"offline", qos=1, retain=True)
        self.connacks: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self._pubacks: dict[int, ReasonCode] = {}
        self._acked = threading.Condition()
        self.client.on_connect = lambda c, u, f, code, p: self.connacks.put(code)
        self.client.on_disconnect = lambda c, u, f, code, p: self.disconnects.put(code)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self._subacks.put(list(codes))
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.on_publish = self._on_publish

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, code: ReasonCode, props: Any) -> None:
        with self._acked:
            self._pubacks[mid] = code
            self._acked.notify_all()

    def open(self) -> ReasonCode:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        code = self.connacks.get(timeout=10)
        if code.is_failure:
            self.close()
        return code

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """The broker's PUBACK reason code for one QoS-1 message."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            acked = self._acked.wait_for(lambda: info.mid in self._pubacks, timeout=10)
            assert acked, f"no PUBACK on {topic}"
            return int(self._pubacks.pop(info.mid).value)

    def subscribe(self, *filters: str) -> list[int]:
        self.client.subscribe([(f, 1) for f in filters])
        return [int(code.value) for code in self._subacks.get(timeout=10)]

    def receive_until(self, topic: str, payload: bytes, timeout: float = 10) -> list[tuple[str, bytes]]:
        """Everything received up to and including `payload` on `topic`."""
        received = []
        deadline = time.monotonic() + timeout
        while True:
            item = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            received.append(item)
            if item == (topic, payload):
                return received


@contextmanager
def connected(port: int, username: str | None, password: str | None, **kwargs: Any) -> Iterator[Session]:
    session = Session(port, username, password, **kwargs)
    code = session.open()
    assert not code.is_failure, f"{username} could not connect: {code}"
    try:
        yield session
    finally:
        session.close()


def connack(port: int, username: str | None, password: str | None) -> int:
    session = Session(port, username, password)
    code = session.open()
    if not code.is_failure:
        session.close()
    return int(code.value)


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
    assert credentials["username"] == body["id"] and len(credentials["password"]) >= 32
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
        assert new["username"] == device and new["password"] != old
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
    for taken in (GATEWAY_USER, "admin"):
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
    config.write_text(_broker_config(port, dynsec))
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
        _wait_for_port(port, process, log, timeout=40)
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
