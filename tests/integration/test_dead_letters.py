"""Replayable dead letters against the real services: a device nobody registered publishes over
MQTT, its letter names it and keeps the payload byte for byte; once the device is registered a
replay stores its reading once and makes it the device's latest state; a letter is replayed once
however often, and however concurrently, it is asked for; bulk replays go on in bounded batches."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.conftest import ADMIN_HEADERS, SESSION_CITY, System, free_port
from tests.integration.harness import ComponentProcess, publish, unique, wait_until

LOCATION = {"lat": 21.0285, "lon": 105.8542}


def topic_of(device: str) -> str:
    return f"ioc/v1/{SESSION_CITY}/flood/{device}/telemetry"


async def letters_of(admin: httpx.AsyncClient, device: str, count: int) -> list[dict[str, Any]]:
    """The device's dead letters, oldest first, once there are `count` of them."""

    async def listed() -> list[dict[str, Any]] | None:
        page = await admin.get("/v1/dead-letters", params={"device_id": device, "limit": 1000})
        assert page.status_code == 200, page.text
        items = page.json()["items"]
        return sorted(items, key=lambda item: int(item["id"])) if len(items) >= count else None

    letters = await wait_until(listed, timeout=30, what=f"{count} dead letters of {device}")
    assert len(letters) == count
    return letters


async def register(admin: httpx.AsyncClient, device: str) -> None:
    body = {"id": device, "city": SESSION_CITY, "domain": "flood", "location": LOCATION}
    response = await admin.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text


