"""Areas on the map: wards, catchments, zones as GeoJSON (RFC 7946). Put one, list them as a
FeatureCollection, read or remove one. Which devices lie in an area follows every change."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal, cast

import orjson
from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.audit_trail import Audit, Subject
from api.auth import Admin, Principal, Viewer
from api.deps import AppSettings, Db, Views
from api.params import BboxFilter, CityFilter, comma_list, parse_bbox
from api.problems import PROBLEM
from api.routes.screens import DomainSummary, domain_summaries
from api.view_cache import cached_view
from ioc_core.areas import AREA_ID_PATTERN, AREA_KINDS, Area, parse_feature
from ioc_core.audit import AREA, AREA_CREATE, AREA_DELETE, AREA_UPDATE
from ioc_core.domains import DOMAINS
from ioc_core.errors import NotFoundError
from ioc_core.rules import SEVERITIES, Severity
from ioc_core.storage import Database
from ioc_core.storage.areas import AREAS_VERSION
from ioc_core.storage.views import AreaDevice

router = APIRouter(tags=["areas"])

GEOJSON = "application/geo+json"

AreaId = Annotated[str, Path(pattern=f"^{AREA_ID_PATTERN.pattern}$", description="area id")]
KindFilter = Annotated[
    str | None, Query(max_length=200, description=f"comma list of kinds: {', '.join(AREA_KINDS)}")
]

_FEATURE_EXAMPLE = {
    "type": "Feature",
    "geometry": {
        "type": "Polygon",
        "coordinates": [
            [[106.68, 20.85], [106.70, 20.85], [106.70, 20.87], [106.68, 20.87], [106.68, 20.85]]
        ],
    },
    "properties": {
        "name_vi": "Phường Lê Chân",
        "name_en": "Le Chan Ward",
        "kind": "ward",
        "code": "11311",
        "city": "hai-phong",
    },
}


def _geojson(body: dict[str, Any], status_code: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, media_type=GEOJSON)


def _subject(action: str, area_id: str, city: str) -> Subject:
    return Subject(action, AREA, area_id, [city], None)


def _may_see(principal: Principal, area: Area) -> bool:
    return (principal.cities is None or area.city in principal.cities) and (
        principal.areas is None or area.id in principal.areas
    )


@router.get(
    "/v1/areas",
    summary="Areas as a GeoJSON FeatureCollection, in id order.",
    description="Each Feature's `id` is the area's id; its `properties` hold `name_vi`, `name_en`,"
    " `kind`, `code` (the official code, when known), `parent`, `city` and any other properties it"
    " was stored with. `bbox` keeps the areas whose geometry meets the box.",
    response_class=JSONResponse,
    responses={200: {"content": {GEOJSON: {}}}, 304: {"description": "nothing changed"}, 400: PROBLEM},
)
async def areas(
    request: Request,
    database: Db,
    cache: Views,
    principal: Viewer,
    city: CityFilter = None,
    kind: KindFilter = None,
    bbox: BboxFilter = None,
    with_: Annotated[
        Literal["state"] | None,
        Query(
            alias="with",
            description="`state`: each Feature's properties also hold `state` (worst open alarm,"
            " devices by status, each domain's headline figures), for a choropleth",
        ),
    ] = None,
    geometry: Annotated[
        bool,
        Query(
            description="false leaves the geometry out (null), for a screen that polls the state of"
            " areas it has drawn"
        ),
    ] = True,
) -> Response:
    box = parse_bbox(bbox)
    kinds = comma_list(kind, AREA_KINDS, "kind")
    cities = principal.city_filter(city)
    domains = principal.domain_filter(None)

    async def render() -> bytes:
        found = (
            []
            if cities == []
            else await database.areas.find(cities, kinds, box, ids=principal.area_filter(None))
        )
        states = await _area_states(database, cities, domains, found) if with_ == "state" else {}
        features = []
        for area in found:
            feature = area.feature()
            if not geometry:
                feature["geometry"] = None
            if with_ == "state":
                feature["properties"]["state"] = states[area.id].model_dump(mode="json")
            features.append(feature)
        return orjson.dumps({"type": "FeatureCollection", "features": features})

    # The tag: the areas of the cities in scope and, with their state, the devices' state in scope.
    areas_version = await database.status.version(cities, [AREAS_VERSION]) if with_ == "state" else ""
    return await cached_view(
        request,
        principal,
        database=database,
        cache=cache,
        cities=cities,
        domains=domains if with_ == "state" else [AREAS_VERSION],
        render=render,
        media_type=GEOJSON,
        also_version=f"|{areas_version}" if with_ == "state" else "",
    )


class AreaDevices(BaseModel):
    total: int
    online: int
    offline: int
    unknown: int


class AreaState(BaseModel):
    """What a choropleth colours an area by, and what its tooltip says."""

    alarm_severity: Severity | None = Field(
        description="worst severity among the open alarms of the area's devices and the area-wide"
        " alarms over it (a catchment's or ward's flood)"
    )
    open_alarms: int
    devices: AreaDevices
    domains: dict[str, DomainSummary] = Field(
        description="per domain with devices in the area: devices by status, open alarms by severity"
        " and headline figures, as `GET /v1/summary?area=` gives them"
    )


async def _area_states(
    database: Database, cities: list[str] | None, domains: list[str] | None, found: list[Area]
) -> dict[str, AreaState]:
    members: dict[str, list[AreaDevice]] = {area.id: [] for area in found}
    # An area's own alarms (a catchment's flood), as (domain, state, severity), beside its devices'.
    area_wide: dict[str, list[tuple[str, str, str]]] = {area.id: [] for area in found}
    if found and domains != []:
        for device in await database.status.area_devices(cities, domains, list(members)):
            for area_id in device.areas:
                members[area_id].append(device)
        for area_id, domain, state, severity in await database.status.area_alarms(
            cities, domains, list(members)
        ):
            area_wide[area_id].append((domain, state, severity))
    states = {}
    for area_id, devices in members.items():
        present = [d for d in DOMAINS if any(m.device.domain == d for m in devices)]
        by_status = Counter(m.device.status for m in devices)
        alarms = [(m.device.domain, state, severity) for m in devices for state, severity in m.alarm_states]
        alarms.extend(area_wide[area_id])
        severities = [severity for _, _, severity in alarms]
        states[area_id] = AreaState(
            alarm_severity=cast(Severity, max(severities, key=SEVERITIES.index)) if severities else None,
            open_alarms=len(severities),
            devices=AreaDevices(
                total=len(devices),
                online=by_status["online"],
                offline=by_status["offline"],
                unknown=by_status["unknown"],
            ),
            domains=domain_summaries(
                present,
                [m.device for m in devices],
                [(domain, state, severity, n) for (domain, state, severity), n in Counter(alarms).items()],
            ),
        )
    return states


@router.get(
    "/v1/areas/{area_id}",
    summary="One area as a GeoJSON Feature.",
    response_class=JSONResponse,
    responses={200: {"content": {GEOJSON: {}}}, 404: PROBLEM},
)
async def get_area(database: Db, principal: Viewer, area_id: AreaId) -> JSONResponse:
    area = await database.areas.get(area_id)
    if not _may_see(principal, area):
        raise NotFoundError(f"area {area_id!r} not found")
    return _geojson(area.feature())


@router.put(
    "/v1/areas/{area_id}",
    summary="Store an area, or replace the one of this id (admin).",
    description="The body is a GeoJSON Feature (RFC 7946, WGS 84) with a Polygon or MultiPolygon"
    " geometry; `properties` hold `name_vi`, `kind` and `city` (required), `name_en`, `code` and"
    " `parent` (optional), and any others, kept as they are. Rings must be closed; either winding is"
    " taken and stored as RFC 7946's. A geometry that is not valid (a self-intersection, a ring"
    " that is not closed, coordinates out of range, more vertices than IOC_AREA_MAX_VERTICES) is a"
    " 400 that says what and where. 201 when new, 200 when replaced; the devices in the area"
    " follow at once.",
    response_class=JSONResponse,
    status_code=200,
    responses={200: {"content": {GEOJSON: {}}}, 201: {"content": {GEOJSON: {}}}, 400: PROBLEM, 403: PROBLEM},
)
async def put_area(
    database: Db,
    audit: Audit,
    settings: AppSettings,
    principal: Admin,
    area_id: AreaId,
    feature: Annotated[dict[str, Any], Body(examples=[_FEATURE_EXAMPLE])],
) -> JSONResponse:
    area = parse_feature(feature, area_id=area_id, max_vertices=settings.area_max_vertices)
    try:
        current: Area | None = await database.areas.get(area_id)
    except NotFoundError:
        current = None
    action = AREA_CREATE if current is None else AREA_UPDATE
    for city in {area.city, *([current.city] if current else [])}:
        if principal.cities is not None and city not in principal.cities:
            raise await audit.refuse(
                _subject(action, area_id, city), 403, f"this key may not change areas in {city}"
            )
    async with audit.change(
        _subject(action, area_id, area.city), kind=area.kind, name_vi=area.name_vi, vertices=area.vertices
    ) as change:
        created = await database.areas.put(area, within=change.transaction)
    stored = await database.areas.get(area_id)
    headers = {"Location": f"/v1/areas/{area_id}"}
    return JSONResponse(
        stored.feature(), status_code=201 if created else 200, media_type=GEOJSON, headers=headers
    )


@router.delete(
    "/v1/areas/{area_id}",
    status_code=204,
    summary="Remove an area (admin); its devices leave it, its child areas keep no parent.",
    responses={404: PROBLEM},
)
async def delete_area(database: Db, audit: Audit, principal: Admin, area_id: AreaId) -> None:
    area = await database.areas.get(area_id)
    if not _may_see(principal, area):
        raise NotFoundError(f"area {area_id!r} not found")
    async with audit.change(_subject(AREA_DELETE, area_id, area.city), name_vi=area.name_vi) as change:
        await database.areas.delete(area_id, within=change.transaction)
