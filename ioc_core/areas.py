"""Areas on the map: provinces, wards (phường, xã and đặc khu alike), drainage catchments, water
pressure zones, grid feeder zones and custom areas, as GeoJSON polygons (RFC 7946, WGS 84).

This module reads a GeoJSON Feature a stranger sent into an `AreaIn`, or says exactly what is
wrong with it, naming the feature: an import of a thousand wards must point at the one that is
broken. Geometry is checked and normalised with shapely (GEOS, the engine PostGIS uses too, so
both storage paths agree on what is inside): rings closed, coordinates in range, no
self-intersection, at most a vertex limit, and the winding made RFC 7946's (exterior rings
counter-clockwise, holes clockwise) whatever the sender used, as the RFC asks parsers to accept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, get_args

import orjson

from ioc_core.errors import ValidationError
from ioc_core.telemetry import CITY_PATTERN

if TYPE_CHECKING:
    from shapely.geometry import MultiPolygon

# shapely (with numpy) is imported where geometry is handled, not with this module: every
# component imports the storage package that imports this, and the gateway and the processor,
# which never touch a polygon, would each carry its 19 MB.

AreaKind = Literal["province", "ward", "catchment", "pressure_zone", "feeder_zone", "custom"]
AREA_KINDS: tuple[str, ...] = get_args(AreaKind)

AREA_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,100}")
# Official codes: the General Statistics Office's 2-digit province and 5-digit ward codes, or
# whatever a city uses for its catchments and zones.
AREA_CODE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}")
NAME_MAX_LENGTH = 200
# The properties an area is made of; any others a file carries are kept as they are, up to this
# size, so a GIS export round-trips.
AREA_FIELDS = ("name_vi", "name_en", "kind", "code", "parent", "city")
EXTRA_PROPERTIES_MAX_BYTES = 8192
DEFAULT_MAX_VERTICES = 100_000


class AreaError(ValidationError):
    """A feature that cannot be an area; the message names the feature."""

    def __init__(self, feature: str, problem: str) -> None:
        super().__init__(f"feature {feature}: {problem}")
        self.feature = feature
        self.problem = problem


@dataclass(frozen=True, slots=True)
class AreaIn:
    """An area to store: its fields, its geometry as a normalised GeoJSON MultiPolygon, and what
    storage indexes it by."""

    id: str
    city: str
    kind: str
    name_vi: str
    name_en: str | None
    code: str | None
    parent: str | None
    geometry: dict[str, Any]
    bbox: tuple[float, float, float, float]
    vertices: int
    extra: dict[str, Any] = field(default_factory=dict)

    def shape(self) -> MultiPolygon:
        return shape_of(self.geometry)


@dataclass(frozen=True, slots=True)
class Area:
    """A stored area, as the API returns it (`feature()`)."""

    id: str
    city: str
    kind: str
    name_vi: str
    name_en: str | None
    code: str | None
    parent: str | None
    geometry: dict[str, Any]
    bbox: tuple[float, float, float, float]
    extra: dict[str, Any]
    updated_at: datetime

    def feature(self) -> dict[str, Any]:
        return {
            "type": "Feature",
            "id": self.id,
            "bbox": list(self.bbox),
            "geometry": self.geometry,
            "properties": {
                **self.extra,
                "name_vi": self.name_vi,
                "name_en": self.name_en,
                "kind": self.kind,
                "code": self.code,
                "parent": self.parent,
                "city": self.city,
                "updated_at": self.updated_at.isoformat(),
            },
        }


def shape_of(geometry: Mapping[str, Any]) -> MultiPolygon:
    """A stored area's geometry (always a MultiPolygon, see `normalised_geometry`) for shapely."""
    from shapely.geometry import MultiPolygon, Polygon, shape

    parsed = shape(dict(geometry))
    if isinstance(parsed, Polygon):
        return MultiPolygon([parsed])
    if not isinstance(parsed, MultiPolygon):
        raise ValueError(f"an area's geometry is a {parsed.geom_type}")
    return parsed


