"""All SQL of the system: schema migrations, storage-tier detection, devices, readings, state.

Readings live in one table per domain with one typed column per metric: the contract fixes each
domain's metrics, so typed columns are smaller than JSON, need no parsing on read, and let
TimescaleDB compress each metric as its own column. The primary key `(device_id, ts)` is the
de-duplication key and, read backwards, serves both "latest for device" and "series for device
over a range". Latest state has its own small table so screens never scan readings.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from pydantic import BaseModel

from ioc_core.component import Component
from ioc_core.domains import DOMAINS, Domain
from ioc_core.errors import ConflictError, NotFoundError, ServiceUnavailableError, StorageError
from ioc_core.events import (
    CAUSE_INACTIVITY,
    CAUSE_STATUS_MESSAGE,
    CAUSE_TELEMETRY,
    Event,
    device_status_event,
)
from ioc_core.models import Device, DeviceIn, DeviceRoute, LatestReading, Location, StateItem
from ioc_core.storage.schema import MIGRATION_LOCK_ID, MIGRATIONS, StorageTier, domain_table_ddl, ident
from ioc_core.telemetry import BusTelemetry, Reading, StoredDeadLetter

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

log = logging.getLogger(__name__)


# Failures that pass by themselves: retry the same transaction later.
_TRANSIENT_ERRORS = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
)

_CONNECTION_ERRORS = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
)


def _insert_readings_sql(domain: Domain) -> str:
    columns = ["ts", "device_id", "seq", "received_at", *(ident(m.column) for m in domain.metrics)]
    types = ["timestamptz[]", "text[]", "bigint[]", "timestamptz[]", *("float8[]" for _ in domain.metrics)]
    params = ", ".join(f"${i}::{t}" for i, t in enumerate(types, start=1))
    return (
        f"INSERT INTO {ident(domain.table)} ({', '.join(columns)}) "
        f"SELECT * FROM unnest({params}) ON CONFLICT DO NOTHING"
    )


_INSERT_SQL: dict[str, str] = {name: _insert_readings_sql(domain) for name, domain in DOMAINS.items()}

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
    SELECT u.device_id, u.status, u.at, u.cause, cur.status AS previous, d.city, d.domain
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[]) AS u (device_id, status, at, cause)
    JOIN device_state cur ON cur.device_id = u.device_id
    JOIN devices d ON d.id = u.device_id
) x
WHERE s.device_id = x.device_id
  AND s.status <> x.status
  AND (s.status_changed_at IS NULL OR s.status_changed_at <= x.at)
RETURNING x.device_id, x.city, x.domain, x.status, x.previous, x.cause, x.at
"""

_REMEMBER_SEQS_SQL = """
INSERT INTO reading_seqs AS r (device_id, seq, ts)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[])
ON CONFLICT (device_id, seq) DO UPDATE SET ts = excluded.ts
    WHERE r.ts < excluded.ts - make_interval(secs => $4)
RETURNING device_id, seq
"""

_SWEEP_SILENT_SQL = """
WITH owned AS (
    SELECT * FROM unnest($1::text[], $2::integer[]) AS o (domain, bus_partition)
), limits AS (
    SELECT * FROM unnest($3::text[], $4::float8[]) AS l (domain, seconds)
), silent AS (
    SELECT s.device_id, d.city, d.domain
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
RETURNING s.device_id, silent.city, silent.domain, s.status_changed_at
"""

_INSERT_OUTBOX_SQL = """
INSERT INTO outbox (event_id, topic, key, payload)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]::jsonb[])
ON CONFLICT (event_id) DO NOTHING
"""

_INSERT_DEAD_LETTERS_SQL = """
INSERT INTO dead_letters (source, received_at, topic, reason, detail, payload, payload_size)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::integer[])
ON CONFLICT (source) DO NOTHING
"""


_DEVICE_COLUMNS = """
    d.id, d.city, d.domain, d.name, d.district, d.lat, d.lon, d.thresholds, d.created_at,
    coalesce(s.status, 'unknown') AS status, s.last_seen, s.ts, s.metrics
"""


@dataclass
class TelemetryBatch:
    """One poll of the bus: telemetry records with their partition, in bus order, and dead letters."""

    records: list[tuple[BusTelemetry, int]] = field(default_factory=list)
    dead_letters: list[StoredDeadLetter] = field(default_factory=list)


@dataclass
class WriteResult:
    stored: int = 0
    duplicates: int = 0
    events: list[Event] = field(default_factory=list)


class DeadLetterRow(BaseModel):
    id: int
    received_at: datetime
    topic: str
    reason: str
    detail: str
    payload: str
    payload_size: int


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


