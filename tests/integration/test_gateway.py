"""The gateway's promises against the real services: every rejection dead-lettered with its
reason and listed by the API, exact counts in a mixed stream, repeats stored once, device status
from the status topic and from silence, two gateways sharing one subscription."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer

from tests.integration.conftest import (
    ADMIN_HEADERS,
    FAST_OFFLINE_DOMAIN,
    FAST_OFFLINE_S,
    SESSION_CITY,
    System,
)
from tests.integration.harness import Publisher, publish, tail_topic, unique, wait_until

LOCATION = {"lat": 20.8631, "lon": 106.6720}


async def register(admin: httpx.AsyncClient, domain: str, city: str = SESSION_CITY) -> str:
    device_id = unique(f"{domain}-gw")
    response = await admin.post(
        "/v1/devices", json={"id": device_id, "city": city, "domain": domain, "location": LOCATION}
    )
    assert response.status_code == 201, response.text
    return device_id


async def dead_letters_of(admin: httpx.AsyncClient, marker: str) -> list[dict[str, Any]]:
    """Every stored dead letter whose topic contains `marker`, following the cursor."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = await admin.get("/v1/dead-letters", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        found.extend(item for item in body["items"] if marker in item["topic"])
        cursor = body["next"]
        if cursor is None:
            return found


async def count_readings(database_url: str, table: str, device_ids: list[str]) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return int(
            await connection.fetchval(f"SELECT count(*) FROM {table} WHERE device_id = ANY($1)", device_ids)
        )
    finally:
        await connection.close()


async def test_every_rejection_reason_is_dead_lettered_and_listed(
    system: System, admin: httpx.AsyncClient
) -> None:
    flood = await register(admin, "flood")
    other_city = await register(admin, "flood", city=unique("elsewhere")[:32])
    future = (datetime.now(tz=UTC) + timedelta(minutes=10)).isoformat()
    topic = f"ioc/v1/{SESSION_CITY}/flood/{flood}/telemetry"
    cases = {
        "payload_too_large": (topic, b'{"currentLevel": 1, "pad": "' + b"x" * 70_000 + b'"}'),
        "malformed_payload": (topic, b"{not json"),
        "unknown_device": (
            f"ioc/v1/{SESSION_CITY}/flood/{unique('nobody')}/telemetry",
            b'{"currentLevel": 1}',
        ),
        "device_mismatch": (f"ioc/v1/{SESSION_CITY}/grid/{flood}/telemetry", b'{"voltage": 230}'),
        "unknown_metric": (topic, b'{"voltage": 230}'),
        "out_of_range": (topic, b'{"currentLevel": 101}'),
        "not_finite": (topic, b'{"currentLevel": NaN}'),
        "unit_mismatch": (topic, b'[{"n": "currentLevel", "u": "V", "v": 1}]'),
        "bad_timestamp": (topic, b'{"currentLevel": 1, "ts": "yesterday"}'),
        "future_timestamp": (topic, json.dumps({"currentLevel": 1, "ts": future}).encode()),
        "no_metrics": (topic, b"{}"),
        "bad_status": (f"ioc/v1/{SESSION_CITY}/flood/{flood}/status", b"sleeping"),
    }
    for published_topic, payload in cases.values():
        publish(published_topic, payload)
    # The device is registered for another city than the topic says.
    publish(f"ioc/v1/{SESSION_CITY}/flood/{other_city}/telemetry", b'{"currentLevel": 1}')

    async def all_listed() -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]] | None:
        letters = [
            *await dead_letters_of(admin, flood),
            *await dead_letters_of(admin, "nobody"),
            *await dead_letters_of(admin, other_city),
        ]
        by_reason = {letter["reason"]: letter for letter in letters}
        return (letters, by_reason) if set(cases) <= set(by_reason) and len(letters) >= 13 else None

    letters, by_reason = await wait_until(
        all_listed, timeout=30, what=f"dead letters for every reason\n{system.logs()}"
    )
    assert len(letters) == 13
    assert [letter["reason"] for letter in letters if other_city in letter["topic"]] == ["device_mismatch"]
    too_large = by_reason["payload_too_large"]
    assert too_large["payload_size"] > 64 * 1024 and len(too_large["payload"]) <= 4096
    assert by_reason["out_of_range"]["payload"] == '{"currentLevel": 101}'
    assert "101" in by_reason["out_of_range"]["detail"]
    for letter in by_reason.values():
        assert letter["received_at"] and letter["topic"].startswith("ioc/v1/")

    metrics = (await admin.get("/metrics")).text
    for reason in cases:
        assert f'ioc_dead_letters_total{{reason="{reason}"}}' in metrics
    async with httpx.AsyncClient() as client:
        gateway_metrics = (
            await client.get(f"{system.processes['gateway'].health_url}/metrics", headers=ADMIN_HEADERS)
        ).text
    assert 'ioc_gateway_rejected_total{reason="future_timestamp"}' in gateway_metrics


