"""Maintenance windows (`/v1/maintenance-windows`): planned outages of a device, an area, a city's
domain or a whole city, one-off or recurring (RFC 5545 RRULE). Alarms raised inside one are
recorded with `suppressed: true` and sent to no agency; silence inside one raises no offline alarm.

Viewers read the windows within their scope; operators (and admins) make, change and remove them
within it, since planning field work is an operations task; every change goes to the audit log. A
window beyond the key's scope (a whole city for a key limited to some domains, say) is refused
(403); one naming a device or an area outside it answers as if it did not exist (422, as for a
missing one), and the attempt is recorded.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query

from api.audit_trail import Audit, AuditTrail, Subject
from api.auth import Operator, Viewer
from api.deps import Db
from api.pagination import Page, decode_text_cursor, paginate
from api.params import CityFilter, Cursor, DomainFilter, sees_nothing
from api.problems import PROBLEM
from ioc_core.audit import (
    MAINTENANCE_WINDOW,
    MAINTENANCE_WINDOW_CREATE,
    MAINTENANCE_WINDOW_DELETE,
    MAINTENANCE_WINDOW_READ,
    MAINTENANCE_WINDOW_UPDATE,
)
from ioc_core.errors import NotFoundError, ValidationError
from ioc_core.maintenance import (
    EXPANSION_TIMEOUT_S,
    WINDOW_ID_PATTERN,
    MaintenanceWindow,
    WindowIn,
    WindowPatch,
    new_window_id,
    normalised_rule,
    occurrences,
)

router = APIRouter(tags=["maintenance"])

WindowId = Annotated[str, Path(pattern=f"^{WINDOW_ID_PATTERN.pattern}$", description="window id")]


async def _expanded(
    start: datetime, end: datetime, rrule: str | None
) -> tuple[str | None, list[tuple[datetime, datetime]]]:
    """The rule as stored and the window's occurrences; a bad time or rule is a 422. Expanded in a
    thread, given up after `EXPANSION_TIMEOUT_S`: a rule that never matches searches for ages."""
    try:
        rule = normalised_rule(rrule) if rrule is not None else None
        expansion = asyncio.to_thread(occurrences, start, end, rule)
        return rule, await asyncio.wait_for(expansion, EXPANSION_TIMEOUT_S)
    except ValidationError as exc:
        raise HTTPException(422, str(exc)) from exc
    except TimeoutError:
        raise HTTPException(
            422, "`rrule` matches too rarely, or never: no occurrences found in time"
        ) from None


def _subject(action: str, window: MaintenanceWindow, areas: list[str] | None) -> Subject:
    return Subject(
        action,
        MAINTENANCE_WINDOW,
        window.id,
        [window.city] if window.city is not None else None,
        [window.domain] if window.domain is not None else None,
        areas,
    )


def _detail(window: MaintenanceWindow) -> dict[str, Any]:
    return {
        "target": window.target,
        "device_id": window.device_id,
        "area": window.area,
        "city": window.city,
        "domain": window.domain,
        "start": window.start.isoformat(),
        "end": window.end.isoformat(),
        "rrule": window.rrule,
        "reason": window.reason,
    }


async def _scoped_window(audit: AuditTrail, window_id: str, action: str) -> MaintenanceWindow:
    window = await audit.database.maintenance.get(window_id)
    areas = await audit.database.maintenance.areas_of(window)
    await audit.require_scope(_subject(action, window, areas), what=f"maintenance window {window_id!r}")
    return window


async def _target_place(audit: AuditTrail, body: WindowIn) -> Subject:
    """Where the new window lies (its cities, domains and areas), for the scope check. A device or an
    area that does not exist, or lies outside the key's scope, is the same 422."""
    database, principal = audit.database, audit.principal
    window_id = new_window_id()
    if body.device_id is not None:
        try:
            device = await database.devices.get(body.device_id)
        except NotFoundError:
            raise HTTPException(422, f"no device {body.device_id!r} is registered") from None
        subject = Subject(
            MAINTENANCE_WINDOW_CREATE,
            MAINTENANCE_WINDOW,
            window_id,
            [device.city],
            [device.domain],
            device.areas,
        )
        if not principal.covers(subject.cities, subject.domains) or not principal.sees_areas(device.areas):
            raise await audit.refuse(subject, 422, f"no device {body.device_id!r} is registered")
        return subject
    if body.area is not None:
        try:
            area = await database.areas.get(body.area)
        except NotFoundError:
            raise HTTPException(422, f"no area {body.area!r} is stored") from None
        # An area holds every domain's devices: only a key of every domain may silence one.
        subject = Subject(
            MAINTENANCE_WINDOW_CREATE, MAINTENANCE_WINDOW, window_id, [area.city], None, [area.id]
        )
        if (principal.cities is not None and area.city not in principal.cities) or not principal.sees_areas(
            [area.id]
        ):
            raise await audit.refuse(subject, 422, f"no area {body.area!r} is stored")
        if principal.domains is not None:
            raise await audit.refuse(
                subject, 403, "a window over an area silences every domain: beyond the key's domains"
            )
        return subject
    assert body.city is not None
    subject = Subject(
        MAINTENANCE_WINDOW_CREATE,
        MAINTENANCE_WINDOW,
        window_id,
        [body.city],
        [body.domain] if body.domain is not None else None,
    )
    if not principal.covers(subject.cities, subject.domains) or principal.areas is not None:
        raise await audit.refuse(subject, 403, "a maintenance window cannot reach beyond the key's scope")
    return subject


