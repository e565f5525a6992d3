"""One reading per domain flows device → Mosquitto → gateway → Kafka → processor → TimescaleDB → API."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from ioc_core.domains import DOMAINS
from tests.conftest import Figures
from tests.integration.conftest import SESSION_CITY, System
from tests.integration.harness import publish, tail_topic, unique, wait_until

CITY = SESSION_CITY
LOCATION = {"lat": 21.0285, "lon": 105.8542}


async def register(admin: httpx.AsyncClient, domain: str, **extra: Any) -> str:
    device_id = unique(f"{domain}-dev")
    response = await admin.post(
        "/v1/devices",
        json={"id": device_id, "city": CITY, "domain": domain, "location": LOCATION, **extra},
    )
    assert response.status_code == 201, response.text
    return device_id


async def latest_of(admin: httpx.AsyncClient, device_id: str) -> dict[str, Any] | None:
    response = await admin.get(f"/v1/devices/{device_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body if body["latest"] is not None else None


@pytest.mark.parametrize("domain", sorted(DOMAINS))
async def test_reading_reaches_the_api(
    domain: str, system: System, admin: httpx.AsyncClient, figures: Figures
) -> None:
    device_id = await register(admin, domain, name=f"{domain} test", district="Hoàn Kiếm")
    ts = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(seconds=1)
    metrics = DOMAINS[domain].sampler(random.Random(3), ts, 0.5)
    payload = json.dumps({"ts": ts.isoformat(), "seq": 1, **metrics}).encode()

    started = time.monotonic()
    publish(f"ioc/v1/{CITY}/{domain}/{device_id}/telemetry", payload)
    device = await wait_until(
        lambda: latest_of(admin, device_id),
        timeout=30,
        what=f"{domain} reading of {device_id} in the API\n{system.logs()}",
    )
    figures.latencies_s[domain] = time.monotonic() - started

    assert device["latest"]["metrics"] == pytest.approx(metrics)
    assert datetime.fromisoformat(device["latest"]["ts"]) == ts
    assert device["status"] == "online"
    assert device["last_seen"] is not None

    state = await admin.get("/v1/state", params={"city": CITY, "domain": domain})
    assert state.status_code == 200
    [item] = [i for i in state.json()["items"] if i["device_id"] == device_id]
    assert item["metrics"] == pytest.approx(metrics)
    assert item["location"] == LOCATION and item["city"] == CITY and item["domain"] == domain


async def test_repeated_reading_is_stored_once(system: System, admin: httpx.AsyncClient) -> None:
    device_id = await register(admin, "flood")
    topic = f"ioc/v1/{CITY}/flood/{device_id}/telemetry"
    ts = datetime.now(tz=UTC).replace(microsecond=0)
    for _ in range(3):
        publish(topic, json.dumps({"ts": ts.isoformat(), "seq": 9, "currentLevel": 1.5}).encode())
    later = (ts + timedelta(seconds=1)).isoformat()
    publish(topic, json.dumps({"ts": later, "seq": 10, "currentLevel": 1.7}).encode())

    async def stored_level() -> float | None:
        device = await latest_of(admin, device_id)
        return device["latest"]["metrics"]["currentLevel"] if device else None

    await wait_until(lambda: _equals(stored_level, 1.7), timeout=30, what="the later reading in the API")
    connection = await asyncpg.connect(system.database_url)
    try:
        rows = await connection.fetch(
            "SELECT seq, current_level FROM readings_flood WHERE device_id = $1 ORDER BY ts", device_id
        )
    finally:
        await connection.close()
    assert [(r["seq"], r["current_level"]) for r in rows] == [(9, 1.5), (10, 1.7)]


async def test_late_reading_does_not_move_latest_backwards(system: System, admin: httpx.AsyncClient) -> None:
    device_id = await register(admin, "grid")
    topic = f"ioc/v1/{CITY}/grid/{device_id}/telemetry"
    now = datetime.now(tz=UTC).replace(microsecond=0)
    publish(topic, json.dumps({"ts": now.isoformat(), "voltage": 231.0}).encode())
    await wait_until(lambda: latest_of(admin, device_id), timeout=30, what="first reading")
    publish(topic, json.dumps({"ts": (now - timedelta(minutes=10)).isoformat(), "voltage": 199.0}).encode())

    connection = await asyncpg.connect(system.database_url)
    try:
        await wait_until(
            lambda: connection.fetchval(
                "SELECT 1 FROM readings_grid WHERE device_id = $1 AND voltage = 199.0", device_id
            ),
            timeout=30,
            what="the late reading stored",
        )
    finally:
        await connection.close()
    device = await latest_of(admin, device_id)
    assert device is not None
    assert device["latest"]["metrics"]["voltage"] == 231.0
    assert datetime.fromisoformat(device["latest"]["ts"]) == now


async def test_rejected_message_is_dead_lettered_and_the_flow_goes_on(
    system: System, admin: httpx.AsyncClient
) -> None:
    consumer = await tail_topic(system.topics.deadletter)
    try:
        ghost = unique("ghost")
        publish(f"ioc/v1/{CITY}/flood/{ghost}/telemetry", b'{"currentLevel": 1}')
        device_id = await register(admin, "flood")
        publish(f"ioc/v1/{CITY}/flood/{device_id}/telemetry", b'{"currentLevel": 999}')
        publish(f"ioc/v1/{CITY}/flood/{device_id}/telemetry", b'{"currentLevel": 2.25}')

        found: dict[str, dict[str, Any]] = {}

        async def letters() -> dict[str, dict[str, Any]] | None:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                for message in messages:
                    letter = json.loads(message.value)
                    if CITY in letter["topic"]:
                        found[letter["reason"]] = letter
            return found if {"unknown_device", "out_of_range"} <= set(found) else None

        await wait_until(letters, timeout=30, what="both dead letters on ioc.deadletter")
        assert ghost in found["unknown_device"]["topic"]
        assert found["out_of_range"]["payload"] == '{"currentLevel": 999}'
        assert "received_at" in found["out_of_range"] and found["out_of_range"]["detail"]
        device = await wait_until(lambda: latest_of(admin, device_id), timeout=30, what="the good reading")
        assert device["latest"]["metrics"] == {"currentLevel": 2.25}
    finally:
        await consumer.stop()


async def _equals(probe: Any, expected: float) -> bool | None:
    value = await probe()
    return True if value == expected else None


async def test_migrate_is_safe_to_run_twice(system: System) -> None:
    for _ in range(2):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ioc.cli",
            "migrate",
            env=system.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()
        assert b"timescaledb-apache" in output or b"timescaledb-community" in output, output.decode()
