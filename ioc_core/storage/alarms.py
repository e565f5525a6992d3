"""Alarms and the detectors' state: raising, repeating, escalating and resolving alarms from
findings (with their lifecycle events), operators acknowledging or resolving them, the public
alarm feed, and the per-device detector state (with flood stations' district signals)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from ioc_core.alarms import (
    ALARM_ACKNOWLEDGED,
    ALARM_RAISED,
    ALARM_RESOLVED,
    ALARM_UPDATED,
    DISTRICT_FLOOD_RULE,
    OFFLINE_RULE,
    Alarm,
    AlarmMessages,
    AlarmReason,
    AuditEntry,
    Finding,
    alarm_event,
    bilingual,
    excursion_kind_rank,
)
from ioc_core.errors import ConflictError, NotFoundError
from ioc_core.events import Event
from ioc_core.rules import severity_rank
from ioc_core.storage import views
from ioc_core.storage.maintenance import in_window_sql
from ioc_core.storage.outbox import insert_events
from ioc_core.storage.pool import Connection, Pool, Transaction, text_list
from ioc_core.storage.severity import reason_rank_sql, severity_rank_sql

log = logging.getLogger(__name__)

_ALARM_COLUMNS = """
    a.id, a.subject, a.device_id, a.city, a.domain, a.district, a.rule, a.metric, a.severity,
    a.state, a.started_at, a.last_seen_at, a.acknowledged_at, a.resolved_at, a.value, a.threshold,
    a.count, a.message_vi, a.message_en, a.escalated, a.escalated_at, a.reasons, a.suppressed,
    CASE WHEN a.device_id IS NULL THEN coalesce(a.areas, '{}')
         ELSE coalesce((SELECT array_agg(m.area_id ORDER BY m.area_id) FROM device_areas m
                        WHERE m.device_id = a.device_id), '{}') END AS areas
"""


@dataclasses.dataclass(frozen=True, slots=True)
class StoredSignal:
    """A flood station's signal as stored beside its detector state, with the zone it counts in
    (an area or district subject; None for a station in no zone)."""

    body: dict[str, Any]
    zone: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class ZoneStation:
    """A zone's station as the correlation reads it: its stored signal and the areas it lies in."""

    signal: dict[str, Any]
    areas: tuple[str, ...]


def _higher(new: str, old: str) -> str:
    return f"{severity_rank_sql(new)} > {severity_rank_sql(old)}"


# The finding's rule takes over as the alarm's own rule (with its value, limit and message) when it
# ranks above the current one: more severe, or as severe and of a kind that explains more.
_TAKES_OVER = (
    f"(excluded.rule <> a.rule AND {reason_rank_sql('excluded.severity', 'excluded.rule')}"
    f" > {reason_rank_sql('a.severity', 'a.rule')})"
)
_OWN_OR_TAKES_OVER = f"(excluded.rule = a.rule OR {_TAKES_OVER})"
_OLD_REASON = "(a.reasons -> excluded.rule)"
_NEW_REASON = "(excluded.reasons -> excluded.rule)"
_REASON_COUNT = f"(coalesce(({_OLD_REASON} ->> 'count')::integer, 0) + excluded.count)"

# -- maintenance windows (ioc_core.maintenance) --
# Whether a finding falls inside a maintenance window of its device (or, for an area-wide alarm,
# of its areas, city or domain) at its own time: a new alarm is then stored `suppressed`; a repeat
# keeps whatever its alarm was raised as.
_IN_WINDOW = in_window_sql(
    device="u.device_id", city="u.city", domain="u.domain", areas="string_to_array(u.areas, ',')", at="u.at"
)
# -- end maintenance windows --

