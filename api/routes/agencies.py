"""Agencies (`ioc_core.incidents`): the records incidents are assigned to. Admin only; an admin
limited to some cities or domains manages only agencies whose cities and domains lie within its
scope. Every change goes to the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from api.audit_trail import Audit, AuditTrail, Subject
from api.auth import Admin
from api.deps import Db
from api.pagination import Page, decode_text_cursor, paginate
from api.params import Cursor, DomainFilter
from api.problems import PROBLEM
from ioc_core.audit import AGENCY, AGENCY_CREATE, AGENCY_DELETE, AGENCY_UPDATE
from ioc_core.incidents import (
    AGENCY_ID_PATTERN,
    Agency,
    AgencyFields,
    AgencyIn,
)

router = APIRouter(tags=["agencies"])

AgencyId = Annotated[str, Path(pattern=f"^{AGENCY_ID_PATTERN.pattern}$", description="agency id")]


def _subject(action: str, agency: Agency | AgencyIn) -> Subject:
    return Subject(action, AGENCY, agency.id, agency.cities, agency.domains)


async def _scoped(audit: AuditTrail, agency_id: str, action: str) -> Agency:
    agency = await audit.database.agencies.get(agency_id)
    await audit.require_scope(_subject(action, agency), what=f"agency {agency_id!r}")
    return agency


@router.post(
    "/v1/agencies",
    response_model=Agency,
    status_code=201,
    summary="Register an agency (admin).",
    description="`webhook_ids` name endpoints of `/v1/webhooks` that are told of the agency's"
    " assignments; `escalation_webhook_id` the one told when an assignment escalates.",
    responses={400: PROBLEM, 403: PROBLEM, 409: PROBLEM},
)
async def create_agency(database: Db, audit: Audit, principal: Admin, body: AgencyIn) -> Agency:
    subject = _subject(AGENCY_CREATE, body)
    if not principal.covers(body.cities, body.domains):
        raise await audit.refuse(
            subject, 403, "an agency cannot reach beyond the scope of the key that makes it"
        )
    async with audit.change(subject, **body.model_dump(mode="json", exclude_none=True)) as change:
        return await database.agencies.create(body, actor=principal.name, within=change.transaction)


@router.get(
    "/v1/agencies",
    response_model=Page[Agency],
    summary="Agencies by id (admin).",
    responses={400: PROBLEM},
)
async def agencies(
    database: Db,
    principal: Admin,
    domain: DomainFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Cursor = None,
) -> Page[Agency]:
    after = decode_text_cursor(cursor)
    page = await paginate(
        lambda n: database.agencies.page(limit=n, after=after, domains=[domain] if domain else None),
        limit,
        cursor_of=lambda row: row.id,
        item=lambda row: row,
    )
    page.items = [a for a in page.items if principal.covers(a.cities, a.domains)]
    return page


@router.get(
    "/v1/agencies/{agency_id}",
    response_model=Agency,
    summary="One agency (admin).",
    responses={404: PROBLEM},
)
async def agency(audit: Audit, principal: Admin, agency_id: AgencyId) -> Agency:
    return await _scoped(audit, agency_id, AGENCY_UPDATE)


@router.patch(
    "/v1/agencies/{agency_id}",
    response_model=Agency,
    summary="Change an agency (admin): the fields given; an explicit null clears an optional one.",
    responses={400: PROBLEM, 403: PROBLEM, 404: PROBLEM},
)
async def change_agency(
    database: Db, audit: Audit, principal: Admin, agency_id: AgencyId, body: AgencyFields
) -> Agency:
    found = await _scoped(audit, agency_id, AGENCY_UPDATE)
    cities = body.cities if "cities" in body.model_fields_set else found.cities
    domains = body.domains if "domains" in body.model_fields_set else found.domains
    subject = _subject(AGENCY_UPDATE, found)
    if not principal.covers(cities, domains):
        raise await audit.refuse(
            subject, 403, "an agency cannot reach beyond the scope of the key that changes it"
        )
    async with audit.change(subject, **body.model_dump(mode="json", exclude_unset=True)) as change:
        return await database.agencies.update(agency_id, body, within=change.transaction)


@router.delete(
    "/v1/agencies/{agency_id}",
    status_code=204,
    summary="Remove an agency (admin); its incidents are left unassigned.",
    responses={404: PROBLEM},
)
async def delete_agency(database: Db, audit: Audit, principal: Admin, agency_id: AgencyId) -> Response:
    found = await _scoped(audit, agency_id, AGENCY_DELETE)
    async with audit.change(_subject(AGENCY_DELETE, found)) as change:
        await database.agencies.delete(agency_id, within=change.transaction)
    return Response(status_code=204)
