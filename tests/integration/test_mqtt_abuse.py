"""Hostile devices against the compose deployment's broker: a Mosquitto of this module's own with
the shipped configuration and the dynamic-security plugin, device accounts made as the API makes
them, and an `ioc gateway` reading this module's city through it into the session's pipeline.

Each abuse is answered: retained telemetry is a dead letter (`retained_telemetry`, counted by the
gateway); a payload over 64 KiB and a packet over 128 KiB are refused by the broker; a device
connecting with the gateway's (or the admin's, or a neighbour's) client id is refused before it
touches that session; publishing to a neighbour's topics or to anything of its own but telemetry
and status is refused. What the broker refuses never reaches the gateway, whose counters show
only what was let through. And the queue limits leave a gateway's backlog whole.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from api.broker_grants import device_acls, device_role
from api.device_accounts import DeviceAccounts
from tests.integration.conftest import ADMIN_HEADERS, System, free_port
from tests.integration.dynsec import ACCEPTED, NOT_AUTHORIZED, Broker, RawMqtt, connected
from tests.integration.harness import ComponentProcess, unique, wait_until

GATEWAY_USER = "ioc-gateway"
GATEWAY_PASSWORD = secrets.token_urlsafe(18)
GATEWAY_CLIENT_ID = unique("ioc-gateway")
CITY = unique("abuse")[:32]
LOCATION = {"lat": 21.0285, "lon": 105.8542}
PACKET_TOO_LARGE = 0x95
SESSION_TAKEN_OVER = 0x8E
QOS_NOT_SUPPORTED = 0x9B
# MQTT 3.1.1 CONNACK return code 5: not authorized.
REFUSED_V311 = 5


def topic(device_id: str, kind: str = "telemetry", city: str = CITY) -> str:
    return f"ioc/v1/{city}/flood/{device_id}/{kind}"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("abuse-broker"))
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
async def gateway(
    system: System, broker: Broker, accounts: DeviceAccounts, log_dir: Path
) -> AsyncIterator[ComponentProcess]:
    """An `ioc gateway` of this module's city, logged in to the module's broker as the compose
    gateway is, feeding the session's processor and API."""
    env = {
        **system.env,
        "IOC_MQTT_URL": f"mqtt://{GATEWAY_USER}:{GATEWAY_PASSWORD}@127.0.0.1:{broker.port}",
        "IOC_GATEWAY_CITIES": json.dumps([CITY]),
        "IOC_GATEWAY_CLIENT_ID": GATEWAY_CLIENT_ID,
        "IOC_GATEWAY_SHARE_GROUP": unique("abuse"),
        "IOC_GATEWAY_HEALTH_PORT": str(free_port()),
    }
    process = ComponentProcess("gateway", env, log_dir, name="gateway-abuse")
    process.start()
    try:
        await process.wait_for_log("gateway health listening")
        yield process
    finally:
        process.stop()


async def register(admin: httpx.AsyncClient, accounts: DeviceAccounts) -> tuple[str, str]:
    """A flood device of the module's city in the registry and on the broker: its id and password."""
    device_id = unique("abuse-dev")
    body = {"id": device_id, "city": CITY, "domain": "flood", "location": LOCATION}
    response = await admin.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text
    credentials = await accounts.create(device_id, CITY, "flood")
    return device_id, credentials.password


async def gateway_metrics(gateway: ComponentProcess) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=gateway.health_url, headers=ADMIN_HEADERS, timeout=5) as client:
        text = (await client.get("/metrics")).text
    return {
        match[1]: float(match[2])
        for match in re.finditer(r"^(ioc_gateway_\S+) ([0-9.e+]+)$", text, re.MULTILINE)
    }


