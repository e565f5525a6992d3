"""Public warnings as OASIS CAP 1.2, with no key: the open alarms each domain declares public
(`Domain.public_warning`), for media and citizen apps to relay. `api.cap` builds the XML."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response

from api import cap
from api.deps import AppSettings, Db
from api.params import AlarmId, CityFilter
from api.problems import PROBLEM_MEDIA_TYPE, RATE_LIMIT_HEADERS
from api.view_cache import etag_matches
from ioc_core.domains import DOMAINS
from ioc_core.places import city_name, place_label
from ioc_core.settings import Settings
from ioc_core.storage.views import PublicAlarmRow

router = APIRouter(tags=["public"])

# Relays poll; half a minute of staleness is nothing next to a flood's pace and spares the database.
_MAX_AGE_S = 30
# The worst come first, so a flood of warnings still leaves out only the mildest.
_FEED_LIMIT = 1000
_ALERT_ROUTE = "public_cap_alert"


# Errors are problem+json only: with the shared `PROBLEM` (a model), FastAPI would also list the
# route's own XML media type for them.
_PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {
        "description": HTTPStatus(status).phrase,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        **({"headers": RATE_LIMIT_HEADERS} if status == 429 else {}),
    }
    for status in (400, 401, 403, 404, 422, 429, 500)
}


class AtomResponse(Response):
    media_type = cap.ATOM_MEDIA_TYPE


class CapResponse(Response):
    media_type = cap.CAP_MEDIA_TYPE


def _headers() -> dict[str, Any]:
    return {
        "ETag": {
            "description": "weak validator; send it back as `If-None-Match`",
            "schema": {"type": "string"},
        },
        "Cache-Control": {"description": f"`public, max-age={_MAX_AGE_S}`", "schema": {"type": "string"}},
    }


# The (domain, rule) pairs the domains declare public.
_PUBLIC_RULES = sorted(
    (name, rule)
    for name, domain in DOMAINS.items()
    if domain.public_warning is not None
    for rule in domain.public_warning.rules
)


def _sender(request: Request, settings: Settings) -> cap.Sender:
    return cap.Sender(
        address=settings.cap_sender or cap.sender_address(request.url.hostname),
        name_vi="Trung tâm Điều hành thông minh",
        name_en="Intelligent Operations Center",
    )


def _area(row: PublicAlarmRow) -> cap.Area:
    alarm = row.alarm
    if row.area is not None:
        # An area's alarm: the area by name as a district is named, its outline, and the official
        # codes of the wards it concerns (its own first when it is a ward; a catchment has none).
        area = row.area
        own = [area.code] if area.kind == "ward" and area.code else []
        return cap.Area(
            f"{area.name_vi}, {city_name(alarm.city)}",
            polygons=cap.polygons_of(area.geometry),
            geocodes=cap.unit_geocodes([*own, *(ward.code for ward in area.wards)]),
        )
    if alarm.device_id is None:
        where = f"{alarm.district}, {city_name(alarm.city)}" if alarm.district else city_name(alarm.city)
        return cap.Area(where, cap.circle_around(row.district_points))
    label = place_label(
        name=row.device_name, fallback=alarm.device_id, district=alarm.district, city=alarm.city
    )
    return cap.Area(label, cap.circle_around([row.location]) if row.location else None)


def _public_alarm(request: Request, row: PublicAlarmRow) -> cap.PublicAlarm:
    alarm = row.alarm
    warning = DOMAINS[alarm.domain].public_warning
    # The query selects only the rules of domains that declare public warnings.
    assert warning is not None
    return cap.PublicAlarm(
        alarm_id=alarm.id,
        severity=alarm.severity,
        started_at=alarm.started_at,
        last_seen_at=alarm.last_seen_at,
        category=warning.category,
        event_vi=warning.event_vi,
        event_en=warning.event_en,
        description_vi=alarm.messages.vi,
        description_en=alarm.messages.en,
        area=_area(row),
        web=str(request.url_for(_ALERT_ROUTE, alarm_id=str(alarm.id))),
    )


def _answer(
    request: Request,
    what: object,
    render: Callable[[], ET.Element],
    response_class: type[Response],
    media_type: str,
) -> Response:
    """304 when the client has this version, else the rendered body; either way cacheable by anyone
    for a short while (nothing here depends on who asks)."""
    tag = f'W/"{hashlib.blake2b(repr(what).encode(), digest_size=16).hexdigest()}"'
    headers = {"ETag": tag, "Cache-Control": f"public, max-age={_MAX_AGE_S}"}
    if etag_matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    return response_class(cap.to_bytes(render()), media_type=f"{media_type}; charset=utf-8", headers=headers)


@router.get(
    "/v1/public/cap",
    response_class=AtomResponse,
    summary="Public warnings: an Atom feed of OASIS CAP 1.2 alerts (no key).",
    description="One entry per open public alarm (flood: water past a station's limits, rising fast,"
    " or flooding a catchment, ward or district) of severity medium or worse, worst first, each with"
    " its CAP `alert` inline (Vietnamese and English `info`; the place as a circle, or for a catchment"
    " or ward its outline as polygons with the wards' official codes as `VN-MaDVHC` geocodes). An"
    " alarm whose severity rises is a new alert, an `Update` referencing the earlier ones.",
    responses={
        200: {"description": "the feed", "headers": _headers()},
        304: {"description": "nothing changed"},
        **{k: v for k, v in _PROBLEMS.items() if k != 404},
    },
)
async def cap_feed(
    request: Request, database: Db, settings: AppSettings, city: CityFilter = None
) -> Response:
    rows = await database.alarms.public(_PUBLIC_RULES, cap.PUBLIC_SEVERITIES, city=city, limit=_FEED_LIMIT)
    sender = _sender(request, settings)
    entries = [cap.FeedEntry(alarm, alarm.web or "") for alarm in (_public_alarm(request, r) for r in rows)]
    self_link = str(request.url)

    def render() -> ET.Element:
        return cap.feed(
            entries,
            sender,
            feed_id=self_link,
            self_link=self_link,
            title=f"Cảnh báo công cộng / Public warnings{f' — {city_name(city)}' if city else ''}",
            now=datetime.now(UTC),
        )

    # The feed's `updated` of an empty feed is the time of asking; the entries are what matter.
    return _answer(request, (self_link, sender, entries), render, AtomResponse, cap.ATOM_MEDIA_TYPE)


@router.get(
    "/v1/public/cap/{alarm_id}",
    name=_ALERT_ROUTE,
    response_class=CapResponse,
    summary="One public warning's current OASIS CAP 1.2 alert (no key).",
    description="The alert of an open public alarm at its current severity; an alarm that is not"
    " public, not open or not known is a 404.",
    responses={
        200: {"description": "the alert", "headers": _headers()},
        304: {"description": "nothing changed"},
        **_PROBLEMS,
    },
)
async def cap_alert(request: Request, database: Db, settings: AppSettings, alarm_id: AlarmId) -> Response:
    rows = await database.alarms.public(_PUBLIC_RULES, cap.PUBLIC_SEVERITIES, alarm_id=alarm_id, limit=1)
    if not rows:
        raise HTTPException(404, f"public warning {alarm_id} not found")
    alarm = _public_alarm(request, rows[0])
    sender = _sender(request, settings)
    return _answer(
        request, (alarm, sender), lambda: cap.alert(alarm, sender), CapResponse, cap.CAP_MEDIA_TYPE
    )