async def test_dead_letter_listing_needs_admin_and_a_valid_cursor(
    system: System, admin: httpx.AsyncClient
) -> None:
    async with httpx.AsyncClient(base_url=system.api_url) as anonymous:
        assert (await anonymous.get("/v1/dead-letters")).status_code == 401
    bad = await admin.get("/v1/dead-letters", params={"cursor": "!!not-a-cursor"})
    assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"
    assert (await admin.get("/v1/dead-letters", params={"limit": 0})).status_code == 422


async def test_mixed_stream_stores_exactly_the_good_ones(system: System, admin: httpx.AsyncClient) -> None:
    devices = [await register(admin, "traffic") for _ in range(5)]
    rng = random.Random(11)
    start = datetime.now(tz=UTC) - timedelta(minutes=4)
    messages: list[tuple[str, bytes]] = []
    expected_bad: Counter[str] = Counter()
    good = 0
    for index in range(600):
        device = devices[index % len(devices)]
        topic = f"ioc/v1/{SESSION_CITY}/traffic/{device}/telemetry"
        ts = (start + timedelta(milliseconds=index * 200)).isoformat()
        kind = rng.choice(["good", "good", "good", "range", "json", "metric"])
        if kind == "good":
            payload = {"ts": ts, "seq": index, "intensity": rng.uniform(0, 100), "occupancy": 0.2}
            good += 1
        elif kind == "range":
            payload = {"ts": ts, "averageVehicleSpeed": 400}
            expected_bad["out_of_range"] += 1
        elif kind == "metric":
            payload = {"ts": ts, "fillingLevel": 0.5}
            expected_bad["unknown_metric"] += 1
        else:
            messages.append((topic, b'{"intensity": '))
            expected_bad["malformed_payload"] += 1
            continue
        messages.append((topic, json.dumps(payload).encode()))
    with Publisher() as publisher:
        publisher.publish_all(messages)

    await wait_until(
        lambda: _at_least(count_readings(system.database_url, "readings_traffic", devices), good),
        timeout=60,
        what=f"{good} good readings stored",
    )

    async def bad_counted() -> Counter[str] | None:
        letters: list[dict[str, Any]] = []
        for device in devices:
            letters.extend(await dead_letters_of(admin, device))
        counted = Counter(letter["reason"] for letter in letters)
        return counted if sum(counted.values()) >= sum(expected_bad.values()) else None

    counted = await wait_until(bad_counted, timeout=60, what="every bad message dead-lettered")
    assert counted == expected_bad
    assert await count_readings(system.database_url, "readings_traffic", devices) == good


async def _at_least(probe: Any, expected: int) -> bool | None:
    return True if await probe >= expected else None


async def test_repeats_without_ts_are_stored_once_by_seq(system: System, admin: httpx.AsyncClient) -> None:
    device = await register(admin, "water")
    topic = f"ioc/v1/{SESSION_CITY}/water/{device}/telemetry"
    for seq in (1, 1, 2, 1, 2, 3):
        publish(topic, json.dumps({"seq": seq, "pressure": 3.0 + seq / 10}).encode())
    # A reading without ts and without seq cannot be recognised as a repeat: each is stored.
    for _ in range(2):
        publish(topic, b'{"pressure": 2.5}')
    await wait_until(
        lambda: _at_least(count_readings(system.database_url, "readings_water", [device]), 5),
        timeout=30,
        what="the water readings stored",
    )
    connection = await asyncpg.connect(system.database_url)
    try:
        rows = await connection.fetch(
            "SELECT seq, pressure FROM readings_water WHERE device_id = $1 ORDER BY ts", device
        )
    finally:
        await connection.close()
    assert [r["seq"] for r in rows] == [1, 2, 3, None, None]


async def test_units_and_messages_of_one_instant_reach_storage(
    system: System, admin: httpx.AsyncClient
) -> None:
    """A SenML value in centimetres is stored in metres, and a second message at the same time
    with another metric joins the first one's row."""
    device = await register(admin, "flood")
    topic = f"ioc/v1/{SESSION_CITY}/flood/{device}/telemetry"
    ts = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(minutes=1)
    publish(topic, json.dumps([{"bt": ts.timestamp(), "n": "currentLevel", "u": "cm", "v": 45}]).encode())
    publish(topic, json.dumps({"ts": ts.isoformat(), "rainfall": 3.5}).encode())

    async def merged() -> list[tuple[Any, ...]] | None:
        connection = await asyncpg.connect(system.database_url)
        try:
            rows = await connection.fetch(
                "SELECT ts, current_level, rainfall FROM readings_flood WHERE device_id = $1", device
            )
        finally:
            await connection.close()
        found = [tuple(row) for row in rows]
        return found if found and found[0][2] is not None else None

    rows = await wait_until(merged, timeout=30, what=f"the merged reading\n{system.logs()}")
    assert rows == [(ts, 0.45, 3.5)]
    state = (await admin.get(f"/v1/devices/{device}")).json()
    assert state["latest"]["metrics"] == {"currentLevel": 0.45, "rainfall": 3.5}


