"""Incidents: grouping alarms into them (the processor's job), escalating unacknowledged
assignments, what operators do with them (open by hand, change state, assign, note, tick the
checklist) with a timeline entry and an `incident.*` event for each change, and the cities' own
standard operating procedures. See `ioc_core.incidents` for what they are."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ioc_core.alarms import bilingual
from ioc_core.errors import ConflictError, NotFoundError, ValidationError
from ioc_core.events import Event
from ioc_core.incidents import (
    INCIDENT_ASSIGNED,
    INCIDENT_CLOSED,
    INCIDENT_ESCALATED,
    INCIDENT_OPENED,
    INCIDENT_RESOLVED,
    INCIDENT_UPDATED,
    OPEN_STATES,
    ChecklistItem,
    Incident,
    IncidentAlarm,
    Procedure,
    ProcedureIn,
    Step,
    TimelineEntry,
    Titles,
    check_transition,
    checklist_of,
    default_procedure,
    domain_of_kind,
    groups,
    incident_event,
    kind_of_domain,
    titles_for,
)
from ioc_core.rules import severity_rank
from ioc_core.storage.outbox import insert_events
from ioc_core.storage.pool import Connection, Pool, Transaction, text_list
from ioc_core.storage.schema import FLOOD_ZONE_AREA_SQL, area_size_sql
from ioc_core.storage.severity import severity_rank_sql
from ioc_core.storage.webhooks import NOTIFY_CHANNEL
from ioc_core.webhooks import message_body, message_id

SYSTEM_ACTOR = "system"
# One grouping pass takes at most this many new alarms; the next pass takes the rest.
GROUPING_BATCH = 500
# Whichever processors run the grouping job, one pass at a time groups: two passes seeing the
# same new alarm of a new place would each open an incident for it.
_GROUPING_LOCK = "ioc-incident-grouping"

_INCIDENT_COLUMNS = """
    i.id, i.city, i.kind, i.domain, i.area_id, i.areas, i.title_vi, i.title_en, i.severity, i.state,
    i.automatic, i.agency_id, i.assigned_at, i.escalated_at, i.escalate_after_s, i.opened_at,
    i.last_alarm_at, i.acknowledged_at, i.resolved_at, i.closed_at, i.updated_at, i.checklist,
    (SELECT count(*) FROM incident_alarms ia WHERE ia.incident_id = i.id) AS alarm_count
"""

# The areas an alarm concerns (as `alarms.areas` says for alarms with no device).
_ALARM_AREAS = """
    CASE WHEN a.device_id IS NULL THEN coalesce(a.areas, '{}')
         ELSE coalesce((SELECT array_agg(m.area_id ORDER BY m.area_id) FROM device_areas m
                        WHERE m.device_id = a.device_id), '{}') END
"""

# The place an alarm is grouped by (see ioc_core.incidents): an area alarm's own area; a device
# alarm of a zone-correlating domain ($1), the zone its area alarms use; else the device's
# smallest ward; NULL for the city as a whole.
_ALARM_PLACE = f"""
    CASE WHEN a.subject LIKE 'area:%' THEN substr(a.subject, 6)
         WHEN a.device_id IS NULL THEN NULL
         WHEN a.domain = ANY($1::text[]) THEN {FLOOD_ZONE_AREA_SQL.format(device="a.device_id")}
         ELSE (SELECT wa.id FROM device_areas wm JOIN areas wa ON wa.id = wm.area_id
               WHERE wm.device_id = a.device_id AND wa.kind = 'ward'
               ORDER BY {area_size_sql("wa")}, wa.id
               LIMIT 1) END
"""

# Open alarms of the domains with a procedure ($2) that no incident holds, oldest first. An alarm
# raised inside a maintenance window (`suppressed`) is planned work, no incident.
_NEW_ALARMS_SQL = f"""
SELECT a.id, a.city, a.domain, a.rule, a.severity, a.started_at, {_ALARM_AREAS} AS areas,
       {_ALARM_PLACE} AS place
FROM alarms a
WHERE a.state <> 'resolved' AND a.domain = ANY($2::text[]) AND NOT a.suppressed
  AND a.rule <> 'offline' AND a.rule NOT LIKE 'flatline%'
  AND NOT EXISTS (SELECT 1 FROM incident_alarms ia WHERE ia.alarm_id = a.id)
