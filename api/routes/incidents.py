"""Incidents (`ioc_core.incidents`): list and read them within the caller's scope; open one by
hand from chosen alarms, move it through its states, assign it to an agency, note and tick its
checklist (operator); the cities' standard operating procedures (read: viewer; edit: admin).
Every change goes to the incident's timeline and to the audit log."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field

from api.audit_trail import Audit, AuditTrail, Subject
from api.auth import Admin, Operator, Viewer
from api.deps import Db, scoped_alarm
from api.pagination import Page, decode_int_cursor, paginate
from api.params import AreaFilter, CityFilter, DomainFilter, area_list, comma_list, sees_nothing
from api.problems import PROBLEM
from api.view_cache import etag_matches
from ioc_core.audit import (
    ALARM_READ,
    INCIDENT,
    INCIDENT_CHECK,
    INCIDENT_CREATE,
    INCIDENT_READ,
    INCIDENT_UPDATE,
    PROCEDURE,
    PROCEDURE_UPDATE,
)
from ioc_core.incidents import (
    AGENCY_ID_PATTERN,
    INCIDENT_STATES,
    KINDS,
    STEP_ID_PATTERN,
    Incident,
    IncidentState,
    Procedure,
    ProcedureIn,
    TextInput,
    Titles,
    domain_of_kind,
)
from ioc_core.rules import SEVERITIES
from ioc_core.telemetry import CITY_PATTERN

router = APIRouter(tags=["incidents"])

IncidentId = Annotated[int, Path(ge=1, le=2**63 - 1, description="incident id")]
StepPath = Annotated[str, Path(pattern=f"^{STEP_ID_PATTERN.pattern}$", description="checklist step id")]
KindQuery = Annotated[str, Query(pattern="^(" + "|".join(KINDS) + ")$", description="incident kind")]
CityQuery = Annotated[str, Query(pattern=f"^{CITY_PATTERN.pattern}$", description="city slug")]


class TitlesIn(TextInput):
    model_config = ConfigDict(extra="forbid")

    vi: str = Field(min_length=1, max_length=300)
    en: str = Field(min_length=1, max_length=300)


class IncidentIn(TextInput):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"alarm_ids": [41, 42], "title": {"vi": "Ngập phố Cầu Đất", "en": "Cầu Đất street flooding"}}
            ]
        },
    )

    alarm_ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(min_length=1, max_length=500)
    title: TitlesIn | None = Field(default=None, description="left out: the kind's title and the place")
    kind: str | None = Field(
        default=None, pattern="^(" + "|".join(KINDS) + ")$", description="left out: the alarms' domain's"
    )


class IncidentPatch(TextInput):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"state": "in_progress", "agency_id": "pctt-hai-phong", "note": "đã cử đội"}]
        },
    )

    state: IncidentState | None = Field(
        default=None,
        description="open → acknowledged → in_progress → resolved → closed (forward steps may be"
        " skipped; a resolved incident may go back to in_progress); any other move is a 409",
    )
    agency_id: str | None = Field(
        default=None, pattern=f"^{AGENCY_ID_PATTERN.pattern}$", description="assign to this agency"
    )
    title: TitlesIn | None = None
    note: str | None = Field(default=None, max_length=2000, description="for the timeline")


class CheckIn(TextInput):
    model_config = ConfigDict(extra="forbid")

    done: bool = Field(default=True, description="false unticks the step")
    note: str | None = Field(default=None, max_length=2000)


def _subject(action: str, incident: Incident) -> Subject:
    return Subject(action, INCIDENT, str(incident.id), [incident.city], [incident.domain], incident.areas)


async def _scoped(audit: AuditTrail, incident_id: int, action: str) -> Incident:
    """The incident, when it lies within the caller's scope; else 404, as a missing one."""
    incident = await audit.database.incidents.get(incident_id)
    await audit.require_scope(_subject(action, incident), what=f"incident {incident_id}")
    return incident


