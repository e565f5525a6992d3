"""Maintenance windows and their occurrences: storing, changing, listing and removing windows
(see `ioc_core.maintenance`), the SQL test "is this subject inside a window at t" that alarms and
webhook routing share, and what the processor does when an occurrence ends.

A window's occurrences are expanded when it is stored (its rule is bounded), so the test is one
lookup in `maintenance_occurrences` inside the caller's transaction: the processor needs neither a
cache (which would let a window made a moment ago miss the next batch) nor the rule itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ioc_core.alarms import OFFLINE_RULE
from ioc_core.errors import NotFoundError, ValidationError
from ioc_core.maintenance import MaintenanceWindow, WindowIn, WindowTarget, new_window_id
from ioc_core.storage.pool import Connection, Pool, Transaction, text_list


def in_window_sql(*, device: str, city: str, domain: str, areas: str, at: str) -> str:
    """A boolean SQL expression: whether the subject (its device id, which may be NULL for an
    area-wide alarm; city; domain; `text[]` of areas, which may be NULL) lies in a maintenance
    window at `at`. A device's areas are looked up as well as those given."""
    return f"""EXISTS (
        SELECT 1 FROM maintenance_occurrences mo JOIN maintenance_windows mw ON mw.id = mo.window_id
        WHERE mo.ends_at > {at} AND mo.starts_at <= {at}
          AND CASE mw.target
                  WHEN 'device' THEN mw.device_id = {device}
                  WHEN 'area' THEN mw.area_id = ANY({areas})
                                   OR EXISTS (SELECT 1 FROM device_areas mm
                                              WHERE mm.device_id = {device} AND mm.area_id = mw.area_id)
                  WHEN 'domain' THEN mw.city = {city} AND mw.domain = {domain}
                  ELSE mw.city = {city} END)"""


# Whether window `mw` covers device `d`.
_COVERS_DEVICE = """CASE mw.target
    WHEN 'device' THEN mw.device_id = d.id
    WHEN 'area' THEN EXISTS (SELECT 1 FROM device_areas mm
                             WHERE mm.device_id = d.id AND mm.area_id = mw.area_id)
    WHEN 'domain' THEN mw.city = d.city AND mw.domain = d.domain
    ELSE mw.city = d.city END"""

_WINDOW_COLUMNS = """
    w.id, w.target, w.device_id, w.area_id, w.city, w.domain, w.starts_at, w.ends_at, w.rrule, w.reason,
    w.owner, w.created_at, w.updated_at,
    (SELECT count(*) FROM maintenance_occurrences o WHERE o.window_id = w.id) AS occurrences,
    (SELECT max(o.ends_at) FROM maintenance_occurrences o WHERE o.window_id = w.id) AS last_end,
    EXISTS (SELECT 1 FROM maintenance_occurrences o
            WHERE o.window_id = w.id AND o.starts_at <= now() AND o.ends_at > now()) AS active
"""

# A window's schedule changes from now on: what has not begun is forgotten, what is under way ends
# now (so the processor handles its end as any other's), and the new schedule is stored over it.
_CUT_OCCURRENCES_SQL = """
WITH gone AS (DELETE FROM maintenance_occurrences WHERE window_id = $1 AND starts_at > now())
UPDATE maintenance_occurrences SET ends_at = now()
WHERE window_id = $1 AND starts_at <= now() AND ends_at > now()
"""
_INSERT_OCCURRENCES_SQL = """
INSERT INTO maintenance_occurrences (window_id, starts_at, ends_at)
SELECT $1, u.s, u.e FROM unnest($2::timestamptz[], $3::timestamptz[]) AS u (s, e)
ON CONFLICT (window_id, starts_at) DO UPDATE SET
    ends_at = excluded.ends_at,
    -- An occurrence that now lasts longer ends again later; one whose end is unchanged stays handled.
    closed_at = CASE WHEN excluded.ends_at > maintenance_occurrences.ends_at THEN NULL
                     ELSE maintenance_occurrences.closed_at END
"""
# Removed windows whose every occurrence's end has been handled.
_PURGE_REMOVED_SQL = """
DELETE FROM maintenance_windows w
WHERE w.deleted_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM maintenance_occurrences o WHERE o.window_id = w.id AND o.closed_at IS NULL)
"""

# Occurrences that ended and are not yet handled, claimed and closed by one processor (the others
# skip them).
_CLOSE_ENDED_SQL = """
WITH ended AS (
    SELECT o.window_id, o.starts_at FROM maintenance_occurrences o
    WHERE o.closed_at IS NULL AND o.ends_at <= now()
    ORDER BY o.ends_at LIMIT 1000
    FOR UPDATE SKIP LOCKED
)
UPDATE maintenance_occurrences o SET closed_at = now()
FROM ended e WHERE o.window_id = e.window_id AND o.starts_at = e.starts_at
RETURNING o.window_id, o.starts_at, o.ends_at
"""

