"""Public warnings as CAP 1.2 (pure): versions, the severity and urgency mapping, times, areas,
and text that XML cannot carry as it is."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta, timezone

import pytest

from api import cap
from ioc_core.domains import DOMAINS

C = f"{{{cap.CAP_NS}}}"
A = f"{{{cap.ATOM_NS}}}"
SENDER = cap.Sender(address="ioc@ioc.example.vn", name_vi="Trung tâm", name_en="Centre")
HANOI = timezone(timedelta(hours=7))
STARTED = datetime(2026, 11, 20, 8, 0, 5, 123456, tzinfo=HANOI)
CAP_TIME = re.compile(r"\d\d\d\d-\d\d-\d\dT\d\d:\d\d:\d\d[-,+]\d\d:\d\d")


def warning(severity: str = "critical", **changes: object) -> cap.PublicAlarm:
    fields: dict[str, object] = {
        "alarm_id": 42,
        "severity": severity,
        "started_at": STARTED,
        "last_seen_at": STARTED + timedelta(minutes=5),
        "category": "Met",
        "event_vi": "Ngập lụt",
        "event_en": "Flood",
        "description_vi": "Mực nước 4,70 m",
        "description_en": "Water level 4.70 m",
        "area": cap.Area("Trạm Tô Lịch (Hoàng Mai, Hà Nội)", cap.Circle(20.98, 105.86, 1.0)),
        "web": "https://ioc.example.vn/v1/public/cap/42",
        **changes,
    }
    return cap.PublicAlarm(**fields)  # type: ignore[arg-type]


def parsed(element: ET.Element) -> ET.Element:
    """Serialized and read back, as a relay would."""
    return ET.fromstring(cap.to_bytes(element))


def text(root: ET.Element, path: str) -> str:
    found = root.find(path)
    assert found is not None and found.text is not None, path
    return found.text


@pytest.mark.parametrize(
    ("severity", "cap_severity", "urgency"),
    [("critical", "Extreme", "Immediate"), ("high", "Severe", "Expected"), ("medium", "Moderate", "Future")],
)
def test_severity_and_urgency(severity: str, cap_severity: str, urgency: str) -> None:
    root = parsed(cap.alert(warning(severity), SENDER))
    infos = root.findall(f"{C}info")
    assert [text(i, f"{C}language") for i in infos] == ["vi-VN", "en-US"]
    for info in infos:
        assert text(info, f"{C}severity") == cap_severity
        assert text(info, f"{C}urgency") == urgency
        assert text(info, f"{C}certainty") == "Observed"
        assert text(info, f"{C}category") == "Met"
    assert cap.CAP_SEVERITY["low"] == "Minor"


def test_a_low_alarm_is_never_published() -> None:
    with pytest.raises(ValueError, match="not published"):
        cap.alert(warning("low"), SENDER)


def test_each_severity_is_a_version_and_a_rise_updates_the_lower_ones() -> None:
    first = parsed(cap.alert(warning("medium"), SENDER))
    assert text(first, f"{C}identifier") == "urn:ioc:alarm:42:medium"
    assert text(first, f"{C}msgType") == "Alert"
    assert first.find(f"{C}references") is None

    risen = parsed(cap.alert(warning("critical"), SENDER))
    sent = text(risen, f"{C}sent")
    assert text(risen, f"{C}identifier") == "urn:ioc:alarm:42:critical"
    assert text(risen, f"{C}msgType") == "Update"
    assert text(risen, f"{C}references").split() == [
        f"ioc@ioc.example.vn,urn:ioc:alarm:42:medium,{sent}",
        f"ioc@ioc.example.vn,urn:ioc:alarm:42:high,{sent}",
    ]
    # The earlier version is referenced exactly as it was sent.
    assert text(first, f"{C}sent") == sent
    assert text(first, f"{C}incidents") == text(risen, f"{C}incidents") == "urn:ioc:alarm:42"
    assert text(risen, f"{C}status") == "Actual" and text(risen, f"{C}scope") == "Public"


def test_the_same_version_reads_the_same_every_time() -> None:
    assert cap.to_bytes(cap.alert(warning(), SENDER)) == cap.to_bytes(cap.alert(warning(), SENDER))


def test_sent_has_whole_seconds_and_a_numeric_offset() -> None:
    assert cap.cap_time(STARTED) == "2026-11-20T01:00:05-00:00"
    assert CAP_TIME.fullmatch(cap.cap_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)))
    with pytest.raises(ValueError):
        cap.cap_time(datetime(2026, 1, 2))
    root = parsed(cap.alert(warning(), SENDER))
    assert text(root, f"{C}sent") == "2026-11-20T01:00:05-00:00"
    assert "Z" not in text(root, f"{C}sent")


def test_a_device_circle_and_a_district_circle_holding_every_station() -> None:
    assert cap.circle_around([]) is None
    one = cap.circle_around([(20.98, 105.86)])
    assert one == cap.Circle(20.98, 105.86, cap.DEVICE_RADIUS_KM)
    assert one is not None and one.text() == "20.98000,105.86000 1.00"

    stations = [(20.98, 105.84), (20.99, 105.86), (20.97, 105.88), (20.95, 105.85)]
    district = cap.circle_around(stations)
    assert district is not None
    assert district.lat == pytest.approx(20.9725) and district.lon == pytest.approx(105.8575)
    centre = (district.lat, district.lon)
    farthest = max(cap.distance_km(centre, s) for s in stations)
    # Every station's own circle lies inside the district's.
    assert farthest + cap.DEVICE_RADIUS_KM <= district.radius_km < farthest + cap.DEVICE_RADIUS_KM + 0.02
    # About 0.0045° of longitude by 0.0225° of latitude: 2.5 km and change from the centre.
    assert 2.5 < farthest < 2.7
    lat, lon, radius = re.split("[, ]", district.text())
    assert float(radius) >= farthest + cap.DEVICE_RADIUS_KM
    assert abs(float(lat) - district.lat) < 1e-5 and abs(float(lon) - district.lon) < 1e-5


def test_distance() -> None:
    # One degree of latitude is about 111.2 km anywhere.
    assert cap.distance_km((20.0, 105.0), (21.0, 105.0)) == pytest.approx(111.2, abs=0.1)
    assert cap.distance_km((20.0, 105.0), (20.0, 105.0)) == 0


def test_the_area_goes_into_both_infos() -> None:
    root = parsed(cap.alert(warning(), SENDER))
    for info in root.findall(f"{C}info"):
        assert text(info, f"{C}area/{C}areaDesc") == "Trạm Tô Lịch (Hoàng Mai, Hà Nội)"
        assert text(info, f"{C}area/{C}circle") == "20.98000,105.86000 1.00"
    gone = parsed(cap.alert(warning(area=cap.Area("Hà Nội")), SENDER))
    assert gone.find(f"{C}info/{C}area/{C}circle") is None


def test_odd_names_are_escaped_and_unwritable_characters_dropped() -> None:
    odd = 'Trạm <b>"A&B"</b> \x00\x1b\ud800\ufffe\'' + "x" * 300
    root = parsed(cap.alert(warning(area=cap.Area(odd), description_en="level > 4 & rising\x07"), SENDER))
    desc = text(root, f"{C}info/{C}area/{C}areaDesc")
    assert desc.startswith('Trạm <b>"A&B"</b> \'x')
    assert not set(desc) & {"\x00", "\x1b", "\ud800", "\ufffe"}
    english = root.findall(f"{C}info")[1]
    assert text(english, f"{C}description") == "level > 4 & rising"
    headline = text(english, f"{C}headline")
    assert len(headline) <= 160 and headline.endswith("…") and headline.startswith("Flood – extreme: Trạm")
    raw = cap.to_bytes(cap.alert(warning(area=cap.Area(odd)), SENDER))
    assert b"<b>" not in raw and b"&lt;b&gt;" in raw and b"&amp;" in raw


def test_headlines_name_the_event_the_severity_and_the_place() -> None:
    vi, en = cap.headlines(warning("high"))
    assert vi == "Ngập lụt – mức nghiêm trọng: Trạm Tô Lịch (Hoàng Mai, Hà Nội)"
    assert en == "Flood – severe: Trạm Tô Lịch (Hoàng Mai, Hà Nội)"


def test_sender_keeps_only_what_cap_allows() -> None:
    assert cap.sender_address("IOC.Example.vn") == "ioc@ioc.example.vn"
    assert cap.sender_address("a b,c<d&e") == "ioc@abcde"
    assert cap.sender_address(None) == cap.sender_address("") == "ioc@localhost"


def test_atom_feed_embeds_each_alert() -> None:
    entries = [
        cap.FeedEntry(warning("critical"), "https://ioc.example.vn/v1/public/cap/42"),
        cap.FeedEntry(warning("medium", alarm_id=7), "https://ioc.example.vn/v1/public/cap/7"),
    ]
    now = datetime(2026, 11, 21, tzinfo=UTC)
    raw = cap.to_bytes(
        cap.feed(
            entries, SENDER, feed_id="https://f/", self_link="https://f/?city=ha-noi", title="T", now=now
        )
    )
    assert raw.startswith(
        b"<?xml version='1.0' encoding='utf-8'?>\n<feed xmlns=\"http://www.w3.org/2005/Atom\""
    )
    root = ET.fromstring(raw)
    # The newest entry's time, not the time of asking.
    assert text(root, f"{A}updated") == "2026-11-20T01:05:05Z"
    link = root.find(f"{A}link")
    assert link is not None and link.get("rel") == "self" and link.get("href") == "https://f/?city=ha-noi"
    found = root.findall(f"{A}entry")
    assert [text(e, f"{A}id") for e in found] == ["urn:ioc:alarm:42:critical", "urn:ioc:alarm:7:medium"]
    for entry, given in zip(found, entries, strict=True):
        content = entry.find(f"{A}content")
        assert content is not None and content.get("type") == "application/cap+xml"
        alerts = list(content)
        assert len(alerts) == 1 and alerts[0].tag == f"{C}alert"
        assert text(alerts[0], f"{C}identifier") == text(entry, f"{A}id")
        alternate = entry.find(f"{A}link")
        assert alternate is not None and alternate.get("href") == given.link
        assert text(entry, f"{A}title").startswith("Ngập lụt – mức")

    empty = ET.fromstring(cap.to_bytes(cap.feed([], SENDER, feed_id="f", self_link="f", title="T", now=now)))
    assert text(empty, f"{A}updated") == "2026-11-21T00:00:00Z" and empty.find(f"{A}entry") is None


def test_flood_declares_its_public_rules() -> None:
    warning_ = DOMAINS["flood"].public_warning
    assert warning_ is not None and warning_.category == "Met"
    assert {"threshold.currentLevel", "rate.currentLevel", "threshold.rainfall", "flood.district"} <= (
        warning_.rules
    )
    assert not warning_.rules & {"offline", "threshold.batteryLevel", "zscore.currentLevel"}
    assert all(d.public_warning is None for name, d in DOMAINS.items() if name != "flood")


def square(lon: float, lat: float, size: float) -> list[list[float]]:
    """A GeoJSON ring, `[lon, lat]`, counter-clockwise and closed."""
    return [[lon, lat], [lon + size, lat], [lon + size, lat + size], [lon, lat + size], [lon, lat]]


def circle_ring(lon: float, lat: float, radius: float, vertices: int) -> list[list[float]]:
    ring = [
        [
            lon + radius * math.cos(2 * math.pi * i / vertices),
            lat + radius * math.sin(2 * math.pi * i / vertices),
        ]
        for i in range(vertices)
    ]
    return [*ring, ring[0]]


def multipolygon(*polygons: list[list[list[float]]]) -> dict[str, object]:
    return {"type": "MultiPolygon", "coordinates": list(polygons)}


def pairs(polygon_text: str) -> list[tuple[float, float]]:
    """CAP's `lat,lon lat,lon …` read back."""
    return [(float(lat), float(lon)) for lat, lon in (p.split(",") for p in polygon_text.split(" "))]