@router.get(
    "/v1/incidents",
    response_model=Page[Incident],
    summary="Incidents matching every filter given, newest first (ETag; 304 on If-None-Match).",
    responses={304: {"description": "not modified"}, 400: PROBLEM},
)
async def incidents(
    request: Request,
    database: Db,
    principal: Viewer,
    state: Annotated[
        str | None,
        Query(
            max_length=100, description="comma-separated: open, acknowledged, in_progress, resolved, closed"
        ),
    ] = None,
    city: CityFilter = None,
    domain: DomainFilter = None,
    kind: Annotated[str | None, Query(max_length=100, description="comma-separated incident kinds")] = None,
    severity: Annotated[
        str | None, Query(max_length=100, description="comma-separated: low, medium, high, critical")
    ] = None,
    area: AreaFilter = None,
    agency_id: Annotated[str | None, Query(pattern=f"^{AGENCY_ID_PATTERN.pattern}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Annotated[str | None, Query(max_length=200, description="`next` of the previous page")] = None,
) -> Response:
    before = decode_int_cursor(cursor)
    areas = principal.area_filter(area_list(area))
    cities, domains = principal.city_filter(city), principal.domain_filter(domain)
    states = comma_list(state, INCIDENT_STATES, "state")
    kinds = comma_list(kind, KINDS, "kind")
    severities = comma_list(severity, SEVERITIES, "severity")
    if sees_nothing(cities, domains, areas):
        page = Page[Incident].empty()
    else:
        page = await paginate(
            lambda n: database.incidents.page(
                limit=n,
                before_id=before,
                states=states,
                cities=cities,
                domains=domains,
                kinds=kinds,
                severities=severities,
                areas=areas,
                agency_id=agency_id,
            ),
            limit,
            cursor_of=lambda row: row.id,
            item=lambda row: row,
        )
    body = page.model_dump(mode="json")
    # Screens poll this list: the tag is the answer's own digest, so a list that did not change
    # costs them no body.
    tag = f'W/"{hashlib.blake2b(repr(body).encode(), digest_size=16).hexdigest()}"'
    if etag_matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers={"ETag": tag})
    return JSONResponse(body, headers={"ETag": tag})


@router.post(
    "/v1/incidents",
    response_model=Incident,
    status_code=201,
    summary="Open an incident by hand from chosen alarms (operator).",
    description="The alarms must be of one city and belong to no incident yet (409 otherwise);"
    " its severity is the highest of theirs, its checklist its kind's procedure as the city uses it.",
    responses={400: PROBLEM, 403: PROBLEM, 404: PROBLEM, 409: PROBLEM},
)
async def create_incident(database: Db, audit: Audit, principal: Operator, body: IncidentIn) -> Incident:
    alarm_ids = sorted(set(body.alarm_ids))
    cities: set[str] = set()
    domains: set[str] = set()
    areas: set[str] = set()
    for alarm_id in alarm_ids:
        alarm = await scoped_alarm(audit, alarm_id, ALARM_READ)
        cities.add(alarm.city)
        domains.add(alarm.domain)
        areas.update(alarm.areas)
    if body.kind is not None:
        domains.add(domain_of_kind(body.kind))
    subject = Subject(INCIDENT_CREATE, INCIDENT, "new", sorted(cities), sorted(domains), sorted(areas))
    if not principal.covers(subject.cities, subject.domains):
        raise await audit.refuse(subject, 403, "the incident would reach beyond the key's scope")
    titles = Titles(vi=body.title.vi, en=body.title.en) if body.title is not None else None
    async with audit.change(subject, alarm_ids=alarm_ids, kind=body.kind) as change:
        incident = await database.incidents.create(
            alarm_ids, kind=body.kind, titles=titles, actor=principal.name, within=change.transaction
        )
        change.detail["incident_id"] = incident.id
    return incident


@router.get(
    "/v1/incidents/{incident_id}",
    response_model=Incident,
    summary="One incident with its alarms, checklist and timeline.",
    responses={404: PROBLEM},
)
async def incident(audit: Audit, principal: Viewer, incident_id: IncidentId) -> Incident:
    return await _scoped(audit, incident_id, INCIDENT_READ)


@router.patch(
    "/v1/incidents/{incident_id}",
    response_model=Incident,
    summary="Change an incident's state, assign it to an agency, retitle it or note something (operator).",
    description="Assigning tells the agency's webhook endpoints (`incident.assigned`); an assignment"
    " left open (not acknowledged) past the kind's delay escalates (`incident.escalated`, to the"
    " agency's escalation endpoint). A move the state machine does not allow is a 409.",
    responses={400: PROBLEM, 404: PROBLEM, 409: PROBLEM},
)
async def change_incident(
    database: Db, audit: Audit, principal: Operator, incident_id: IncidentId, body: IncidentPatch
) -> Incident:
    found = await _scoped(audit, incident_id, INCIDENT_UPDATE)
    detail: dict[str, Any] = body.model_dump(mode="json", exclude_none=True)
    titles = Titles(vi=body.title.vi, en=body.title.en) if body.title is not None else None
    async with audit.change(_subject(INCIDENT_UPDATE, found), **detail) as change:
        return await database.incidents.change(
            incident_id,
            actor=principal.name,
            state=body.state,
            agency_id=body.agency_id,
            note=body.note,
            titles=titles,
            within=change.transaction,
        )


@router.post(
    "/v1/incidents/{incident_id}/checklist/{item}",
    response_model=Incident,
    summary="Tick (or untick) a step of an incident's checklist (operator).",
    responses={404: PROBLEM, 409: PROBLEM},
)
async def check_step(
    database: Db,
    audit: Audit,
    principal: Operator,
    incident_id: IncidentId,
    item: StepPath,
    body: CheckIn | None = None,
) -> Incident:
    check = body or CheckIn()
    found = await _scoped(audit, incident_id, INCIDENT_CHECK)
    async with audit.change(_subject(INCIDENT_CHECK, found), step=item, done=check.done) as change:
        return await database.incidents.check(
            incident_id,
            item,
            done=check.done,
            actor=principal.name,
            note=check.note,
            within=change.transaction,
        )


@router.get(
    "/v1/procedures",
    response_model=Procedure,
    summary="A kind's standard operating procedure as a city uses it.",
    responses={400: PROBLEM, 404: PROBLEM},
)
async def procedure(
    database: Db, audit: Audit, principal: Viewer, city: CityQuery, kind: KindQuery
) -> Procedure:
    await audit.require_scope(
        Subject(PROCEDURE_UPDATE, PROCEDURE, f"{city}/{kind}", [city], [domain_of_kind(kind)]),
        what=f"procedure {kind!r} of {city!r}",
    )
    return await database.incidents.procedure(city, kind)


@router.put(
    "/v1/procedures",
    response_model=Procedure,
    summary="Set a city's own procedure of a kind (admin); incidents opened afterwards use it.",
    responses={400: PROBLEM, 404: PROBLEM},
)
async def put_procedure(
    database: Db, audit: Audit, principal: Admin, city: CityQuery, kind: KindQuery, body: ProcedureIn
) -> Procedure:
    subject = Subject(PROCEDURE_UPDATE, PROCEDURE, f"{city}/{kind}", [city], [domain_of_kind(kind)])
    await audit.require_scope(subject, what=f"procedure {kind!r} of {city!r}")
    async with audit.change(subject, **body.model_dump(mode="json", exclude_none=True)) as change:
        return await database.incidents.put_procedure(
            city, kind, body, actor=principal.name, within=change.transaction
        )


@router.delete(
    "/v1/procedures",
    response_model=Procedure,
    summary="Drop a city's own procedure of a kind (admin): the domain's applies again.",
    responses={400: PROBLEM, 404: PROBLEM},
)
async def reset_procedure(
    database: Db, audit: Audit, principal: Admin, city: CityQuery, kind: KindQuery
) -> Procedure:
    subject = Subject(PROCEDURE_UPDATE, PROCEDURE, f"{city}/{kind}", [city], [domain_of_kind(kind)])
    await audit.require_scope(subject, what=f"procedure {kind!r} of {city!r}")
    async with audit.change(subject, reset=True) as change:
        return await database.incidents.reset_procedure(city, kind, within=change.transaction)
