"""Public warnings as OASIS CAP 1.2 alerts (Common Alerting Protocol), and an Atom 1.0 feed of
them. Pure: dataclasses in, `xml.etree.ElementTree` elements out.

One alarm, several versions. An open alarm's severity only ever rises, so
`urn:ioc:alarm:{id}:{severity}` names one version of it for good, and a rise is a new alert. The
first public severity (`medium`) is an `Alert`; a higher one is an `Update` whose `references` name
the same alarm at every lower public severity, so a relay replaces whichever of them it carried
(the store keeps an alarm's current severity, not the ones it passed through, so some of those
may never have been published; a relay that knows none of them takes the update as new). All
versions share the alarm's `incidents` value and its `sent` time, the time the alarm started:
both are stored facts, so every version reads the same whenever and wherever it is rendered.
The description is the alarm's latest message and follows the readings without a new version:
what a relay acts on, the severity, is what changes the identifier.

Where: a station's alarm is a circle around it, an old district alarm a circle around the
district's stations, and an area's alarm (a catchment or ward) the area's own outline as CAP
polygons, with the official codes of the wards it concerns as geocodes.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import shapely
from shapely.geometry.base import BaseGeometry

from ioc_core.areas import shape_of

CAP_NS = "urn:oasis:names:tc:emergency:cap:1.2"
ATOM_NS = "http://www.w3.org/2005/Atom"
CAP_MEDIA_TYPE = "application/cap+xml"
ATOM_MEDIA_TYPE = "application/atom+xml"

# ElementTree keeps prefixes in one registry: the feed is in Atom's namespace by default and its
# alerts carry the `cap` prefix (a default namespace given to `tostring` cannot hold attributes).
ET.register_namespace("", ATOM_NS)
ET.register_namespace("cap", CAP_NS)

PUBLIC_SEVERITIES: tuple[str, ...] = ("medium", "high", "critical")

CAP_SEVERITY = {"critical": "Extreme", "high": "Severe", "medium": "Moderate", "low": "Minor"}
# Critical is a limit already crossed: act now. A fast rise or a district flooding gives the hour
# before it arrives; a level past the alert limit is a reason to get ready.
CAP_URGENCY = {"critical": "Immediate", "high": "Expected", "medium": "Future", "low": "Future"}
_SEVERITY_WORDS = {
    "Extreme": ("cực kỳ nghiêm trọng", "extreme"),
    "Severe": ("nghiêm trọng", "severe"),
    "Moderate": ("trung bình", "moderate"),
    "Minor": ("nhẹ", "minor"),
}

# A station's reading speaks for the streets around it, about a kilometre; a district's circle
# takes that much beyond its farthest station, so it covers every station's own circle.
DEVICE_RADIUS_KM = 1.0
_EARTH_RADIUS_KM = 6371.0088
# CAP asks for headlines a text message or a pager can carry.
_HEADLINE_MAX = 160
# Characters XML 1.0 cannot carry at all, escaped or not (controls, lone surrogates, U+FFFE/F):
# a device name holding one must not make the whole feed unreadable.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_HOST = re.compile(r"[^a-z0-9.-]")

# CAP 1.2 sets no limit on a polygon's points, but the systems that relay alerts do: 100 points a
# polygon is the limit of common CAP profiles (IPAWS's for wireless alerts among them), and a
# polygon past it may be refused or cut by a relay, so an area's outline is simplified to fit.
POLYGON_MAX_POINTS = 100
# A ring closes on its first point, so four points (a triangle) is the least a polygon can be; CAP
# asks for at least four too.
POLYGON_MIN_POINTS = 4
# An area with islands or detached parts is sent as its largest parts only: every polygon is
# repeated in both `info` blocks, ten of them at the point limit are already some 40 KB of alert,
# and what is left out is the smallest islets, which `areaDesc` and the ward geocodes still name.
POLYGONS_MAX = 10
# Five decimals of a degree are about a metre, finer than any ward boundary is drawn (and what
# `Circle.text` writes).
_DECIMALS = 5
# The simplification starts at about a metre, below what is written anyway, and grows by half
# each step; each step simplifies the previous one's result, so a ring of 100,000 vertices is read
# in full once. The outline then strays from the area by at most three times the last tolerance
# (the sum of the steps).
_TOLERANCE_START = 10.0**-_DECIMALS
_TOLERANCE_GROWTH = 1.5
_TOLERANCE_STEPS = 60
# Vietnam's official administrative-unit codes (mã đơn vị hành chính, the General Statistics
# Office's 2-digit province and 5-digit ward codes) have no published CAP geocode name (CAP's
# `valueName` is left to each community, as `SAME` or `FIPS6` in the US): this one says what the
# code is, `VN-` for the country, `MaDVHC` for "mã đơn vị hành chính".
GEOCODE_VN_UNIT = "VN-MaDVHC"


@dataclass(frozen=True, slots=True)
class Circle:
    """WGS 84 centre and radius in kilometres."""

    lat: float
    lon: float
    radius_km: float

    def text(self) -> str:
        """CAP's `lat,lon radius`."""
        return f"{self.lat:.5f},{self.lon:.5f} {self.radius_km:.2f}"