def test_an_area_outline_is_written_latitude_first_and_closed() -> None:
    # A ward of Hải Phòng: longitude about 106.7, latitude about 20.8 (GeoJSON says lon first).
    (polygon,) = cap.polygons_of(multipolygon([square(106.7, 20.8, 0.01)]))
    assert polygon.text() == (
        "20.80000,106.70000 20.80000,106.71000 20.81000,106.71000 20.81000,106.70000 20.80000,106.70000"
    )
    assert polygon.points[0] == polygon.points[-1]
    # A lone Polygon is read too, and coordinates are rounded to about a metre.
    (single,) = cap.polygons_of({"type": "Polygon", "coordinates": [square(106.7000049, 20.8000051, 0.01)]})
    assert single.points[0] == (20.80001, 106.7)


def test_a_big_ring_is_simplified_to_the_point_limit() -> None:
    centre_lon, centre_lat, radius = 105.85, 21.0, 0.05
    (polygon,) = cap.polygons_of(multipolygon([circle_ring(centre_lon, centre_lat, radius, 1000)]))
    points = pairs(polygon.text())
    assert cap.POLYGON_MIN_POINTS <= len(points) <= cap.POLYGON_MAX_POINTS == 100
    assert points[0] == points[-1]
    assert len(set(points)) == len(points) - 1
    # Still the circle: every point on it, give or take a few metres, and all the way round.
    for lat, lon in points:
        assert math.hypot(lon - centre_lon, lat - centre_lat) == pytest.approx(radius, abs=2e-4)
    assert max(lat for lat, _ in points) > centre_lat + 0.99 * radius
    assert min(lon for _, lon in points) < centre_lon - 0.99 * radius
    # A ring within the limit is left as it is.
    (small,) = cap.polygons_of(multipolygon([circle_ring(centre_lon, centre_lat, radius, 99)]))
    assert len(small.points) == 100