async def stored_readings(database_url: str, device: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        return list(
            await connection.fetch(
                "SELECT ts, current_level FROM readings_flood WHERE device_id = $1 ORDER BY ts", device
            )
        )
    finally:
        await connection.close()


async def replay(admin: httpx.AsyncClient, letter_id: str) -> dict[str, Any]:
    response = await admin.post(f"/v1/dead-letters/{letter_id}/replay")
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def replay_matching(admin: httpx.AsyncClient, **selection: Any) -> dict[str, Any]:
    response = await admin.post("/v1/dead-letters/replay", json=selection)
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_an_unknown_devices_letter_is_replayed_once_after_it_is_registered(
    system: System, admin: httpx.AsyncClient
) -> None:
    device = unique("dl-flood")
    ts = (datetime.now(UTC) - timedelta(minutes=2)).replace(microsecond=0)
    publish(topic_of(device), json.dumps({"ts": ts.isoformat(), "currentLevel": 1.25}).encode())
    [letter] = await letters_of(admin, device, 1)
    assert (letter["reason"], letter["device_id"], letter["topic"]) == (
        "unknown_device",
        device,
        topic_of(device),
    )
    assert letter["replayable"] is True and letter["replayed_at"] is None

    # Still unknown: refused again, and the letter says why.
    assert await replay(admin, letter["id"]) == {"replayed": 0, "refused": 1, "next": None}
    refused = (await admin.get(f"/v1/dead-letters/{letter['id']}")).json()
    assert refused["replay_reason"] == "unknown_device" and refused["replayed_at"] is None

    await register(admin, device)
    assert await replay(admin, letter["id"]) == {"replayed": 1, "refused": 0, "next": None}

    async def latest() -> dict[str, Any] | None:
        body = (await admin.get(f"/v1/devices/{device}")).json()
        return body["latest"] if body.get("latest") else None

    state = await wait_until(
        latest, timeout=30, what=f"the replayed reading as the latest state\n{system.logs()}"
    )
    assert state["metrics"] == {"currentLevel": 1.25}
    assert datetime.fromisoformat(state["ts"]) == ts

    # Once: asked again, alone or by filter, it is not sent again.
    assert await replay(admin, letter["id"]) == {"replayed": 0, "refused": 0, "next": None}
    assert await replay_matching(admin, device_id=device) == {"replayed": 0, "refused": 0, "next": None}
    assert [(r["ts"], r["current_level"]) for r in await stored_readings(system.database_url, device)] == [
        (ts, 1.25)
    ]
    replayed = (await admin.get(f"/v1/dead-letters/{letter['id']}")).json()
    assert replayed["replayed_at"] is not None and replayed["replay_reason"] is None
    flags = replayed["mqtt"]
    assert (flags["qos"], flags["retain"], flags["dup"]) == (1, False, False) and flags["packet_id"] > 0
    listed = (await admin.get("/v1/dead-letters", params={"device_id": device, "replayed": "false"})).json()
    assert listed["items"] == []

    audit = await admin.get(
        "/v1/audit", params={"action": "dead_letter.replayed", "object_id": letter["id"], "limit": 10}
    )
    assert audit.status_code == 200, audit.text
    entries = audit.json()["items"]
    assert [(e["detail"]["replayed"], e["detail"]["refused"]) for e in entries] == [(0, 0), (1, 0), (0, 1)]
    assert entries[1]["object"] == {"type": "dead_letter", "id": letter["id"]}

    missing = await admin.post("/v1/dead-letters/999999999999/replay")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


async def test_a_letter_replayed_twice_and_concurrently_is_stored_once(
    system: System, admin: httpx.AsyncClient
) -> None:
    device = unique("dl-twice")
    ts = (datetime.now(UTC) - timedelta(minutes=3)).replace(microsecond=0)
    publish(topic_of(device), json.dumps({"ts": ts.isoformat(), "currentLevel": 2.5}).encode())
    # No time of its own: stamped with its receive time, which the replay keeps.
    publish(topic_of(device), b'{"currentLevel": 0.75}')
    # Dead letters carry no key, so the two may be stored in either order.
    letters = await letters_of(admin, device, 2)
    [timed] = [letter for letter in letters if '"ts"' in letter["payload"]]
    [untimed] = [letter for letter in letters if letter is not timed]
    await register(admin, device)

    answers = await asyncio.gather(
        replay(admin, timed["id"]),
        replay(admin, timed["id"]),
        replay_matching(admin, device_id=device),
        replay_matching(admin, device_id=device),
    )
    assert sum(answer["replayed"] for answer in answers) == 2
    assert sum(answer["refused"] for answer in answers) == 0

    # A replay whose commit was lost after the bus took its records sends them again: the
    # readings tables still store each once.
    connection = await asyncpg.connect(system.database_url)
    try:
        await connection.execute("UPDATE dead_letters SET replayed_at = NULL WHERE device_id = $1", device)
    finally:
        await connection.close()
    assert await replay_matching(admin, device_id=device) == {"replayed": 2, "refused": 0, "next": None}

    # A reading published after the second replay is stored after its records (one device, one
    # partition, in order); the gateway may take a moment to learn of the registration, so the
    # sentinel is published again (the same reading: stored once) until it is stored.
    sentinel = datetime.now(UTC).replace(microsecond=0)
    sentinel_payload = json.dumps({"ts": sentinel.isoformat(), "currentLevel": 3.0}).encode()

    async def sentinel_stored() -> list[asyncpg.Record] | None:
        rows = await stored_readings(system.database_url, device)
        if any(r["ts"] == sentinel for r in rows):
            return rows
        publish(topic_of(device), sentinel_payload)
        return None

    rows = await wait_until(sentinel_stored, timeout=60, interval=1.0, what="the reading after the replays")
    received_at = datetime.fromisoformat(untimed["received_at"])
    assert sorted((r["ts"], r["current_level"]) for r in rows) == sorted(
        [(ts, 2.5), (received_at, 0.75), (sentinel, 3.0)]
    )


@pytest.fixture
async def small_batch_api(system: System, log_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """An API of the same system whose replays take two letters at most."""
    port = free_port()
    env = {**system.env, "IOC_API_PORT": str(port), "IOC_DEAD_LETTER_REPLAY_BATCH": "2"}
    api = ComponentProcess("api", env, log_dir, name=unique("api-replay-batch"))
    api.start()
    try:
        await api.wait_for_log("API listening")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=ADMIN_HEADERS, timeout=30
        ) as client:
            yield client
    finally:
        api.stop()


async def test_bulk_replay_by_device_goes_on_in_bounded_batches(
    system: System, admin: httpx.AsyncClient, small_batch_api: httpx.AsyncClient
) -> None:
    device, other = unique("dl-bulk"), unique("dl-other")
    start = (datetime.now(UTC) - timedelta(minutes=10)).replace(microsecond=0)
    for minute in range(3):
        ts = (start + timedelta(minutes=minute)).isoformat()
        publish(topic_of(device), json.dumps({"ts": ts, "currentLevel": 1.0 + minute}).encode())
    publish(topic_of(other), json.dumps({"ts": start.isoformat(), "currentLevel": 9.0}).encode())
    letters = await letters_of(admin, device, 3)
    [other_letter] = await letters_of(admin, other, 1)
    await register(admin, device)
    await register(admin, other)

    # Filters that match none of them take none.
    assert await replay_matching(small_batch_api, device_id=device, reason="out_of_range") == {
        "replayed": 0,
        "refused": 0,
        "next": None,
    }
    earliest = min(datetime.fromisoformat(letter["received_at"]) for letter in letters).isoformat()
    assert (await replay_matching(small_batch_api, device_id=device, to=earliest))["replayed"] == 0

    first = await replay_matching(small_batch_api, device_id=device, **{"from": earliest})
    assert (first["replayed"], first["refused"]) == (2, 0) and first["next"] is not None
    rest = await replay_matching(
        small_batch_api, device_id=device, cursor=first["next"], **{"from": earliest}
    )
    assert rest == {"replayed": 1, "refused": 0, "next": None}

    async def all_stored() -> list[asyncpg.Record] | None:
        rows = await stored_readings(system.database_url, device)
        return rows if len(rows) == 3 else None

    rows = await wait_until(all_stored, timeout=30, what="the three replayed readings")
    assert [r["current_level"] for r in rows] == [1.0, 2.0, 3.0]
    # The other device's letter was not taken.
    untouched = (await admin.get(f"/v1/dead-letters/{other_letter['id']}")).json()
    assert untouched["replayed_at"] is None and untouched["replay_attempted_at"] is None


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"from": "yesterday"}, 422),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, 400),
        ({"from": "0001-01-01T00:00:00+00:00"}, 400),
        ({"device": "x"}, 422),
        ({"device_id": "no spaces"}, 422),
        ({"cursor": "!!"}, 400),
        ([1, 2], 422),
    ],
)
async def test_a_bad_replay_request_is_a_client_error(
    admin: httpx.AsyncClient, body: Any, status: int
) -> None:
    response = await admin.post("/v1/dead-letters/replay", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"


async def test_replay_needs_an_admin_key_without_a_scope_limit(
    system: System, admin: httpx.AsyncClient
) -> None:
    keys = {}
    for name, body in {
        "scoped": {"role": "admin", "cities": [SESSION_CITY]},
        "operator": {"role": "operator"},
    }.items():
        made = await admin.post("/v1/api-keys", json=body)
        assert made.status_code == 201, made.text
        keys[name] = made.json()["key"]
    for name, status in (("scoped", 403), ("operator", 403)):
        async with httpx.AsyncClient(base_url=system.api_url, headers={"X-API-Key": keys[name]}) as client:
            assert (await client.post("/v1/dead-letters/replay", json={})).status_code == status
            assert (await client.post("/v1/dead-letters/1/replay")).status_code == status
    async with httpx.AsyncClient(base_url=system.api_url) as anonymous:
        assert (await anonymous.post("/v1/dead-letters/replay")).status_code == 401


async def test_a_payload_that_is_not_utf_8_round_trips_byte_for_byte(admin: httpx.AsyncClient) -> None:
    device = unique("dl-bytes")
    payload = b'\xff\xfe{"currentLevel": 1}\x00\x80' + bytes(range(256)) * 200  # 51 KiB, not UTF-8
    oversized = b"\x80" * 70_000
    publish(topic_of(device), payload)
    publish(topic_of(device), oversized)
    # Both are refused as from an unknown device (the registry is asked before the payload is read).
    by_size = {letter["payload_size"]: letter for letter in await letters_of(admin, device, 2)}
    kept, cut = by_size[len(payload)], by_size[len(oversized)]
    assert kept["reason"] == cut["reason"] == "unknown_device"
    one = (await admin.get(f"/v1/dead-letters/{kept['id']}")).json()
    assert base64.b64decode(one["payload_base64"]) == payload
    assert one["payload_size"] == len(payload) and one["replayable"] is True
    too_large = (await admin.get(f"/v1/dead-letters/{cut['id']}")).json()
    assert base64.b64decode(too_large["payload_base64"]) == oversized[: 64 * 1024]
    assert too_large["payload_size"] == 70_000 and too_large["replayable"] is False
    # Only the whole payload is replayed: the cut one is not taken, the other is refused again.
    assert await replay_matching(admin, device_id=device) == {"replayed": 0, "refused": 1, "next": None}


@pytest.mark.parametrize("qos", [0, 1])
async def test_a_letter_keeps_the_mqtt_5_properties_its_publisher_set(
    admin: httpx.AsyncClient, qos: int
) -> None:
    device = unique("dl-props")
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.PayloadFormatIndicator = 1
    properties.ContentType = "application/senml+json"
    properties.ResponseTopic = f"vendor/{device}/replies"
    properties.CorrelationData = b"\x00\x01req-7"
    properties.UserProperty = [("firmware", "2.4.1"), ("vùng", "Lê Chân"), ("firmware", "dup")]
    publish(topic_of(device), b'{"currentLevel": 1.5}', qos=qos, properties=properties)
    plain = unique("dl-noprops")
    publish(topic_of(plain), b'{"currentLevel": 1.5}', qos=qos, properties=Properties(PacketTypes.PUBLISH))

    [letter] = await letters_of(admin, device, 1)
    one = (await admin.get(f"/v1/dead-letters/{letter['id']}")).json()
    assert one["reason"] == "unknown_device" and one["mqtt"]["qos"] == qos
    assert one["mqtt"]["properties"] == {
        "payload_format_indicator": 1,
        "message_expiry_interval": None,
        "content_type": "application/senml+json",
        "response_topic": f"vendor/{device}/replies",
        "correlation_data_base64": base64.b64encode(b"\x00\x01req-7").decode(),
        "user_properties": [["firmware", "2.4.1"], ["vùng", "Lê Chân"], ["firmware", "dup"]],
        "undecoded_base64": None,
    }
    [without] = await letters_of(admin, plain, 1)
    assert (await admin.get(f"/v1/dead-letters/{without['id']}")).json()["mqtt"]["properties"] is None