async def _events_for(consumer: AIOKafkaConsumer, device_id: str, seen: list[dict[str, Any]]) -> None:
    batches = await consumer.getmany(timeout_ms=300)
    for messages in batches.values():
        for message in messages:
            event = json.loads(message.value)
            if event.get("subject") == device_id and event["type"].startswith("device."):
                seen.append(event)


async def test_status_topic_and_silence_set_status_and_emit_events(
    system: System, admin: httpx.AsyncClient
) -> None:
    consumer = await tail_topic(system.topics.events)
    try:
        device = await register(admin, FAST_OFFLINE_DOMAIN)
        base = f"ioc/v1/{SESSION_CITY}/{FAST_OFFLINE_DOMAIN}/{device}"
        seen: list[dict[str, Any]] = []

        async def status_is(expected: str) -> bool | None:
            await _events_for(consumer, device, seen)
            body = (await admin.get(f"/v1/devices/{device}")).json()
            return True if body["status"] == expected else None

        publish(f"{base}/status", b"online", retain=True)
        await wait_until(lambda: status_is("online"), timeout=20, what="online from the status topic")
        publish(f"{base}/status", b"offline", retain=True)
        await wait_until(lambda: status_is("offline"), timeout=20, what="offline from the status topic")
        publish(f"{base}/telemetry", b'{"fillingLevel": 0.4}')
        await wait_until(lambda: status_is("online"), timeout=20, what="online again from telemetry")
        # Then silence: the processor marks it offline after FAST_OFFLINE_S seconds.
        await wait_until(
            lambda: status_is("offline"), timeout=FAST_OFFLINE_S + 20, what="offline after silence"
        )

        async def four_events() -> list[dict[str, Any]] | None:
            await _events_for(consumer, device, seen)
            return seen if len(seen) >= 4 else None

        events = await wait_until(four_events, timeout=20, what="four status events on ioc.events")
        assert [(e["type"], e["data"]["cause"]) for e in events] == [
            ("device.online", "status_message"),
            ("device.offline", "status_message"),
            ("device.online", "telemetry"),
            ("device.offline", "inactivity"),
        ]
        for event in events:
            assert event["specversion"] == "1.0" and event["id"] and event["source"] and event["time"]
            assert event["data"]["city"] == SESSION_CITY and event["data"]["domain"] == FAST_OFFLINE_DOMAIN
        assert len({e["id"] for e in events}) == 4
    finally:
        await consumer.stop()
        publish(f"ioc/v1/{SESSION_CITY}/{FAST_OFFLINE_DOMAIN}/{device}/status", b"", retain=True)


async def test_two_gateways_share_the_subscription(
    system: System, admin: httpx.AsyncClient, gateways: Any
) -> None:
    city = unique("shared")[:32]
    group = unique("grp")
    settings = {"IOC_GATEWAY_CITIES": json.dumps([city]), "IOC_GATEWAY_SHARE_GROUP": group}
    first = gateways("gateway-a", IOC_GATEWAY_CLIENT_ID=unique("gw-a"), **settings)
    second = gateways("gateway-b", IOC_GATEWAY_CLIENT_ID=unique("gw-b"), **settings)
    await first.wait_for_log("gateway health listening")
    await second.wait_for_log("gateway health listening")
    devices = [await register(admin, "grid", city=city) for _ in range(10)]
    start = datetime.now(tz=UTC) - timedelta(minutes=4)
    messages = [
        (
            f"ioc/v1/{city}/grid/{devices[i % 10]}/telemetry",
            json.dumps(
                {"ts": (start + timedelta(milliseconds=i * 100)).isoformat(), "voltage": 230.0}
            ).encode(),
        )
        for i in range(2000)
    ]
    with Publisher() as publisher:
        publisher.publish_all(messages)
    await wait_until(
        lambda: _at_least(count_readings(system.database_url, "readings_grid", devices), 2000),
        timeout=60,
        what="2000 readings from two gateways",
    )
    assert await count_readings(system.database_url, "readings_grid", devices) == 2000
    received = []
    async with httpx.AsyncClient() as client:
        for gateway in (first, second):
            text = (await client.get(f"{gateway.health_url}/metrics", headers=ADMIN_HEADERS)).text
            received.append(_sample(text, "ioc_gateway_received_total"))
    assert sum(received) == 2000, received
    assert min(received) > 0, f"one gateway took everything: {received}"


def _sample(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")