ORDER BY a.id
LIMIT $3
"""

_PLACES_SQL = f"""
SELECT a.id, a.city, a.domain, a.severity, a.last_seen_at, {_ALARM_AREAS} AS areas, {_ALARM_PLACE} AS place,
       (SELECT ia.incident_id FROM incident_alarms ia WHERE ia.alarm_id = a.id) AS incident_id
FROM alarms a WHERE a.id = ANY($2::bigint[])
"""

_JOIN_TARGET_SQL = """
SELECT i.id FROM incidents i
WHERE i.city = $1 AND i.kind = $2 AND i.area_id IS NOT DISTINCT FROM $3
  AND i.state = ANY($4::text[]) AND i.last_alarm_at > now() - make_interval(secs => $5)
ORDER BY i.id DESC LIMIT 1
FOR UPDATE
"""

_OPEN_SQL = """
INSERT INTO incidents (city, kind, domain, area_id, areas, title_vi, title_en, severity, automatic,
                       escalate_after_s, checklist)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb)
RETURNING id
"""

# Link alarms to an incident; its severity rises to its worst alarm and its areas gather theirs.
_JOIN_SQL = f"""
WITH linked AS (
    INSERT INTO incident_alarms (alarm_id, incident_id)
    SELECT unnest($2::bigint[]), $1
    ON CONFLICT (alarm_id) DO NOTHING
    RETURNING alarm_id
)
UPDATE incidents i SET
    last_alarm_at = now(),
    updated_at = now(),
    severity = CASE WHEN {severity_rank_sql("$3")} > {severity_rank_sql("i.severity")}
                    THEN $3 ELSE i.severity END,
    areas = (SELECT coalesce(array_agg(DISTINCT x ORDER BY x), '{{}}')
             FROM unnest(i.areas || $4::text[]) AS x)
WHERE i.id = $1 AND EXISTS (SELECT 1 FROM linked)
RETURNING (SELECT array_agg(alarm_id) FROM linked) AS linked
"""

# An open incident whose alarms grew more severe than it rises with them.
_RAISE_SEVERITY_SQL = f"""
WITH worst AS (
    SELECT ia.incident_id, max({severity_rank_sql("a.severity")}) AS rank
    FROM incidents i JOIN incident_alarms ia ON ia.incident_id = i.id JOIN alarms a ON a.id = ia.alarm_id
    WHERE i.state = ANY($1::text[])
    GROUP BY ia.incident_id
)
UPDATE incidents i
SET severity = (ARRAY['low', 'medium', 'high', 'critical'])[w.rank], updated_at = now()
FROM worst w
WHERE i.id = w.incident_id AND w.rank > {severity_rank_sql("i.severity")}
RETURNING i.id
"""

# Assignments nobody acknowledged (the incident still open) within their kind's delay: each
# escalates once, whichever processors run this together (the row lock decides).
_ESCALATE_SQL = """
UPDATE incidents SET escalated_at = now(), updated_at = now()
WHERE state = 'open' AND agency_id IS NOT NULL AND escalated_at IS NULL
  AND assigned_at < now() - make_interval(secs => escalate_after_s)