# Open or bump the alarm of each finding's excursion (or rule). The finding's rule becomes, or
# updates, one of the alarm's reasons: its count adds up, its severity never drops while the alarm
# is open, and it is active again. A worse severity replaces the alarm's (with the reason that
# brought it); a milder one does not lower it: an alarm stays as serious as the worst it has been
# until resolved.
_UPSERT_ALARMS_SQL = f"""
INSERT INTO alarms AS a (subject, device_id, city, domain, district, rule, metric, severity,
                         started_at, last_seen_at, value, threshold, count, message_vi, message_en,
                         serious_since, reasons, areas, suppressed)
SELECT u.subject, u.device_id, u.city, u.domain, u.district, u.rule, u.metric, u.severity,
       u.at, u.at, u.value, u.threshold, u.repeats, u.message_vi, u.message_en,
       CASE WHEN u.severity IN ('high', 'critical') THEN u.at END,
       jsonb_build_object(u.rule, jsonb_build_object(
           'severity', u.severity, 'active', true, 'value', u.value, 'threshold', u.threshold,
           'count', u.repeats, 'first_seen_at', u.at, 'last_seen_at', u.at, 'cleared_at', null,
           'message_vi', u.message_vi, 'message_en', u.message_en)),
       string_to_array(u.areas, ','),
       {_IN_WINDOW}
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::timestamptz[], $10::float8[], $11::float8[], $12::integer[], $13::text[],
            $14::text[], $15::text[])
     AS u (subject, device_id, city, domain, district, rule, metric, severity, at, value,
           threshold, repeats, message_vi, message_en, areas)
-- Maintenance: silence inside a planned outage is no offline alarm at all (see _IN_WINDOW).
WHERE NOT (u.rule = '{OFFLINE_RULE}' AND {_IN_WINDOW})
ON CONFLICT (subject, alarm_key) WHERE state <> 'resolved' DO UPDATE SET
    reasons = a.reasons || jsonb_build_object(excluded.rule, {_NEW_REASON} || jsonb_build_object(
        'count', {_REASON_COUNT},
        'first_seen_at', coalesce({_OLD_REASON} -> 'first_seen_at', {_NEW_REASON} -> 'first_seen_at'),
        'severity', CASE WHEN {_OLD_REASON} IS NULL
                              OR {_higher("excluded.severity", f"{_OLD_REASON} ->> 'severity'")}
                         THEN excluded.severity ELSE {_OLD_REASON} ->> 'severity' END)),
    reason_joined = NOT coalesce(({_OLD_REASON} ->> 'active')::boolean, false),
    count = greatest(a.count, {_REASON_COUNT}),
    last_seen_at = greatest(a.last_seen_at, excluded.last_seen_at),
    previous_severity = a.severity,
    severity = CASE WHEN {_higher("excluded.severity", "a.severity")}
                    THEN excluded.severity ELSE a.severity END,
    rule = CASE WHEN {_TAKES_OVER} THEN excluded.rule ELSE a.rule END,
    value = CASE WHEN {_OWN_OR_TAKES_OVER} THEN excluded.value ELSE a.value END,
    threshold = CASE WHEN {_TAKES_OVER}
                          OR (excluded.rule = a.rule AND {_higher("excluded.severity", "a.severity")})
                     THEN excluded.threshold ELSE a.threshold END,
    message_vi = CASE WHEN {_OWN_OR_TAKES_OVER} THEN excluded.message_vi ELSE a.message_vi END,
    message_en = CASE WHEN {_OWN_OR_TAKES_OVER} THEN excluded.message_en ELSE a.message_en END,
    serious_since = coalesce(a.serious_since, excluded.serious_since),
    -- A zone's alarm gathers the areas of every station that joined it while open.
    areas = CASE WHEN excluded.areas IS NULL THEN a.areas
                 ELSE (SELECT array_agg(DISTINCT x ORDER BY x)
                       FROM unnest(coalesce(a.areas, '{{}}') || excluded.areas) AS x) END,
    updated_at = now()
RETURNING {_ALARM_COLUMNS}, a.previous_severity, a.reason_joined, (a.xmax = 0) AS inserted
"""