def parse_feature(
    feature: Any,
    *,
    area_id: str | None = None,
    name: str | None = None,
    max_vertices: int = DEFAULT_MAX_VERTICES,
) -> AreaIn:
    """The area a GeoJSON Feature describes. `area_id` is the id the caller chose (a PUT's path);
    without it the feature's `id` (or its properties' `id`) is the area's. `name` is how errors
    call the feature (`#3` in a file); by default its id."""
    label = name or (repr(area_id) if area_id else "?")
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise AreaError(label, 'must be a GeoJSON Feature ({"type": "Feature", ...})')
    properties = feature.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, dict):
        raise AreaError(label, "properties must be an object")
    given_id = feature.get("id", properties.get("id"))
    if given_id is not None and not isinstance(given_id, str):
        raise AreaError(label, "id must be a string")
    if area_id is not None and given_id is not None and given_id != area_id:
        raise AreaError(label, f"the feature's id {given_id!r} is not the area's id {area_id!r}")
    the_id = area_id or given_id
    if name is None and the_id:
        label = repr(the_id)
    if not the_id:
        raise AreaError(label, "has no id (the Feature's `id` or `properties.id`)")
    if not AREA_ID_PATTERN.fullmatch(the_id):
        raise AreaError(label, "id must be 1-100 letters, digits, '_', '.' or '-'")
    if name is not None:
        label = f"{name} ({the_id!r})"

    city = _text(properties, "city", label, required=True, pattern=CITY_PATTERN)
    kind = _text(properties, "kind", label, required=True)
    if kind not in AREA_KINDS:
        raise AreaError(label, f"kind must be one of {', '.join(AREA_KINDS)}")
    name_vi = _text(properties, "name_vi", label, required=True)
    name_en = _text(properties, "name_en", label)
    code = _text(properties, "code", label, pattern=AREA_CODE_PATTERN)
    parent = _text(properties, "parent", label, pattern=AREA_ID_PATTERN)
    if parent == the_id:
        raise AreaError(label, "an area cannot be its own parent")
    extra = {k: v for k, v in properties.items() if k not in AREA_FIELDS and k not in ("id", "updated_at")}
    try:
        extra_size = len(orjson.dumps(extra))
    except orjson.JSONEncodeError as exc:
        raise AreaError(label, f"other properties hold a value JSON cannot carry ({exc})") from exc
    if extra_size > EXTRA_PROPERTIES_MAX_BYTES:
        raise AreaError(label, f"other properties take more than {EXTRA_PROPERTIES_MAX_BYTES} bytes")

    geometry, bbox, vertices = normalised_geometry(feature.get("geometry"), label, max_vertices)
    assert city is not None and kind is not None and name_vi is not None
    return AreaIn(
        id=the_id,
        city=city,
        kind=kind,
        name_vi=name_vi,
        name_en=name_en,
        code=code,
        parent=parent,
        geometry=geometry,
        bbox=bbox,
        vertices=vertices,
        extra=extra,
    )


def parse_collection(
    document: Any, *, max_vertices: int = DEFAULT_MAX_VERTICES
) -> tuple[list[AreaIn], list[AreaError]]:
    """Every feature of a FeatureCollection as an area, and an error for each that cannot be one
    (features are named `#1`, `#2`, … in file order). Ids given twice are errors too."""
    if not isinstance(document, dict) or document.get("type") != "FeatureCollection":
        raise ValidationError('the file must be a GeoJSON FeatureCollection ({"type": "FeatureCollection"})')
    features = document.get("features")
    if not isinstance(features, list):
        raise ValidationError("the FeatureCollection has no list of features")
    areas: list[AreaIn] = []
    errors: list[AreaError] = []
    seen: dict[str, int] = {}
    for number, feature in enumerate(features, start=1):
        try:
            area = parse_feature(feature, name=f"#{number}", max_vertices=max_vertices)
        except AreaError as exc:
            errors.append(exc)
            continue
        if area.id in seen:
            errors.append(AreaError(f"#{number} ({area.id!r})", f"the same id as feature #{seen[area.id]}"))
            continue
        seen[area.id] = number
        areas.append(area)
    return areas, errors