RETURNING id
"""

_TIMELINE_SQL = """
INSERT INTO incident_timeline (incident_id, actor, action, note, detail)
VALUES ($1, $2, $3, $4, $5::jsonb)
"""

# Deliveries of one event straight to chosen endpoints (an agency's), whatever their filter says;
# an endpoint whose filter already took the event keeps its one delivery.
_DELIVER_TO_SQL = """
WITH made AS (
    INSERT INTO webhook_deliveries (endpoint_id, message_id, event_type, body)
    SELECT e.id, $2, $3, $4 FROM webhook_endpoints e
    WHERE e.id = ANY($1::text[]) AND e.disabled_at IS NULL
    ON CONFLICT (endpoint_id, message_id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM made
"""


@dataclass(frozen=True, slots=True)
class GroupingOutcome:
    """What one grouping pass did: alarms grouped, incidents opened, events recorded."""

    grouped: int
    opened: int
    events: list[Event]


def _incident_of(row: asyncpg.Record) -> Incident:
    checklist = row["checklist"]
    if isinstance(checklist, str):
        checklist = json.loads(checklist)
    return Incident(
        id=row["id"],
        city=row["city"],
        kind=row["kind"],
        domain=row["domain"],
        area=row["area_id"],
        areas=list(row["areas"] or []),
        title=Titles(vi=row["title_vi"], en=row["title_en"]),
        severity=row["severity"],
        state=row["state"],
        automatic=row["automatic"],
        agency_id=row["agency_id"],
        assigned_at=row["assigned_at"],
        escalated_at=row["escalated_at"],
        escalate_after_s=row["escalate_after_s"],
        opened_at=row["opened_at"],
        last_alarm_at=row["last_alarm_at"],
        acknowledged_at=row["acknowledged_at"],
        resolved_at=row["resolved_at"],
        closed_at=row["closed_at"],
        updated_at=row["updated_at"],
        alarm_count=row["alarm_count"],
        checklist=[ChecklistItem(**item) for item in checklist],
    )


async def _row(connection: Connection, incident_id: int, *, lock: bool = False) -> Incident:
    row = await connection.fetchrow(
        f"SELECT {_INCIDENT_COLUMNS} FROM incidents i WHERE i.id = $1" + (" FOR UPDATE" if lock else ""),
        incident_id,
    )
    if row is None:
        raise NotFoundError(f"incident {incident_id} not found")
    return _incident_of(row)


async def _timeline(
    connection: Connection,
    incident_id: int,
    actor: str | None,
    action: str,
    note: str | None = None,
    **detail: Any,
) -> None:
    await connection.execute(_TIMELINE_SQL, incident_id, actor, action, note, json.dumps(detail))


async def deliver_to(connection: Connection, endpoint_ids: Sequence[str], event: Event) -> int:
    """Deliver `event` to these endpoints in the caller's transaction; how many were made."""
    if not endpoint_ids:
        return 0
    made: int = await connection.fetchval(
        _DELIVER_TO_SQL, list(endpoint_ids), message_id(event.id), event.type, message_body(event)
    )
    if made:
        await connection.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return made


async def _procedure(connection: Connection, city: str, kind: str) -> Procedure:
    """The kind's procedure as the city uses it: its own edit, else the domain's."""
    default = default_procedure(city, kind)
    row = await connection.fetchrow(
        "SELECT title_vi, title_en, escalate_after_s, checklist FROM incident_procedures"
        " WHERE city = $1 AND kind = $2",
        city,
        kind,
    )
    if row is None:
        return default
    checklist = row["checklist"]
    if isinstance(checklist, str):
        checklist = json.loads(checklist)
    return default.model_copy(
        update={
            "title_vi": row["title_vi"],
            "title_en": row["title_en"],
            "escalate_after_s": row["escalate_after_s"],
            "checklist": [Step(**s) for s in checklist],
            "source": "city",
        }
    )


async def _area_names(connection: Connection, area_id: str | None) -> tuple[str | None, str | None]:
    if area_id is None:
        return None, None
    row = await connection.fetchrow("SELECT name_vi, name_en FROM areas WHERE id = $1", area_id)
    return (row["name_vi"], row["name_en"]) if row is not None else (area_id, area_id)


async def _open(
    connection: Connection,
    *,
    city: str,
    kind: str,
    area_id: str | None,
    severity: str,
    automatic: bool,
    titles: Titles | None,
) -> int:
    procedure = await _procedure(connection, city, kind)
    if titles is None:
        titles = titles_for(procedure, *(await _area_names(connection, area_id)))
    incident_id: int = await connection.fetchval(
        _OPEN_SQL,
        city,
        kind,
        procedure.domain,
        area_id,
        [area_id] if area_id is not None else [],
        titles.vi,
        titles.en,
        severity,
        automatic,
        procedure.escalate_after_s,
        json.dumps(checklist_of(procedure)),
    )
    return incident_id


def _worst(severities: Sequence[str]) -> str:
    return max(severities, key=severity_rank)


def _zone_domains() -> list[str]:
    from ioc_core.domains import DOMAINS

    return [d.name for d in DOMAINS.values() if d.correlation is not None]


def _procedure_domains() -> list[str]:
    from ioc_core.domains import DOMAINS

    return [d.name for d in DOMAINS.values() if d.procedure is not None]


# -- the processor's jobs ------------------------------------------------------------------------


async def group_new_alarms(connection: Connection, *, window_s: float) -> GroupingOutcome:
    """One grouping pass in the caller's transaction: every open alarm no incident holds joins
    the open incident of its city, kind and place whose last alarm came within `window_s`, else
    opens one; incidents rise to their alarms' severity. Events recorded in the outbox."""
    locked = await connection.fetchval(
        "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))", _GROUPING_LOCK
    )
    if not locked:
        return GroupingOutcome(0, 0, [])
    rows = await connection.fetch(_NEW_ALARMS_SQL, _zone_domains(), _procedure_domains(), GROUPING_BATCH)
    by_place: dict[tuple[str, str, str | None], list[asyncpg.Record]] = {}
    for row in rows:
        kind = kind_of_domain(row["domain"])
        if kind is None or not groups(row["rule"]):
            continue
        by_place.setdefault((row["city"], kind, row["place"]), []).append(row)
    now = datetime.now(UTC)
    events: list[Event] = []
    opened = grouped = 0
    changed: set[int] = set()
    for (city, kind, place), alarms in sorted(
        by_place.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "")
    ):
        incident_id = await connection.fetchval(
            _JOIN_TARGET_SQL, city, kind, place, list(OPEN_STATES), window_s
        )
        alarm_ids = [a["id"] for a in alarms]
        if incident_id is None:
            incident_id = await _open(
                connection,
                city=city,
                kind=kind,
                area_id=place,
                severity=_worst([a["severity"] for a in alarms]),
                automatic=True,
                titles=None,
            )
            opened += 1
            await _timeline(connection, incident_id, SYSTEM_ACTOR, "opened", None, alarm_ids=alarm_ids)
        else:
            changed.add(incident_id)
        await _link(connection, incident_id, alarms)
        for alarm in alarms:
            await _timeline(
                connection,
                incident_id,
                SYSTEM_ACTOR,
                "alarm_joined",
                None,
                alarm_id=alarm["id"],
                severity=alarm["severity"],
            )
        grouped += len(alarms)
        if incident_id not in changed:
            events.append(incident_event(INCIDENT_OPENED, await _row(connection, incident_id), now))
    for row in await connection.fetch(_RAISE_SEVERITY_SQL, list(OPEN_STATES)):
        changed.add(row["id"])
        await _timeline(connection, row["id"], SYSTEM_ACTOR, "severity_raised")
    for incident_id in sorted(changed):
        events.append(incident_event(INCIDENT_UPDATED, await _row(connection, incident_id), now))
    await insert_events(connection, events)
    return GroupingOutcome(grouped, opened, events)


async def _link(connection: Connection, incident_id: int, alarms: Sequence[asyncpg.Record]) -> None:
    areas = sorted({area for a in alarms for area in a["areas"]})
    await connection.fetchval(
        _JOIN_SQL, incident_id, [a["id"] for a in alarms], _worst([a["severity"] for a in alarms]), areas
    )


async def escalate(connection: Connection) -> list[Event]:
    """Escalate the assignments left unacknowledged past their kind's delay, in the caller's
    transaction: a timeline entry, `incident.escalated`, and a delivery to the agency's
    escalation endpoint."""
    rows = await connection.fetch(_ESCALATE_SQL)
    now = datetime.now(UTC)
    events = []
    for row in rows:
        incident = await _row(connection, row["id"])
        agency = await connection.fetchrow(
            "SELECT escalation_webhook_id, escalation_contact FROM agencies WHERE id = $1", incident.agency_id
        )
        contact = agency["escalation_contact"] if agency is not None else None
        await _timeline(
            connection, incident.id, SYSTEM_ACTOR, "escalated", None, agency_id=incident.agency_id
        )
        event = incident_event(INCIDENT_ESCALATED, incident, now, escalation_contact=contact, escalated=True)
        await insert_events(connection, [event])
        if agency is not None and agency["escalation_webhook_id"] is not None:
            await deliver_to(connection, [agency["escalation_webhook_id"]], event)
        events.append(event)
    return events


# -- over the pool ---------------------------------------------------------------------------


class IncidentStore:
    """What operators read and do with incidents, and the cities' procedures, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def group_new_alarms(self, *, window_s: float) -> GroupingOutcome:
        """One grouping pass in a transaction of its own (see `group_new_alarms`)."""
        async with self._pool.transaction() as transaction:
            return await group_new_alarms(transaction.connection, window_s=window_s)

    async def escalate_assignments(self) -> list[Event]:
        """Escalate the assignments left unacknowledged too long (see `escalate`)."""
        async with self._pool.transaction() as transaction:
            return await escalate(transaction.connection)

    async def page(
        self,
        *,
        limit: int,
        before_id: int | None = None,
        states: Sequence[str] | None = None,
        cities: Sequence[str] | None = None,
        domains: Sequence[str] | None = None,
        kinds: Sequence[str] | None = None,
        severities: Sequence[str] | None = None,
        areas: Sequence[str] | None = None,
        agency_id: str | None = None,
    ) -> list[Incident]:
        """Incidents matching every filter given, newest first (None = no limit)."""
        rows = await self._pool.fetch(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents i"
            " WHERE ($1::bigint IS NULL OR i.id < $1)"
            " AND ($2::text[] IS NULL OR i.state = ANY($2))"
            " AND ($3::text[] IS NULL OR i.city = ANY($3))"
            " AND ($4::text[] IS NULL OR i.domain = ANY($4))"
            " AND ($5::text[] IS NULL OR i.kind = ANY($5))"
            " AND ($6::text[] IS NULL OR i.severity = ANY($6))"
            " AND ($7::text[] IS NULL OR i.areas && $7)"
            " AND ($8::text IS NULL OR i.agency_id = $8)"
            " ORDER BY i.id DESC LIMIT $9",
            before_id,
            text_list(states),
            text_list(cities),
            text_list(domains),
            text_list(kinds),
            text_list(severities),
            text_list(areas),
            agency_id,
            limit,
        )
        return [_incident_of(r) for r in rows]

    async def get(self, incident_id: int) -> Incident:
        """One incident with its alarms and timeline."""
        async with self._pool.guard(), self._pool.pool.acquire() as connection:
            return await self._full(connection, incident_id)

    async def _full(self, connection: Connection, incident_id: int) -> Incident:
        incident = await _row(connection, incident_id)
        alarms = await connection.fetch(
            "SELECT a.id, a.device_id, a.subject, a.rule, a.severity, a.state, a.started_at, a.message_vi,"
            " a.message_en FROM incident_alarms ia JOIN alarms a ON a.id = ia.alarm_id"
            " WHERE ia.incident_id = $1 ORDER BY a.id",
            incident_id,
        )
        timeline = await connection.fetch(
            "SELECT at, actor, action, note, detail FROM incident_timeline"
            " WHERE incident_id = $1 ORDER BY id",
            incident_id,
        )
        incident.alarms = [
            IncidentAlarm(
                id=a["id"],
                device_id=a["device_id"],
                subject=a["subject"],
                rule=a["rule"],
                severity=a["severity"],
                state=a["state"],
                started_at=a["started_at"],
                message=bilingual(a["message_vi"], a["message_en"]),
            )
            for a in alarms
        ]
        incident.timeline = [
            TimelineEntry(
                at=t["at"],
                actor=t["actor"],
                action=t["action"],
                note=t["note"],
                detail=json.loads(t["detail"]) if isinstance(t["detail"], str) else t["detail"],
            )
            for t in timeline
        ]
        return incident

    async def alarm_places(self, alarm_ids: Sequence[int]) -> list[asyncpg.Record]:
        """The alarms' city, domain, areas, place and incident (if one holds them)."""
        return await self._pool.fetch(_PLACES_SQL, _zone_domains(), list(alarm_ids))

    async def create(
        self,
        alarm_ids: Sequence[int],
        *,
        kind: str | None,
        titles: Titles | None,
        actor: str,
        within: Transaction | None = None,
    ) -> Incident:
        """Open an incident by hand from chosen alarms (of one city, none held by an incident).
        Its place is their common place, if they share one, else the city."""
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            rows = await connection.fetch(_PLACES_SQL + " FOR UPDATE OF a", _zone_domains(), list(alarm_ids))
            missing = sorted(set(alarm_ids) - {r["id"] for r in rows})
            if missing:
                raise ValidationError(f"alarms {missing} not found")
            held = sorted({r["incident_id"] for r in rows if r["incident_id"] is not None})
            if held:
                raise ConflictError(f"some of these alarms already belong to incidents {held}")
            cities = {r["city"] for r in rows}
            if len(cities) != 1:
                raise ValidationError("an incident's alarms must all be of one city")
            if kind is None:
                kinds = {kind_of_domain(r["domain"]) for r in rows}
                kind = sorted(k for k in kinds if k is not None)[0] if kinds - {None} else None
                if kind is None:
                    raise ValidationError("name the incident's kind: its alarms' domains have none")
            domain_of_kind(kind)
            places = {r["place"] for r in rows}
            place = places.pop() if len(places) == 1 else None
            incident_id = await _open(
                connection,
                city=cities.pop(),
                kind=kind,
                area_id=place,
                severity=_worst([r["severity"] for r in rows]),
                automatic=False,
                titles=titles,
            )
            await _link(connection, incident_id, rows)
            await _timeline(connection, incident_id, actor, "opened", None, alarm_ids=sorted(alarm_ids))
            incident = await self._full(connection, incident_id)
            await insert_events(
                connection, [incident_event(INCIDENT_OPENED, incident, datetime.now(UTC), by=actor)]
            )
            return incident

    async def change(
        self,
        incident_id: int,
        *,
        actor: str,
        state: str | None = None,
        agency_id: str | None = None,
        note: str | None = None,
        titles: Titles | None = None,
        within: Transaction | None = None,
    ) -> Incident:
        """Move the incident to `state` (a transition `TRANSITIONS` allows, else 409), assign it
        to an agency (its webhook endpoints are told), retitle it, or note something; each change a
        timeline entry and an event."""
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            incident = await _row(connection, incident_id, lock=True)
            if incident.state == "closed":
                raise ConflictError(f"incident {incident_id} is closed; it cannot change")
            now = datetime.now(UTC)
            events: list[tuple[Event, list[str]]] = []
            if titles is not None:
                await connection.execute(
                    "UPDATE incidents SET title_vi = $2, title_en = $3, updated_at = now() WHERE id = $1",
                    incident_id,
                    titles.vi,
                    titles.en,
                )
                await _timeline(connection, incident_id, actor, "retitled", note, vi=titles.vi, en=titles.en)
            if agency_id is not None:
                agency = await connection.fetchrow(
                    "SELECT webhook_ids FROM agencies WHERE id = $1", agency_id
                )
                if agency is None:
                    raise ValidationError(f"agency {agency_id!r} not found")
                procedure = await _procedure(connection, incident.city, incident.kind)
                # The delay is the procedure's at the time of the assignment: a city's edit
                # applies to the assignments made after it.
                await connection.execute(
                    "UPDATE incidents SET agency_id = $2, assigned_at = now(), escalated_at = NULL,"
                    " escalate_after_s = $3, updated_at = now() WHERE id = $1",
                    incident_id,
                    agency_id,
                    procedure.escalate_after_s,
                )
                await _timeline(connection, incident_id, actor, "assigned", note, agency_id=agency_id)
                events.append(
                    (
                        incident_event(
                            INCIDENT_ASSIGNED, await _row(connection, incident_id), now, by=actor, note=note
                        ),
                        list(agency["webhook_ids"]),
                    )
                )
            if state is not None and state != incident.state:
                check_transition(incident_id, incident.state, state)
                stamp = {
                    "acknowledged": "acknowledged_at",
                    "resolved": "resolved_at",
                    "closed": "closed_at",
                }.get(state)
                await connection.execute(
                    "UPDATE incidents SET state = $2, updated_at = now()"
                    + (f", {stamp} = now()" if stamp else "")
                    + " WHERE id = $1",
                    incident_id,
                    state,
                )
                await _timeline(connection, incident_id, actor, state, note, previous=incident.state)
                event_type = {"resolved": INCIDENT_RESOLVED, "closed": INCIDENT_CLOSED}.get(
                    state, INCIDENT_UPDATED
                )
                events.append(
                    (
                        incident_event(
                            event_type, await _row(connection, incident_id), now, by=actor, note=note
                        ),
                        [],
                    )
                )
            if not events and titles is None:
                if note is None:
                    if state is not None:
                        return await self._full(connection, incident_id)  # already in that state
                    raise ValidationError("say what to change: state, agency_id, title or note")
                await _timeline(connection, incident_id, actor, "note", note)
            if not events:
                await connection.execute("UPDATE incidents SET updated_at = now() WHERE id = $1", incident_id)
                events.append(
                    (
                        incident_event(
                            INCIDENT_UPDATED, await _row(connection, incident_id), now, by=actor, note=note
                        ),
                        [],
                    )
                )
            await insert_events(connection, [event for event, _ in events])
            for event, endpoints in events:
                await deliver_to(connection, endpoints, event)
            return await self._full(connection, incident_id)

    async def check(
        self,
        incident_id: int,
        item: str,
        *,
        done: bool,
        actor: str,
        note: str | None,
        within: Transaction | None = None,
    ) -> Incident:
        """Tick (or untick) a step of the incident's checklist."""
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            incident = await _row(connection, incident_id, lock=True)
            if incident.state == "closed":
                raise ConflictError(f"incident {incident_id} is closed; its checklist cannot change")
            items = [i.model_dump(mode="json") for i in incident.checklist]
            step = next((i for i in items if i["id"] == item), None)
            if step is None:
                raise NotFoundError(f"incident {incident_id} has no checklist step {item!r}")
            if step["done"] != done:
                step.update(
                    done=done,
                    done_by=actor if done else None,
                    done_at=datetime.now(UTC).isoformat() if done else None,
                )
                await connection.execute(
                    "UPDATE incidents SET checklist = $2::jsonb, updated_at = now() WHERE id = $1",
                    incident_id,
                    json.dumps(items),
                )
                await _timeline(
                    connection, incident_id, actor, "checked" if done else "unchecked", note, step=item
                )
                changed = await _row(connection, incident_id)
                await insert_events(
                    connection,
                    [
                        incident_event(
                            INCIDENT_UPDATED, changed, datetime.now(UTC), by=actor, step=item, done=done
                        )
                    ],
                )
            return await self._full(connection, incident_id)

    async def procedure(self, city: str, kind: str) -> Procedure:
        async with self._pool.guard(), self._pool.pool.acquire() as connection:
            return await _procedure(connection, city, kind)

    async def put_procedure(
        self, city: str, kind: str, body: ProcedureIn, *, actor: str, within: Transaction | None = None
    ) -> Procedure:
        """Set the city's own procedure of a kind; fields left out keep the domain's. Incidents
        opened from now on start with its checklist."""
        default = default_procedure(city, kind)
        async with self._pool.joined(within) as transaction:
            await transaction.connection.execute(
                "INSERT INTO incident_procedures AS p (city, kind, title_vi, title_en, escalate_after_s,"
                " checklist, updated_by) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7)"
                " ON CONFLICT (city, kind) DO UPDATE SET title_vi = excluded.title_vi,"
                " title_en = excluded.title_en, escalate_after_s = excluded.escalate_after_s,"
                " checklist = excluded.checklist, updated_by = excluded.updated_by, updated_at = now()",
                city,
                kind,
                body.title_vi or default.title_vi,
                body.title_en or default.title_en,
                body.escalate_after_s if body.escalate_after_s is not None else default.escalate_after_s,
                json.dumps([s.model_dump() for s in body.checklist]),
                actor,
            )
            return await _procedure(transaction.connection, city, kind)

    async def reset_procedure(self, city: str, kind: str, *, within: Transaction | None = None) -> Procedure:
        """Drop the city's own procedure of a kind: the domain's applies again."""
        async with self._pool.joined(within) as transaction:
            await transaction.connection.execute(
                "DELETE FROM incident_procedures WHERE city = $1 AND kind = $2", city, kind
            )
            return await _procedure(transaction.connection, city, kind)