@dataclass(frozen=True, slots=True)
class Polygon:
    """A closed ring of WGS 84 `(lat, lon)` points: the first is also the last."""

    points: tuple[tuple[float, float], ...]

    def text(self) -> str:
        """CAP's space-separated `lat,lon` pairs (latitude first, unlike GeoJSON)."""
        return " ".join(f"{lat:.{_DECIMALS}f},{lon:.{_DECIMALS}f}" for lat, lon in self.points)


@dataclass(frozen=True, slots=True)
class Geocode:
    value_name: str
    value: str


@dataclass(frozen=True, slots=True)
class Area:
    description: str
    circle: Circle | None = None
    polygons: tuple[Polygon, ...] = ()
    geocodes: tuple[Geocode, ...] = ()


@dataclass(frozen=True, slots=True)
class Sender:
    """`address` is CAP's `sender`: with the identifier, what makes an alert unique anywhere."""

    address: str
    name_vi: str
    name_en: str


@dataclass(frozen=True, slots=True)
class PublicAlarm:
    """One open public alarm, as much of it as its alerts tell."""

    alarm_id: int
    severity: str
    started_at: datetime
    last_seen_at: datetime
    category: str
    event_vi: str
    event_en: str
    description_vi: str
    description_en: str
    area: Area
    web: str | None = None

    @property
    def identifier(self) -> str:
        return identifier(self.alarm_id, self.severity)


def identifier(alarm_id: int, severity: str) -> str:
    return f"urn:ioc:alarm:{alarm_id}:{severity}"


def sender_address(host: str | None) -> str:
    """`ioc@host`, keeping only what CAP allows in `sender` (no spaces, commas, `<` or `&`)."""
    cleaned = _HOST.sub("", (host or "").lower())[:253].strip(".-")
    return f"ioc@{cleaned or 'localhost'}"


def cap_time(value: datetime) -> str:
    """CAP's date-time: whole seconds and a numeric offset, never `Z`; UTC is written `-00:00`."""
    if value.tzinfo is None:
        raise ValueError("CAP times need a time zone")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + "-00:00"