# Active (nobody acknowledged) high or critical alarms older than their domain's limit. Each is
# escalated once, whichever processors run this at the same time: the row lock decides.
_ESCALATE_ALARMS_SQL = f"""
UPDATE alarms AS a SET escalated = true, escalated_at = now(), updated_at = now()
FROM unnest($1::text[], $2::float8[]) AS u (domain, after_s)
WHERE a.domain = u.domain AND a.state = 'active' AND NOT a.escalated AND a.serious_since IS NOT NULL
  AND NOT a.suppressed
  AND a.serious_since < now() - make_interval(secs => u.after_s)
RETURNING {_ALARM_COLUMNS}
"""


def _cleared(reason: str, at: str) -> str:
    """The reason (a jsonb expression) recovered at `at`."""
    return f"({reason} || jsonb_build_object('active', false, 'cleared_at', {at}))"


# Resolved by hand, an alarm's reasons are cleared with it: a resolved alarm tells no rule as
# still broken (the detectors raise a new alarm if one is).
_RESOLVE_BY_HAND_SQL = f"""
UPDATE alarms SET state = 'resolved', resolved_at = now(), updated_at = now(),
    reasons = coalesce(
        (SELECT jsonb_object_agg(
                    r.rule,
                    CASE WHEN (r.reason ->> 'active')::boolean THEN {_cleared("r.reason", "now()")}
                         ELSE r.reason END)
         FROM jsonb_each(reasons) AS r (rule, reason)),
        reasons)
WHERE id = $1 AND state <> 'resolved' RETURNING id
"""

# A recovered rule clears its reason; the alarm resolves when none of its reasons is active.
_CLEAR_REASONS_SQL = f"""
WITH cleared AS (
    SELECT a.id, u.at,
           a.reasons || jsonb_build_object(u.rule, {_cleared("(a.reasons -> u.rule)", "u.at")}) AS reasons
    FROM alarms a
    JOIN unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS u (subject, alarm_key, rule, at)
      ON a.subject = u.subject AND a.alarm_key = u.alarm_key
    WHERE a.state <> 'resolved' AND a.reasons ? u.rule
), judged AS (
    SELECT c.*, jsonb_path_exists(c.reasons, '$.* ? (@.active == true)') AS open FROM cleared c
)
UPDATE alarms AS a SET
    reasons = j.reasons,
    state = CASE WHEN j.open THEN a.state ELSE 'resolved' END,
    resolved_at = CASE WHEN j.open THEN a.resolved_at ELSE j.at END,
    updated_at = now()
FROM judged j
WHERE a.id = j.id
RETURNING {_ALARM_COLUMNS}
"""

_SAVE_DETECTOR_STATES_SQL = """
INSERT INTO detector_state AS d (device_id, state, flood_signal, flood_zone)
SELECT u.device_id, u.state, u.flood_signal::jsonb, u.flood_zone
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u (device_id, state, flood_signal, flood_zone)
JOIN devices ON devices.id = u.device_id
ON CONFLICT (device_id) DO UPDATE SET
    state = excluded.state,
    flood_signal = coalesce(excluded.flood_signal, d.flood_signal),
    -- The zone the signal was judged in moves with the signal (a station moved, an area changed).
    flood_zone = CASE WHEN excluded.flood_signal IS NULL THEN d.flood_zone ELSE excluded.flood_zone END,
    updated_at = now()
"""


def _alarm_of(row: asyncpg.Record) -> Alarm:
    return Alarm(
        id=row["id"],
        subject=row["subject"],
        device_id=row["device_id"],
        city=row["city"],
        domain=row["domain"],
        district=row["district"],
        rule=row["rule"],
        metric=row["metric"],
        severity=row["severity"],
        state=row["state"],
        started_at=row["started_at"],
        last_seen_at=row["last_seen_at"],
        acknowledged_at=row["acknowledged_at"],
        resolved_at=row["resolved_at"],
        value=row["value"],
        threshold=row["threshold"],
        count=row["count"],
        message=bilingual(row["message_vi"], row["message_en"]),
        messages=AlarmMessages(vi=row["message_vi"], en=row["message_en"]),
        escalated=row["escalated"],
        escalated_at=row["escalated_at"],
        reasons=_reasons_of(row["reasons"], own=row["rule"]),
        areas=row["areas"],
        suppressed=row["suppressed"],
    )


