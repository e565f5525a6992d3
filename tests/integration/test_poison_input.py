"""The worst payloads the property tests know of, published over the real Mosquitto: each becomes
a dead letter with its reason, and the gateway goes on to store the next good reading."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx

from tests.integration.conftest import SESSION_CITY, System
from tests.integration.harness import publish, wait_until
from tests.integration.test_gateway import count_readings, dead_letters_of, register

WORST: dict[str, bytes] = {
    "float overflow": b'{"currentLevel": 1' + b"0" * 400 + b"}",
    "integer past the digit limit": b'{"currentLevel": 1' + b"0" * 5000 + b"}",
    "epoch overflow": b'{"currentLevel": 1.0, "ts": 1' + b"0" * 400 + b"}",
    "year past 9999 in UTC": b'{"currentLevel": 1.0, "ts": "9999-12-31T23:59:59-01:00"}',
    "huge seq": b'{"currentLevel": 1.0, "seq": 1' + b"0" * 400 + b"}",
    "deep nesting": b"[" * 30_000 + b"]" * 30_000,
    "unterminated nesting": b'{"a":' * 12_000,
    "not UTF-8": b'\xff\xfe{"currentLevel": 1}',
    "NaN": b'{"currentLevel": NaN}',
    "Infinity": b'{"currentLevel": -Infinity}',
    "1e999": b'{"currentLevel": 1e999}',
    "SenML huge t": b'[{"n": "currentLevel", "v": 1.0, "t": 1' + b"0" * 400 + b"}]",
    "SenML huge negative bt": b'[{"bt": -100000000000000000000, "n": "currentLevel", "v": 1.0}]',
    "SenML wrong types": b'[{"bn": 5, "n": ["x"], "v": "1"}]',
    "wrong types": b'{"currentLevel": {"v": [1, 2]}}',
    "huge string": b'{"currentLevel": "' + "Đ".encode() * 20_000 + b'"}',
}


async def test_worst_payloads_are_dead_lettered_and_the_next_reading_is_stored(
    system: System, admin: httpx.AsyncClient
) -> None:
    device = await register(admin, "flood")
    topic = f"ioc/v1/{SESSION_CITY}/flood/{device}/telemetry"
    for payload in WORST.values():
        publish(topic, payload)
    publish(topic, json.dumps({"currentLevel": 1.25, "ts": datetime.now(tz=UTC).isoformat()}).encode())

    async def stored() -> int | None:
        count = await count_readings(system.database_url, "readings_flood", [device])
        return count or None

    assert await wait_until(stored, timeout=30, what=f"the good reading stored\n{system.logs()}") == 1

    async def all_dead_lettered() -> list[dict[str, Any]] | None:
        letters = await dead_letters_of(admin, device)
        return letters if len(letters) >= len(WORST) else None

    letters = await wait_until(all_dead_lettered, timeout=30, what="a dead letter for each payload")
    assert len(letters) == len(WORST)
    assert all(letter["reason"] != "unprocessable" for letter in letters), letters
    assert system.processes["gateway"].running, system.processes["gateway"].tail()
    async with httpx.AsyncClient() as client:
        ready = await client.get(f"{system.processes['gateway'].health_url}/ready")
    assert ready.status_code == 200, ready.text
