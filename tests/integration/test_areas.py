"""Areas against real servers, on both spatial engines: PostGIS (the community TimescaleDB server
of `make services`, which has `postgresql-17-postgis-3`) and shapely (plain PostgreSQL migrated
without PostGIS, as the embedded server of `ioc up` runs). Each test runs in a database of its own.

The same city is laid out for both engines and must give the same answers: two wards sharing a
border (a device on it lies in both), a ward with a hole (a device in the hole lies in neither),
an L-shaped catchment whose bounding box covers a device it does not contain, and a feeder zone
of two polygons. Devices moving, areas replaced and removed keep membership current; an import
with one bad parent stores nothing; PostGIS coming to a database that used shapely keeps every
answer.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ioc_core.areas import AreaIn, parse_collection, parse_feature
from ioc_core.errors import ValidationError
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, TelemetryBatch
from ioc_core.storage.areas import SpatialEngine
from ioc_core.storage.status import status_event
from ioc_core.storage.views import BUMP_STATE_VERSIONS_SQL
from ioc_core.telemetry import Reading
from tests.integration.conftest import PLAIN_POSTGRES_URL, POSTGRES_URL, System, scratch_database
from tests.integration.harness import unique

CITY = "hai-phong"


def _box(min_lon: float, min_lat: float, max_lon: float, max_lat: float) -> list[list[float]]:
    return [
        [min_lon, min_lat],
        [max_lon, min_lat],
        [max_lon, max_lat],
        [min_lon, max_lat],
        [min_lon, min_lat],
    ]


def feature(area_id: str, kind: str, rings: Any, *, multi: bool = False, **properties: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": area_id,
        "geometry": {"type": "MultiPolygon" if multi else "Polygon", "coordinates": rings},
        "properties": {"name_vi": f"Khu {area_id}", "kind": kind, "city": CITY, **properties},
    }


# Two wards side by side sharing the line lon = 106.70; ward B has a hole.
WARD_A = feature("ward-a", "ward", [_box(106.60, 20.80, 106.70, 20.90)], code="11311")
WARD_B = feature(
    "ward-b", "ward", [_box(106.70, 20.80, 106.80, 20.90), _box(106.74, 20.84, 106.76, 20.86)[::-1]]
)
# An L: the bottom strip and the left column of a 0.2° square.
CATCHMENT = feature(
    "catchment-l",
    "catchment",
    [
        [
            [106.60, 20.80],
            [106.80, 20.80],
            [106.80, 20.82],
            [106.62, 20.82],
            [106.62, 21.00],
            [106.60, 21.00],
            [106.60, 20.80],
        ]
    ],
)
FEEDER = feature(
    "feeder-2",
    "feeder_zone",
    [[_box(106.65, 20.85, 106.66, 20.86)], [_box(106.77, 20.87, 106.78, 20.88)]],
    multi=True,
)
AREAS = [WARD_A, WARD_B, CATCHMENT, FEEDER]

# Device id → (lon, lat) and the areas it lies in.
DEVICES: dict[str, tuple[tuple[float, float], list[str]]] = {
    "in-a": ((106.655, 20.855), ["feeder-2", "ward-a"]),
    "on-border": ((106.70, 20.87), ["ward-a", "ward-b"]),
    "in-hole": ((106.75, 20.85), []),
    "in-b": ((106.775, 20.875), ["feeder-2", "ward-b"]),
    "in-l-column": ((106.61, 20.95), ["catchment-l"]),
    "in-l-bottom": ((106.75, 20.81), ["catchment-l", "ward-b"]),
    # Inside the L's bounding box, outside the L.
    "in-l-box": ((106.75, 20.95), []),
    "far": ((105.85, 21.03), []),
}


def _areas(features: Sequence[dict[str, Any]]) -> list[AreaIn]:
    return [parse_feature(f) for f in features]


def _device(device_id: str, lon: float, lat: float) -> DeviceIn:
    return DeviceIn(id=device_id, city=CITY, domain="flood", location=Location(lat=lat, lon=lon))


async def _membership(database: Database) -> dict[str, list[str]]:
    return {device_id: (await database.devices.get(device_id)).areas for device_id in DEVICES}


@pytest.fixture(params=[SpatialEngine.POSTGIS, SpatialEngine.SHAPELY])
async def database(request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    engine: SpatialEngine = request.param
    server = POSTGRES_URL if engine is SpatialEngine.POSTGIS else PLAIN_POSTGRES_URL
    async with scratch_database(server) as url, Database(url, max_size=3) as db:
        await db.migrate(postgis=engine is SpatialEngine.POSTGIS)
        assert db.spatial is engine
        yield db


async def test_both_engines_place_devices_alike(database: Database) -> None:
    # Devices first, areas after: placing an area finds the devices already there.
    for device_id, ((lon, lat), _) in list(DEVICES.items())[:4]:
        await database.devices.insert(_device(device_id, lon, lat))
    assert await database.areas.put_many(_areas(AREAS)) == {f["id"]: True for f in AREAS}
    # Areas first, devices after (one by one and as a fleet): placing a device finds its areas.
    for device_id, ((lon, lat), _) in list(DEVICES.items())[4:6]:
        await database.devices.insert(_device(device_id, lon, lat))
    assert await database.devices.insert_many([_device(d, *DEVICES[d][0]) for d in ("in-l-box", "far")]) == 2
    assert await _membership(database) == {d: areas for d, (_, areas) in DEVICES.items()}
    assert await database.areas.members("ward-b") == ["in-b", "in-l-bottom", "on-border"]
    # An area is its city's: another city's device inside it is not in it.
    stranger = DeviceIn(
        id="stranger", city="ha-noi", domain="flood", location=Location(lat=20.855, lon=106.655)
    )
    assert (await database.devices.insert(stranger)).areas == []
    await database.areas.put(parse_feature(WARD_A))
    assert (await database.devices.get("stranger")).areas == []


async def test_membership_follows_devices_and_areas(database: Database) -> None:
    await database.areas.put_many(_areas(AREAS))
    await database.devices.insert(_device("mover", 106.655, 20.855))
    assert (await database.devices.get("mover")).areas == ["feeder-2", "ward-a"]
    # The device moves into ward B.
    moved = _device("mover", 106.72, 20.88)
    assert (await database.devices.update(moved)).areas == ["ward-b"]
    # Ward B shrinks away from it: the device leaves it; replacing says the area was not new.
    smaller = feature("ward-b", "ward", [_box(106.75, 20.80, 106.80, 20.90)])
    assert await database.areas.put(parse_feature(smaller)) is False
    assert (await database.devices.get("mover")).areas == []
    # Ward A grows over it.
    bigger = feature("ward-a", "ward", [_box(106.60, 20.80, 106.73, 20.90)])
    await database.areas.put(parse_feature(bigger))
    assert (await database.devices.get("mover")).areas == ["ward-a"]
    # Removing the area takes the device out of it; removing the device leaves no membership.
    await database.areas.delete("ward-a")
    assert (await database.devices.get("mover")).areas == []
    await database.areas.put(parse_feature(bigger))
    await database.devices.delete("mover")
    assert await database.areas.members("ward-a") == []


async def test_bbox_filter_tests_the_geometry_not_its_box(database: Database) -> None:
    await database.areas.put_many(_areas(AREAS))
    # Inside the L's bounding box, away from the L itself: ward B's top right, nothing else.
    found = await database.areas.find([CITY], None, (106.74, 20.93, 106.76, 20.97))
    assert [a.id for a in found] == []
    found = await database.areas.find([CITY], None, (106.61, 20.93, 106.76, 20.97))
    assert [a.id for a in found] == ["catchment-l"]
    found = await database.areas.find(None, ["ward", "feeder_zone"], (106.69, 20.85, 106.71, 20.86))
    assert [a.id for a in found] == ["ward-a", "ward-b"]
    assert [a.id for a in await database.areas.find(["ha-noi"], None, None)] == []


async def test_stored_area_reads_back_as_sent_normalised(database: Database) -> None:
    # Clockwise exterior (against RFC 7946) is taken and stored counter-clockwise.
    clockwise = feature("cw", "custom", [_box(106.60, 20.80, 106.61, 20.81)[::-1]], source="survey 2026")
    await database.areas.put(parse_feature(clockwise))
    area = await database.areas.get("cw")
    ring = area.geometry["coordinates"][0][0]
    signed_area = sum((x1 * y2 - x2 * y1) for (x1, y1), (x2, y2) in itertools.pairwise(ring))
    assert signed_area > 0
    assert area.geometry["type"] == "MultiPolygon"
    assert area.bbox == pytest.approx((106.60, 20.80, 106.61, 20.81))
    assert area.feature()["properties"]["source"] == "survey 2026"
    assert area.feature()["id"] == "cw"


async def test_a_bad_parent_stores_nothing(database: Database) -> None:
    good = feature("ward-c", "ward", [_box(106.60, 20.80, 106.61, 20.81)], parent="hai-phong")
    province = feature("hai-phong", "province", [_box(106.0, 20.5, 107.0, 21.2)])
    orphan = feature("ward-d", "ward", [_box(106.62, 20.80, 106.63, 20.81)], parent="no-such-area")
    with pytest.raises(ValidationError, match=r"ward-d.*no-such-area"):
        await database.areas.put_many(_areas([good, province, orphan]))
    assert await database.areas.find(None, None, None) == []
    # Parents in the same import, in any order, are fine; removing one leaves its child parentless.
    await database.areas.put_many(_areas([good, province]))
    assert (await database.areas.get("ward-c")).parent == "hai-phong"
    await database.areas.delete("hai-phong")
    assert (await database.areas.get("ward-c")).parent is None


async def test_status_changes_name_the_devices_areas(database: Database) -> None:
    """A device's status events carry its areas, so area-limited streams and webhooks get them."""
    await database.areas.put_many(_areas(AREAS))
    await database.devices.insert(_device("on-border", 106.70, 20.87))
    now = datetime.now(UTC)
    reading = Reading(
        device_id="on-border",
        city=CITY,
        domain="flood",
        ts=now,
        seq=1,
        metrics={"currentLevel": 1.2},
        received_at=now,
    )
    result = await database.write_batch(TelemetryBatch(records=[(reading, 0)]))
    assert [(t.status, t.areas) for t in result.transitions] == [("online", ("ward-a", "ward-b"))]
    events = [status_event(t) for t in result.transitions]
    assert events[0].data["areas"] == ["ward-a", "ward-b"]