@router.post(
    "/v1/maintenance-windows",
    response_model=MaintenanceWindow,
    status_code=201,
    summary="Plan a maintenance window (operator): alarms raised inside it are recorded as suppressed.",
    description="Exactly one target: `device_id`, `area`, `domain` with `city`, or `city`. `start`"
    " and `end` (RFC 3339 with an offset) bound the window, or its first occurrence when `rrule`"
    " (RFC 5545, bounded by COUNT or UNTIL, at most 1000 occurrences within five years) repeats"
    " it. Inside it: alarms carry `suppressed: true`, send no webhook, are not escalated and do not"
    " count in the screens' open-alarm figures; a device going silent or offline raises no offline"
    " alarm (its status still shows offline) and its status events send no webhook. When it ends, an"
    " alarm still open is raised to agencies, and a device still offline raises its offline alarm."
    " The device or area must exist (422 otherwise).",
    responses={403: PROBLEM, 422: PROBLEM},
)
async def create_window(database: Db, audit: Audit, principal: Operator, body: WindowIn) -> MaintenanceWindow:
    rule, expanded = await _expanded(body.start, body.end, body.rrule)
    subject = await _target_place(audit, body)
    body = body.model_copy(update={"rrule": rule})
    async with audit.change(subject) as change:
        try:
            window = await database.maintenance.create(
                body,
                owner=principal.name,
                occurrences=expanded,
                within=change.transaction,
                window_id=subject.object_id,
            )
        except ValidationError as exc:
            # The device or area went away since it was looked up.
            raise HTTPException(422, str(exc)) from exc
        change.detail.update(_detail(window))
    return window


@router.get(
    "/v1/maintenance-windows",
    response_model=Page[MaintenanceWindow],
    summary="Maintenance windows within the caller's scope, in id order.",
    responses={400: PROBLEM},
)
async def list_windows(
    database: Db,
    principal: Viewer,
    city: CityFilter = None,
    domain: DomainFilter = None,
    active: Annotated[
        bool | None, Query(description="true: only windows under way now; false: only the others")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Cursor = None,
) -> Page[MaintenanceWindow]:
    cities, domains = principal.city_filter(city), principal.domain_filter(domain)
    areas = principal.area_filter(None)
    if sees_nothing(cities, domains) or areas == []:
        return Page[MaintenanceWindow].empty()
    after = decode_text_cursor(cursor)
    return await paginate(
        lambda n: database.maintenance.page(
            limit=n, after_id=after, cities=cities, domains=domains, areas=areas, active=active
        ),
        limit,
        cursor_of=lambda window: window.id,
        item=lambda window: window,
    )


@router.get(
    "/v1/maintenance-windows/{window_id}",
    response_model=MaintenanceWindow,
    summary="One maintenance window.",
    responses={404: PROBLEM},
)
async def get_window(audit: Audit, principal: Viewer, window_id: WindowId) -> MaintenanceWindow:
    return await _scoped_window(audit, window_id, MAINTENANCE_WINDOW_READ)


@router.patch(
    "/v1/maintenance-windows/{window_id}",
    response_model=MaintenanceWindow,
    summary="Change a window's times, rule (null removes it) or reason (operator).",
    description="The target cannot change: remove the window and plan another. Alarms already"
    " raised keep how they were raised; one left suppressed when the window no longer covers it is"
    " raised to agencies by the processor's next check.",
    responses={404: PROBLEM, 422: PROBLEM},
)
async def update_window(
    database: Db, audit: Audit, principal: Operator, window_id: WindowId, body: WindowPatch
) -> MaintenanceWindow:
    current = await _scoped_window(audit, window_id, MAINTENANCE_WINDOW_UPDATE)
    start = body.start if body.start is not None else current.start
    end = body.end if body.end is not None else current.end
    rrule = body.rrule if "rrule" in body.model_fields_set else current.rrule
    rule, expanded = await _expanded(start, end, rrule)
    areas = await database.maintenance.areas_of(current)
    changes = body.model_dump(mode="json", exclude_unset=True)
    async with audit.change(_subject(MAINTENANCE_WINDOW_UPDATE, current, areas), changes=changes) as change:
        return await database.maintenance.update(
            window_id,
            start=start,
            end=end,
            rrule=rule,
            reason=body.reason if body.reason is not None else current.reason,
            occurrences=expanded,
            within=change.transaction,
        )


@router.delete(
    "/v1/maintenance-windows/{window_id}",
    status_code=204,
    summary="Remove a maintenance window (operator).",
    description="Alarms it left suppressed and still open are raised to agencies by the processor's"
    " next check, as when a window ends.",
    responses={404: PROBLEM},
)
async def delete_window(database: Db, audit: Audit, principal: Operator, window_id: WindowId) -> None:
    current = await _scoped_window(audit, window_id, MAINTENANCE_WINDOW_DELETE)
    areas = await database.maintenance.areas_of(current)
    async with audit.change(
        _subject(MAINTENANCE_WINDOW_DELETE, current, areas), **_detail(current)
    ) as change:
        await database.maintenance.delete(window_id, within=change.transaction)
