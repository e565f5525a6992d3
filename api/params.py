"""Request parameters the routes share: path and query types, parsing of comma lists and bounding
boxes, and the rule that an unknown query parameter is refused."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import HTTPException, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from ioc_core.areas import AREA_ID_PATTERN
from ioc_core.domains import DOMAINS
from ioc_core.telemetry import CITY_PATTERN, DEVICE_ID_PATTERN

AlarmId = Annotated[int, Path(ge=1, le=2**63 - 1, description="alarm id")]
DeviceId = Annotated[str, Path(pattern=f"^{DEVICE_ID_PATTERN.pattern}$", description="device id")]
DomainName = Annotated[str, Path(pattern="^(" + "|".join(DOMAINS) + ")$", description="domain")]
CityFilter = Annotated[str | None, Query(pattern=f"^{CITY_PATTERN.pattern}$", description="city slug")]
DomainFilter = Annotated[str | None, Query(pattern="^(" + "|".join(DOMAINS) + ")$", description="domain")]
Cursor = Annotated[str | None, Query(max_length=200, description="`next` of the previous page")]
BboxFilter = Annotated[
    str | None,
    Query(
        max_length=200,
        description="bounding box `minLon,minLat,maxLon,maxLat` (WGS 84 degrees)",
        examples=["105.75,20.95,105.90,21.10"],
    ),
]


REGION_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
RegionFilter = Annotated[
    str | None, Query(pattern=REGION_ID_PATTERN, description="a region's id (`/v1/regions`): its cities")
]
_AREA_LIST = f"^{AREA_ID_PATTERN.pattern}(,{AREA_ID_PATTERN.pattern})*$"
AreaFilter = Annotated[
    str | None,
    Query(
        max_length=1000,
        pattern=_AREA_LIST,
        description="comma list of area ids (`/v1/areas`): only what lies in one of them",
    ),
]


def area_list(value: str | None) -> list[str] | None:
    """The ids of an `area=` filter (its pattern is checked with the query's)."""
    return None if value is None else value.split(",")


def comma_list(value: str | None, allowed: Sequence[str], name: str) -> list[str] | None:
    if value is None:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise HTTPException(400, f"{name} must be a comma-separated list of {', '.join(allowed)}")
    return items


def parse_bbox(value: str | None) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    parts = value.split(",")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        raise HTTPException(400, "bbox must be four numbers: minLon,minLat,maxLon,maxLat")
    min_lon, min_lat, max_lon, max_lat = numbers
    if not (-180 <= min_lon <= max_lon <= 180 and -90 <= min_lat <= max_lat <= 90):
        raise HTTPException(
            400, "bbox must have -180 <= minLon <= maxLon <= 180 and -90 <= minLat <= maxLat <= 90"
        )
    return min_lon, min_lat, max_lon, max_lat


def sees_nothing(
    cities: Sequence[str] | None, domains: Sequence[str] | None, areas: Sequence[str] | None = None
) -> bool:
    """Filters narrowed to the key's scope that no object can match (see `Principal.narrow`)."""
    return cities == [] or domains == [] or areas == []


_ALLOWED_QUERY: dict[int, frozenset[str]] = {}


def _query_names(dependant: Dependant) -> set[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query_parameters(request: Request) -> None:
    """A misspelt filter must not silently widen a query: unknown parameters are a 400."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    allowed = _ALLOWED_QUERY.get(id(route))
    if allowed is None:
        allowed = frozenset(_query_names(route.dependant))
        _ALLOWED_QUERY[id(route)] = allowed
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise HTTPException(400, f"unknown query parameter {', '.join(unknown)}; this endpoint takes {known}")


# Times a request may name: a timestamp outside them is a client's mistake or a probe (year 1,
# year 9999 with an offset that pushes it past 9999 in UTC), never something stored, and it
# would overflow date arithmetic before any query ran.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2201, 1, 1, tzinfo=UTC)  # exclusive: years 1970 to 2200
_TIME_ADAPTER = TypeAdapter(datetime)
_TIME_QUERY: dict[int, frozenset[str]] = {}


def within_time_bounds(value: datetime) -> bool:
    """Whether `value` (naive: UTC) lies in years 1970 to 2200 in UTC."""
    try:
        utc = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    except OverflowError:
        return False
    return EARLIEST_TIME <= utc < LATEST_TIME


def _names_datetime(annotation: Any) -> bool:
    if annotation is datetime:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, Annotated):
        return any(_names_datetime(arg) for arg in typing.get_args(annotation))
    return False


def _time_query_names(dependant: Dependant) -> set[str]:
    names = {f.alias for f in dependant.query_params if _names_datetime(f.field_info.annotation)}
    for sub in dependant.dependencies:
        names |= _time_query_names(sub)
    return names


async def check_time_query_parameters(request: Request) -> None:
    """Every time a query parameter names lies in years 1970 to 2200, on every route: outside is a
    400 saying so. A value that is not a time is left to the parameter's own validation (422)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    names = _TIME_QUERY.get(id(route))
    if names is None:
        names = _TIME_QUERY[id(route)] = frozenset(_time_query_names(route.dependant))
    for name in names:
        for raw in request.query_params.getlist(name):
            try:
                value = _TIME_ADAPTER.validate_python(raw)
            except PydanticValidationError:
                continue
            if not within_time_bounds(value):
                raise HTTPException(
                    400,
                    f"`{name}` must lie in the years 1970 to 2200 (from {EARLIEST_TIME:%Y-%m-%dT%H:%M:%SZ},"
                    f" before {LATEST_TIME:%Y-%m-%dT%H:%M:%SZ}), not {raw[:64]!r}",
                )