def _seq_candidates(readings: Sequence[Reading]) -> dict[tuple[str, int], Reading]:
    """Readings de-duplicated by (device, seq): those stamped with their receive time. The first
    of a batch stands for its copies."""
    candidates: dict[tuple[str, int], Reading] = {}
    for reading in readings:
        if not reading.device_time and reading.seq is not None:
            candidates.setdefault((reading.device_id, reading.seq), reading)
    return candidates


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


async def _init_connection(connection: asyncpg.Connection) -> None:
    for type_name in ("jsonb", "json"):
        await connection.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
        )


def _unavailable(url: str, exc: BaseException) -> ServiceUnavailableError:
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 5432}{parts.path}"
    return ServiceUnavailableError(f"database at {where} is unreachable: {exc}")


async def ensure_database(url: str) -> bool:
    """Create the database named in `url` when it does not exist; True when it was created."""
    try:
        connection = await asyncpg.connect(url, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        pass
    except _CONNECTION_ERRORS as exc:
        raise _unavailable(url, exc) from exc
    else:
        await connection.close()
        return False
    parts = urlsplit(url)
    name = ident(parts.path.lstrip("/"))
    try:
        admin = await asyncpg.connect(parts._replace(path="/postgres").geturl(), timeout=10)
    except _CONNECTION_ERRORS as exc:
        raise _unavailable(url, exc) from exc
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("created database %s", name)
    return True


class Database(Component):
    """A connection pool and every query the system makes. Use with `async with`."""

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 10, seq_window_s: float = 3600
    ) -> None:
        self._url = url
        self._seq_window_s = seq_window_s
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self.tier: StorageTier | None = None

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=self._min_size,
                max_size=self._max_size,
                init=_init_connection,
                timeout=10,
                command_timeout=60,
            )
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc
        except asyncpg.InvalidCatalogNameError as exc:
            raise StorageError(f"{exc}; run `ioc migrate` to create it") from exc
        self.tier = await self.detect_tier()

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("database is not started")
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return list(await self.pool.fetch(sql, *args))
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            return await self.pool.fetchrow(sql, *args)
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc

    # -- schema -------------------------------------------------------------------------------

    async def detect_tier(self) -> StorageTier:
        row = await self._fetchrow(
            "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS version,"
            " current_setting('timescaledb.license', true) AS license"
        )
        if row is None or row["version"] is None:
            return StorageTier.POSTGRES
        return StorageTier.COMMUNITY if row["license"] == "timescale" else StorageTier.APACHE

    async def migrate(self) -> StorageTier:
        """Create or upgrade the schema; safe to run twice and from several processes at once."""
        async with self.pool.acquire() as connection:
            await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
            try:
                await self._enable_timescaledb(connection)
                tier = await self.detect_tier()
                await connection.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                applied = {
                    r["version"] for r in await connection.fetch("SELECT version FROM schema_migrations")
                }
                for version, sql in MIGRATIONS:
                    if version in applied:
                        continue
                    async with connection.transaction():
                        await connection.execute(sql)
                        await connection.execute(
                            "INSERT INTO schema_migrations (version) VALUES ($1)", version
                        )
                    log.info("applied migration %d", version)
                for domain in DOMAINS.values():
                    async with connection.transaction():
                        for statement in domain_table_ddl(domain, tier):
                            await connection.execute(statement)
            finally:
                await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
        self.tier = tier
        log.info("schema is up to date on storage tier %s", tier)
        return tier

    async def _enable_timescaledb(self, connection: Connection) -> None:
        available = await connection.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        if not available:
            log.warning("TimescaleDB is not installed on this server; using plain PostgreSQL")
            return
        try:
            await connection.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except asyncpg.PostgresError as exc:
            # Most often: not in shared_preload_libraries. Plain tables still work.
            log.warning("TimescaleDB is installed but cannot be enabled (%s); using plain PostgreSQL", exc)

    async def ping(self) -> None:
        await self._fetchrow("SELECT 1")

    # -- devices ------------------------------------------------------------------------------

    async def insert_device(self, device: DeviceIn) -> Device:
        try:
            await self.pool.execute(
                "INSERT INTO devices (id, city, domain, name, district, lat, lon, thresholds)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                device.id,
                device.city,
                device.domain,
                device.name,
                device.district,
                device.location.lat,
                device.location.lon,
                device.thresholds,
            )
        except asyncpg.UniqueViolationError as exc:
            raise ConflictError(f"device {device.id!r} already exists") from exc
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc
        return await self.get_device(device.id)

    async def get_device(self, device_id: str) -> Device:
        row = await self._fetchrow(
            f"SELECT {_DEVICE_COLUMNS} FROM devices d LEFT JOIN device_state s ON s.device_id = d.id"
            " WHERE d.id = $1",
            device_id,
        )
        if row is None:
            raise NotFoundError(f"device {device_id!r} not found")
        return Device(
            id=row["id"],
            city=row["city"],
            domain=row["domain"],
            name=row["name"],
            district=row["district"],
            location=Location(lat=row["lat"], lon=row["lon"]),
            thresholds=row["thresholds"],
            status=row["status"],
            last_seen=row["last_seen"],
            latest=LatestReading(ts=row["ts"], metrics=row["metrics"]) if row["ts"] is not None else None,
            created_at=row["created_at"],
        )

    async def device_routes(self) -> list[DeviceRoute]:
        rows = await self._fetch("SELECT id, city, domain FROM devices")
        return [DeviceRoute(id=r["id"], city=r["city"], domain=r["domain"]) for r in rows]

    async def device_route(self, device_id: str) -> DeviceRoute | None:
        row = await self._fetchrow("SELECT id, city, domain FROM devices WHERE id = $1", device_id)
        return None if row is None else DeviceRoute(id=row["id"], city=row["city"], domain=row["domain"])

    async def list_state(self, *, city: str | None = None, domain: str | None = None) -> list[StateItem]:
        rows = await self._fetch(
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

    # -- readings -----------------------------------------------------------------------------

    async def write_batch(self, batch: TelemetryBatch) -> WriteResult:
        """Store one poll of the bus in one transaction: readings (each once), latest state,
        status transitions with their events in the outbox, and dead letters.

        Durable when this returns, so the caller may commit its Kafka offsets.
        """
        readings = [(r, p) for r, p in batch.records if isinstance(r, Reading)]
        fresh_seqs = _seq_candidates([r for r, _ in readings])
        statuses = _final_statuses(batch.records)
        result = WriteResult()
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                accepted: set[tuple[str, int]] = set()
                if fresh_seqs:
                    rows = await connection.fetch(
                        _REMEMBER_SEQS_SQL,
                        [k[0] for k in fresh_seqs],
                        [k[1] for k in fresh_seqs],
                        [r.ts for r in fresh_seqs.values()],
                        self._seq_window_s,
                    )
                    accepted = {(row["device_id"], row["seq"]) for row in rows}
                kept = [
                    (r, p)
                    for r, p in readings
                    if r.device_time
                    or r.seq is None
                    or (fresh_seqs.get((r.device_id, r.seq)) is r and (r.device_id, r.seq) in accepted)
                ]
                result.stored = await self._insert_readings(connection, [r for r, _ in kept])
                result.duplicates = len(readings) - result.stored
                if kept:
                    latest = _latest_per_device(kept)
                    await connection.execute(
                        _UPSERT_STATE_SQL,
                        list(latest),
                        [s.ts for s in latest.values()],
                        [s.seq for s in latest.values()],
                        [json.dumps(s.metrics) for s in latest.values()],
                        [s.received_at for s in latest.values()],
                        [s.bus_partition for s in latest.values()],
                    )
                reported_only = {d: s for d, s in statuses.items() if s.cause == CAUSE_STATUS_MESSAGE}
                if reported_only:
                    await connection.execute(
                        _ENSURE_STATE_SQL,
                        list(reported_only),
                        [s.bus_partition for s in reported_only.values()],
                    )
                if statuses:
                    rows = await connection.fetch(
                        _APPLY_STATUS_SQL,
                        list(statuses),
                        [s.status for s in statuses.values()],
                        [s.at for s in statuses.values()],
                        [s.cause for s in statuses.values()],
                    )
                    result.events = [
                        device_status_event(
                            device_id=row["device_id"],
                            city=row["city"],
                            domain=row["domain"],
                            status=row["status"],
                            previous=row["previous"],
                            cause=row["cause"],
                            at=row["at"],
                        )
                        for row in rows
                    ]
                    await _insert_outbox(connection, result.events)
                if batch.dead_letters:
                    letters = batch.dead_letters
                    await connection.execute(
                        _INSERT_DEAD_LETTERS_SQL,
                        [d.source for d in letters],
                        [d.received_at for d in letters],
                        [d.topic for d in letters],
                        [d.reason for d in letters],
                        [d.detail for d in letters],
                        [d.payload.replace("\x00", "\ufffd") for d in letters],
                        [d.payload_size for d in letters],
                    )
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"writing a batch of {len(batch.records)} records failed: {exc}",
                retriable=isinstance(exc, _TRANSIENT_ERRORS),
            ) from exc
        return result

    async def _insert_readings(self, connection: Connection, readings: Sequence[Reading]) -> int:
        by_domain: dict[str, list[Reading]] = {}
        for reading in readings:
            by_domain.setdefault(reading.domain, []).append(reading)
        stored = 0
        for domain_name, batch in by_domain.items():
            domain = DOMAINS[domain_name]
            columns: list[list[Any]] = [
                [r.ts for r in batch],
                [r.device_id for r in batch],
                [r.seq for r in batch],
                [r.received_at for r in batch],
                *([r.metrics.get(m.name) for r in batch] for m in domain.metrics),
            ]
            status = await connection.execute(_INSERT_SQL[domain_name], *columns)
            stored += int(status.rsplit(" ", 1)[-1])
        return stored

    async def sweep_silent_devices(
        self, owned: Sequence[tuple[str, int]], offline_after_s: dict[str, float]
    ) -> list[Event]:
        """Mark offline the online devices, among those whose (domain, partition) is in `owned`,
        that have been silent longer than their domain allows; returns the recorded events."""
        if not owned:
            return []
        limits = list(offline_after_s.items())
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                rows = await connection.fetch(
                    _SWEEP_SILENT_SQL,
                    [o[0] for o in owned],
                    [o[1] for o in owned],
                    [limit[0] for limit in limits],
                    [limit[1] for limit in limits],
                )
                events = [
                    device_status_event(
                        device_id=row["device_id"],
                        city=row["city"],
                        domain=row["domain"],
                        status="offline",
                        previous="online",
                        cause=CAUSE_INACTIVITY,
                        at=row["status_changed_at"],
                    )
                    for row in rows
                ]
                await _insert_outbox(connection, events)
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc
        return events

    # -- outbox -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def unpublished_events(self, limit: int) -> AsyncIterator[OutboxClaim]:
        """Claim up to `limit` unpublished events (other relays skip them) until the block ends;
        the block publishes them and calls `claim.mark_published()`."""
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                rows = await connection.fetch(
                    "SELECT id, topic, key, payload::text AS payload FROM outbox"
                    " WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    limit,
                )
                claim = OutboxClaim(
                    connection, [OutboxEvent(r["id"], r["topic"], r["key"], r["payload"]) for r in rows]
                )
                yield claim
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc

    async def housekeeping(self, *, outbox_keep_s: float = 86_400) -> None:
        """Forget what no longer matters: relayed events and expired de-duplication windows."""
        try:
            await self.pool.execute(
                "DELETE FROM outbox WHERE published_at < now() - make_interval(secs => $1)", outbox_keep_s
            )
            await self.pool.execute(
                "DELETE FROM reading_seqs WHERE ts < now() - make_interval(secs => $1)", self._seq_window_s
            )
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc

    # -- dead letters -------------------------------------------------------------------------

    async def list_dead_letters(
        self, *, limit: int, before_id: int | None = None, reason: str | None = None
    ) -> list[DeadLetterRow]:
        rows = await self._fetch(
            "SELECT id, received_at, topic, reason, detail, payload, payload_size FROM dead_letters"
            " WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR reason = $2)"
            " ORDER BY id DESC LIMIT $3",
            before_id,
            reason,
            limit,
        )
        return [DeadLetterRow(**dict(r)) for r in rows]

    async def dead_letter_counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason")
        return {r["reason"]: r["n"] for r in rows}

    async def device_status_counts(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT coalesce(s.status, 'unknown') AS status, count(*) AS n"
            " FROM devices d LEFT JOIN device_state s ON s.device_id = d.id GROUP BY 1"
        )
        return {r["status"]: r["n"] for r in rows}

    # -- device changes -----------------------------------------------------------------------

    async def update_device(self, device: DeviceIn) -> Device:
        """Store a device's name, district, location and thresholds; its id, city and domain stay."""
        row = await self._fetchrow(
            "UPDATE devices SET name = $2, district = $3, lat = $4, lon = $5, thresholds = $6,"
            " updated_at = now() WHERE id = $1 RETURNING id",
            device.id,
            device.name,
            device.district,
            device.location.lat,
            device.location.lon,
            device.thresholds,
        )
        if row is None:
            raise NotFoundError(f"device {device.id!r} not found")
        return await self.get_device(device.id)

    async def delete_device(self, device_id: str) -> None:
        """Remove a device from the registry (its state goes with it; stored readings stay)."""
        row = await self._fetchrow("DELETE FROM devices WHERE id = $1 RETURNING id", device_id)
        if row is None:
            raise NotFoundError(f"device {device_id!r} not found")


async def _insert_outbox(connection: Connection, events: Sequence[Event]) -> None:
    if not events:
        return
    await connection.execute(
        _INSERT_OUTBOX_SQL,
        [e.id for e in events],
        ["events" for _ in events],
        [e.key for e in events],
        [json.dumps(e.to_cloudevent(), ensure_ascii=False) for e in events],
    )


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    id: int
    topic: str
    key: str | None
    payload: str


class OutboxClaim:
    def __init__(self, connection: Connection, events: list[OutboxEvent]) -> None:
        self._connection = connection
        self.events = events

    async def mark_published(self) -> None:
        await self._connection.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", [e.id for e in self.events]
        )