def _reasons_of(stored: Mapping[str, Any] | None, *, own: str) -> list[AlarmReason]:
    """The stored reasons by rule as a list: the alarm's own rule first, then the most severe."""
    reasons = [
        AlarmReason(
            rule=rule,
            severity=body["severity"],
            active=body["active"],
            value=body.get("value"),
            threshold=body.get("threshold"),
            count=body.get("count") or 1,
            first_seen_at=body["first_seen_at"],
            last_seen_at=body["last_seen_at"],
            cleared_at=body.get("cleared_at"),
            messages=AlarmMessages(vi=body["message_vi"], en=body["message_en"]),
        )
        for rule, body in (stored or {}).items()
    ]
    reasons.sort(
        key=lambda r: (r.rule != own, -severity_rank(r.severity), -excursion_kind_rank(r.rule), r.rule)
    )
    return reasons


def _in_rounds(findings: Sequence[Finding]) -> list[list[Finding]]:
    """Split findings so that no round names an alarm (subject, alarm key) twice, keeping each
    key's order: one statement may not touch a row twice, and a recovery must follow the raise
    before it."""
    rounds: list[list[Finding]] = []
    seen: dict[tuple[str, str], int] = {}
    for finding in findings:
        index = seen.get(finding.key, -1) + 1
        seen[finding.key] = index
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(finding)
    return rounds


# -- in the caller's transaction ----------------------------------------------------------------


async def apply_findings(connection: Connection, findings: Sequence[Finding]) -> list[Event]:
    """Raise, repeat, escalate or resolve alarms; returns their lifecycle events (not yet
    recorded in the outbox)."""
    events: list[Event] = []
    for round_ in _in_rounds(findings):
        # In key order, so that processors racing on the same alarms lock them in one order.
        raised = sorted((f for f in round_ if f.active), key=lambda f: f.key)
        recovered = sorted((f for f in round_ if not f.active), key=lambda f: f.key)
        if raised:
            events.extend(await _raise(connection, raised))
        if recovered:
            events.extend(await _resolve(connection, recovered))
    return _one_per_change(events)


def _one_per_change(events: Sequence[Event]) -> list[Event]:
    """The events with each run of `alarm.raised`/`alarm.updated` of one alarm folded into its
    first, carrying the alarm as the last left it: a batch whose threshold and rate findings open
    one alarm tells agencies once, with both reasons, not once per reason."""
    kept: list[Event] = []
    open_run: dict[Any, int] = {}  # alarm id -> index in `kept` of its run's first event
    for event in events:
        alarm_id = event.data.get("id")
        first = open_run.get(alarm_id)
        if event.type == ALARM_UPDATED and first is not None:
            kept[first] = dataclasses.replace(kept[first], data=event.data, time=event.time)
            continue
        if event.type in (ALARM_RAISED, ALARM_UPDATED):
            open_run[alarm_id] = len(kept)
        else:
            open_run.pop(alarm_id, None)
        kept.append(event)
    return kept


async def _raise(connection: Connection, raised: Sequence[Finding]) -> list[Event]:
    """Open or bump the alarms of active findings: `alarm.raised` for a new alarm,
    `alarm.updated` for one whose severity rose or that a rule joined (or rejoined)."""
    rows = await connection.fetch(
        _UPSERT_ALARMS_SQL,
        [f.subject for f in raised],
        [f.device_id for f in raised],
        [f.city for f in raised],
        [f.domain for f in raised],
        [f.district for f in raised],
        [f.rule for f in raised],
        [f.metric for f in raised],
        [f.severity or "medium" for f in raised],
        [f.at for f in raised],
        [f.value for f in raised],
        [f.threshold for f in raised],
        [max(f.repeats, 1) for f in raised],
        [f.message_vi for f in raised],
        [f.message_en for f in raised],
        # Area ids hold no comma (ioc_core.areas.AREA_ID_PATTERN): one text per finding.
        [",".join(f.areas) if f.areas else None for f in raised],
    )
    events: list[Event] = []
    for row in rows:
        alarm = _alarm_of(row)
        if row["inserted"]:
            events.append(alarm_event(ALARM_RAISED, alarm, alarm.last_seen_at))
        elif row["reason_joined"] or severity_rank(alarm.severity) > severity_rank(row["previous_severity"]):
            events.append(alarm_event(ALARM_UPDATED, alarm, alarm.last_seen_at))
    return events


