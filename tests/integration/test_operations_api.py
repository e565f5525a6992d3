"""The operations-center API (§6) against the running system: API keys and scopes, the polled
views (state with ETag/304/gzip, GIS layers, summary, cities), device lists, series, and errors.

Two cities of their own (with a gateway of their own) keep the figures exact: the session's city
holds every other test's devices.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, System, free_port
from tests.integration.harness import ComponentProcess, Publisher, unique, wait_until

CITY_B = unique("scope-b")[:32]
CITY_C = unique("scope-c")[:32]
# Only the summary test puts devices here, so its figures are exact.
CITY_D = unique("summary")[:32]
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
async def city_gateway(system: System, log_dir: Path) -> AsyncIterator[ComponentProcess]:
    """A gateway taking the telemetry of this module's two cities."""
    env = {
        **system.env,
        "IOC_GATEWAY_HEALTH_PORT": str(free_port()),
        "IOC_GATEWAY_CITIES": json.dumps([CITY_B, CITY_C, CITY_D]),
        "IOC_GATEWAY_CLIENT_ID": unique("gw-ops"),
        "IOC_GATEWAY_SHARE_GROUP": unique("gw-ops"),
    }
    process = ComponentProcess("gateway", env, log_dir, name="gateway-ops")
    process.start()
    try:
        await process.wait_for_log("gateway health listening")
        yield process
    finally:
        process.stop()


@pytest.fixture
async def client_for(system: System) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(key: str, *, header: str = "bearer") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
        client = httpx.AsyncClient(base_url=system.api_url, headers=headers, timeout=10)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def make_key(admin: httpx.AsyncClient, role: str, **scope: Any) -> dict[str, Any]:
    response = await admin.post("/v1/api-keys", json={"role": role, **scope})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["key"].startswith("ioc_") and body["role"] == role
    return body


async def register(admin: httpx.AsyncClient, city: str, domain: str, **extra: Any) -> str:
    device_id = unique(f"{domain}-ops")
    body = {
        "id": device_id,
        "city": city,
        "domain": domain,
        "location": {"lat": 20.86, "lon": 106.68},
        **extra,
    }
    response = await admin.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text
    return device_id


def send(city: str, domain: str, device_id: str, readings: list[tuple[datetime, dict[str, float]]]) -> None:
    topic = f"ioc/v1/{city}/{domain}/{device_id}/telemetry"
    with Publisher() as publisher:
        publisher.publish_all(
            [(topic, json.dumps({"ts": ts.isoformat(), **metrics}).encode()) for ts, metrics in readings]
        )


def now() -> datetime:
    return datetime.now(tz=UTC).replace(microsecond=0)


async def open_alarms(admin: httpx.AsyncClient, device_id: str) -> list[dict[str, Any]] | None:
    response = await admin.get("/v1/alarms", params={"device_id": device_id, "state": "active,acknowledged"})
    items: list[dict[str, Any]] = response.json()["items"]
    return items or None


async def latest_ts(admin: httpx.AsyncClient, device_id: str) -> str | None:
    response = await admin.get(f"/v1/devices/{device_id}")
    latest = response.json().get("latest")
    return latest["ts"] if latest else None


# -- API keys -------------------------------------------------------------------------------


async def test_api_keys_have_roles_are_hashed_and_can_be_revoked(
    system: System, admin: httpx.AsyncClient, client_for: Any
) -> None:
    viewer = await make_key(admin, "viewer", name="wall screen")
    client = client_for(viewer["key"], header="x-api-key")
    assert (await client.get("/v1/state", params={"limit": 1})).status_code == 200
    refused = await client.post(
        "/v1/devices",
        json={"id": unique("x"), "city": CITY_B, "domain": "grid", "location": {"lat": 1, "lon": 1}},
    )
    assert refused.status_code == 403 and refused.headers["content-type"] == PROBLEM
    assert (await client.post("/v1/alarms/1/ack", json={})).status_code == 403
    assert (await client.post("/v1/api-keys", json={"role": "viewer"})).status_code == 403

    # Only a digest is stored: the key itself appears nowhere in the table.
    connection = await asyncpg.connect(system.database_url)
    try:
        row = await connection.fetchrow("SELECT * FROM api_keys WHERE id = $1", viewer["id"])
    finally:
        await connection.close()
    assert row is not None and len(row["key_hash"]) == 32
    assert viewer["key"] not in json.dumps({k: str(v) for k, v in dict(row).items()})

    listed = (await admin.get("/v1/api-keys", params={"limit": 1000})).json()["items"]
    mine = [k for k in listed if k["id"] == viewer["id"]]
    assert mine and "key" not in mine[0] and mine[0]["name"] == "wall screen"

    assert (await admin.delete(f"/v1/api-keys/{viewer['id']}")).status_code == 204
    gone = await client.get("/v1/state", params={"limit": 1})
    assert gone.status_code == 401 and gone.headers["content-type"] == PROBLEM
    assert (await client_for("ioc_not-a-key").get("/v1/state")).status_code == 401


