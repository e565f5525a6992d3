"""Rules at run time: a domain's default rules overridden for a city, an area or a device, read,
stored (versioned, with optimistic concurrency) and removed; and a device's effective rules with
where each value comes from. Processors take a change into account within IOC_RULES_REFRESH_S.

Precedence, later winning key by key (see `ioc_core.rules`): the domain's defaults, the city's
override, the overrides of the areas the device lies in (largest first, so the smallest area wins,
then the smaller id), the device's registered `thresholds`, the device's override.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Header, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from api.audit_trail import Audit, AuditTrail, Subject
from api.auth import Admin, Viewer
from api.deps import Db, ViewedDevice, scoped_device
from api.params import CityFilter, DomainFilter
from api.problems import PROBLEM
from ioc_core.areas import AREA_ID_PATTERN
from ioc_core.audit import RULES, RULES_DELETE, RULES_READ, RULES_UPDATE
from ioc_core.domains import get_domain
from ioc_core.errors import NotFoundError, ValidationError
from ioc_core.models import Thresholds
from ioc_core.rules import device_layers, rule_sources, settings_problems
from ioc_core.storage import RuleOverride, RuleScope
from ioc_core.telemetry import DEVICE_ID_PATTERN

router = APIRouter(tags=["rules"])

AreaParam = Annotated[
    str | None, Query(pattern=f"^{AREA_ID_PATTERN.pattern}$", description="an area's id: its override")
]
DeviceParam = Annotated[
    str | None, Query(pattern=f"^{DEVICE_ID_PATTERN.pattern}$", description="a device's id: its override")
]
IfMatch = Annotated[
    str | None,
    Header(
        description="the `version` (the ETag) the rules were read at: the change is made only if they"
        " are still at it, else 409"
    ),
]
_VERSION_TAG = re.compile(r'^(?:W/)?"?(\d{1,18})"?$')

_RULES_EXAMPLE = {"currentLevel": {"warn_above": 2.5, "crit_above": 4.0}}


class RulesOverride(BaseModel):
    """A stored override of a domain's default rules."""

    level: Literal["city", "area", "device"] = Field(description="where it applies")
    scope: str = Field(description="the city slug, area id or device id")
    domain: str
    rules: dict[str, dict[str, float | None]] = Field(
        description="per metric, rule keys as a device's `thresholds` take them; null switches one off"
    )
    version: int = Field(description="the rules version it last changed at; also its ETag")
    updated_by: str = Field(description="the name of the key that stored it")
    updated_at: datetime


class SourcedRule(BaseModel):
    value: float | None
    source: str = Field(
        description="`domain` (the default), `city`, `area:{id}`, `thresholds` (the device's registered"
        " ones) or `device` (its override)"
    )


class EffectiveRules(BaseModel):
    device_id: str
    domain: str
    rules_version: int = Field(description="the rules version these were read at")
    metrics: dict[str, dict[str, SourcedRule]] = Field(
        description="per metric and rule key, the value in force and where it comes from"
    )


def _out(stored: RuleOverride) -> RulesOverride:
    return RulesOverride(
        level=stored.scope.level,
        scope=stored.scope.id,
        domain=stored.scope.domain,
        rules=stored.rules,
        version=stored.version,
        updated_by=stored.updated_by,
        updated_at=stored.updated_at,
    )


def _expected_version(if_match: str | None) -> int | None:
    if if_match is None:
        return None
    found = _VERSION_TAG.match(if_match.strip())
    if found is None:
        raise ValidationError(
            f'If-Match must carry the version the rules were read at (their ETag, e.g. "12"),'
            f" not {if_match!r}"
        )
    return int(found.group(1))


async def _scope(
    audit: AuditTrail,
    action: str,
    *,
    domain: str | None,
    city: str | None,
    area: str | None,
    device: str | None,
) -> tuple[RuleScope, Subject]:
    """The override a request names, within the caller's scope: an area or device outside it
    answers 404 as a missing one; a city outside it 404 for a read and 403 for a change."""
    named = [
        level for level, value in (("city", city), ("area", area), ("device", device)) if value is not None
    ]
    if len(named) != 1:
        raise ValidationError("name exactly one of city, area or device")
    if device is not None:
        found = await scoped_device(audit, device, action)
        if domain is not None and domain != found.domain:
            raise ValidationError(f"device {device!r} is a {found.domain} device, not a {domain} one")
        scope = RuleScope("device", device, found.domain)
        return scope, Subject(action, RULES, scope.key, [found.city], [found.domain], found.areas)
    if domain is None:
        raise ValidationError("name the domain whose rules these are (domain=)")
    if area is not None:
        place = await audit.database.areas.get(area)
        scope = RuleScope("area", area, domain)
        subject = Subject(action, RULES, scope.key, [place.city], [domain], [area])
        await audit.require_scope(subject, what=f"area {area!r}")
        return scope, subject
    assert city is not None
    scope = RuleScope("city", city, domain)
    subject = Subject(action, RULES, scope.key, [city], [domain], None)
    if action == RULES_READ:
        await audit.require_scope(subject, what=f"the {domain} rules of {city}")
    elif not audit.principal.covers([city], [domain]) or not audit.principal.sees_areas(None):
        raise await audit.refuse(subject, 403, f"this key may not change the {domain} rules of {city}")
    return scope, subject


