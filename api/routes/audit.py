"""`GET /v1/audit`: the audit log of admin and operator actions, and of attempts refused because
the object lay outside the key's scope (admin; an admin limited to a scope sees only the entries
about objects within it)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from api.auth import Admin
from api.deps import Db
from api.pagination import Page, decode_int_cursor, paginate
from api.params import Cursor, comma_list, sees_nothing
from api.problems import PROBLEM
from ioc_core.audit import ACTIONS, OBJECT_TYPES, SETTINGS_KEY, AuditEntry, Outcome
from ioc_core.storage import AuditQuery

router = APIRouter(tags=["audit"])

ObjectType = Literal[
    "api_key",
    "device",
    "webhook",
    "alarm",
    "area",
    "region",
    "rules",
    "maintenance_window",
    "dead_letter",
    "incident",
    "agency",
    "procedure",
]
assert set(get_args(ObjectType)) == set(OBJECT_TYPES)


class AuditActor(BaseModel):
    key_id: str | None = Field(description="the API key's id; null for the settings' admin key")
    name: str = Field(description="the key's name (its id when it has none; `admin` for the settings' key)")
    address: str | None = Field(description="the client's address: the connection's peer")


class AuditObject(BaseModel):
    type: ObjectType
    id: str = Field(description="the object's id (for a refused creation, the id it would have had)")


class AuditItem(BaseModel):
    id: int
    at: datetime
    actor: AuditActor
    action: str = Field(description="what was done or tried, e.g. `device.update`")
    object: AuditObject
    outcome: Outcome = Field(
        description="`refused`: the object lay outside the key's scope (answered 404, or 403 for a"
        " creation beyond it)"
    )
    cities: list[str] | None = Field(description="the object's cities; null: every city")
    domains: list[str] | None = Field(description="the object's domains; null: every domain")
    detail: dict[str, Any] = Field(description="what changed, or why it was refused; never a secret")


def _item(entry: AuditEntry) -> AuditItem:
    return AuditItem(
        id=entry.id,
        at=entry.at,
        actor=AuditActor(key_id=entry.actor_key_id, name=entry.actor_name, address=entry.client_address),
        action=entry.action,
        object=AuditObject(type=entry.object_type, id=entry.object_id),  # type: ignore[arg-type]
        outcome=entry.outcome,  # type: ignore[arg-type]
        cities=entry.cities,
        domains=entry.domains,
        detail=entry.detail,
    )


def _instant(value: str | None, name: str) -> datetime | None:
    """An RFC 3339 time with an offset. Parsed here: as a `datetime` parameter, a bare number would
    pass as seconds since 1970."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise HTTPException(400, f"`{name}` must be RFC 3339 with an offset, like 2026-11-21T08:00:00+07:00")
    return parsed


Instant = {"format": "date-time", "examples": ["2026-11-21T08:00:00+07:00"]}
RFC3339 = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"


@router.get(
    "/v1/audit",
    response_model=Page[AuditItem],
    summary="Who did what, when and from where, newest first (admin).",
    description="Admin and operator actions (API keys, devices and their credentials, webhooks,"
    " alarm acknowledgements and resolutions) and attempts refused because the object lay outside"
    " the key's scope. An admin limited to some cities or domains sees only the entries whose"
    " object lies within its scope. Every filter given must match.",
    responses={400: PROBLEM},
)
async def audit_log(
    database: Db,
    principal: Admin,
    action: Annotated[
        str | None, Query(max_length=500, description="comma-separated actions, e.g. device.create")
    ] = None,
    actor_key_id: Annotated[
        str | None,
        Query(
            pattern=f"^(key_[0-9a-f]{{16}}|{SETTINGS_KEY})$",
            description=f"the acting key's id; `{SETTINGS_KEY}` for the settings' admin key",
        ),
    ] = None,
    object_type: Annotated[ObjectType | None, Query(description="the object's type")] = None,
    object_id: Annotated[
        str | None, Query(min_length=1, max_length=200, description="the object's id")
    ] = None,
    outcome: Annotated[Outcome | None, Query(description="done or refused")] = None,
    from_: Annotated[
        str | None,
        Query(alias="from", pattern=RFC3339, description="at or after, RFC 3339", json_schema_extra=Instant),
    ] = None,
    to: Annotated[
        str | None,
        Query(pattern=RFC3339, description="before (exclusive), RFC 3339", json_schema_extra=Instant),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Cursor = None,
) -> Page[AuditItem]:
    before = decode_int_cursor(cursor)
    since, until = _instant(from_, "from"), _instant(to, "to")
    if since is not None and until is not None and since >= until:
        raise HTTPException(400, "`from` must be before `to`")
    query = AuditQuery(
        actions=comma_list(action, ACTIONS, "action"),
        actor_key_id=actor_key_id if actor_key_id != SETTINGS_KEY else None,
        settings_key=actor_key_id == SETTINGS_KEY,
        object_type=object_type,
        object_id=object_id,
        outcome=outcome,
        since=since,
        until=until,
    )
    cities, domains = principal.city_filter(None), principal.domain_filter(None)
    if sees_nothing(cities, domains):
        return Page[AuditItem].empty()
    return await paginate(
        lambda n: database.audit.page(query, cities, domains, before=before, limit=n),
        limit,
        cursor_of=lambda entry: entry.id,
        item=_item,
    )