async def test_a_scoped_admin_cannot_widen_its_scope(admin: httpx.AsyncClient, client_for: Any) -> None:
    scoped = client_for((await make_key(admin, "admin", cities=[CITY_B]))["key"])
    assert (await scoped.post("/v1/api-keys", json={"role": "viewer"})).status_code == 403
    assert (await scoped.post("/v1/api-keys", json={"role": "viewer", "cities": [CITY_C]})).status_code == 403
    narrower = await scoped.post("/v1/api-keys", json={"role": "viewer", "cities": [CITY_B]})
    assert narrower.status_code == 201
    other_city = {"id": unique("x"), "city": CITY_C, "domain": "grid", "location": {"lat": 1, "lon": 1}}
    assert (await scoped.post("/v1/devices", json=other_city)).status_code == 403
    listed = (await scoped.get("/v1/api-keys", params={"limit": 1000})).json()["items"]
    assert listed and all(k["cities"] == [CITY_B] for k in listed)
    assert (await scoped.get("/v1/dead-letters")).status_code == 403


# -- scope isolation ------------------------------------------------------------------------


async def test_two_city_keys_see_and_touch_only_their_own_city(
    system: System, city_gateway: ComponentProcess, admin: httpx.AsyncClient, client_for: Any
) -> None:
    thresholds = {"currentLevel": {"warn_above": 3.0, "crit_above": 4.5}}
    stations = {
        city: await register(admin, city, "flood", thresholds=thresholds, district="Hồng Bàng")
        for city in (CITY_B, CITY_C)
    }
    start = now() - timedelta(minutes=5)
    for city, device_id in stations.items():
        send(
            city,
            "flood",
            device_id,
            [(start, {"currentLevel": 1.0}), (start + timedelta(seconds=60), {"currentLevel": 5.0})],
        )
    alarm_of: dict[str, dict[str, Any]] = {}
    for city, device_id in stations.items():
        found = await wait_until(lambda d=device_id: open_alarms(admin, d), timeout=30, what="flood alarm")
        alarm_of[city] = found[0]

    keys = {
        city: client_for((await make_key(admin, "operator", cities=[city], name=f"{city} desk"))["key"])
        for city in (CITY_B, CITY_C)
    }
    for city, client in keys.items():
        other = CITY_C if city == CITY_B else CITY_B
        own_device, other_device = stations[city], stations[other]
        own_alarm, other_alarm = alarm_of[city]["id"], alarm_of[other]["id"]

        devices = (await client.get("/v1/devices", params={"limit": 1000})).json()["items"]
        assert {d["city"] for d in devices} == {city} and own_device in {d["id"] for d in devices}
        assert (await client.get("/v1/devices", params={"city": other})).json()["items"] == []
        state = (await client.get("/v1/state")).json()["items"]
        assert {s["city"] for s in state} == {city}
        alarms = (await client.get("/v1/alarms", params={"limit": 1000})).json()["items"]
        assert {a["city"] for a in alarms} == {city}
        layer = (await client.get("/v1/layers/flood")).json()["features"]
        assert {f["properties"]["city"] for f in layer} == {city}
        cities = (await client.get("/v1/cities")).json()["items"]
        assert [c["city"] for c in cities] == [city]
        # Other tests of this module may add devices to the city: the key sees what an admin sees
        # of its city, its station and alarm among them.
        summary = (await client.get("/v1/summary")).json()
        of_city = (await admin.get("/v1/summary", params={"city": city})).json()
        flood, admins_flood = summary["domains"]["flood"], of_city["domains"]["flood"]
        assert flood["devices"]["total"] == admins_flood["devices"]["total"] >= 1
        assert flood["alarms"]["critical"] == admins_flood["alarms"]["critical"] >= 1
        other_summary = (await client.get("/v1/summary", params={"city": other})).json()
        assert other_summary["domains"]["flood"]["devices"]["total"] == 0

        # Another city's objects do not exist for this key: 404, not 403.
        for path in (
            f"/v1/devices/{other_device}",
            f"/v1/devices/{other_device}/series?metric=currentLevel",
            f"/v1/alarms/{other_alarm}",
        ):
            response = await client.get(path)
            assert response.status_code == 404, (path, response.text)
            assert response.headers["content-type"] == PROBLEM
        before = (await admin.get(f"/v1/alarms/{other_alarm}")).json()
        refused = await client.post(f"/v1/alarms/{other_alarm}/ack", json={"note": "not mine"})
        assert refused.status_code == 404
        assert (await client.post(f"/v1/alarms/{other_alarm}/resolve", json={})).status_code == 404
        assert (await admin.get(f"/v1/alarms/{other_alarm}")).json() == before

        acked = await client.post(f"/v1/alarms/{own_alarm}/ack", json={"note": "đội đã đến"})
        assert acked.status_code == 200, acked.text
        audit = (await client.get(f"/v1/alarms/{own_alarm}")).json()["audit"]
        assert audit[-1]["action"] == "acknowledged" and audit[-1]["actor"] == f"{city} desk"
        assert audit[-1]["note"] == "đội đã đến"