def test_each_part_is_a_polygon_of_its_outer_ring_only_the_largest_kept() -> None:
    big = [square(106.60, 20.80, 0.10), square(106.64, 20.84, 0.02)[::-1]]  # with a hole
    small = [square(106.80, 20.80, 0.01)]
    polygons = cap.polygons_of(multipolygon(small, big))
    # Largest first; CAP has no holes, so the hole is not written.
    assert [len(p.points) for p in polygons] == [5, 5]
    assert polygons[0].points[0] == (20.8, 106.6) and polygons[1].points[0] == (20.8, 106.8)

    islets = [[square(107.0 + 0.02 * i, 20.7, 0.001 * (i + 1))] for i in range(cap.POLYGONS_MAX + 3)]
    kept = cap.polygons_of(multipolygon(*islets))
    assert len(kept) == cap.POLYGONS_MAX
    # The three smallest islets are the ones left out.
    assert {p.points[0][1] for p in kept} == {
        round(107.0 + 0.02 * i, 5) for i in range(3, cap.POLYGONS_MAX + 3)
    }

    # A part smaller than a metre cannot be written as a polygon at all.
    assert cap.polygons_of(multipolygon([square(106.7, 20.8, 1e-7)])) == ()


def test_an_area_alert_has_its_polygons_and_ward_codes_in_caps_order() -> None:
    area = cap.Area(
        "Lưu vực Tô Lịch, Hà Nội",
        polygons=cap.polygons_of(multipolygon([square(105.80, 20.98, 0.02)], [square(105.84, 20.98, 0.01)])),
        geocodes=cap.unit_geocodes(["00301", "00292", "00301"]),
    )
    root = parsed(cap.alert(warning(area=area), SENDER))
    for info in root.findall(f"{C}info"):
        element = info.find(f"{C}area")
        assert element is not None
        # CAP's order: areaDesc, polygon*, circle*, geocode*.
        tags = [child.tag.removeprefix(C) for child in element]
        assert tags == ["areaDesc", "polygon", "polygon", "geocode", "geocode"]
        assert text(element, f"{C}areaDesc") == "Lưu vực Tô Lịch, Hà Nội"
        polygons = [pairs(p.text or "") for p in element.findall(f"{C}polygon")]
        assert polygons[0][0] == polygons[0][-1] == (20.98, 105.8)
        assert all(20 < lat < 22 and 105 < lon < 107 for polygon in polygons for lat, lon in polygon)
        geocodes = [(text(g, f"{C}valueName"), text(g, f"{C}value")) for g in element.findall(f"{C}geocode")]
        assert geocodes == [("VN-MaDVHC", "00301"), ("VN-MaDVHC", "00292")]
    vi, en = cap.headlines(warning("high", area=area))
    assert vi.endswith(": Lưu vực Tô Lịch, Hà Nội") and en.endswith(": Lưu vực Tô Lịch, Hà Nội")

    # A circle goes after the polygons and before the geocodes.
    both = cap.Area("Khu", cap.Circle(20.98, 105.86, 1.0), area.polygons[:1], cap.unit_geocodes(["00301"]))
    element = parsed(cap.alert(warning(area=both), SENDER)).find(f"{C}info/{C}area")
    assert element is not None
    assert [c.tag.removeprefix(C) for c in element] == ["areaDesc", "polygon", "circle", "geocode"]
    # No code, no geocode.
    uncoded = parsed(cap.alert(warning(area=cap.Area("Khu", polygons=area.polygons)), SENDER))
    assert uncoded.find(f"{C}info/{C}area/{C}geocode") is None
    assert cap.unit_geocodes([]) == ()