def atom_time(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("Atom times need a time zone")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two `(lat, lon)` points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * _EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def circle_around(
    points: Sequence[tuple[float, float]], margin_km: float = DEVICE_RADIUS_KM
) -> Circle | None:
    """A circle holding every `(lat, lon)` point with `margin_km` to spare, centred on their mean
    (a district is small enough for the plain mean of degrees); None without points."""
    if not points:
        return None
    # Measured from the centre as `Circle.text` writes it, and the radius rounded up to what it
    # writes, so the written circle still holds every point.
    centre = (
        round(sum(p[0] for p in points) / len(points), 5),
        round(sum(p[1] for p in points) / len(points), 5),
    )
    farthest = max(distance_km(centre, p) for p in points)
    return Circle(*centre, math.ceil((farthest + margin_km) * 100) / 100)


def polygons_of(geometry: Mapping[str, Any]) -> tuple[Polygon, ...]:
    """A GeoJSON Polygon or MultiPolygon (`[lon, lat]`, RFC 7946) as CAP polygons: the outer ring
    of each of its `POLYGONS_MAX` largest parts, largest first (CAP has no holes, so a polygon
    covers its holes too), each simplified to at most `POLYGON_MAX_POINTS` points. A part smaller
    than the precision written is left out."""
    parts = sorted(shape_of(geometry).geoms, key=lambda part: part.area, reverse=True)
    polygons: list[Polygon] = []
    for part in parts:
        polygon = _ring(shapely.Polygon(part.exterior))
        if polygon is not None:
            polygons.append(polygon)
            if len(polygons) == POLYGONS_MAX:
                break
    return tuple(polygons)


def _ring(shell: shapely.Polygon) -> Polygon | None:
    """A ring simplified with a growing tolerance (keeping it a valid polygon) until it has at most
    `POLYGON_MAX_POINTS` points as written; None when fewer than four are left."""
    simplified: BaseGeometry = shell
    tolerance = _TOLERANCE_START
    # Counted before rounding (which only ever merges points), so a big ring is not written out
    # at every step.
    for _ in range(_TOLERANCE_STEPS):
        if shapely.get_num_coordinates(simplified) <= POLYGON_MAX_POINTS:
            break
        simplified = simplified.simplify(tolerance, preserve_topology=True)
        tolerance *= _TOLERANCE_GROWTH
    points = _written(simplified)
    if len(points) > POLYGON_MAX_POINTS:
        # Not reached on Earth (once the tolerance passes a ring's size the simplifier leaves it
        # four points), but should it be, a bounding box is never smaller than the area.
        points = _written(shapely.Polygon(shapely.box(*shell.bounds).exterior))
    return Polygon(points) if len(points) >= POLYGON_MIN_POINTS else None


def _written(shell: BaseGeometry) -> tuple[tuple[float, float], ...]:
    """A polygon's outer `(lon, lat)` coordinates as the `(lat, lon)` points CAP writes: rounded,
    without the repeats rounding makes, and still closed (the first and last coordinates round
    alike); none for what is not a polygon (a ring the simplifier collapsed)."""
    if not isinstance(shell, shapely.Polygon) or shell.is_empty:
        return ()
    points: list[tuple[float, float]] = []
    for lon, lat in shell.exterior.coords:
        point = (round(lat, _DECIMALS), round(lon, _DECIMALS))
        if not points or points[-1] != point:
            points.append(point)
    return tuple(points)


def unit_geocodes(codes: Sequence[str]) -> tuple[Geocode, ...]:
    """Vietnamese administrative-unit codes as CAP geocodes, each once, in the order given."""
    return tuple(Geocode(GEOCODE_VN_UNIT, code) for code in dict.fromkeys(codes))


def clean(text: str) -> str:
    """Text without the characters XML 1.0 cannot carry (ElementTree escapes the rest)."""
    return _NOT_XML.sub("", text)


def _headline(text: str) -> str:
    return text if len(text) <= _HEADLINE_MAX else text[: _HEADLINE_MAX - 1].rstrip() + "…"


def headlines(warning: PublicAlarm) -> tuple[str, str]:
    """Vietnamese and English headlines: the event, how severe, and where."""
    word_vi, word_en = _SEVERITY_WORDS[CAP_SEVERITY[warning.severity]]
    place = warning.area.description
    return (
        _headline(clean(f"{warning.event_vi} – mức {word_vi}: {place}")),
        _headline(clean(f"{warning.event_en} – {word_en}: {place}")),
    )


def _sub(parent: ET.Element, namespace: str, tag: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, f"{{{namespace}}}{tag}")
    if text is not None:
        element.text = clean(text)
    return element


def alert(warning: PublicAlarm, sender: Sender) -> ET.Element:
    """The CAP 1.2 `alert` of a warning's current version, with a Vietnamese and an English `info`."""
    if warning.severity not in PUBLIC_SEVERITIES:
        raise ValueError(f"severity {warning.severity!r} is not published")
    sent = cap_time(warning.started_at)
    lower = PUBLIC_SEVERITIES[: PUBLIC_SEVERITIES.index(warning.severity)]
    root = ET.Element(f"{{{CAP_NS}}}alert")
    _sub(root, CAP_NS, "identifier", warning.identifier)
    _sub(root, CAP_NS, "sender", sender.address)
    _sub(root, CAP_NS, "sent", sent)
    _sub(root, CAP_NS, "status", "Actual")
    _sub(root, CAP_NS, "msgType", "Update" if lower else "Alert")
    _sub(root, CAP_NS, "scope", "Public")
    if lower:
        triples = (f"{sender.address},{identifier(warning.alarm_id, s)},{sent}" for s in lower)
        _sub(root, CAP_NS, "references", " ".join(triples))
    _sub(root, CAP_NS, "incidents", f"urn:ioc:alarm:{warning.alarm_id}")
    headline_vi, headline_en = headlines(warning)
    for language, event, sender_name, headline, description in (
        ("vi-VN", warning.event_vi, sender.name_vi, headline_vi, warning.description_vi),
        ("en-US", warning.event_en, sender.name_en, headline_en, warning.description_en),
    ):
        info = _sub(root, CAP_NS, "info")
        _sub(info, CAP_NS, "language", language)
        _sub(info, CAP_NS, "category", warning.category)
        _sub(info, CAP_NS, "event", event)
        _sub(info, CAP_NS, "urgency", CAP_URGENCY[warning.severity])
        _sub(info, CAP_NS, "severity", CAP_SEVERITY[warning.severity])
        # Measured by the city's own stations, not forecast.
        _sub(info, CAP_NS, "certainty", "Observed")
        _sub(info, CAP_NS, "senderName", sender_name)
        _sub(info, CAP_NS, "headline", headline)
        _sub(info, CAP_NS, "description", description)
        if warning.web:
            _sub(info, CAP_NS, "web", warning.web)
        _area(info, warning.area)
    return root


def _area(info: ET.Element, place: Area) -> None:
    # CAP's order within `area`: areaDesc, polygon*, circle*, geocode*, altitude, ceiling.
    area = _sub(info, CAP_NS, "area")
    _sub(area, CAP_NS, "areaDesc", place.description)
    for polygon in place.polygons:
        _sub(area, CAP_NS, "polygon", polygon.text())
    if place.circle is not None:
        _sub(area, CAP_NS, "circle", place.circle.text())
    for geocode in place.geocodes:
        element = _sub(area, CAP_NS, "geocode")
        _sub(element, CAP_NS, "valueName", geocode.value_name)
        _sub(element, CAP_NS, "value", geocode.value)


@dataclass(frozen=True, slots=True)
class FeedEntry:
    warning: PublicAlarm
    link: str


def feed(
    entries: Sequence[FeedEntry],
    sender: Sender,
    *,
    feed_id: str,
    self_link: str,
    title: str,
    now: datetime,
) -> ET.Element:
    """An Atom 1.0 feed with one entry per warning, its CAP alert inline as the entry's content.
    The feed's `updated` is its newest entry's, or `now` when it has none."""
    root = ET.Element(f"{{{ATOM_NS}}}feed")
    _sub(root, ATOM_NS, "id", feed_id)
    _sub(root, ATOM_NS, "title", title)
    newest = max((e.warning.last_seen_at for e in entries), default=now)
    _sub(root, ATOM_NS, "updated", atom_time(newest))
    author = _sub(root, ATOM_NS, "author")
    _sub(author, ATOM_NS, "name", sender.name_en)
    ET.SubElement(root, f"{{{ATOM_NS}}}link", rel="self", type=ATOM_MEDIA_TYPE, href=clean(self_link))
    for entry_ in entries:
        warning = entry_.warning
        headline_vi, headline_en = headlines(warning)
        entry = _sub(root, ATOM_NS, "entry")
        _sub(entry, ATOM_NS, "id", warning.identifier)
        _sub(entry, ATOM_NS, "title", f"{headline_vi} / {headline_en}")
        _sub(entry, ATOM_NS, "published", atom_time(warning.started_at))
        _sub(entry, ATOM_NS, "updated", atom_time(warning.last_seen_at))
        ET.SubElement(
            entry, f"{{{ATOM_NS}}}link", rel="alternate", type=CAP_MEDIA_TYPE, href=clean(entry_.link)
        )
        ET.SubElement(entry, f"{{{ATOM_NS}}}category", term=warning.category)
        content = ET.SubElement(entry, f"{{{ATOM_NS}}}content", type=CAP_MEDIA_TYPE)
        content.append(alert(warning, sender))
    return root


def to_bytes(element: ET.Element) -> bytes:
    """UTF-8 with an XML declaration. A lone alert is in CAP's namespace by default, as relays
    expect `<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">`."""
    default = CAP_NS if element.tag == f"{{{CAP_NS}}}alert" else None
    data: bytes = ET.tostring(element, encoding="utf-8", xml_declaration=True, default_namespace=default)
    return data