# -- polled views ---------------------------------------------------------------------------


async def test_state_answers_304_until_something_changes_and_is_gzipped(
    city_gateway: ComponentProcess, admin: httpx.AsyncClient
) -> None:
    device_id = await register(admin, CITY_B, "grid")
    first = await admin.get("/v1/state", params={"city": CITY_B})
    assert first.status_code == 200 and first.headers["etag"].startswith('W/"')
    tag = first.headers["etag"]
    again = await admin.get("/v1/state", params={"city": CITY_B}, headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.headers["etag"] == tag and again.content == b""
    # The tag covers the query: another filter is another representation.
    assert (await admin.get("/v1/state", params={"city": CITY_C})).headers["etag"] != tag

    send(CITY_B, "grid", device_id, [(now() - timedelta(seconds=5), {"voltage": 231.0})])
    await wait_until(lambda: latest_ts(admin, device_id), timeout=30, what="the reading stored")
    changed = await admin.get("/v1/state", params={"city": CITY_B}, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag
    item = next(i for i in changed.json()["items"] if i["device_id"] == device_id)
    assert item["metrics"]["voltage"] == 231.0 and item["status"] == "online"
    assert item["location"] == {"lat": 20.86, "lon": 106.68}

    # Enough devices for a body worth compressing.
    bulk_city = unique("bulk")[:32]
    for _ in range(10):
        await register(admin, bulk_city, "grid")
    async with httpx.AsyncClient(base_url=str(admin.base_url), timeout=10) as raw:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Accept-Encoding": "gzip"}
        response = await raw.get("/v1/state", headers=headers)
        assert response.headers.get("content-encoding") == "gzip"
        assert json.loads(response.content)["items"]  # httpx decoded it
        streamed = await raw.send(raw.build_request("GET", "/v1/state", headers=headers), stream=True)
        compressed = b"".join([chunk async for chunk in streamed.aiter_raw()])
        await streamed.aclose()
        assert json.loads(gzip.decompress(compressed))["items"]


async def test_state_pages_with_a_cursor(admin: httpx.AsyncClient) -> None:
    city = unique("pages")[:32]
    ids = sorted([await register(admin, city, "waste") for _ in range(5)])
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"city": city, "limit": 2, **({"cursor": cursor} if cursor else {})}
        body = (await admin.get("/v1/state", params=params)).json()
        seen += [i["device_id"] for i in body["items"]]
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == ids
    devices_seen: list[str] = []
    cursor = None
    while True:
        params = {"city": city, "limit": 2, **({"cursor": cursor} if cursor else {})}
        body = (await admin.get("/v1/devices", params=params)).json()
        devices_seen += [d["id"] for d in body["items"]]
        cursor = body["next"]
        if cursor is None:
            break
    assert devices_seen == ids


async def test_devices_filter_by_city_domain_status_and_bbox(admin: httpx.AsyncClient) -> None:
    city = unique("filters")[:32]
    inside = await register(admin, city, "water", location={"lat": 21.02, "lon": 105.85})
    outside = await register(admin, city, "water", location={"lat": 10.77, "lon": 106.70})
    other_domain = await register(admin, city, "traffic", location={"lat": 21.03, "lon": 105.84})

    async def ids(**params: Any) -> set[str]:
        response = await admin.get("/v1/devices", params={"city": city, **params})
        assert response.status_code == 200, response.text
        return {d["id"] for d in response.json()["items"]}

    assert await ids() == {inside, outside, other_domain}
    assert await ids(domain="water") == {inside, outside}
    assert await ids(bbox="105.7,20.9,106.0,21.1") == {inside, other_domain}
    assert await ids(domain="water", bbox="105.7,20.9,106.0,21.1") == {inside}
    assert await ids(status="unknown") == {inside, outside, other_domain}
    assert await ids(status="online") == set()
    layer = (
        await admin.get("/v1/layers/water", params={"city": city, "bbox": "105.7,20.9,106.0,21.1"})
    ).json()
    assert [f["id"] for f in layer["features"]] == [inside]


async def test_layers_are_rfc7946_geojson_with_status_and_worst_alarm(
    city_gateway: ComponentProcess, admin: httpx.AsyncClient
) -> None:
    device_id = await register(
        admin, CITY_C, "waste", location={"lat": 20.95, "lon": 107.08}, name="Thùng Bãi Cháy"
    )
    send(CITY_C, "waste", device_id, [(now() - timedelta(seconds=30), {"fillingLevel": 0.97})])
    await wait_until(lambda: open_alarms(admin, device_id), timeout=30, what="a full-bin alarm")
    response = await admin.get("/v1/layers/waste", params={"city": CITY_C})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/geo+json")
    collection = response.json()
    assert collection["type"] == "FeatureCollection"
    feature = next(f for f in collection["features"] if f["id"] == device_id)
    assert feature["type"] == "Feature"
    assert feature["geometry"] == {"type": "Point", "coordinates": [107.08, 20.95]}
    properties = feature["properties"]
    assert properties["status"] == "online" and properties["name"] == "Thùng Bãi Cháy"
    assert properties["metrics"]["fillingLevel"] == 0.97
    assert properties["alarm_severity"] == "critical" and properties["open_alarms"] == 1
    for other in collection["features"]:
        assert set(other) == {"type", "id", "geometry", "properties"}
        lon, lat = other["geometry"]["coordinates"]
        assert -180 <= lon <= 180 and -90 <= lat <= 90


async def test_summary_gives_each_domains_headline_figures(
    city_gateway: ComponentProcess, admin: httpx.AsyncClient
) -> None:
    city = CITY_D
    at = now() - timedelta(seconds=20)
    readings: dict[str, list[dict[str, float]]] = {
        "traffic": [
            {"averageVehicleSpeed": 30.0, "occupancy": 0.3},
            {"averageVehicleSpeed": 10.0, "occupancy": 0.5},
        ],
        "water": [{"pressure": 2.5, "flow": 100.0}, {"pressure": 1.9, "flow": 90.0}],
        "grid": [{"voltage": 230.0}, {"voltage": 245.0}],
        "flood": [{"currentLevel": 1.0}, {"currentLevel": 3.5}, {"currentLevel": 5.0}],
    }
    devices: dict[str, list[str]] = {}
    for domain, rows in readings.items():
        devices[domain] = []
        for metrics in rows:
            device_id = await register(admin, city, domain)
            devices[domain].append(device_id)
            send(city, domain, device_id, [(at, metrics)])
    for ids in devices.values():
        for device_id in ids:
            await wait_until(lambda d=device_id: latest_ts(admin, d), timeout=30, what="reading stored")

    async def figures_settled() -> dict[str, Any] | None:
        body: dict[str, Any] = (await admin.get("/v1/summary", params={"city": city})).json()
        return body if body["domains"]["flood"]["alarms"]["critical"] >= 1 else None

    summary = await wait_until(figures_settled, timeout=30, what="the flood alarm counted")
    assert summary["city"] == city
    figures = {domain: {f["name"]: f for f in body["figures"]} for domain, body in summary["domains"].items()}
    assert figures["traffic"]["average_speed"]["value"] == 20.0
    assert figures["traffic"]["congested_sensors"]["value"] == 1
    assert figures["water"]["lowest_pressure"]["value"] == 1.9
    assert figures["water"]["lowest_pressure"]["device_id"] == devices["water"][1]
    assert figures["grid"]["outside_voltage_band"]["value"] == 1
    assert figures["flood"]["above_alert"]["value"] == 2
    assert figures["flood"]["above_danger"]["value"] == 1
    assert figures["flood"]["highest_level"]["value"] == 5.0
    assert figures["flood"]["highest_level"]["device_id"] == devices["flood"][2]
    flood = summary["domains"]["flood"]
    assert flood["devices"] == {"total": 3, "online": 3, "offline": 0, "unknown": 0}
    assert summary["domains"]["waste"]["devices"]["total"] == 0
    assert flood["title_vi"] and all(f["label_vi"] and f["label_en"] for f in flood["figures"])


async def test_cities_list_their_centre_and_bbox(admin: httpx.AsyncClient) -> None:
    city = unique("centre")[:32]
    await register(admin, city, "grid", location={"lat": 21.0, "lon": 105.8})
    await register(admin, city, "grid", location={"lat": 21.2, "lon": 106.0})
    items = (await admin.get("/v1/cities")).json()["items"]
    mine = next(c for c in items if c["city"] == city)
    assert mine["devices"] == 2 and mine["bbox"] == [105.8, 21.0, 106.0, 21.2]
    assert mine["center"] == {"lat": pytest.approx(21.1), "lon": pytest.approx(105.9)}


# -- series ---------------------------------------------------------------------------------


async def test_series_buckets_a_metric_and_refuses_bad_requests(
    city_gateway: ComponentProcess, admin: httpx.AsyncClient
) -> None:
    device_id = await register(admin, CITY_B, "flood")
    start = now().replace(second=0) - timedelta(minutes=10)
    send(
        CITY_B,
        "flood",
        device_id,
        [
            (start + timedelta(seconds=15 * i), {"currentLevel": 1.0 + i * 0.1, "rainfall": 0.0})
            for i in range(8)
        ],
    )

    async def two_buckets() -> list[dict[str, Any]] | None:
        params = {
            "metric": "currentLevel",
            "from": start.isoformat(),
            "to": (start + timedelta(minutes=5)).isoformat(),
            "bucket": "1m",
            "agg": "max",
        }
        response = await admin.get(f"/v1/devices/{device_id}/series", params=params)
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items if len(items) == 2 else None

    items = await wait_until(two_buckets, timeout=30, what="two buckets of readings")
    assert [i["value"] for i in items] == [pytest.approx(1.3), pytest.approx(1.7)]
    assert datetime.fromisoformat(items[0]["t"]) == start
    # Whole minutes come from the minute rollup where the server has one; half minutes never do.
    for bucket, sources in (("1m", {"1m", "raw"}), ("30s", {"raw"})):
        params = {"metric": "currentLevel", "from": start.isoformat(), "bucket": bucket}
        response = await admin.get(f"/v1/devices/{device_id}/series", params=params)
        assert response.status_code == 200, response.text
        assert response.json()["source"] in sources, (bucket, response.json())

    path = f"/v1/devices/{device_id}/series"
    bad = {
        "reversed range": {"metric": "currentLevel", "from": now().isoformat(), "to": start.isoformat()},
        "unknown metric": {"metric": "voltage"},
        "too many points": {
            "metric": "currentLevel",
            "from": (now() - timedelta(days=365)).isoformat(),
            "bucket": "30s",
        },
        "bad bucket": {"metric": "currentLevel", "bucket": "5 minutes"},
        "no offset": {"metric": "currentLevel", "from": "2026-01-01T00:00:00"},
    }
    for what, params in bad.items():
        response = await admin.get(path, params=params)
        assert response.status_code == 400, (what, response.text)
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["status"] == 400 and response.json()["detail"]
    assert (await admin.get(path, params={"metric": "currentLevel", "agg": "median"})).status_code == 422
    assert (await admin.get("/v1/devices/nobody-here/series", params={"metric": "x"})).status_code == 404


# -- errors ---------------------------------------------------------------------------------


async def test_errors_are_problem_json_and_unknown_parameters_are_refused(
    system: System, admin: httpx.AsyncClient
) -> None:
    cases = [
        ("GET", "/v1/devices?citty=ha-noi", 400),
        ("GET", "/v1/state?city=ha-noi&foo=1", 400),
        ("GET", "/v1/alarms?state=open", 400),
        ("GET", "/v1/alarms?cursor=%%%", 400),
        ("GET", "/v1/devices?bbox=1,2,3", 400),
        ("GET", "/v1/devices?bbox=10,10,5,5", 400),
        ("GET", "/v1/layers/parking", 422),
        ("GET", "/v1/devices/nope", 404),
        ("GET", "/v1/alarms/999999999", 404),
        ("DELETE", "/v1/api-keys/key_0000000000000000", 404),
        ("POST", "/v1/api-keys", 422),
    ]
    for method, path, status in cases:
        response = await admin.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == status, (method, path, response.text)
        assert response.headers["content-type"] == PROBLEM, (path, response.headers)
        body = response.json()
        assert body["status"] == status and body["title"]
        assert "Traceback" not in response.text
    async with httpx.AsyncClient(base_url=system.api_url) as anonymous:
        response = await anonymous.get("/v1/summary")
        assert response.status_code == 401 and response.headers["content-type"] == PROBLEM
        assert (await anonymous.get("/health")).status_code == 200
