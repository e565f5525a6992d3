"""Latest state and status of devices: the state row a batch of readings updates, status
transitions (reported, implied by telemetry, or found by the silence sweep) with their events,
and the read side screens poll (state lists and pages, their versions, GIS layers, summaries)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson

from ioc_core.events import (
    CAUSE_INACTIVITY,
    CAUSE_STATUS_MESSAGE,
    CAUSE_TELEMETRY,
    Event,
    device_status_event,
)
from ioc_core.models import Location, StateItem
from ioc_core.storage import views
from ioc_core.storage.pool import Connection, Pool, text_list
from ioc_core.telemetry import BusTelemetry, Reading

# A reading older than the stored state never moves "latest" backwards; it still proves the
# device alive. Status is left to _APPLY_STATUS_SQL, which records transitions.
_UPSERT_STATE_SQL = """
INSERT INTO device_state AS s (device_id, ts, seq, metrics, last_seen, bus_partition)
SELECT u.device_id, u.ts, u.seq, u.metrics::jsonb, u.received_at, u.bus_partition
FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::text[], $5::timestamptz[], $6::integer[])
     AS u (device_id, ts, seq, metrics, received_at, bus_partition)
JOIN devices d ON d.id = u.device_id
ON CONFLICT (device_id) DO UPDATE SET
    ts = CASE WHEN s.ts IS NULL OR excluded.ts >= s.ts THEN excluded.ts ELSE s.ts END,
    seq = CASE WHEN s.ts IS NULL OR excluded.ts >= s.ts THEN excluded.seq ELSE s.seq END,
    metrics = CASE WHEN s.ts IS NULL OR excluded.ts >= s.ts THEN s.metrics || excluded.metrics
                   ELSE s.metrics END,
    last_seen = GREATEST(s.last_seen, excluded.last_seen),
    bus_partition = excluded.bus_partition,
    updated_at = now()
"""

_ENSURE_STATE_SQL = """
INSERT INTO device_state (device_id, bus_partition)
SELECT u.device_id, u.bus_partition
FROM unnest($1::text[], $2::integer[]) AS u (device_id, bus_partition)
JOIN devices d ON d.id = u.device_id
ON CONFLICT (device_id) DO UPDATE SET bus_partition = excluded.bus_partition
"""

# A status older than the last change (a replayed batch after a rebalance) changes nothing.
_APPLY_STATUS_SQL = """
UPDATE device_state s
SET status = x.status, status_changed_at = x.at, updated_at = now()
FROM (
    SELECT u.device_id, u.status, u.at, u.cause, cur.status AS previous, d.city, d.domain, d.name,
           d.district
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[]) AS u (device_id, status, at, cause)
    JOIN device_state cur ON cur.device_id = u.device_id
    JOIN devices d ON d.id = u.device_id
) x
WHERE s.device_id = x.device_id
  AND s.status <> x.status
  AND (s.status_changed_at IS NULL OR s.status_changed_at <= x.at)
RETURNING x.device_id, x.city, x.domain, x.name, x.district, x.status, x.previous, x.cause, x.at,
          coalesce((SELECT array_agg(m.area_id ORDER BY m.area_id) FROM device_areas m
                    WHERE m.device_id = x.device_id), '{}') AS areas
