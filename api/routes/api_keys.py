"""API keys: made by an admin, shown once, kept hashed, limited to a role and optionally to some
cities and domains."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.audit_trail import Audit, Subject
from api.auth import Admin, Role
from api.deps import Db, Keys
from api.pagination import Page, decode_text_cursor, paginate
from api.params import REGION_ID_PATTERN, Cursor
from api.problems import PROBLEM
from ioc_core.access import METRICS_ROLE, hash_key
from ioc_core.areas import AREA_ID_PATTERN
from ioc_core.audit import API_KEY, API_KEY_CREATE, API_KEY_REVOKE
from ioc_core.models import CityList, DomainList
from ioc_core.storage import ApiKeyRow

router = APIRouter()

KeyId = Annotated[str, Path(pattern="^key_[0-9a-f]{16}$", description="API key id")]


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"role": "operator", "cities": ["hai-phong"], "name": "Hải Phòng flood desk"},
                {"role": "metrics", "name": "Prometheus"},
            ]
        },
    )

    role: Role = Field(
        description="viewer (read), operator (read, acknowledge, resolve), admin (everything), or"
        " metrics (`/metrics` of the API, gateways and processors, and nothing else)"
    )
    cities: CityList = Field(
        default=None, min_length=1, max_length=100, description="only these cities; omitted = every city"
    )
    domains: DomainList = Field(
        default=None, min_length=1, max_length=10, description="only these domains; omitted = every domain"
    )
    regions: list[Annotated[str, StringConstraints(pattern=REGION_ID_PATTERN)]] | None = Field(
        default=None,
        min_length=1,
        max_length=20,
        description="the cities of these regions (`/v1/regions`), as they are when the key is used,"
        " with any `cities` named",
    )
    areas: list[Annotated[str, StringConstraints(pattern=f"^{AREA_ID_PATTERN.pattern}$")]] | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="only the devices lying in these areas (`/v1/areas`) and their alarms: a ward"
        " office's key; viewer or operator only",
    )
    name: str | None = Field(default=None, max_length=200, description="who or what uses the key")


class ApiKey(BaseModel):
    id: str
    name: str | None
    role: Role
    cities: list[str] | None
    domains: list[str] | None
    regions: list[str] | None = None
    areas: list[str] | None = None
    created_by: str | None
    created_at: datetime
    revoked_at: datetime | None


class NewApiKey(ApiKey):
    key: str = Field(description="the key itself, shown this once only")


def _api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        role=row.role,  # type: ignore[arg-type]
        cities=row.cities,
        domains=row.domains,
        regions=row.regions,
        areas=row.areas,
        created_by=row.created_by,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


@router.post(
    "/v1/api-keys",
    response_model=NewApiKey,
    status_code=201,
    summary="Make an API key (admin); the key is in this answer only.",
    description="A key limited to some cities or domains sees nothing else: other objects answer 404."
    " An admin limited to a scope can only make keys within it. A `metrics` key has no scope (metrics"
    " count across the whole system), so only an admin without a scope limit makes one.",
    tags=["api keys"],
    responses={400: PROBLEM, 403: PROBLEM},
)
async def create_key(database: Db, audit: Audit, principal: Admin, body: ApiKeyIn) -> NewApiKey:
    if body.role == METRICS_ROLE and (body.cities, body.domains, body.regions) != (None, None, None):
        raise HTTPException(
            400, "a metrics key cannot be limited to cities, regions or domains: metrics are system-wide"
        )
    if body.areas is not None and body.role not in ("viewer", "operator"):
        raise HTTPException(400, "a key limited to areas is a viewer or operator key")
    key_id = "key_" + secrets.token_hex(8)
    cities = body.cities
    if body.regions is not None:
        if missing := await database.regions.missing(body.regions):
            raise HTTPException(400, f"no such region: {', '.join(missing)}")
        # Scope is checked against the regions' cities of today; the key follows them later.
        cities = sorted({*(body.cities or []), *await database.regions.cities_of(body.regions)})
    if body.areas is not None:
        found = await database.areas.find(None, None, None, ids=body.areas)
        if missing := sorted(set(body.areas) - {a.id for a in found}):
            raise HTTPException(400, f"no such area: {', '.join(missing)}")
        # The scope a key-maker must hold: the areas' cities (and any cities named).
        if cities is None:
            cities = sorted({a.city for a in found})
    subject = Subject(API_KEY_CREATE, API_KEY, key_id, cities, body.domains)
    if not principal.covers(body.cities, body.domains):
        raise await audit.refuse(
            subject, 403, "a key cannot be given a wider scope than the key that makes it", role=body.role
        )
    key = "ioc_" + secrets.token_urlsafe(32)
    # Regions and areas are named in the entry only where the key has them.
    limits = {k: v for k, v in (("regions", body.regions), ("areas", body.areas)) if v is not None}
    async with audit.change(subject, role=body.role, name=body.name, **limits) as change:
        row = await database.api_keys.create(
            key_id=key_id,
            name=body.name,
            role=body.role,
            cities=body.cities,
            domains=body.domains,
            key_hash=hash_key(key),
            created_by=principal.name,
            regions=body.regions,
            areas=body.areas,
            within=change.transaction,
        )
    return NewApiKey(**_api_key(row).model_dump(), key=key)


@router.get(
    "/v1/api-keys",
    response_model=Page[ApiKey],
    summary="API keys within the caller's scope, without the keys themselves (admin).",
    tags=["api keys"],
    responses={400: PROBLEM},
)
async def list_keys(
    database: Db,
    principal: Admin,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Cursor = None,
) -> Page[ApiKey]:
    after = decode_text_cursor(cursor)
    cities, domains = principal.city_filter(None), principal.domain_filter(None)
    return await paginate(
        lambda n: database.api_keys.page(cities, domains, after=after, limit=n),
        limit,
        cursor_of=lambda row: row.id,
        item=_api_key,
    )


@router.delete(
    "/v1/api-keys/{key_id}",
    status_code=204,
    summary="Revoke an API key (admin); it stops working within seconds.",
    tags=["api keys"],
    responses={404: PROBLEM},
)
async def revoke_key(database: Db, audit: Audit, keys: Keys, principal: Admin, key_id: KeyId) -> None:
    row = await database.api_keys.get(key_id)
    subject = Subject(API_KEY_REVOKE, API_KEY, key_id, row.cities, row.domains)
    await audit.require_scope(subject, what=f"API key {key_id!r}")
    async with audit.change(subject, role=row.role, name=row.name) as change:
        await database.api_keys.revoke(key_id, within=change.transaction)
    keys.clear()
