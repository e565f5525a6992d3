"""The API's registry endpoints and their errors, against the real database."""

from __future__ import annotations

import httpx

from tests.integration.conftest import System
from tests.integration.harness import unique

PROBLEM = "application/problem+json"


def device_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "id": unique("api-dev"),
        "city": "ha-noi",
        "domain": "flood",
        "name": "Trạm đo mực nước Phan Đình Phùng",
        "district": "Ba Đình",
        "location": {"lat": 21.0401, "lon": 105.8412},
        "thresholds": {"currentLevel": {"warn_above": 3.0, "crit_above": 4.5}},
    }
    body.update(overrides)
    return body


async def test_health_and_ready(system: System) -> None:
    async with httpx.AsyncClient(base_url=system.api_url) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        ready = await client.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok"}
        assert ready.json()["storage_tier"].startswith("timescaledb")


async def test_register_then_get(admin: httpx.AsyncClient) -> None:
    body = device_body()
    created = await admin.post("/v1/devices", json=body)
    assert created.status_code == 201
    assert created.headers["location"] == f"/v1/devices/{body['id']}"
    device = (await admin.get(f"/v1/devices/{body['id']}")).json()
    assert device["name"] == body["name"] and device["district"] == "Ba Đình"
    assert device["thresholds"] == body["thresholds"]
    assert device["status"] == "unknown" and device["latest"] is None and device["last_seen"] is None


async def test_keys_are_required_and_checked(system: System) -> None:
    async with httpx.AsyncClient(base_url=system.api_url) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
            response = await client.get("/v1/state", headers=headers)
            assert response.status_code == 401
            assert response.headers["content-type"] == PROBLEM
        ok = await client.get("/v1/state", headers={"X-API-Key": "test-admin-key-0123456789abcdef"})
        assert ok.status_code == 200


async def test_errors_are_problem_json(admin: httpx.AsyncClient) -> None:
    body = device_body()
    assert (await admin.post("/v1/devices", json=body)).status_code == 201
    duplicate = await admin.post("/v1/devices", json=body)
    assert duplicate.status_code == 409 and duplicate.headers["content-type"] == PROBLEM
    missing = await admin.get(f"/v1/devices/{unique('nobody')}")
    assert missing.status_code == 404 and missing.json()["status"] == 404
    for bad in (
        device_body(domain="weather"),
        device_body(id="has space"),
        device_body(city="Hà Nội"),
        device_body(location={"lat": 91, "lon": 0}),
        device_body(thresholds={"voltage": {"warn_above": 1}}),
        device_body(thresholds={"currentLevel": {"too_high": 1}}),
        device_body(unexpected=True),
    ):
        response = await admin.post("/v1/devices", json=bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.headers["content-type"] == PROBLEM
        assert "Traceback" not in response.text
    bad_filter = await admin.get("/v1/state", params={"domain": "weather"})
    assert bad_filter.status_code == 422
    not_json = await admin.post("/v1/devices", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and not_json.headers["content-type"] == PROBLEM
