"""What operations-center screens poll: latest state, GIS layers, summaries, cities and series."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from api.audit_trail import Audit
from api.auth import Viewer
from api.deps import AppSettings, Db, Views, scoped_device
from api.pagination import Page, decode_text_cursor, encode_cursor
from api.params import (
    AreaFilter,
    BboxFilter,
    CityFilter,
    Cursor,
    DeviceId,
    DomainFilter,
    DomainName,
    RegionFilter,
    area_list,
    parse_bbox,
    sees_nothing,
)
from api.problems import PROBLEM
from api.view_cache import cached_view
from ioc_core.audit import DEVICE_READ
from ioc_core.domains import DOMAINS
from ioc_core.errors import NotFoundError, ValidationError
from ioc_core.exports import parse_bucket
from ioc_core.kpis import DeviceSnapshot
from ioc_core.models import Location, StateItem
from ioc_core.places import city_name
from ioc_core.rules import SEVERITIES, rules_for
from ioc_core.storage import SummaryDevice
from ioc_core.storage.tiers import AGGREGATES, SeriesSource

router = APIRouter()

_GEOJSON = "application/geo+json"

Aggregate = Literal["avg", "min", "max", "count", "last"]


class PointGeometry(BaseModel):
    type: Literal["Point"]
    coordinates: list[float] = Field(min_length=2, max_length=2, description="[lon, lat] (RFC 7946)")


class FeatureProperties(BaseModel):
    id: str
    name: str | None
    city: str
    domain: str
    district: str | None
    status: Literal["online", "offline", "unknown"]
    ts: datetime | None = Field(description="time of the latest reading")
    last_seen: datetime | None
    metrics: dict[str, float]
    alarm_severity: Literal["low", "medium", "high", "critical"] | None = Field(
        description="worst severity among the device's open alarms"
    )
    open_alarms: int
    area_alarm_severity: Literal["low", "medium", "high", "critical"] | None = Field(
        default=None,
        description="worst open area-wide alarm (a catchment's or ward's flood) over the device",
    )
    district_alarm_severity: Literal["low", "medium", "high", "critical"] | None = Field(
        description="deprecated alias of area_alarm_severity, read for one more release", deprecated=True
    )
    areas: list[str] = Field(default_factory=list, description="ids of the areas the device lies in")


class Feature(BaseModel):
    type: Literal["Feature"]
    id: str
    geometry: PointGeometry
    properties: FeatureProperties


class FeatureCollection(BaseModel):
    type: Literal["FeatureCollection"]
    features: list[Feature]


class DeviceCounts(BaseModel):
    total: int
    online: int
    offline: int
    unknown: int


class SeverityCounts(BaseModel):
    low: int = 0
    medium: int = 0
    high: int = 0
    critical: int = 0


class SummaryFigure(BaseModel):
    name: str
    label_en: str
    label_vi: str
    value: float | None
    unit: str | None
    device_id: str | None = Field(default=None, description="the device of a lowest or highest value")


class DomainSummary(BaseModel):
    title_en: str
    title_vi: str
    devices: DeviceCounts
    alarms: SeverityCounts = Field(description="active (unacknowledged) alarms by severity")
    acknowledged: SeverityCounts = Field(description="acknowledged, still open alarms by severity")
    figures: list[SummaryFigure]


class Summary(BaseModel):
    city: str | None = Field(description="the city asked for, or null for every city in scope")
    region: str | None = Field(default=None, description="the region asked for: its cities together")
    areas: list[str] | None = Field(
        default=None, description="the areas asked for (`area=`): the figures count their devices only"
    )
    generated_at: datetime
    domains: dict[str, DomainSummary]


class City(BaseModel):
    city: str
    name: str
    devices: int
    center: Location
    bbox: list[float] = Field(min_length=4, max_length=4, description="[minLon, minLat, maxLon, maxLat]")


class SeriesPoint(BaseModel):
    t: datetime = Field(description="start of the bucket")
    value: float | None


class Series(BaseModel):
    device_id: str
    metric: str
    unit: str
    agg: Aggregate
    bucket: str
    source: SeriesSource = Field(
        description="where the whole buckets were read: the readings, or the continuous aggregate"
        " of that width (community TimescaleDB, for buckets that are whole multiples of it)"
    )
    items: list[SeriesPoint]
    next: str | None = None


def _scope(
    principal: Viewer, city: str | None, domain: str | None
) -> tuple[list[str] | None, list[str] | None]:
    return principal.city_filter(city), principal.domain_filter(domain)


@router.get(
    "/v1/state",
    response_model=Page[StateItem],
    summary="The latest reading of every device in scope (ETag, 304, gzip).",
    description="Answered from the latest-state table, never the readings. Send the `ETag` back as"
    " `If-None-Match` to get 304 while nothing in scope changed. Devices in id order.",
    tags=["state"],
    responses={304: {"description": "nothing changed"}, 400: PROBLEM},
)
async def state(
    request: Request,
    database: Db,
    cache: Views,
    principal: Viewer,
    city: CityFilter = None,
    domain: DomainFilter = None,
    area: AreaFilter = None,
    limit: Annotated[int, Query(ge=1, le=50_000, description="page size")] = 10_000,
    cursor: Cursor = None,
) -> Response:
    after = decode_text_cursor(cursor)
    areas = principal.area_filter(area_list(area))
    cities, domains = _scope(principal, city, domain)

    async def render() -> bytes:
        if sees_nothing(cities, domains, areas):
            return b'{"items":[],"next":null}'
        page = await database.status.page(cities, domains, after=after, limit=limit, areas=areas)
        next_ = json.dumps(encode_cursor(page.last_id)) if page.more and page.last_id else "null"
        return f'{{"items":{page.items_json},"next":{next_}}}'.encode()

    return await cached_view(
        request, principal, database=database, cache=cache, cities=cities, domains=domains, render=render
    )


@router.get(
    "/v1/layers/{domain}",
    response_model=FeatureCollection,
    summary="A domain's devices as an RFC 7946 GeoJSON FeatureCollection (ETag, 304, gzip).",
    description="Points are `[lon, lat]`; properties carry status, latest metrics and the worst open"
    " alarm severity, ready for Leaflet, MapLibre or Grafana's Geomap.",
    tags=["state"],
    responses={
        200: {"content": {_GEOJSON: {}}},
        304: {"description": "nothing changed"},
        400: PROBLEM,
    },
)
async def layer(
    request: Request,
    database: Db,
    cache: Views,
    principal: Viewer,
    domain: DomainName,
    city: CityFilter = None,
    bbox: BboxFilter = None,
    area: AreaFilter = None,
) -> Response:
    box = parse_bbox(bbox)
    areas = principal.area_filter(area_list(area))
    cities, domains = _scope(principal, city, domain)

    async def render() -> bytes:
        if sees_nothing(cities, domains, areas):
            return b'{"type":"FeatureCollection","features":[]}'
        _, features = await database.status.layer_features(cities, domains, box, areas)
        return f'{{"type":"FeatureCollection","features":{features}}}'.encode()

    return await cached_view(
        request,
        principal,
        database=database,
        cache=cache,
        cities=cities,
        domains=domains,
        render=render,
        media_type=_GEOJSON,
    )


@router.get(
    "/v1/summary",
    response_model=Summary,
    summary="Per domain: devices by status, open alarms by severity and headline figures.",
    description="Figures: traffic average speed and congested sensors; waste bins at or above 80 %;"
    " water lowest pressure and suspected leaks; grid sensors outside the voltage band; flood"
    " stations above alert and danger level and the highest level. Offline devices' last values"
    " are left out of the figures.",
    tags=["state"],
    responses={304: {"description": "nothing changed"}, 400: PROBLEM},
)
async def summary(
    request: Request,
    database: Db,
    cache: Views,
    principal: Viewer,
    city: CityFilter = None,
    area: AreaFilter = None,
    region: RegionFilter = None,
) -> Response:
    cities, domains = _scope(principal, city, None)
    areas = principal.area_filter(area_list(area))
    if region is not None:
        try:
            in_region = set((await database.regions.get(region)).cities)
        except NotFoundError as exc:
            raise HTTPException(400, f"no such region: {region}") from exc
        cities = sorted(in_region if cities is None else in_region & set(cities))

    async def render() -> bytes:
        devices: list[SummaryDevice] = []
        alarms: list[tuple[str, str, str, int]] = []
        if not sees_nothing(cities, domains, areas):
            devices, alarms = await database.status.summary_inputs(cities, domains, None, areas)
        visible = [d for d in DOMAINS if domains is None or d in domains]
        body = Summary(
            city=city,
            region=region,
            areas=areas,
            generated_at=datetime.now(UTC),
            domains=domain_summaries(visible, devices, alarms),
        )
        return body.model_dump_json().encode()

    return await cached_view(
        request, principal, database=database, cache=cache, cities=cities, domains=domains, render=render
    )


def domain_summaries(
    domains: list[str], devices: list[SummaryDevice], alarms: list[tuple[str, str, str, int]]
) -> dict[str, DomainSummary]:
    result: dict[str, DomainSummary] = {}
    for name in domains:
        domain = DOMAINS[name]
        mine = [d for d in devices if d.domain == name]
        counts = {status: sum(1 for d in mine if d.status == status) for status in ("online", "offline")}
        active = SeverityCounts()
        acknowledged = SeverityCounts()
        for alarm_domain, alarm_state, severity, n in alarms:
            if alarm_domain == name and severity in SEVERITIES:
                target = active if alarm_state == "active" else acknowledged
                setattr(target, severity, getattr(target, severity) + n)
        snapshots = [
            DeviceSnapshot(
                device_id=d.id,
                status=d.status,
                metrics=d.metrics,
                rules=rules_for(domain, d.thresholds),
                open_alarms=d.open_alarms,
            )
            for d in mine
        ]
        figures = []
        for kpi in domain.kpis:
            figure = kpi.compute(snapshots)
            figures.append(
                SummaryFigure(
                    name=kpi.name,
                    label_en=kpi.label_en,
                    label_vi=kpi.label_vi,
                    value=figure.value,
                    unit=kpi.unit,
                    device_id=figure.device_id,
                )
            )
        result[name] = DomainSummary(
            title_en=domain.title_en,
            title_vi=domain.title_vi,
            devices=DeviceCounts(
                total=len(mine),
                online=counts["online"],
                offline=counts["offline"],
                unknown=len(mine) - counts["online"] - counts["offline"],
            ),
            alarms=active,
            acknowledged=acknowledged,
            figures=figures,
        )
    return result


@router.get(
    "/v1/cities",
    response_model=Page[City],
    summary="Cities with devices in scope, with their centre and bounding box.",
    tags=["state"],
)
async def cities(database: Db, principal: Viewer) -> Page[City]:
    rows = await database.devices.cities(
        principal.city_filter(None), principal.domain_filter(None), principal.area_filter(None)
    )
    return Page[City](
        items=[
            City(
                city=r.city,
                name=city_name(r.city),
                devices=r.devices,
                center=Location(lat=r.lat, lon=r.lon),
                bbox=list(r.bbox),
            )
            for r in rows
        ],
        next=None,
    )


def _parse_bucket(bucket: str) -> timedelta:
    try:
        return parse_bucket(bucket)
    except ValidationError as exc:
        raise HTTPException(400, str(exc)) from exc


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise HTTPException(400, f"`{name}` must be RFC 3339 with an offset, like 2026-11-21T08:00:00+07:00")
    return value


@router.get(
    "/v1/devices/{device_id}/series",
    response_model=Series,
    summary="One metric of one device in time buckets (time_bucket, or the best tier's aggregates).",
    description="Buckets are aligned to the Unix epoch in UTC and left out when they hold no reading."
    " `from` defaults to an hour before `to`, `to` to now; both lie in the years 1970 to 2200."
    " Asking for more buckets than the server allows, a range whose readings (or aggregate rows)"
    " would exceed the rows one request may read, a reversed range or a metric the device's"
    " domain does not have is a 400.",
    tags=["devices"],
    responses={400: PROBLEM, 404: PROBLEM},
)
async def series(
    database: Db,
    audit: Audit,
    settings: AppSettings,
    principal: Viewer,
    device_id: DeviceId,
    metric: Annotated[str, Query(max_length=64, description="metric name, e.g. currentLevel")],
    from_: Annotated[datetime | None, Query(alias="from", description="start, RFC 3339")] = None,
    to: Annotated[datetime | None, Query(description="end (exclusive), RFC 3339")] = None,
    bucket: Annotated[str, Query(max_length=16, description="bucket width: 30s, 5m, 1h, 1d")] = "1m",
    agg: Annotated[Aggregate, Query(description="aggregate per bucket")] = "avg",
) -> Series:
    device = await scoped_device(audit, device_id, DEVICE_READ)
    domain = DOMAINS[device.domain]
    metric_def = domain.metric(metric)
    if metric_def is None:
        known = ", ".join(m.name for m in domain.metrics)
        raise HTTPException(400, f"{metric!r} is not a metric of the {device.domain} domain; known: {known}")
    width = _parse_bucket(bucket)
    end = _aware(to, "to") if to is not None else datetime.now(UTC)
    start = _aware(from_, "from") if from_ is not None else end - timedelta(hours=1)
    if start >= end:
        raise HTTPException(400, "`from` must be before `to`")
    limit = settings.api_max_series_points
    points = (end - start) / width
    if points > limit:
        raise HTTPException(
            400,
            f"that is {math.ceil(points)} buckets; at most {limit} are allowed: use a wider bucket"
            " or a shorter range",
        )
    assert agg in AGGREGATES
    rows = await database.readings.series(
        device.id, device.domain, metric, start, end, width, agg, max_rows=settings.api_max_series_rows
    )
    return Series(
        device_id=device.id,
        metric=metric,
        unit=metric_def.unit,
        agg=agg,
        bucket=bucket,
        source=rows.source,
        items=[SeriesPoint(t=t, value=v) for t, v in rows],
    )