async def latest(admin: httpx.AsyncClient, device_id: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = (await admin.get(f"/v1/devices/{device_id}")).json()["latest"]
    return found


@contextmanager
def raw(broker: Broker, *, level: int = 5) -> Iterator[RawMqtt]:
    client = RawMqtt(broker.port, level=level)
    try:
        yield client
    finally:
        client.close()


# -- tests ------------------------------------------------------------------------------------


async def test_retained_telemetry_is_a_dead_letter_and_is_counted(
    admin: httpx.AsyncClient, accounts: DeviceAccounts, broker: Broker, gateway: ComponentProcess
) -> None:
    device, password = await register(admin, accounts)
    with connected(broker.port, device, password) as session:
        # The broker cannot tell a retained reading from a retained status: it takes both.
        assert session.publish(topic(device), b'{"currentLevel": 7.5, "seq": 1}', retain=True) in ACCEPTED
        assert session.publish(topic(device, "status"), b"online", retain=True) in ACCEPTED
        assert session.publish(topic(device), b'{"currentLevel": 1.25, "seq": 2}') in ACCEPTED

    async def dead_lettered() -> list[dict[str, Any]] | None:
        page = (await admin.get("/v1/dead-letters", params={"reason": "retained_telemetry"})).json()
        return [item for item in page["items"] if item["topic"] == topic(device)] or None

    [letter] = await wait_until(dead_lettered, timeout=30, what="the retained reading's dead letter")
    assert json.loads(letter["payload"]) == {"currentLevel": 7.5, "seq": 1}
    reading = await wait_until(lambda: latest(admin, device), timeout=30, what="the plain reading")
    assert reading["metrics"] == {"currentLevel": 1.25}
    assert (await gateway_metrics(gateway))['ioc_gateway_rejected_total{reason="retained_telemetry"}'] >= 1

    async def online() -> bool | None:
        return (await admin.get(f"/v1/devices/{device}")).json()["status"] == "online" or None

    await wait_until(online, timeout=30, what="the retained status")


async def test_oversized_payloads_are_dead_letters_and_huge_or_qos_2_packets_are_refused(
    admin: httpx.AsyncClient, accounts: DeviceAccounts, broker: Broker, gateway: ComponentProcess
) -> None:
    device, password = await register(admin, accounts)
    before = await gateway_metrics(gateway)
    over_64k = b'{"currentLevel": 1, "pad": "' + b"x" * 100_000 + b'"}'
    for level in (5, 4):
        with raw(broker, level=level) as client:
            assert client.connect(device, device, password) == 0
            # Over the contract's 64 KiB but within the packet limit: on to the gateway's dead letter.
            client.publish(topic(device), over_64k)
            assert client.answer() == ("puback", 0)
            # A megabyte: refused as soon as the broker has read the packet's length, before the
            # rest (MQTT 3.1.1 has no reason codes: the connection just closes).
            client.publish(topic(device), b"x" * 1_048_576, send=1024)
            refusal = ("disconnect", PACKET_TOO_LARGE) if level == 5 else ("closed", None)
            assert client.answer() == refusal
            assert client.answer() == ("closed", None)
        with raw(broker, level=level) as client:
            # QoS 2 would have the broker hold each message until its publisher releases it.
            assert client.connect(device, device, password) == 0
            client.publish(topic(device), b'{"currentLevel": 9.5}', qos=2)
            refusal = ("disconnect", QOS_NOT_SUPPORTED) if level == 5 else ("closed", None)
            assert client.answer() == refusal
            assert client.answer() == ("closed", None)

    async def dead_lettered() -> list[dict[str, Any]] | None:
        page = (await admin.get("/v1/dead-letters", params={"reason": "payload_too_large"})).json()
        letters = [item for item in page["items"] if item["topic"] == topic(device)]
        return letters if len(letters) == 2 else None

    letters = await wait_until(dead_lettered, timeout=30, what="both oversized payloads' dead letters")
    assert all(letter["payload_size"] == len(over_64k) for letter in letters)
    after = await gateway_metrics(gateway)
    counted = 'ioc_gateway_rejected_total{reason="payload_too_large"}'
    assert after[counted] - before.get(counted, 0) == 2
    # Only those two reached the gateway: not the megabytes, not the QoS 2 messages.
    assert after["ioc_gateway_received_total"] - before["ioc_gateway_received_total"] == 2
    assert await latest(admin, device) is None


async def test_a_device_cannot_take_the_gateways_client_id(
    admin: httpx.AsyncClient, accounts: DeviceAccounts, broker: Broker, gateway: ComponentProcess
) -> None:
    device, password = await register(admin, accounts)
    neighbour, _ = await register(admin, accounts)
    assert accounts._client is not None
    taken = {
        "the gateway's": GATEWAY_CLIENT_ID,
        "the admin's": accounts._client._client_id.decode(),
        "a neighbour's": neighbour,
        "a random": unique("x"),
    }
    for level in (5, 4):
        for whose, client_id in taken.items():
            for clean in (True, False):
                with raw(broker, level=level) as client:
                    code = client.connect(client_id, device, password, clean=clean, session_expiry_s=3600)
                    assert code == (NOT_AUTHORIZED if level == 5 else REFUSED_V311), (level, whose, clean)
    # An empty client id, for the broker to assign one: not the device's either.
    for level in (5, 4):
        with raw(broker, level=level) as client:
            assert client.connect("", device, password) == (NOT_AUTHORIZED if level == 5 else REFUSED_V311)
    # The gateway kept its one connection and its session, and the admin its own.
    log = gateway.log_text()
    assert log.count("connected to MQTT broker") == 1 and "MQTT connection lost" not in log, log
    assert await accounts.get_client(device) is not None
    with connected(broker.port, device, password) as session:
        assert session.publish(topic(device), b'{"currentLevel": 3.5, "seq": 1}') in ACCEPTED
    reading = await wait_until(lambda: latest(admin, device), timeout=30, what="a reading after the attempts")
    assert reading["metrics"] == {"currentLevel": 3.5}


async def test_an_unbound_account_could_take_a_session_over_until_rotated(
    admin: httpx.AsyncClient, accounts: DeviceAccounts, broker: Broker
) -> None:
    """Why accounts are bound: Mosquitto hands a persistent session to whoever connects with its
    client id, whatever the username. An account as an earlier release made it (no binding, a
    grant of `…/{id}/#`) shows it; rotation and the grant narrowing bring it to today's rules."""
    device = unique("abuse-old")
    response = await admin.post(
        "/v1/devices", json={"id": device, "city": CITY, "domain": "flood", "location": LOCATION}
    )
    assert response.status_code == 201, response.text
    password = secrets.token_urlsafe(18)
    old_grant = {
        "acltype": "publishClientSend",
        "topic": f"ioc/v1/{CITY}/flood/{device}/#",
        "priority": 0,
        "allow": True,
    }
    for answer in await accounts._execute(
        [
            {"command": "createRole", "rolename": device_role(device), "acls": [old_grant]},
            {
                "command": "createClient",
                "username": device,
                "password": password,
                "roles": [{"rolename": device_role(device)}],
            },
        ]
    ):
        assert "error" not in answer, answer
    victim_id = unique("ioc-gateway")
    with raw(broker) as victim:
        assert (
            victim.connect(victim_id, GATEWAY_USER, GATEWAY_PASSWORD, clean=False, session_expiry_s=300) == 0
        )
        # QoS 1, no retained messages: only what the takeover does shows.
        assert victim.subscribe(f"$share/{unique('g')}/{topic('+')}", options=0x21) == 1
        with raw(broker) as thief:
            assert thief.connect(victim_id, device, password, clean=False, session_expiry_s=300) == 0
            assert thief.session_present  # the victim's subscriptions and queue are the thief's now
        # Mosquitto 2.0 closes the connection without a DISCONNECT ("session taken over").
        assert victim.answer() in {("closed", None), ("disconnect", SESSION_TAKEN_OVER)}

    assert await accounts.narrow_grants() >= 1
    answer = (await accounts._execute([{"command": "getRole", "rolename": device_role(device)}]))[0]
    grants = {(a["acltype"], a["topic"], a["allow"]) for a in answer["data"]["role"]["acls"]}
    assert grants == {(a["acltype"], a["topic"], a["allow"]) for a in device_acls(device, CITY, "flood")}
    rotated = await accounts.rotate(device, CITY, "flood")
    assert rotated.client_id == device
    with raw(broker) as victim:
        assert (
            victim.connect(victim_id, GATEWAY_USER, GATEWAY_PASSWORD, clean=False, session_expiry_s=300) == 0
        )
        with raw(broker) as thief:
            code = thief.connect(victim_id, device, rotated.password, clean=False, session_expiry_s=300)
            assert code == NOT_AUTHORIZED
        with raw(broker) as own:
            assert own.connect(device, device, rotated.password) == 0
            own.publish(f"ioc/v1/{CITY}/flood/{device}/anything-else", b"x")
            assert own.answer() == ("puback", NOT_AUTHORIZED)
        # Still connected: a PINGREQ is answered.
        victim.sock.sendall(b"\xc0\x00")
        assert victim.next_packet()[0] == 13


async def test_a_device_publishes_to_its_own_telemetry_and_status_only(
    admin: httpx.AsyncClient, accounts: DeviceAccounts, broker: Broker, gateway: ComponentProcess
) -> None:
    device, password = await register(admin, accounts)
    neighbour, _ = await register(admin, accounts)
    received = (await gateway_metrics(gateway))["ioc_gateway_received_total"]
    refused = [
        topic(neighbour),
        topic(neighbour, "status"),
        topic(device, city=unique("elsewhere")[:32]),
        f"ioc/v1/{CITY}/flood/{device}/anything-else",
        f"ioc/v1/{CITY}/flood/{device}/telemetry/more",
        f"ioc/v1/{CITY}/flood/{device}",
    ]
    with connected(broker.port, device, password) as session:
        for refused_topic in refused:
            assert session.publish(refused_topic, b'{"currentLevel": 9.9}') == NOT_AUTHORIZED, refused_topic
        # A retained "offline" on a neighbour's status would mark it offline for every later reader.
        assert session.publish(topic(neighbour, "status"), b"offline", retain=True) == NOT_AUTHORIZED
        assert session.publish(topic(device), b'{"currentLevel": 4.5, "seq": 1}') in ACCEPTED
    with raw(broker, level=4) as client:
        # MQTT 3.1.1: acknowledged and dropped.
        assert client.connect(device, device, password) == 0
        client.publish(topic(neighbour), b'{"currentLevel": 9.9}')
        assert client.answer() == ("puback", 0)
    reading = await wait_until(lambda: latest(admin, device), timeout=30, what="the device's own reading")
    assert reading["metrics"] == {"currentLevel": 4.5}
    assert (await gateway_metrics(gateway))["ioc_gateway_received_total"] - received == 1
    shown = (await admin.get(f"/v1/devices/{neighbour}")).json()
    assert shown["latest"] is None and shown["status"] != "offline"


async def test_the_queue_limits_keep_a_gateways_backlog_whole(
    accounts: DeviceAccounts, broker: Broker
) -> None:
    """Five times Mosquitto's default queue of 1000, which would drop the rest silently, queued for
    a gateway's session while it is away, then all delivered when it is back."""
    city = unique("backlog")[:32]
    device = unique("abuse-backlog")
    password = (await accounts.create(device, city, "flood")).password
    gateway_id, subscription = unique("ioc-gateway"), f"$share/{unique('g')}/ioc/v1/{city}/+/+/telemetry"
    with raw(broker) as away:
        assert (
            away.connect(gateway_id, GATEWAY_USER, GATEWAY_PASSWORD, clean=False, session_expiry_s=300) == 0
        )
        assert away.subscribe(subscription, options=0x09) == 1  # QoS 1, retain as published
    count = 5000
    with connected(broker.port, device, password) as session:
        infos = [
            session.client.publish(topic(device, city=city), json.dumps({"seq": i}).encode(), qos=1)
            for i in range(count)
        ]
        for info in infos:
            info.wait_for_publish(30)
    seen = receive_backlog(broker, gateway_id, count)
    assert seen == set(range(count)), f"{count - len(seen)} of {count} messages lost"


def receive_backlog(broker: Broker, client_id: str, count: int, timeout: float = 60) -> set[int]:
    """Come back as the gateway does (persistent session, Receive Maximum 10,000) and take what
    was queued, until `count` distinct messages or `timeout`."""
    seen: set[int] = set()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(GATEWAY_USER, GATEWAY_PASSWORD)
    client.on_message = lambda c, u, message: seen.add(json.loads(message.payload)["seq"])
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 300
    properties.ReceiveMaximum = 10_000
    client.connect("127.0.0.1", broker.port, 30, clean_start=False, properties=properties)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while len(seen) < count and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return seen
