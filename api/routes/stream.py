"""`GET /v1/stream`: live alarms, device status and state changes as Server-Sent Events, from the
process's `EventHub` (`api.stream`)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Header, HTTPException, Query
from pydantic import Field

from api import problems
from api.auth import Principal, require
from api.deps import Hub
from api.params import AreaFilter, CityFilter, DomainFilter, area_list, comma_list
from api.problems import Problem, ProblemError
from api.stream.framing import EVENT_STREAM_MEDIA_TYPE, RETRY_MS
from api.stream.hub import AUDIT_KIND, KINDS, STREAM_KINDS, EventHub, StreamFilter
from api.stream.positions import Position, decode_position, encode_position
from api.stream.response import ClientStream, EventStreamResponse
from ioc_core.errors import IocError

log = logging.getLogger(__name__)

router = APIRouter()

_RETRY_AFTER_S = 5


def _problem(description: str) -> dict[str, Any]:
    """An error answer in the schema. Spelt out rather than with `model`, which would document it
    under the route's own media type (`text/event-stream`) as well."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {"description": description, "content": {problems.PROBLEM_MEDIA_TYPE: {"schema": schema}}}


class StaleResumeProblem(Problem):
    oldest_event_id: str = Field(
        description="where the stream can resume instead: the client's position, moved forward"
        " wherever it is older than what is still served"
    )


_DESCRIPTION = f"""Server-Sent Events (`{EVENT_STREAM_MEDIA_TYPE}`) of what happens in the caller's scope:

* `event: alarm`: alarm lifecycle (`alarm.raised`, `alarm.updated`, `alarm.acknowledged`,
  `alarm.resolved`); the CloudEvent's `data` is the alarm.
* `event: status`: a device went online or offline (`device.online`, `device.offline`).
* `event: state`: `state.changed`, the latest state of devices of one city and domain that changed
  lately, sent every few seconds at most: `data.items` is a list of
  `{{device_id, status, ts, metrics}}`. `metrics` are those of the readings since the previous
  state event: merge them into what you have; the newest `ts` wins.
* `event: audit`: `audit.recorded`, an entry of the audit log (as `GET /v1/audit` lists it); only
  when `types` names `audit`, for admin keys, and only entries whose object lies within the key's
  scope (with `city` or `domain`, only those naming it).

Every `data:` is the CloudEvent 1.0 as one line of JSON. Every event has an `id`; a client that
reconnects with `Last-Event-ID` (browsers' EventSource does so by itself) gets every event it
missed, then the live ones, none twice, as long as what it missed is at most the server's resume
window old (`IOC_STREAM_RESUME_WINDOW_S`); an older id is refused with 409 and `oldest_event_id`,
the nearest position still served (resume from it, or start without an id and reload the state).
An id that is not one of this stream's starts from now. The stream starts with
`retry: {RETRY_MS}` and, for a new stream, an `id:` without data that gives the starting position.
Comment lines (`: heartbeat`) keep idle connections open. `types` is a comma-separated list of
`alarm`, `status`, `state`, `audit` (default `alarm,status,state`); `city` and `domain` narrow the
stream further, and `area` (area ids) to the alarms and status changes of devices lying in one of
those areas (state snapshots name no area, so they do not come then). One API process serves a
limited number of streams: beyond it, and while the process is not connected to Kafka, the answer
is 503 with `Retry-After`."""


def stream_kinds(types: str | None) -> frozenset[str]:
    return frozenset(comma_list(types, STREAM_KINDS, "types") or KINDS)


@router.get(
    "/v1/stream",
    tags=["live"],
    summary="Live alarms, device status and state changes as Server-Sent Events.",
    description=_DESCRIPTION,
    response_class=EventStreamResponse,
    status_code=200,
    responses={
        200: {
            "description": "an endless stream of events",
            "content": {EVENT_STREAM_MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        400: _problem("`types` names an unknown kind"),
        401: _problem("no API key, or not a valid one"),
        403: _problem("the key lacks the viewer role, or asks for `audit` without the admin role"),
        409: {
            "description": "the Last-Event-ID is older than the resume window",
            "content": {problems.PROBLEM_MEDIA_TYPE: {"schema": StaleResumeProblem.model_json_schema()}},
        },
        422: _problem("`city` or `domain` is not valid"),
        500: _problem("internal error"),
        503: {
            **_problem("not connected to Kafka yet, or too many open streams"),
            "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
        },
    },
)
async def stream(
    hub: Hub,
    principal: Annotated[Principal, require("viewer")],
    city: CityFilter = None,
    domain: DomainFilter = None,
    area: AreaFilter = None,
    types: Annotated[
        str | None,
        Query(description="comma-separated: alarm, status, state, audit (default alarm,status,state)"),
    ] = None,
    last_event_id: Annotated[
        str | None, Query(description="where to resume, for clients that cannot send the header")
    ] = None,
    last_event_id_header: Annotated[
        str | None, Header(alias="Last-Event-ID", description="the id of the last event received")
    ] = None,
) -> EventStreamResponse:
    kinds = stream_kinds(types)
    if AUDIT_KIND in kinds and not principal.has_role("admin"):
        raise HTTPException(403, "audit events need the admin role")
    retry_after = {"Retry-After": str(_RETRY_AFTER_S)}
    if not hub.connected:
        raise HTTPException(503, "the live event stream is not connected to Kafka yet", headers=retry_after)
    if hub.open_streams >= hub.max_streams:
        raise HTTPException(
            503, f"this API process already serves {hub.max_streams} streams", headers=retry_after
        )
    resume = decode_position(last_event_id_header or last_event_id, topic=hub.topic)
    if resume is not None:
        await refuse_stale_resume(hub, resume)
    areas = principal.area_filter(area_list(area))
    stream_filter = StreamFilter(
        kinds, city, domain, principal, frozenset(areas) if areas is not None else None
    )
    subscription, live_from = hub.subscribe(stream_filter)
    return EventStreamResponse(ClientStream(hub, subscription, live_from, resume))


async def refuse_stale_resume(hub: EventHub, resume: Position) -> None:
    """Refuse (409) a resume from before the resume window: replaying that much of the events
    topic costs the process more than a fresh start and a state reload cost the client."""
    live = hub.position
    if len(resume) != len(live) or all(r >= h for r, h in zip(resume, live, strict=True)):
        return  # nothing to replay; the stream itself sorts out ids of another layout
    try:
        oldest = await hub.oldest_served()
    except (KafkaError, TimeoutError, IocError) as exc:
        log.warning("live events: cannot find where the resume window starts: %s", exc)
        raise HTTPException(
            503,
            "the live event stream cannot check this Last-Event-ID now",
            headers={"Retry-After": str(_RETRY_AFTER_S)},
        ) from exc
    if all(r >= o for r, o in zip(resume, oldest, strict=True)):
        return
    nearest = tuple(max(r, o) for r, o in zip(resume, oldest, strict=True))
    raise ProblemError(
        409,
        f"this Last-Event-ID is older than the {hub.resume_window_s:g} s a stream may resume from;"
        " resume from `oldest_event_id` (what lies between is not replayed), or start without an id"
        " and reload the state",
        oldest_event_id=encode_position(nearest, topic=hub.topic),
    )
