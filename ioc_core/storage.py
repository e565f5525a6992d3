"""All SQL of the system: schema migrations, storage-tier detection, devices, readings, state.

Readings live in one table per domain with one typed column per metric: the contract fixes each
domain's metrics, so typed columns are smaller than JSON, need no parsing on read, and let
TimescaleDB compress each metric as its own column. The primary key `(device_id, ts)` is the
de-duplication key and, read backwards, serves both "latest for device" and "series for device
over a range". Latest state has its own small table so screens never scan readings.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import asyncpg

from ioc_core.domains import DOMAINS, Domain
from ioc_core.errors import ConflictError, NotFoundError, ServiceUnavailableError, StorageError
from ioc_core.models import Device, DeviceIn, DeviceRoute, LatestReading, Location, StateItem
from ioc_core.telemetry import Reading

log = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# One lock id for every migrating process, so concurrent `ioc migrate` runs apply each step once.
_MIGRATION_LOCK_ID = 0x10C_0001


class StorageTier(enum.StrEnum):
    """What the database offers, best first; the schema and queries adapt to it."""

    COMMUNITY = "timescaledb-community"
    APACHE = "timescaledb-apache"
    POSTGRES = "postgresql"

    @property
    def has_hypertables(self) -> bool:
        return self is not StorageTier.POSTGRES


_CONNECTION_ERRORS = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
)


def _ident(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{name!r} is not a safe SQL identifier")
    return name


# Versioned schema steps; each runs once, in order, inside the migration lock.
_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE devices (
            id          text PRIMARY KEY,
            city        text NOT NULL,
            domain      text NOT NULL,
            name        text,
            district    text,
            lat         double precision NOT NULL,
            lon         double precision NOT NULL,
            thresholds  jsonb NOT NULL DEFAULT '{}',
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX devices_city_domain ON devices (city, domain);

        CREATE TABLE device_state (
            device_id          text PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
            ts                 timestamptz,
            seq                bigint,
            metrics            jsonb NOT NULL DEFAULT '{}',
            last_seen          timestamptz,
            status             text NOT NULL DEFAULT 'unknown'
                               CHECK (status IN ('online', 'offline', 'unknown')),
            status_changed_at  timestamptz,
            updated_at         timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
)


def _domain_table_ddl(domain: Domain, tier: StorageTier) -> list[str]:
    """Create or extend a domain's readings table; safe to run at every migration."""
    table = _ident(domain.table)
    columns = [f"{_ident(m.column)} double precision" for m in domain.metrics]
    statements = [
        f"""
        CREATE TABLE IF NOT EXISTS {table} (
            ts           timestamptz NOT NULL,
            device_id    text NOT NULL,
            seq          bigint,
            received_at  timestamptz NOT NULL,
            {", ".join(columns)},
            PRIMARY KEY (device_id, ts)
        )
        """,
        *(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}" for column in columns),
    ]
    if tier.has_hypertables:
        statements.append(
            f"SELECT create_hypertable('{table}', 'ts', chunk_time_interval => INTERVAL '1 day', "
            "if_not_exists => TRUE, migrate_data => TRUE)"
        )
    return statements


def _insert_readings_sql(domain: Domain) -> str:
    columns = ["ts", "device_id", "seq", "received_at", *(_ident(m.column) for m in domain.metrics)]
    types = ["timestamptz[]", "text[]", "bigint[]", "timestamptz[]", *("float8[]" for _ in domain.metrics)]
    params = ", ".join(f"${i}::{t}" for i, t in enumerate(types, start=1))
    return (
        f"INSERT INTO {_ident(domain.table)} ({', '.join(columns)}) "
        f"SELECT * FROM unnest({params}) ON CONFLICT DO NOTHING"
    )


_INSERT_SQL: dict[str, str] = {name: _insert_readings_sql(domain) for name, domain in DOMAINS.items()}