"""

_SWEEP_SILENT_SQL = f"""
WITH owned AS (
    SELECT * FROM unnest($1::text[], $2::integer[]) AS o (domain, bus_partition)
), limits AS (
    SELECT * FROM unnest($3::text[], $4::float8[]) AS l (domain, seconds)
), silent AS (
    SELECT s.device_id, d.city, d.domain, d.name, d.district
    FROM device_state s
    JOIN devices d ON d.id = s.device_id
    JOIN owned o ON o.domain = d.domain AND o.bus_partition = s.bus_partition
    JOIN limits l ON l.domain = d.domain
    WHERE s.status = 'online' AND s.last_seen < now() - make_interval(secs => l.seconds)
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE device_state s
SET status = 'offline', status_changed_at = now(), updated_at = now()
FROM silent
WHERE s.device_id = silent.device_id
RETURNING s.device_id, silent.city, silent.domain, silent.name, silent.district, s.status,
          'online' AS previous, '{CAUSE_INACTIVITY}' AS cause, s.status_changed_at AS at,
          coalesce((SELECT array_agg(m.area_id ORDER BY m.area_id) FROM device_areas m
                    WHERE m.device_id = s.device_id), '{{}}') AS areas
"""


@dataclass(frozen=True, slots=True)
class StatusTransition:
    """A device whose status changed, with what an alarm about it needs."""

    device_id: str
    city: str
    domain: str
    name: str | None
    district: str | None
    status: str
    previous: str
    cause: str
    at: datetime
    # The areas the device lies in, so that its status events reach area-limited streams and hooks.
    areas: tuple[str, ...] = ()


@dataclass(frozen=True)
class _LatestOfDevice:
    ts: datetime
    seq: int | None
    metrics: dict[str, float]
    received_at: datetime
    bus_partition: int


def _latest_per_device(readings: Sequence[tuple[Reading, int]]) -> dict[str, _LatestOfDevice]:
    """Fold a batch to one state row per device: one upsert may not touch a row twice."""
    latest: dict[str, _LatestOfDevice] = {}
    for reading, partition in sorted(readings, key=lambda rp: rp[0].ts):
        previous = latest.get(reading.device_id)
        metrics = {**previous.metrics, **reading.metrics} if previous else dict(reading.metrics)
        received_at = max(previous.received_at, reading.received_at) if previous else reading.received_at
        latest[reading.device_id] = _LatestOfDevice(reading.ts, reading.seq, metrics, received_at, partition)
    return latest


@dataclass(frozen=True)
class _StatusOfDevice:
    status: str
    at: datetime
    cause: str
    bus_partition: int


def _final_statuses(records: Sequence[tuple[BusTelemetry, int]]) -> dict[str, _StatusOfDevice]:
    """Each device's status after the batch: its last record decides (a reading means online).
    Flaps inside one batch collapse into the end result."""
    statuses: dict[str, _StatusOfDevice] = {}
    for record, partition in records:
        if isinstance(record, Reading):
            statuses[record.device_id] = _StatusOfDevice(
                "online", record.received_at, CAUSE_TELEMETRY, partition
            )
        else:
            statuses[record.device_id] = _StatusOfDevice(
                record.status, record.received_at, CAUSE_STATUS_MESSAGE, partition
            )
    return statuses


def _transition_of(row: asyncpg.Record) -> StatusTransition:
    return StatusTransition(
        device_id=row["device_id"],
        city=row["city"],
        domain=row["domain"],
        name=row["name"],
        district=row["district"],
        status=row["status"],
        previous=row["previous"],
        cause=row["cause"],
        at=row["at"],
        areas=tuple(row["areas"]),
    )


def status_event(transition: StatusTransition) -> Event:
    return device_status_event(
        device_id=transition.device_id,
        city=transition.city,
        domain=transition.domain,
        status=transition.status,
        previous=transition.previous,
        cause=transition.cause,
        at=transition.at,
        areas=list(transition.areas),
    )


async def save_latest(connection: Connection, stored: Sequence[tuple[Reading, int]]) -> None:
    """Fold the readings a batch stored (with their partitions) into their devices' state rows."""
    if not stored:
        return
    latest = _latest_per_device(stored)
    await connection.execute(
        _UPSERT_STATE_SQL,
        list(latest),
        [s.ts for s in latest.values()],
        [s.seq for s in latest.values()],
        [orjson.dumps(s.metrics).decode() for s in latest.values()],
        [s.received_at for s in latest.values()],
        [s.bus_partition for s in latest.values()],
    )


async def apply_statuses(
    connection: Connection, records: Sequence[tuple[BusTelemetry, int]]
) -> list[StatusTransition]:
    """Apply each device's status after a batch of records; returns the statuses that changed."""
    statuses = _final_statuses(records)
    reported_only = {d: s for d, s in statuses.items() if s.cause == CAUSE_STATUS_MESSAGE}
    if reported_only:
        await connection.execute(
            _ENSURE_STATE_SQL, list(reported_only), [s.bus_partition for s in reported_only.values()]
        )
    if not statuses:
        return []
    rows = await connection.fetch(
        _APPLY_STATUS_SQL,
        list(statuses),
        [s.status for s in statuses.values()],
        [s.at for s in statuses.values()],
        [s.cause for s in statuses.values()],
    )
    return [_transition_of(row) for row in rows]


async def sweep_silent(
    connection: Connection, owned: Sequence[tuple[str, int]], offline_after_s: dict[str, float]
) -> list[StatusTransition]:
    """Mark offline the online devices, among those whose (domain, partition) is in `owned`,
    that have been silent longer than their domain allows."""
    if not owned:
        return []
    limits = list(offline_after_s.items())
    rows = await connection.fetch(
        _SWEEP_SILENT_SQL,
        [o[0] for o in owned],
        [o[1] for o in owned],
        [limit[0] for limit in limits],
        [limit[1] for limit in limits],
    )
    return [_transition_of(row) for row in rows]


def _state_and_severity(item: str) -> tuple[str, str]:
    state, _, severity = item.partition("|")
    return state, severity


def _rule_and_metric(item: str) -> tuple[str, str | None]:
    rule, _, metric = item.partition("|")
    return rule, metric or None


class StatusStore:
    """What screens read of the devices' latest state and status, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def state_items(self, *, city: str | None = None, domain: str | None = None) -> list[StateItem]:
        rows = await self._pool.fetch(
            "SELECT d.id, d.city, d.domain, d.lat, d.lon, coalesce(s.status, 'unknown') AS status,"
            " s.ts, coalesce(s.metrics, '{}'::jsonb) AS metrics"
            " FROM devices d LEFT JOIN device_state s ON s.device_id = d.id"
            " WHERE ($1::text IS NULL OR d.city = $1) AND ($2::text IS NULL OR d.domain = $2)"
            " ORDER BY d.id",
            city,
            domain,
        )
        return [
            StateItem(
                device_id=r["id"],
                city=r["city"],
                domain=r["domain"],
                status=r["status"],
                ts=r["ts"],
                metrics=r["metrics"],
                location=Location(lat=r["lat"], lon=r["lon"]),
            )
            for r in rows
        ]

    async def version(self, cities: Sequence[str] | None, domains: Sequence[str] | None) -> str:
        """Changes whenever anything shown about the devices in scope changes (see `views`)."""
        row = await self._pool.fetchrow(views.STATE_VERSIONS_SQL, text_list(cities), text_list(domains))
        return str(row[0]) if row is not None else ""

    async def page(
        self,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        *,
        after: str | None,
        limit: int,
        areas: Sequence[str] | None = None,
    ) -> views.StatePage:
        """The latest state of devices in scope (and in one of `areas`, when given), in id order,
        as JSON built by the database."""
        row = await self._pool.fetchrow(
            views.STATE_PAGE_SQL, text_list(cities), text_list(domains), after, limit, text_list(areas)
        )
        if row is None or not row["n"]:
            return views.StatePage(items_json="[]", count=0, last_id=None, more=False)
        return views.StatePage(
            items_json=row["items"], count=row["n"], last_id=row["last_id"], more=row["more"]
        )

    async def layer_features(
        self,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        bbox: tuple[float, float, float, float] | None,
        areas: Sequence[str] | None = None,
    ) -> tuple[int, str]:
        """GeoJSON features (a JSON array text) of the devices in scope, with how many there are."""
        row = await self._pool.fetchrow(
            views.LAYER_SQL,
            text_list(cities),
            text_list(domains),
            list(bbox) if bbox else None,
            text_list(areas),
        )
        return (row["n"], row["features"]) if row is not None else (0, "[]")

    async def summary_inputs(
        self,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        city: str | None,
        areas: Sequence[str] | None = None,
    ) -> tuple[list[views.SummaryDevice], list[tuple[str, str, str, int]]]:
        """Devices in scope (in one of `areas`, when given) with their open alarms, and open alarms
        counted by (domain, state, severity): what a summary's figures are computed from."""
        scope = (text_list(cities), text_list(domains), city, text_list(areas))
        device_rows = await self._pool.fetch(views.SUMMARY_DEVICES_SQL, *scope)
        alarm_rows = await self._pool.fetch(views.SUMMARY_ALARMS_SQL, *scope)
        devices = [
            views.SummaryDevice(
                id=r["id"],
                domain=r["domain"],
                status=r["status"],
                metrics=r["metrics"],
                thresholds=r["thresholds"],
                open_alarms=[_rule_and_metric(item) for item in r["open_alarms"]],
            )
            for r in device_rows
        ]
        return devices, [(r["domain"], r["state"], r["severity"], r["n"]) for r in alarm_rows]

    async def area_alarms(
        self, cities: Sequence[str] | None, domains: Sequence[str] | None, areas: Sequence[str]
    ) -> list[tuple[str, str, str, str]]:
        """The open area-wide alarms over `areas`, as (area id, domain, state, severity), once per
        area each concerns."""
        rows = await self._pool.fetch(
            views.AREA_ALARMS_SQL, text_list(cities), text_list(domains), list(areas)
        )
        return [(r["area_id"], r["domain"], r["state"], r["severity"]) for r in rows]

    async def area_devices(
        self, cities: Sequence[str] | None, domains: Sequence[str] | None, areas: Sequence[str]
    ) -> list[views.AreaDevice]:
        """The devices in scope lying in `areas`, as each area's state counts them."""
        rows = await self._pool.fetch(
            views.AREA_DEVICES_SQL, text_list(cities), text_list(domains), list(areas)
        )
        return [
            views.AreaDevice(
                device=views.SummaryDevice(
                    id=r["id"],
                    domain=r["domain"],
                    status=r["status"],
                    metrics=r["metrics"],
                    thresholds=r["thresholds"],
                    open_alarms=[_rule_and_metric(item) for item in r["open_alarms"]],
                ),
                areas=r["areas"],
                alarm_states=[_state_and_severity(item) for item in r["alarm_states"]],
            )
            for r in rows
        ]

    async def counts(self) -> dict[str, int]:
        """Registered devices counted by status ('unknown' before the first message)."""
        rows = await self._pool.fetch(
            "SELECT coalesce(s.status, 'unknown') AS status, count(*) AS n"
            " FROM devices d LEFT JOIN device_state s ON s.device_id = d.id GROUP BY 1"
        )
        return {r["status"]: r["n"] for r in rows}
