"""API keys: made by an admin, shown once, kept hashed, limited to a role and optionally to some
cities and domains."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from api.audit_trail import Audit, Subject
from api.auth import Admin, Role
from api.deps import Db, Keys
from api.pagination import Page, decode_text_cursor, paginate
from api.params import Cursor
from api.problems import PROBLEM
from ioc_core.access import METRICS_ROLE, hash_key
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
    name: str | None = Field(default=None, max_length=200, description="who or what uses the key")


class ApiKey(BaseModel):
    id: str
    name: str | None
    role: Role
    cities: list[str] | None
    domains: list[str] | None
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
    if body.role == METRICS_ROLE and (body.cities is not None or body.domains is not None):
        raise HTTPException(
            400, "a metrics key cannot be limited to cities or domains: metrics are system-wide"
        )
    key_id = "key_" + secrets.token_hex(8)
    subject = Subject(API_KEY_CREATE, API_KEY, key_id, body.cities, body.domains)
    if not principal.covers(body.cities, body.domains):
        raise await audit.refuse(
            subject, 403, "a key cannot be given a wider scope than the key that makes it", role=body.role
        )
    key = "ioc_" + secrets.token_urlsafe(32)
    async with audit.change(subject, role=body.role, name=body.name) as change:
        row = await database.api_keys.create(
            key_id=key_id,
            name=body.name,
            role=body.role,
            cities=body.cities,
            domains=body.domains,
            key_hash=hash_key(key),
            created_by=principal.name,
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