# The devices these ended occurrences cover that went offline during one and are offline still,
# with no open offline alarm and in no window now: their silence outlived the planned outage.
_STILL_OFFLINE_SQL = f"""
SELECT DISTINCT d.id, d.city, d.domain, d.name, d.district,
       coalesce((SELECT array_agg(m.area_id ORDER BY m.area_id) FROM device_areas m
                 WHERE m.device_id = d.id), '{{}}') AS areas
FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS e (window_id, starts_at, ends_at)
JOIN maintenance_windows mw ON mw.id = e.window_id
JOIN devices d ON {_COVERS_DEVICE}
JOIN device_state s ON s.device_id = d.id
WHERE s.status = 'offline' AND s.status_changed_at >= e.starts_at AND s.status_changed_at < e.ends_at
  AND NOT EXISTS (SELECT 1 FROM alarms a
                  WHERE a.subject = d.id AND a.rule = '{OFFLINE_RULE}' AND a.state <> 'resolved')
  AND NOT {in_window_sql(device="d.id", city="d.city", domain="d.domain", areas="NULL::text[]", at="now()")}
ORDER BY d.id
"""


def _window_of(row: asyncpg.Record) -> MaintenanceWindow:
    return MaintenanceWindow(
        id=row["id"],
        target=row["target"],
        device_id=row["device_id"],
        area=row["area_id"],
        domain=row["domain"],
        city=row["city"],
        start=row["starts_at"],
        end=row["ends_at"],
        rrule=row["rrule"],
        reason=row["reason"],
        owner=row["owner"],
        occurrences=row["occurrences"],
        last_end=row["last_end"],
        active=row["active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def _read(connection: Connection, window_id: str) -> MaintenanceWindow:
    row = await connection.fetchrow(
        f"SELECT {_WINDOW_COLUMNS} FROM maintenance_windows w WHERE w.id = $1 AND w.deleted_at IS NULL",
        window_id,
    )
    if row is None:
        raise NotFoundError(f"maintenance window {window_id!r} not found")
    return _window_of(row)


async def _reschedule(
    connection: Connection, window_id: str, occurrences: Sequence[tuple[datetime, datetime]]
) -> None:
    await connection.execute(_CUT_OCCURRENCES_SQL, window_id)
    await connection.execute(
        _INSERT_OCCURRENCES_SQL, window_id, [s for s, _ in occurrences], [e for _, e in occurrences]
    )


@dataclass(frozen=True, slots=True)
class StillOffline:
    """A device that went offline inside a maintenance window and is offline still after it."""

    device_id: str
    city: str
    domain: str
    name: str | None
    district: str | None
    areas: tuple[str, ...]
    # The transaction's `now()`: when its offline alarm is raised.
    at: datetime


async def close_ended(connection: Connection) -> tuple[int, list[StillOffline]]:
    """Mark the occurrences that ended as handled; returns how many, and the devices still offline
    since a time inside one of them, whose offline alarm is to be raised now, outside any window."""
    ended = await connection.fetch(_CLOSE_ENDED_SQL)
    if not ended:
        await connection.execute(_PURGE_REMOVED_SQL)
        return 0, []
    rows = await connection.fetch(
        _STILL_OFFLINE_SQL,
        [r["window_id"] for r in ended],
        [r["starts_at"] for r in ended],
        [r["ends_at"] for r in ended],
    )
    # Only now: the statement above reads the removed windows' targets.
    await connection.execute(_PURGE_REMOVED_SQL)
    now = await connection.fetchval("SELECT now()")
    return len(ended), [
        StillOffline(
            device_id=row["id"],
            city=row["city"],
            domain=row["domain"],
            name=row["name"],
            district=row["district"],
            areas=tuple(row["areas"]),
            at=now,
        )
        for row in rows
    ]


class MaintenanceStore:
    """Maintenance windows, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def create(
        self,
        window: WindowIn,
        *,
        owner: str,
        occurrences: Sequence[tuple[datetime, datetime]],
        within: Transaction | None = None,
        window_id: str | None = None,
    ) -> MaintenanceWindow:
        """Store a new window (under `window_id`, or a new id). A device's or an area's window must
        name one that exists (`ValidationError` otherwise: a window on nothing protects nothing); a
        city's or a domain's need not have devices yet."""
        target: WindowTarget = window.target
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            city, domain = window.city, window.domain
            if target == "device":
                row = await connection.fetchrow(
                    "SELECT city, domain FROM devices WHERE id = $1", window.device_id
                )
                if row is None:
                    raise ValidationError(f"no device {window.device_id!r} is registered")
                city, domain = row["city"], row["domain"]
            elif target == "area":
                city = await connection.fetchval("SELECT city FROM areas WHERE id = $1", window.area)
                if city is None:
                    raise ValidationError(f"no area {window.area!r} is stored")
            window_id = window_id or new_window_id()
            await connection.execute(
                "INSERT INTO maintenance_windows (id, target, device_id, area_id, city, domain, starts_at,"
                " ends_at, rrule, reason, owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                window_id,
                target,
                window.device_id,
                window.area,
                city,
                domain,
                window.start,
                window.end,
                window.rrule,
                window.reason,
                owner,
            )
            await _reschedule(connection, window_id, occurrences)
            return await _read(connection, window_id)

    async def get(self, window_id: str) -> MaintenanceWindow:
        async with self._pool.guard(), self._pool.pool.acquire() as connection:
            return await _read(connection, window_id)

    async def areas_of(self, window: MaintenanceWindow) -> list[str] | None:
        """The areas a window's target lies in, for keys limited to areas (None: no area holds a
        city's or a domain's window)."""
        if window.area is not None:
            return [window.area]
        if window.device_id is None:
            return None
        rows = await self._pool.fetch(
            "SELECT area_id FROM device_areas WHERE device_id = $1", window.device_id
        )
        return [r["area_id"] for r in rows]

    async def page(
        self,
        *,
        limit: int,
        after_id: str | None,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        areas: Sequence[str] | None,
        active: bool | None,
    ) -> list[MaintenanceWindow]:
        """Windows in id order within the filters (None: no filter). A window of a whole city has
        no domain, so a domain filter leaves it out; an area filter keeps only the windows of those
        areas and of devices in them."""
        rows = await self._pool.fetch(
            f"SELECT {_WINDOW_COLUMNS} FROM maintenance_windows w"
            " WHERE w.deleted_at IS NULL AND ($1::text IS NULL OR w.id > $1)"
            " AND ($2::text[] IS NULL OR w.city = ANY($2))"
            " AND ($3::text[] IS NULL OR w.domain = ANY($3))"
            " AND ($4::text[] IS NULL OR w.area_id = ANY($4) OR EXISTS (SELECT 1 FROM device_areas m"
            "      WHERE m.device_id = w.device_id AND m.area_id = ANY($4)))"
            " AND ($5::boolean IS NULL OR $5 = EXISTS (SELECT 1 FROM maintenance_occurrences o"
            "      WHERE o.window_id = w.id AND o.starts_at <= now() AND o.ends_at > now()))"
            " ORDER BY w.id LIMIT $6",
            after_id,
            text_list(cities),
            text_list(domains),
            text_list(areas),
            active,
            limit,
        )
        return [_window_of(r) for r in rows]

    async def update(
        self,
        window_id: str,
        *,
        start: datetime,
        end: datetime,
        rrule: str | None,
        reason: str,
        occurrences: Sequence[tuple[datetime, datetime]],
        within: Transaction | None = None,
    ) -> MaintenanceWindow:
        """Change a window's times, rule and reason; its occurrences are expanded again."""
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            changed = await connection.fetchval(
                "UPDATE maintenance_windows SET starts_at = $2, ends_at = $3, rrule = $4, reason = $5,"
                " updated_at = now() WHERE id = $1 AND deleted_at IS NULL RETURNING id",
                window_id,
                start,
                end,
                rrule,
                reason,
            )
            if changed is None:
                raise NotFoundError(f"maintenance window {window_id!r} not found")
            await _reschedule(connection, window_id, occurrences)
            return await _read(connection, window_id)

    async def delete(self, window_id: str, *, within: Transaction | None = None) -> None:
        """Remove a window: it ends now. The processor's next check releases the alarms it
        suppressed and raises the offline alarms of its devices still offline, as for a window that
        ended, then forgets it."""
        async with self._pool.joined(within) as transaction:
            removed = await transaction.connection.fetchval(
                "UPDATE maintenance_windows SET deleted_at = now(), updated_at = now()"
                " WHERE id = $1 AND deleted_at IS NULL RETURNING id",
                window_id,
            )
            if removed is None:
                raise NotFoundError(f"maintenance window {window_id!r} not found")
            await transaction.connection.execute(_CUT_OCCURRENCES_SQL, window_id)