async def _resolve(connection: Connection, recovered: Sequence[Finding]) -> list[Event]:
    """Clear the recovered rules' reasons: `alarm.resolved` for each alarm left with none active."""
    rows = await connection.fetch(
        _CLEAR_REASONS_SQL,
        [f.subject for f in recovered],
        [f.key[1] for f in recovered],
        [f.rule for f in recovered],
        [f.at for f in recovered],
    )
    resolved = (a for a in map(_alarm_of, rows) if a.state == "resolved")
    return [alarm_event(ALARM_RESOLVED, a, a.resolved_at or a.last_seen_at) for a in resolved]


async def escalate(connection: Connection, after_s: dict[str, float]) -> list[Event]:
    """Escalate the alarms nobody acknowledged in time; returns their `alarm.updated` events
    with `escalated: true` (not yet recorded in the outbox)."""
    rows = await connection.fetch(_ESCALATE_ALARMS_SQL, list(after_s), list(after_s.values()))
    now = datetime.now(UTC)
    return [alarm_event(ALARM_UPDATED, _alarm_of(row), now) for row in rows]


# -- maintenance windows: releasing what a window suppressed --
# Open suppressed alarms whose subject is in no window now (the window ended or was removed): the
# condition outlived the planned outage, so the alarm now counts as raised; its wait for
# acknowledgement starts now rather than inside the window. Two processors cannot both release one:
# the second's update re-reads the row and finds it no longer suppressed.
_RELEASE_SUPPRESSED_SQL = f"""
UPDATE alarms AS a SET suppressed = false, updated_at = now(),
    serious_since = CASE WHEN a.serious_since IS NOT NULL THEN now() END
WHERE a.suppressed AND a.state <> 'resolved'
  AND NOT {in_window_sql(device="a.device_id", city="a.city", domain="a.domain", areas="a.areas", at="now()")}
RETURNING {_ALARM_COLUMNS}
"""


async def release_suppressed(connection: Connection) -> list[Event]:
    """Open alarms raised inside a maintenance window that has ended are no longer suppressed;
    returns their `alarm.raised` events (not yet recorded in the outbox), which agencies now get."""
    rows = await connection.fetch(_RELEASE_SUPPRESSED_SQL)
    now = datetime.now(UTC)
    return [alarm_event(ALARM_RAISED, _alarm_of(row), now) for row in rows]


# -- end maintenance windows --