# A reading older than the stored state never moves "latest" backwards; it still proves the
# device alive.
_UPSERT_STATE_SQL = """
INSERT INTO device_state AS s (device_id, ts, seq, metrics, last_seen, status, status_changed_at)
SELECT u.device_id, u.ts, u.seq, u.metrics::jsonb, u.received_at, 'online', u.received_at
FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::text[], $5::timestamptz[])
     AS u (device_id, ts, seq, metrics, received_at)
JOIN devices d ON d.id = u.device_id
ON CONFLICT (device_id) DO UPDATE SET
    ts = CASE WHEN s.ts IS NULL OR excluded.ts >= s.ts THEN excluded.ts ELSE s.ts END,
    seq = CASE WHEN s.ts IS NULL OR excluded.ts >= s.ts THEN excluded.seq ELSE s.seq END,
    metrics = CASE WHEN s.ts IS NULL OR excluded.ts >= s.ts THEN s.metrics || excluded.metrics
                   ELSE s.metrics END,
    last_seen = GREATEST(s.last_seen, excluded.last_seen),
    status = 'online',
    status_changed_at = CASE WHEN s.status = 'online' THEN s.status_changed_at
                             ELSE excluded.status_changed_at END,
    updated_at = now()
"""

_DEVICE_COLUMNS = """
    d.id, d.city, d.domain, d.name, d.district, d.lat, d.lon, d.thresholds, d.created_at,
    coalesce(s.status, 'unknown') AS status, s.last_seen, s.ts, s.metrics
"""


@dataclass(frozen=True)
class _LatestOfDevice:
    ts: datetime
    seq: int | None
    metrics: dict[str, float]
    received_at: datetime


def _latest_per_device(readings: Sequence[Reading]) -> dict[str, _LatestOfDevice]:
    """Fold a batch to one state row per device: one upsert may not touch a row twice."""
    latest: dict[str, _LatestOfDevice] = {}
    for reading in sorted(readings, key=lambda r: r.ts):
        previous = latest.get(reading.device_id)
        metrics = {**previous.metrics, **reading.metrics} if previous else dict(reading.metrics)
        received_at = max(previous.received_at, reading.received_at) if previous else reading.received_at
        latest[reading.device_id] = _LatestOfDevice(reading.ts, reading.seq, metrics, received_at)
    return latest


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
    name = _ident(parts.path.lstrip("/"))
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


class Database:
    """A connection pool and every query the system makes. Use with `async with`."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self._url = url
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self.tier: StorageTier | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

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
            await connection.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
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
                for version, sql in _MIGRATIONS:
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
                        for statement in _domain_table_ddl(domain, tier):
                            await connection.execute(statement)
            finally:
                await connection.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)
        self.tier = tier
        log.info("schema is up to date on storage tier %s", tier)
        return tier

    async def _enable_timescaledb(self, connection: asyncpg.pool.PoolConnectionProxy[Any]) -> None:
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

    async def write_readings(self, readings: Sequence[Reading]) -> None:
        """Store a batch in one transaction: readings (duplicates ignored) and latest state.

        Durable when this returns, so the caller may commit its Kafka offsets.
        """
        if not readings:
            return
        by_domain: dict[str, list[Reading]] = {}
        for reading in readings:
            by_domain.setdefault(reading.domain, []).append(reading)
        latest = _latest_per_device(readings)
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                for domain_name, batch in by_domain.items():
                    domain = DOMAINS[domain_name]
                    columns: list[list[Any]] = [
                        [r.ts for r in batch],
                        [r.device_id for r in batch],
                        [r.seq for r in batch],
                        [r.received_at for r in batch],
                        *([r.metrics.get(m.name) for r in batch] for m in domain.metrics),
                    ]
                    await connection.execute(_INSERT_SQL[domain_name], *columns)
                await connection.execute(
                    _UPSERT_STATE_SQL,
                    list(latest),
                    [s.ts for s in latest.values()],
                    [s.seq for s in latest.values()],
                    [json.dumps(s.metrics) for s in latest.values()],
                    [s.received_at for s in latest.values()],
                )
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(f"writing {len(readings)} readings failed: {exc}", retriable=True) from exc
