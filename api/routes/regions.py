"""Regions: named groups of cities, for regional summaries (`GET /v1/summary?region=`) and
region-scoped keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.audit_trail import Audit, Subject
from api.auth import Admin, Viewer
from api.deps import Db
from api.params import REGION_ID_PATTERN
from api.problems import PROBLEM
from ioc_core.audit import REGION, REGION_CREATE, REGION_DELETE, REGION_UPDATE
from ioc_core.errors import NotFoundError
from ioc_core.storage.regions import Region as StoredRegion
from ioc_core.telemetry import CITY_PATTERN

router = APIRouter(tags=["regions"])

RegionId = Annotated[str, Path(pattern=REGION_ID_PATTERN, description="region id")]


class RegionIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name_vi": "Tam giác tăng trưởng Hà Nội – Hải Phòng – Quảng Ninh",
                    "name_en": "Hà Nội – Hải Phòng – Quảng Ninh growth triangle",
                    "cities": ["ha-noi", "hai-phong", "quang-ninh"],
                }
            ]
        },
    )

    name_vi: str = Field(min_length=1, max_length=200)
    name_en: str | None = Field(default=None, min_length=1, max_length=200)
    cities: list[Annotated[str, StringConstraints(pattern=f"^{CITY_PATTERN.pattern}$")]] = Field(
        min_length=1, max_length=100, description="the region's city slugs"
    )


class Region(BaseModel):
    id: str
    name_vi: str
    name_en: str | None
    cities: list[str]
    created_at: datetime
    updated_at: datetime


class Regions(BaseModel):
    items: list[Region]
    next: None = None


def _region(stored: StoredRegion) -> Region:
    return Region(
        id=stored.id,
        name_vi=stored.name_vi,
        name_en=stored.name_en,
        cities=stored.cities,
        created_at=stored.created_at,
        updated_at=stored.updated_at,
    )


def _unscoped(principal: Admin) -> None:
    # A region spans cities: only an admin over every city draws one.
    if principal.cities is not None or principal.domains is not None:
        raise HTTPException(403, "regions are changed by an admin key without a scope limit")


@router.get("/v1/regions", response_model=Regions, summary="Every region, in id order.")
async def regions(database: Db, principal: Viewer) -> Regions:
    return Regions(items=[_region(r) for r in await database.regions.all()])


@router.get("/v1/regions/{region_id}", response_model=Region, summary="One region.", responses={404: PROBLEM})
async def get_region(database: Db, principal: Viewer, region_id: RegionId) -> Region:
    return _region(await database.regions.get(region_id))


@router.put(
    "/v1/regions/{region_id}",
    response_model=Region,
    summary="Store a region, or replace the one of this id (admin without a scope limit).",
    description="201 when new, 200 when replaced. Keys scoped to the region follow its cities within"
    " `IOC_API_KEY_CACHE_S`.",
    responses={201: {"model": Region}, 403: PROBLEM},
)
async def put_region(
    database: Db, audit: Audit, principal: Admin, region_id: RegionId, body: RegionIn, response: Response
) -> Region:
    _unscoped(principal)
    try:
        await database.regions.get(region_id)
        action = REGION_UPDATE
    except NotFoundError:
        action = REGION_CREATE
    subject = Subject(action, REGION, region_id, body.cities, None)
    async with audit.change(subject, cities=body.cities) as change:
        stored, created = await database.regions.put(
            region_id,
            name_vi=body.name_vi,
            name_en=body.name_en,
            cities=body.cities,
            within=change.transaction,
        )
    response.status_code = 201 if created else 200
    return _region(stored)


@router.delete(
    "/v1/regions/{region_id}",
    status_code=204,
    summary="Remove a region (admin without a scope limit); keys scoped to it alone see nothing.",
    responses={403: PROBLEM, 404: PROBLEM},
)
async def delete_region(database: Db, audit: Audit, principal: Admin, region_id: RegionId) -> None:
    _unscoped(principal)
    region = await database.regions.get(region_id)
    async with audit.change(Subject(REGION_DELETE, REGION, region_id, region.cities, None)) as change:
        await database.regions.delete(region_id, within=change.transaction)