@router.get(
    "/v1/rules",
    response_model=RulesOverride,
    summary="The override of a domain's rules for a city, an area or a device.",
    description="Name exactly one of `city`, `area` or `device`, and the `domain` (a device's is its"
    " own). 404 when none is set there. The `ETag` is the override's version, for `If-Match`.",
    responses={400: PROBLEM, 404: PROBLEM},
)
async def get_rules(
    audit: Audit,
    principal: Viewer,
    response: Response,
    domain: DomainFilter = None,
    city: CityFilter = None,
    area: AreaParam = None,
    device: DeviceParam = None,
) -> RulesOverride:
    scope, _ = await _scope(audit, RULES_READ, domain=domain, city=city, area=area, device=device)
    stored = await audit.database.rules.get(scope)
    response.headers["ETag"] = f'"{stored.version}"'
    return _out(stored)


@router.put(
    "/v1/rules",
    response_model=RulesOverride,
    summary="Override a domain's rules for a city, an area or a device (admin).",
    description="The body is `{metric: {key: value}}` as a device's `thresholds` (limits warn_above,"
    " crit_above, warn_below, crit_below, hysteresis; rise_above, drop_above, rate_window_s; zscore,"
    " zscore_floor; flatline_s; null switches one off), checked the same way (422). It replaces the"
    ' override there as a whole. With `If-Match: "VERSION"` it is stored only while the override'
    " is at that version (409 otherwise). 201 when new, 200 when replaced. Processors apply it"
    " within IOC_RULES_REFRESH_S seconds; precedence, later winning key by key: domain defaults,"
    " city, areas (largest first: the smallest area wins, then the smaller id), the device's"
    " `thresholds`, the device's override.",
    responses={201: {"model": RulesOverride}, 400: PROBLEM, 403: PROBLEM, 404: PROBLEM, 409: PROBLEM},
)
async def put_rules(
    audit: Audit,
    principal: Admin,
    response: Response,
    rules: Annotated[Thresholds, Body(examples=[_RULES_EXAMPLE])],
    if_match: IfMatch = None,
    domain: DomainFilter = None,
    city: CityFilter = None,
    area: AreaParam = None,
    device: DeviceParam = None,
) -> RulesOverride:
    expected = _expected_version(if_match)
    scope, subject = await _scope(audit, RULES_UPDATE, domain=domain, city=city, area=area, device=device)
    known = get_domain(scope.domain)
    assert known is not None
    settings: dict[str, dict[str, float | None]] = {
        metric: {str(key): value for key, value in keys.items()} for metric, keys in rules.items()
    }
    problems = settings_problems(known, settings, name="rules")
    if not settings:
        problems.append(((), "rules name no metric; DELETE removes an override"))
    if problems:
        raise RequestValidationError(
            [
                {"type": "value_error", "loc": ("body", *where), "msg": what, "input": None}
                for where, what in problems
            ]
        )
    async with audit.change(subject, level=scope.level, scope=scope.id, domain=scope.domain) as change:
        stored, previous = await audit.database.rules.put(
            scope, settings, updated_by=principal.name, expected_version=expected, within=change.transaction
        )
        change.detail.update(
            version=stored.version,
            rules=stored.rules,
            previous_version=previous.version if previous is not None else None,
            previous_rules=previous.rules if previous is not None else None,
        )
    response.status_code = 201 if previous is None else 200
    response.headers["ETag"] = f'"{stored.version}"'
    return _out(stored)


@router.delete(
    "/v1/rules",
    status_code=204,
    summary="Remove the override of a domain's rules for a city, an area or a device (admin).",
    description="The devices there return to the next rules in precedence within IOC_RULES_REFRESH_S"
    " seconds. `If-Match` as for PUT.",
    responses={400: PROBLEM, 403: PROBLEM, 404: PROBLEM, 409: PROBLEM},
)
async def delete_rules(
    audit: Audit,
    principal: Admin,
    if_match: IfMatch = None,
    domain: DomainFilter = None,
    city: CityFilter = None,
    area: AreaParam = None,
    device: DeviceParam = None,
) -> None:
    expected = _expected_version(if_match)
    scope, subject = await _scope(audit, RULES_DELETE, domain=domain, city=city, area=area, device=device)
    async with audit.change(subject, level=scope.level, scope=scope.id, domain=scope.domain) as change:
        removed = await audit.database.rules.delete(
            scope, expected_version=expected, within=change.transaction
        )
        change.detail.update(version=removed.version, rules=removed.rules)


@router.get(
    "/v1/devices/{device_id}/rules",
    response_model=EffectiveRules,
    summary="The rules in force for a device, and where each value comes from.",
    description="Per metric and rule key: the value the processors apply and its source: `domain`"
    " (the default), `city`, `area:{id}`, `thresholds` (the device's registered ones) or `device`"
    " (its override).",
    responses={404: PROBLEM},
)
async def device_rules(database: Db, device: ViewedDevice) -> EffectiveRules:
    # The version first: what follows is at least as new.
    version = await database.rules.version()
    rows = await database.devices.profiles([device.id])
    known = get_domain(device.domain)
    if not rows or known is None:
        raise NotFoundError(f"device {device.id!r} not found")
    row = rows[0]
    explained = rule_sources(known, device_layers(row.rule_layers, row.thresholds))
    return EffectiveRules(
        device_id=device.id,
        domain=device.domain,
        rules_version=version,
        metrics={
            metric: {
                key: SourcedRule(value=sourced.value, source=sourced.source) for key, sourced in keys.items()
            }
            for metric, keys in explained.items()
        },
    )