async def test_postgis_coming_later_keeps_every_answer() -> None:
    async with scratch_database(POSTGRES_URL) as url, Database(url, max_size=3) as database:
        await database.migrate(postgis=False)
        assert database.spatial is SpatialEngine.SHAPELY
        await database.areas.put_many(_areas(AREAS))
        await database.devices.insert_many([_device(d, *where) for d, (where, _) in DEVICES.items()])
        before = await _membership(database)
        await database.migrate(postgis=True)
        assert database.spatial is SpatialEngine.POSTGIS
        assert await _membership(database) == before == {d: areas for d, (_, areas) in DEVICES.items()}
        # Migrating again changes nothing.
        await database.migrate(postgis=True)
        assert await _membership(database) == before


def test_area_import_cli_is_all_or_nothing(tmp_path: Path) -> None:
    import asyncio

    async def scenario() -> None:
        async with scratch_database(POSTGRES_URL) as url:
            env = {**os.environ, "IOC_DATABASE_URL": url}
            migrate = subprocess.run(
                [sys.executable, "-m", "ioc.cli", "migrate"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert migrate.returncode == 0, migrate.stderr
            assert "areas computed with postgis" in migrate.stdout
            bowtie = feature(
                "bowtie",
                "custom",
                [[[106.6, 20.8], [106.7, 20.9], [106.7, 20.8], [106.6, 20.9], [106.6, 20.8]]],
            )
            bad = tmp_path / "bad.geojson"
            bad.write_text(json.dumps({"type": "FeatureCollection", "features": [*AREAS, bowtie]}))
            run = subprocess.run(
                [sys.executable, "-m", "ioc.cli", "areas", "import", str(bad)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 1
            assert "feature #5 ('bowtie'): geometry is not valid: Self-intersection" in run.stderr
            async with Database(url, max_size=1) as database:
                assert await database.areas.find(None, None, None) == []
            good = tmp_path / "good.geojson"
            good.write_text(json.dumps({"type": "FeatureCollection", "features": AREAS}))
            for expected in ({"created": 4, "replaced": 0}, {"created": 0, "replaced": 4}):
                run = subprocess.run(
                    [sys.executable, "-m", "ioc.cli", "areas", "import", str(good)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert run.returncode == 0, run.stderr
                assert json.loads(run.stdout) == expected
            async with Database(url, max_size=1) as database:
                assert [a.id for a in await database.areas.find(None, None, None)] == sorted(
                    f["id"] for f in AREAS
                )

    asyncio.run(scenario())


def test_collection_errors_name_each_feature() -> None:
    unclosed = feature("open", "ward", [[[106.6, 20.8], [106.7, 20.8], [106.7, 20.9], [106.6, 20.9]]])
    far = feature("far", "ward", [_box(106.6, 20.8, 186.7, 20.9)])
    areas, errors = parse_collection(
        {"type": "FeatureCollection", "features": [WARD_A, unclosed, far, WARD_A]}
    )
    assert [a.id for a in areas] == ["ward-a"]
    assert [str(e) for e in errors] == [
        "feature #2 ('open'): the polygon, exterior ring is not closed:"
        " its last position must repeat its first",
        "feature #3 ('far'): the polygon, exterior ring has a position out of range: [186.7, 20.8]"
        " (longitude -180..180, latitude -90..90)",
        "feature #4 ('ward-a'): the same id as feature #1",
    ]


# ---------------------------------------------------------------- the API

API_CITY = unique("areas")[:32]


def api_feature(base: dict[str, Any], area_id: str) -> dict[str, Any]:
    """A feature of this module's city under an id of its own (the session's database is shared)."""
    return {**base, "id": area_id, "properties": {**base["properties"], "city": API_CITY}}


async def test_areas_api_stores_lists_and_removes(system: System, admin: httpx.AsyncClient) -> None:
    ward_a, ward_b = unique("ward-a"), unique("ward-b")
    answer = await admin.put(f"/v1/areas/{ward_a}", json=api_feature(WARD_A, ward_a))
    assert answer.status_code == 201, answer.text
    assert answer.headers["content-type"] == "application/geo+json"
    assert answer.headers["location"] == f"/v1/areas/{ward_a}"
    stored = answer.json()
    assert stored["id"] == ward_a and stored["geometry"]["type"] == "MultiPolygon"
    assert {k: stored["properties"][k] for k in ("kind", "code", "city", "parent")} == {
        "kind": "ward",
        "code": "11311",
        "city": API_CITY,
        "parent": None,
    }
    assert (await admin.put(f"/v1/areas/{ward_a}", json=api_feature(WARD_A, ward_a))).status_code == 200
    # The id may come from the path alone.
    without_id = {k: v for k, v in api_feature(WARD_B, ward_b).items() if k != "id"}
    assert (await admin.put(f"/v1/areas/{ward_b}", json=without_id)).status_code == 201

    device = {
        "id": unique("on-border"),
        "city": API_CITY,
        "domain": "flood",
        "location": {"lon": 106.70, "lat": 20.87},
    }
    registered = await admin.post("/v1/devices", json=device)
    assert registered.status_code == 201, registered.text
    assert registered.json()["areas"] == sorted([ward_a, ward_b])
    listed = await admin.get("/v1/devices", params={"city": API_CITY, "area": ward_b})
    assert [d["id"] for d in listed.json()["items"]] == [device["id"]]
    listed = await admin.get("/v1/devices", params={"city": API_CITY, "area": "no-such-area"})
    assert listed.json()["items"] == []

    collection = await admin.get("/v1/areas", params={"city": API_CITY, "kind": "ward"})
    assert collection.status_code == 200
    assert collection.json()["type"] == "FeatureCollection"
    assert [f["id"] for f in collection.json()["features"]] == sorted([ward_a, ward_b])
    boxed = await admin.get("/v1/areas", params={"city": API_CITY, "bbox": "106.61,20.81,106.62,20.82"})
    assert [f["id"] for f in boxed.json()["features"]] == [ward_a]
    assert (await admin.get(f"/v1/areas/{ward_b}")).json()["properties"]["name_vi"] == "Khu ward-b"

    assert (await admin.delete(f"/v1/areas/{ward_a}")).status_code == 204
    assert (await admin.get(f"/v1/areas/{ward_a}")).status_code == 404
    assert (await admin.delete(f"/v1/areas/{ward_a}")).status_code == 404
    assert (await admin.get(f"/v1/devices/{device['id']}")).json()["areas"] == [ward_b]


@pytest.mark.parametrize(
    ("geometry", "problem"),
    [
        (
            {
                "type": "Polygon",
                "coordinates": [[[106.6, 20.8], [106.7, 20.9], [106.7, 20.8], [106.6, 20.9], [106.6, 20.8]]],
            },
            "geometry is not valid: Self-intersection[106.65 20.85]",
        ),
        (
            {
                "type": "Polygon",
                "coordinates": [[[106.6, 20.8], [106.7, 20.8], [106.7, 20.9], [106.6, 20.9]]],
            },
            "the polygon, exterior ring is not closed",
        ),
        (
            {"type": "Polygon", "coordinates": [_box(106.6, 20.8, 106.7, 95.0)]},
            "has a position out of range: [106.7, 95.0]",
        ),
        (
            {"type": "Point", "coordinates": [106.6, 20.8]},
            "geometry must be a Polygon or MultiPolygon, not 'Point'",
        ),
        (
            {"type": "Polygon", "coordinates": [[[106.6, 20.8], [106.7, 20.8], [106.6, 20.8]]]},
            "at least 4 positions",
        ),
    ],
)
async def test_invalid_geometry_is_a_400_naming_the_feature(
    admin: httpx.AsyncClient, geometry: dict[str, Any], problem: str
) -> None:
    area_id = unique("bad")
    answer = await admin.put(
        f"/v1/areas/{area_id}", json={**api_feature(WARD_A, area_id), "geometry": geometry}
    )
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["detail"].startswith(f"feature {area_id!r}: ")
    assert problem in answer.json()["detail"]
    assert (await admin.get(f"/v1/areas/{area_id}")).status_code == 404


async def test_other_refusals(admin: httpx.AsyncClient) -> None:
    area_id = unique("area")
    mismatched = await admin.put(f"/v1/areas/{area_id}", json=api_feature(WARD_A, "another-id"))
    assert mismatched.status_code == 400
    assert "is not the area's id" in mismatched.json()["detail"]
    no_kind = api_feature(WARD_A, area_id)
    no_kind["properties"] = {**no_kind["properties"], "kind": "district"}
    assert (await admin.put(f"/v1/areas/{area_id}", json=no_kind)).status_code == 400
    orphan = api_feature(WARD_A, area_id)
    orphan["properties"] = {**orphan["properties"], "parent": "no-such-parent"}
    answer = await admin.put(f"/v1/areas/{area_id}", json=orphan)
    assert answer.status_code == 400 and "no-such-parent" in answer.json()["detail"]
    assert (await admin.get("/v1/areas", params={"kind": "district"})).status_code == 400
    assert (await admin.get("/v1/areas", params={"bbox": "1,2,3"})).status_code == 400
    assert (await admin.get("/v1/devices", params={"area": "bad id!"})).status_code == 422
    assert (await admin.get("/v1/alarms", params={"area": "a,,b"})).status_code == 422


async def test_a_city_key_keeps_to_its_city(system: System, admin: httpx.AsyncClient) -> None:
    ours, theirs = unique("ours"), unique("theirs")
    assert (await admin.put(f"/v1/areas/{theirs}", json=api_feature(WARD_A, theirs))).status_code == 201
    created = await admin.post(
        "/v1/api-keys", json={"role": "admin", "name": unique("ward-office"), "cities": ["ha-noi"]}
    )
    assert created.status_code == 201, created.text
    async with httpx.AsyncClient(
        base_url=system.api_url, headers={"X-API-Key": created.json()["key"]}, timeout=10
    ) as scoped:
        assert (await scoped.put(f"/v1/areas/{ours}", json=api_feature(WARD_A, ours))).status_code == 403
        hanoi = api_feature(WARD_A, ours)
        hanoi["properties"] = {**hanoi["properties"], "city": "ha-noi"}
        assert (await scoped.put(f"/v1/areas/{ours}", json=hanoi)).status_code == 201
        # Another city's area: not there for this key, and not to be taken over.
        assert (await scoped.get(f"/v1/areas/{theirs}")).status_code == 404
        assert (await scoped.delete(f"/v1/areas/{theirs}")).status_code == 404
        hanoi_theirs = {**hanoi, "id": theirs}
        assert (await scoped.put(f"/v1/areas/{theirs}", json=hanoi_theirs)).status_code == 403
        listed = await scoped.get("/v1/areas", params={"city": API_CITY})
        assert listed.json()["features"] == []
        assert (await scoped.delete(f"/v1/areas/{ours}")).status_code == 204
    entries = await admin.get("/v1/audit", params={"object_type": "area", "object_id": theirs})
    assert [e["action"] for e in entries.json()["items"]][-1:] in (["area.update"], ["area.create"])


async def test_screens_filter_and_colour_by_area(system: System, admin: httpx.AsyncClient) -> None:
    city = unique("choropleth")[:32]
    ward_a, ward_b = unique("ward-a"), unique("ward-b")

    def of_city(base: dict[str, Any], area_id: str) -> dict[str, Any]:
        return {**base, "id": area_id, "properties": {**base["properties"], "city": city}}

    for area_id, base in ((ward_a, WARD_A), (ward_b, WARD_B)):
        assert (await admin.put(f"/v1/areas/{area_id}", json=of_city(base, area_id))).status_code == 201
    devices = {"in-a": (106.655, 20.855), "on-border": (106.70, 20.87), "in-hole": (106.75, 20.85)}
    ids = {name: unique(name) for name in devices}
    for name, (lon, lat) in devices.items():
        body = {"id": ids[name], "city": city, "domain": "flood", "location": {"lon": lon, "lat": lat}}
        assert (await admin.post("/v1/devices", json=body)).status_code == 201
    # A critical alarm on the device inside ward A only, made as the processor makes them: with its
    # (city, domain) state version bumped in the same transaction.
    connection = await asyncpg.connect(system.database_url)
    try:
        async with connection.transaction():
            await connection.execute(
                "INSERT INTO alarms (subject, device_id, city, domain, rule, severity, started_at,"
                " last_seen_at, message_vi, message_en) VALUES ($1, $1, $2, 'flood',"
                " 'threshold.currentLevel', 'critical', now(), now(), 'mực nước rất cao',"
                " 'water level very high')",
                ids["in-a"],
                city,
            )
            await connection.execute(BUMP_STATE_VERSIONS_SQL, [city], ["flood"])
    finally:
        await connection.close()

    state = await admin.get("/v1/state", params={"city": city, "area": ward_a})
    assert {i["device_id"]: i["areas"] for i in state.json()["items"]} == {
        ids["in-a"]: [ward_a],
        ids["on-border"]: sorted([ward_a, ward_b]),
    }
    layer = await admin.get("/v1/layers/flood", params={"city": city, "area": ward_b})
    assert [(f["id"], f["properties"]["areas"]) for f in layer.json()["features"]] == [
        (ids["on-border"], sorted([ward_a, ward_b]))
    ]
    alarms = await admin.get("/v1/alarms", params={"city": city, "area": ward_a})
    assert [(a["device_id"], a["areas"]) for a in alarms.json()["items"]] == [(ids["in-a"], [ward_a])]
    assert (await admin.get("/v1/alarms", params={"city": city, "area": ward_b})).json()["items"] == []
    summary = (await admin.get("/v1/summary", params={"city": city, "area": ward_a})).json()
    assert summary["areas"] == [ward_a]
    assert summary["domains"]["flood"]["devices"]["total"] == 2
    assert summary["domains"]["flood"]["alarms"]["critical"] == 1
    summary = (await admin.get("/v1/summary", params={"city": city, "area": ward_b})).json()
    assert summary["domains"]["flood"]["devices"]["total"] == 1
    assert summary["domains"]["flood"]["alarms"]["critical"] == 0

    answer = await admin.get("/v1/areas", params={"city": city, "with": "state"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/geo+json"
    states = {f["id"]: f["properties"]["state"] for f in answer.json()["features"]}
    assert states[ward_a]["alarm_severity"] == "critical" and states[ward_a]["open_alarms"] == 1
    assert states[ward_a]["devices"] == {"total": 2, "online": 0, "offline": 0, "unknown": 2}
    assert list(states[ward_a]["domains"]) == ["flood"]
    assert states[ward_a]["domains"]["flood"]["devices"]["total"] == 2
    assert states[ward_a]["domains"]["flood"]["alarms"]["critical"] == 1
    assert states[ward_b]["domains"]["flood"]["alarms"]["critical"] == 0
    assert states[ward_b]["alarm_severity"] is None and states[ward_b]["open_alarms"] == 0
    assert states[ward_b]["devices"]["total"] == 1
    assert all(f["geometry"]["type"] == "MultiPolygon" for f in answer.json()["features"])

    # Polled: 304 while nothing changed; a new answer when an area or a device in scope changes.
    tag = answer.headers["etag"]
    polled = await admin.get(
        "/v1/areas", params={"city": city, "with": "state"}, headers={"If-None-Match": tag}
    )
    assert polled.status_code == 304
    renamed = of_city(WARD_B, ward_b)
    renamed["properties"] = {**renamed["properties"], "name_vi": "Phường Lê Chân"}
    assert (await admin.put(f"/v1/areas/{ward_b}", json=renamed)).status_code == 200
    polled = await admin.get(
        "/v1/areas", params={"city": city, "with": "state"}, headers={"If-None-Match": tag}
    )
    assert polled.status_code == 200 and polled.headers["etag"] != tag
    tag = polled.headers["etag"]
    body = {"id": unique("late"), "city": city, "domain": "water", "location": {"lon": 106.71, "lat": 20.81}}
    assert (await admin.post("/v1/devices", json=body)).status_code == 201
    polled = await admin.get(
        "/v1/areas", params={"city": city, "with": "state"}, headers={"If-None-Match": tag}
    )
    assert polled.status_code == 200
    states = {f["id"]: f["properties"]["state"] for f in polled.json()["features"]}
    assert sorted(states[ward_b]["domains"]) == ["flood", "water"]

    # Without the geometry, for a screen that drew the areas already.
    bare = await admin.get("/v1/areas", params={"city": city, "with": "state", "geometry": "false"})
    assert all(f["geometry"] is None for f in bare.json()["features"])
    plain = await admin.get("/v1/areas", params={"city": city})
    assert plain.headers.get("etag") and "state" not in plain.json()["features"][0]["properties"]


async def test_a_ward_key_sees_its_ward_only(system: System, admin: httpx.AsyncClient) -> None:
    city = unique("ward-office")[:32]
    ward_a, ward_b = unique("ward-a"), unique("ward-b")
    for area_id, base in ((ward_a, WARD_A), (ward_b, WARD_B)):
        feature = {**base, "id": area_id, "properties": {**base["properties"], "city": city}}
        assert (await admin.put(f"/v1/areas/{area_id}", json=feature)).status_code == 201
    places = {"in-a": (106.655, 20.855), "on-border": (106.70, 20.87), "in-b": (106.775, 20.875)}
    ids = {name: unique(name) for name in places}
    for name, (lon, lat) in places.items():
        body = {"id": ids[name], "city": city, "domain": "flood", "location": {"lon": lon, "lat": lat}}
        assert (await admin.post("/v1/devices", json=body)).status_code == 201
    connection = await asyncpg.connect(system.database_url)
    try:
        alarm_id = await connection.fetchval(
            "INSERT INTO alarms (subject, device_id, city, domain, rule, severity, started_at, last_seen_at,"
            " message_vi, message_en) VALUES ($1, $1, $2, 'flood', 'threshold.currentLevel', 'high', now(),"
            " now(), 'mực nước cao', 'water level high') RETURNING id",
            ids["in-b"],
            city,
        )
    finally:
        await connection.close()

    for refused in ({"role": "admin", "areas": [ward_a]}, {"role": "viewer", "areas": ["no-such-area"]}):
        assert (await admin.post("/v1/api-keys", json=refused)).status_code == 400
    made = await admin.post(
        "/v1/api-keys", json={"role": "operator", "name": "UBND phường", "areas": [ward_a]}
    )
    assert made.status_code == 201, made.text
    assert made.json()["areas"] == [ward_a]
    mine = sorted([ids["in-a"], ids["on-border"]])
    async with httpx.AsyncClient(
        base_url=system.api_url, headers={"X-API-Key": made.json()["key"]}, timeout=10
    ) as ward_office:
        listed = await ward_office.get("/v1/devices", params={"city": city})
        assert [d["id"] for d in listed.json()["items"]] == mine
        assert (await ward_office.get(f"/v1/devices/{ids['in-b']}")).status_code == 404
        assert (await ward_office.get(f"/v1/devices/{ids['on-border']}")).status_code == 200
        assert (await ward_office.get("/v1/devices", params={"city": city, "area": ward_b})).json()[
            "items"
        ] == []
        state = await ward_office.get("/v1/state", params={"city": city})
        assert [i["device_id"] for i in state.json()["items"]] == mine
        layer = await ward_office.get("/v1/layers/flood", params={"city": city})
        assert [f["id"] for f in layer.json()["features"]] == mine
        assert (await ward_office.get("/v1/alarms", params={"city": city})).json()["items"] == []
        assert (await ward_office.get(f"/v1/alarms/{alarm_id}")).status_code == 404
        assert (await ward_office.post(f"/v1/alarms/{alarm_id}/ack")).status_code == 404
        summary = (await ward_office.get("/v1/summary", params={"city": city})).json()
        assert summary["domains"]["flood"]["devices"]["total"] == 2
        assert summary["domains"]["flood"]["alarms"]["high"] == 0
        areas = await ward_office.get("/v1/areas", params={"city": city})
        assert [f["id"] for f in areas.json()["features"]] == [ward_a]
        assert (await ward_office.get(f"/v1/areas/{ward_b}")).status_code == 404
        cities = {c["city"]: c["devices"] for c in (await ward_office.get("/v1/cities")).json()["items"]}
        assert cities == {city: 2}
    # The admin, over every area, sees the alarm the ward office does not.
    assert [a["id"] for a in (await admin.get("/v1/alarms", params={"city": city})).json()["items"]] == [
        alarm_id
    ]
