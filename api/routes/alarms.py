"""Alarms: list and read them within the caller's scope, acknowledge and resolve them (operator;
each action also goes to the audit log)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from api.audit_trail import Audit, Subject
from api.auth import Operator, Viewer
from api.deps import Db, ViewedAlarm, scoped_alarm
from api.pagination import Page, decode_int_cursor, paginate
from api.params import AlarmId, AreaFilter, CityFilter, DomainFilter, area_list, comma_list, sees_nothing
from api.problems import PROBLEM
from ioc_core.alarms import ALARM_STATES, Alarm
from ioc_core.audit import ALARM, ALARM_ACKNOWLEDGE, ALARM_RESOLVE
from ioc_core.rules import SEVERITIES
from ioc_core.telemetry import DEVICE_ID_PATTERN

router = APIRouter(tags=["alarms"])


class AlarmAction(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"note": "đội ứng cứu đã đến"}]}
    )

    note: str | None = Field(default=None, max_length=2000, description="why, for the audit trail")


def _subject(action: str, alarm: Alarm) -> Subject:
    return Subject(action, ALARM, str(alarm.id), [alarm.city], [alarm.domain])


def _detail(alarm: Alarm, note: str | None) -> dict[str, Any]:
    return {"device_id": alarm.device_id, "rule": alarm.rule, "severity": alarm.severity, "note": note}


@router.get(
    "/v1/alarms",
    response_model=Page[Alarm],
    summary="Alarms matching every filter given, newest first.",
    responses={400: PROBLEM},
)
async def alarms(
    database: Db,
    principal: Viewer,
    state: Annotated[
        str | None, Query(max_length=100, description="comma-separated: active, acknowledged, resolved")
    ] = None,
    city: CityFilter = None,
    domain: DomainFilter = None,
    severity: Annotated[
        str | None, Query(max_length=100, description="comma-separated: low, medium, high, critical")
    ] = None,
    device_id: Annotated[
        str | None, Query(pattern=f"^{DEVICE_ID_PATTERN.pattern}$", description="one device's alarms")
    ] = None,
    area: AreaFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Annotated[str | None, Query(max_length=200, description="`next` of the previous page")] = None,
) -> Page[Alarm]:
    before = decode_int_cursor(cursor)
    areas = principal.area_filter(area_list(area))
    cities, domains = principal.city_filter(city), principal.domain_filter(domain)
    if sees_nothing(cities, domains, areas):
        return Page[Alarm].empty()
    states = comma_list(state, ALARM_STATES, "state")
    severities = comma_list(severity, SEVERITIES, "severity")
    return await paginate(
        lambda n: database.alarms.page(
            limit=n,
            before_id=before,
            states=states,
            cities=cities,
            domains=domains,
            severities=severities,
            device_id=device_id,
            areas=areas,
        ),
        limit,
        cursor_of=lambda row: row.id,
        item=lambda row: row,
    )


@router.get(
    "/v1/alarms/{alarm_id}",
    response_model=Alarm,
    summary="One alarm, with who acknowledged or resolved it.",
    responses={404: PROBLEM},
)
async def alarm(found: ViewedAlarm) -> Alarm:
    return found


@router.post(
    "/v1/alarms/{alarm_id}/ack",
    response_model=Alarm,
    summary="Acknowledge an alarm (operator).",
    responses={404: PROBLEM, 409: PROBLEM},
)
async def acknowledge_alarm(
    database: Db, audit: Audit, alarm_id: AlarmId, principal: Operator, action: AlarmAction | None = None
) -> Alarm:
    note = action.note if action else None
    alarm = await scoped_alarm(audit, alarm_id, ALARM_ACKNOWLEDGE)
    async with audit.change(_subject(ALARM_ACKNOWLEDGE, alarm), **_detail(alarm, note)) as change:
        return await database.alarms.acknowledge(
            alarm_id, actor=principal.name, note=note, within=change.transaction
        )


@router.post(
    "/v1/alarms/{alarm_id}/resolve",
    response_model=Alarm,
    summary="Resolve an alarm by hand (operator).",
    responses={404: PROBLEM, 409: PROBLEM},
)
async def resolve_alarm(
    database: Db, audit: Audit, alarm_id: AlarmId, principal: Operator, action: AlarmAction | None = None
) -> Alarm:
    note = action.note if action else None
    alarm = await scoped_alarm(audit, alarm_id, ALARM_RESOLVE)
    async with audit.change(_subject(ALARM_RESOLVE, alarm), **_detail(alarm, note)) as change:
        return await database.alarms.resolve(
            alarm_id, actor=principal.name, note=note, within=change.transaction
        )