def _text(
    properties: Mapping[str, Any],
    key: str,
    label: str,
    *,
    required: bool = False,
    pattern: re.Pattern[str] | None = None,
) -> str | None:
    value = properties.get(key)
    if value is None:
        if required:
            raise AreaError(label, f"properties.{key} is required")
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > NAME_MAX_LENGTH:
        raise AreaError(label, f"properties.{key} must be a non-empty string of at most {NAME_MAX_LENGTH}")
    if pattern is not None and not pattern.fullmatch(value):
        raise AreaError(label, f"properties.{key} {value!r} must match {pattern.pattern}")
    return value


def normalised_geometry(
    geometry: Any, label: str, max_vertices: int
) -> tuple[dict[str, Any], tuple[float, float, float, float], int]:
    """A Polygon or MultiPolygon checked and rewritten as a MultiPolygon in RFC 7946's winding,
    with its bounding box and vertex count."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon, mapping

    if not isinstance(geometry, dict):
        raise AreaError(label, "has no geometry")
    kind = geometry.get("type")
    coordinates = geometry.get("coordinates")
    polygons: Sequence[Any]
    if kind == "Polygon":
        polygons = [coordinates]
    elif kind == "MultiPolygon":
        if not isinstance(coordinates, list | tuple) or not coordinates:
            raise AreaError(label, "a MultiPolygon's coordinates must be a non-empty list of polygons")
        polygons = coordinates
    else:
        raise AreaError(label, f"geometry must be a Polygon or MultiPolygon, not {kind!r}")
    parts: list[Polygon] = []
    vertices = 0
    for p, rings in enumerate(polygons, start=1):
        where = f"polygon {p}" if kind == "MultiPolygon" else "the polygon"
        if not isinstance(rings, list | tuple) or not rings:
            raise AreaError(label, f"{where} must be a non-empty list of rings")
        checked: list[list[tuple[float, float]]] = []
        for r, ring in enumerate(rings):
            ring_name = f"{where}, {'exterior ring' if r == 0 else f'hole {r}'}"
            checked.append(_ring(ring, label, ring_name))
            vertices += len(ring)
            if vertices > max_vertices:
                raise AreaError(label, f"has more than {max_vertices} vertices")
        parts.append(Polygon(checked[0], checked[1:]))
    multipolygon = MultiPolygon(parts)
    reason = shapely.is_valid_reason(multipolygon)
    if reason != "Valid Geometry":
        raise AreaError(label, f"geometry is not valid: {reason}")
    oriented = shapely.orient_polygons(multipolygon, exterior_cw=False)
    min_lon, min_lat, max_lon, max_lat = (float(v) for v in oriented.bounds)
    return dict(mapping(oriented)), (min_lon, min_lat, max_lon, max_lat), vertices


def _ring(ring: Any, label: str, ring_name: str) -> list[tuple[float, float]]:
    if not isinstance(ring, list | tuple) or len(ring) < 4:
        raise AreaError(label, f"{ring_name} must have at least 4 positions (RFC 7946)")
    positions: list[tuple[float, float]] = []
    for position in ring:
        if (
            not isinstance(position, list | tuple)
            or not 2 <= len(position) <= 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in position)
        ):
            raise AreaError(label, f"{ring_name} has a position that is not [longitude, latitude]")
        lon, lat = float(position[0]), float(position[1])
        if not (math.isfinite(lon) and math.isfinite(lat) and -180 <= lon <= 180 and -90 <= lat <= 90):
            raise AreaError(
                label,
                f"{ring_name} has a position out of range: [{position[0]}, {position[1]}]"
                " (longitude -180..180, latitude -90..90)",
            )
        positions.append((lon, lat))
    if positions[0] != positions[-1]:
        raise AreaError(label, f"{ring_name} is not closed: its last position must repeat its first")
    return positions


def covering(areas: Sequence[tuple[str, MultiPolygon]], lon: float, lat: float) -> list[str]:
    """The ids of the areas whose geometry contains the point or has it on its boundary (GEOS's
    `intersects`, as PostGIS's ST_Intersects: a device on a border belongs to both sides)."""
    import shapely

    return [area_id for area_id, geometry in areas if shapely.intersects_xy(geometry, lon, lat)]
