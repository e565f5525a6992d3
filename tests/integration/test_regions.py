"""Networks of cities against the running system: regions listed (the seeded growth triangle),
stored, replaced and removed by an unscoped admin only; `GET /v1/summary?region=` over the
region's cities; keys scoped to a region see its cities as they are when the key is used, and
nothing once the region is gone.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.integration.conftest import System
from tests.integration.harness import unique, wait_until

# Keys are cached for a few seconds in the API; a region's change reaches its keys after that.
KEY_CACHE_WAIT_S = 30


async def _devices(client: httpx.AsyncClient, **params: Any) -> list[str] | None:
    answer = await client.get("/v1/devices", params={"limit": 1000, **params})
    return [d["id"] for d in answer.json()["items"]] if answer.status_code == 200 else None


async def test_regions_group_cities_for_summaries_and_keys(system: System, admin: httpx.AsyncClient) -> None:
    seeded = await admin.get("/v1/regions")
    assert seeded.status_code == 200
    triangle = {r["id"]: r for r in seeded.json()["items"]}["red-river-delta-triangle"]
    assert triangle["cities"] == ["ha-noi", "hai-phong", "quang-ninh"]

    city_a, city_b, city_c = (unique(f"region-{x}")[:32] for x in "abc")
    region = unique("chain")
    body = {"name_vi": "Chuỗi đô thị thử", "name_en": "A test chain", "cities": [city_a, city_b]}
    assert (await admin.put(f"/v1/regions/{region}", json=body)).status_code == 201
    assert (await admin.put(f"/v1/regions/{region}", json=body)).status_code == 200
    devices = {}
    for city in (city_a, city_b, city_c):
        devices[city] = unique("station")
        answer = await admin.post(
            "/v1/devices",
            json={
                "id": devices[city],
                "city": city,
                "domain": "flood",
                "location": {"lat": 20.86, "lon": 106.68},
            },
        )
        assert answer.status_code == 201, answer.text

    summary = (await admin.get("/v1/summary", params={"region": region})).json()
    assert summary["region"] == region
    assert summary["domains"]["flood"]["devices"]["total"] == 2
    within = (await admin.get("/v1/summary", params={"region": region, "city": city_a})).json()
    assert within["domains"]["flood"]["devices"]["total"] == 1
    outside = (await admin.get("/v1/summary", params={"region": region, "city": city_c})).json()
    assert outside["domains"]["flood"]["devices"]["total"] == 0
    assert (await admin.get("/v1/summary", params={"region": "no-such-region"})).status_code == 400

    made = await admin.post(
        "/v1/api-keys", json={"role": "viewer", "name": "regional centre", "regions": [region]}
    )
    assert made.status_code == 201, made.text
    assert made.json()["regions"] == [region] and made.json()["cities"] is None
    for refused in ({"regions": ["no-such-region"]}, {"role": "metrics", "regions": [region]}):
        answer = await admin.post("/v1/api-keys", json={"role": "viewer", **refused})
        assert answer.status_code == 400, answer.text
    async with httpx.AsyncClient(
        base_url=system.api_url, headers={"X-API-Key": made.json()["key"]}, timeout=10
    ) as regional:
        mine = {devices[city_a], devices[city_b]}
        seen = set(await _devices(regional) or [])
        assert mine <= seen and devices[city_c] not in seen
        # The region shrinks: the key follows it.
        shrunk = {**body, "cities": [city_a]}
        assert (await admin.put(f"/v1/regions/{region}", json=shrunk)).status_code == 200

        async def follows() -> bool | None:
            ids = set(await _devices(regional) or [])
            return True if devices[city_a] in ids and devices[city_b] not in ids else None

        await wait_until(follows, timeout=KEY_CACHE_WAIT_S, what="the key to follow its region")
        # The region goes: the key sees nothing, never everything.
        scoped_admin = await admin.post("/v1/api-keys", json={"role": "admin", "cities": [city_a]})
        async with httpx.AsyncClient(
            base_url=system.api_url, headers={"X-API-Key": scoped_admin.json()["key"]}, timeout=10
        ) as city_admin:
            assert (await city_admin.put(f"/v1/regions/{region}", json=body)).status_code == 403
            assert (await city_admin.delete(f"/v1/regions/{region}")).status_code == 403
        assert (await admin.delete(f"/v1/regions/{region}")).status_code == 204
        assert (await admin.get(f"/v1/regions/{region}")).status_code == 404

        async def blind() -> bool | None:
            return True if await _devices(regional) == [] else None

        await wait_until(blind, timeout=KEY_CACHE_WAIT_S, what="the key to see nothing")
    audited = await admin.get("/v1/audit", params={"object_type": "region", "object_id": region})
    assert [e["action"] for e in audited.json()["items"]] == [
        "region.delete",
        "region.update",
        "region.update",
        "region.create",
    ]