async def detector_states(connection: Connection, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The devices' stored detector state; a document that does not read as JSON is left out (its
    device starts afresh, as detection does with any part it cannot read)."""
    rows = await connection.fetch(
        "SELECT device_id, state FROM detector_state WHERE device_id = ANY($1::text[])", list(device_ids)
    )
    states = {}
    for row in rows:
        try:
            states[row["device_id"]] = orjson.loads(row["state"])
        except orjson.JSONDecodeError:
            log.warning("detector state of %s is not JSON; the device starts afresh", row["device_id"])
    return states


async def save_detector_states(
    connection: Connection,
    states: Mapping[str, str],
    flood_signals: Mapping[str, StoredSignal | None],
) -> None:
    """Store detector state, each a JSON document (and, for flood stations, their signal with the
    zone it counts in) of registered devices."""
    if not states:
        return
    ids = sorted(states)  # one lock order for processors racing on the same devices
    signals = [flood_signals.get(i) for i in ids]
    await connection.execute(
        _SAVE_DETECTOR_STATES_SQL,
        ids,
        [states[i] for i in ids],
        [json.dumps(signal.body) if signal is not None else None for signal in signals],
        [signal.zone if signal is not None else None for signal in signals],
    )


async def open_zone_alarms(connection: Connection, subjects: Sequence[str]) -> set[str]:
    """Which of these zones (area or district subjects) have an open flood alarm."""
    if not subjects:
        return set()
    rows = await connection.fetch(
        "SELECT subject FROM alarms WHERE subject = ANY($1::text[]) AND rule = $2 AND state <> 'resolved'",
        list(subjects),
        DISTRICT_FLOOD_RULE,
    )
    return {row["subject"] for row in rows}


async def zone_flood_signals(connection: Connection, zone: str, *, rising_only: bool) -> list[ZoneStation]:
    """The stored signals of a zone's flood stations, or only of those whose water rises, each with
    the areas its station lies in."""
    rows = await connection.fetch(
        "SELECT s.flood_signal,"
        " coalesce((SELECT array_agg(m.area_id ORDER BY m.area_id) FROM device_areas m"
        "           WHERE m.device_id = s.device_id), '{}') AS areas"
        " FROM detector_state s WHERE s.flood_zone = $1 AND s.flood_signal IS NOT NULL"
        " AND (NOT $2 OR s.flood_signal -> 'rising' = 'true'::jsonb)",
        zone,
        rising_only,
    )
    return [ZoneStation(signal=row["flood_signal"], areas=tuple(row["areas"])) for row in rows]


# -- over the pool ---------------------------------------------------------------------------


async def _read(connection: Connection, alarm_id: int) -> Alarm:
    """One alarm with its audit trail."""
    row = await connection.fetchrow(f"SELECT {_ALARM_COLUMNS} FROM alarms a WHERE a.id = $1", alarm_id)
    if row is None:
        raise NotFoundError(f"alarm {alarm_id} not found")
    alarm = _alarm_of(row)
    audit = await connection.fetch(
        "SELECT action, actor, note, at FROM alarm_audit WHERE alarm_id = $1 ORDER BY id", alarm_id
    )
    alarm.audit = [AuditEntry(**dict(r)) for r in audit]
    return alarm


class AlarmStore:
    """What operators and the public feed read and do with alarms, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def page(
        self,
        *,
        limit: int,
        before_id: int | None = None,
        states: Sequence[str] | None = None,
        cities: Sequence[str] | None = None,
        domains: Sequence[str] | None = None,
        severities: Sequence[str] | None = None,
        device_id: str | None = None,
        areas: Sequence[str] | None = None,
    ) -> list[Alarm]:
        """Alarms matching every filter given, newest first; `cities`/`domains` None = every one,
        `areas` the alarms of devices lying in one of them."""
        rows = await self._pool.fetch(
            f"SELECT {_ALARM_COLUMNS} FROM alarms a"
            " WHERE ($1::bigint IS NULL OR a.id < $1)"
            " AND ($2::text[] IS NULL OR a.state = ANY($2))"
            " AND ($3::text[] IS NULL OR a.city = ANY($3))"
            " AND ($4::text[] IS NULL OR a.domain = ANY($4))"
            " AND ($5::text[] IS NULL OR a.severity = ANY($5))"
            " AND ($6::text IS NULL OR a.device_id = $6)"
            " AND ($8::text[] IS NULL OR a.areas && $8 OR EXISTS (SELECT 1 FROM device_areas m"
            " WHERE m.device_id = a.device_id AND m.area_id = ANY($8)))"
            " ORDER BY a.id DESC LIMIT $7",
            before_id,
            list(states) if states else None,
            text_list(cities),
            text_list(domains),
            list(severities) if severities else None,
            device_id,
            limit,
            text_list(areas),
        )
        return [_alarm_of(r) for r in rows]

    async def get(self, alarm_id: int) -> Alarm:
        """One alarm with its audit trail."""
        async with self._pool.guard(), self._pool.pool.acquire() as connection:
            return await _read(connection, alarm_id)

    async def acknowledge(
        self, alarm_id: int, *, actor: str, note: str | None, within: Transaction | None = None
    ) -> Alarm:
        """Acknowledge an active alarm (again: no change). A resolved alarm cannot be acknowledged."""
        return await self._operator_action(
            alarm_id,
            actor=actor,
            note=note,
            action="acknowledged",
            sql="UPDATE alarms SET state = 'acknowledged', acknowledged_at = now(), updated_at = now()"
            " WHERE id = $1 AND state = 'active' RETURNING id",
            event_type=ALARM_ACKNOWLEDGED,
            unchanged_state="acknowledged",
            within=within,
        )

    async def resolve(
        self, alarm_id: int, *, actor: str, note: str | None, within: Transaction | None = None
    ) -> Alarm:
        """Resolve an open alarm by hand; the detectors raise a new one if the condition persists."""
        return await self._operator_action(
            alarm_id,
            actor=actor,
            note=note,
            action="resolved",
            sql=_RESOLVE_BY_HAND_SQL,
            event_type=ALARM_RESOLVED,
            unchanged_state=None,
            within=within,
        )

    async def _operator_action(
        self,
        alarm_id: int,
        *,
        actor: str,
        note: str | None,
        action: str,
        sql: str,
        event_type: str,
        unchanged_state: str | None,
        within: Transaction | None,
    ) -> Alarm:
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            changed = await connection.fetchval(sql, alarm_id)
            if changed is None:
                state = await connection.fetchval("SELECT state FROM alarms WHERE id = $1", alarm_id)
                if state is None:
                    raise NotFoundError(f"alarm {alarm_id} not found")
                if state != unchanged_state:
                    raise ConflictError(f"alarm {alarm_id} is {state}; it cannot be {action}")
            else:
                await connection.execute(
                    "INSERT INTO alarm_audit (alarm_id, action, actor, note) VALUES ($1, $2, $3, $4)",
                    alarm_id,
                    action,
                    actor,
                    note,
                )
                rows = await connection.fetch(
                    f"SELECT {_ALARM_COLUMNS} FROM alarms a WHERE a.id = $1", alarm_id
                )
                alarm = _alarm_of(rows[0])
                transaction.touch(alarm.city, alarm.domain)
                event = alarm_event(event_type, alarm, datetime.now(UTC))
                event.data["by"] = actor
                event.data["note"] = note
                await insert_events(connection, [event])
            return await _read(connection, alarm_id)

    async def public(
        self,
        rules: Sequence[tuple[str, str]],
        severities: Sequence[str],
        *,
        city: str | None = None,
        alarm_id: int | None = None,
        limit: int = 1000,
    ) -> list[views.PublicAlarmRow]:
        """Open alarms of the given `(domain, rule)` pairs and severities, worst and newest first,
        with their place (see `views.PUBLIC_ALARMS_SQL`)."""
        rows = await self._pool.fetch(
            views.PUBLIC_ALARMS_SQL.format(alarm_columns=_ALARM_COLUMNS),
            [domain for domain, _ in rules],
            [rule for _, rule in rules],
            list(severities),
            city,
            alarm_id,
            limit,
        )

        def area_of(r: asyncpg.Record) -> views.PublicArea | None:
            if r["area_id"] is None:
                return None
            wards = zip(r["ward_ids"] or (), r["ward_codes"] or (), r["ward_names"] or (), strict=True)
            return views.PublicArea(
                id=r["area_id"],
                kind=r["area_kind"],
                name_vi=r["area_name_vi"],
                name_en=r["area_name_en"],
                code=r["area_code"],
                geometry=r["area_geometry"],
                wards=tuple(views.PublicWard(id=i, code=c, name_vi=n) for i, c, n in wards),
            )

        return [
            views.PublicAlarmRow(
                alarm=_alarm_of(r),
                device_name=r["device_name"],
                location=(r["lat"], r["lon"]) if r["lat"] is not None else None,
                district_points=list(zip(r["district_lats"] or (), r["district_lons"] or (), strict=True)),
                area=area_of(r),
            )
            for r in rows
        ]
