"""Schema migrations and the storage tier: enabling TimescaleDB where the server can load it,
telling which tier the database offers, and creating or upgrading the schema for it."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import asyncpg

from ioc_core.domains import DOMAINS
from ioc_core.storage.areas import PLACE_ALL_WITH_POSTGIS_SQL, SpatialEngine, detect_engine
from ioc_core.storage.pool import Connection, Pool
from ioc_core.storage.schema import MIGRATION_LOCK_ID, MIGRATIONS, StorageTier, domain_table_ddl
from ioc_core.storage.tiers import (
    COMPRESS_AFTER,
    DEFAULT_RETENTION,
    READER_ROLE,
    reader_role_sql,
    tier_objects_sql,
)

log = logging.getLogger(__name__)


async def detect_tier(pool: Pool) -> StorageTier:
    row = await pool.fetchrow(
        "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS version,"
        " current_setting('timescaledb.license', true) AS license"
    )
    if row is None or row["version"] is None:
        return StorageTier.POSTGRES
    return StorageTier.COMMUNITY if row["license"] == "timescale" else StorageTier.APACHE


async def migrate(
    pool: Pool,
    *,
    retention: timedelta = DEFAULT_RETENTION,
    compress_after: timedelta = COMPRESS_AFTER,
    reader_password: str | None = None,
    postgis: bool = True,
) -> StorageTier:
    """Create or upgrade the schema; safe to run twice and from several processes at once.

    On community TimescaleDB this also sets up continuous aggregates, compression of chunks older
    than `compress_after` (IOC_COMPRESS_AFTER_DAYS) and the retention policies, readings being
    kept for `retention` (IOC_RETENTION_DAYS).

    Every tier gets the read-only role `ioc_reader` (see `tiers.reader_role_sql`); with
    `reader_password` (IOC_READER_DB_PASSWORD) it may log in with it, for Grafana.

    With `postgis` (IOC_POSTGIS) and the server offering PostGIS, areas get a PostGIS geometry
    and GiST indexes (see `enable_postgis`); otherwise the areas store works with shapely."""
    if await _update_timescaledb(pool.url):
        # The pool's sessions loaded the old version; the server ends them at their next statement.
        await pool.pool.expire_connections()
    async with pool.pool.acquire() as connection:
        await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await _enable_timescaledb(connection)
            tier = await detect_tier(pool)
            await _apply_migrations(connection)
            for domain in DOMAINS.values():
                async with connection.transaction():
                    for statement in domain_table_ddl(domain, tier):
                        await connection.execute(statement)
            # Each on its own: TimescaleDB refuses some of these inside a transaction block.
            for domain in DOMAINS.values():
                for statement in tier_objects_sql(tier, domain, retention, compress_after):
                    await connection.execute(statement)
            if postgis:
                await enable_postgis(connection)
            await _grant_the_reader(connection, tier)
            if reader_password is not None:
                await _let_the_reader_log_in(connection, reader_password)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    log.info("schema is up to date on storage tier %s", tier)
    return tier


# How often a grant that raced a policy job is tried again.
_GRANT_ATTEMPTS = 5


async def _grant_the_reader(connection: Connection, tier: StorageTier) -> None:
    for attempt in range(1, _GRANT_ATTEMPTS + 1):
        try:
            await connection.execute(reader_role_sql(tier))
            return
        except asyncpg.InternalServerError as exc:
            # A policy job changed a chunk's catalog row in the meantime; the next try finds
            # what was granted and grants the rest.
            if "concurrently updated" not in str(exc) or attempt == _GRANT_ATTEMPTS:
                raise
            await asyncio.sleep(0.1 * attempt)


async def _let_the_reader_log_in(connection: Connection, password: str) -> None:
    # A password cannot be a parameter of ALTER ROLE: the server quotes it (format's %L).
    statement = await connection.fetchval(
        f"SELECT format('ALTER ROLE {READER_ROLE} WITH LOGIN PASSWORD %L', $1::text)", password
    )
    try:
        await connection.execute(statement)
    except asyncpg.InsufficientPrivilegeError as exc:
        log.warning("the read-only role %s cannot be given a password here: %s", READER_ROLE, exc)
    except asyncpg.UndefinedObjectError:
        log.warning("the read-only role %s does not exist: this user may not create roles", READER_ROLE)


async def _apply_migrations(connection: Connection) -> None:
    """Apply, each in its own transaction, the numbered migrations not applied yet."""
    await connection.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    applied = {r["version"] for r in await connection.fetch("SELECT version FROM schema_migrations")}
    for version, sql in MIGRATIONS:
        if version in applied:
            continue
        async with connection.transaction():
            await connection.execute(sql)
            await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        log.info("applied migration %d", version)


async def _update_timescaledb(url: str) -> bool:
    """Bring TimescaleDB in this database up to the version the server has installed (a new
    server image keeps the database's old version until then). The update must be the first
    statement of its session, before anything loads the old version's library: each step runs on
    a connection of its own, outside the pool, whose connections set themselves up first. Says
    whether it updated."""
    connection = await asyncpg.connect(url)
    try:
        versions = await connection.fetchrow(
            "SELECT installed_version, default_version FROM pg_available_extensions"
            " WHERE name = 'timescaledb'"
        )
    finally:
        await connection.close()
    if versions is None or versions["installed_version"] in (None, versions["default_version"]):
        return False
    log.info(
        "updating TimescaleDB in this database from %s to %s",
        versions["installed_version"],
        versions["default_version"],
    )
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("ALTER EXTENSION timescaledb UPDATE")
    finally:
        await connection.close()
    return True


async def _enable_timescaledb(connection: Connection) -> None:
    available = await connection.fetchval(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    if not available:
        log.warning("TimescaleDB is not installed on this server; using plain PostgreSQL")
        return
    # Loading TimescaleDB without it being preloaded is FATAL: it would end this connection.
    preloaded = await connection.fetchval(
        "SELECT 'timescaledb' = ANY (SELECT regexp_replace(trim(both ' \"' FROM library), '^.*/', '')"
        " FROM unnest(string_to_array(current_setting('shared_preload_libraries'), ',')) AS library)"
    )
    if not preloaded:
        log.warning("TimescaleDB is installed but not in shared_preload_libraries; using plain PostgreSQL")
        return
    try:
        await connection.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except asyncpg.PostgresError as exc:
        # Most often: not in shared_preload_libraries. Plain tables still work.
        log.warning("TimescaleDB is installed but cannot be enabled (%s); using plain PostgreSQL", exc)


# PostGIS for areas: a geometry kept from the GeoJSON by a trigger (so the store's writes are the
# same on both engines), GiST indexes on it and on the devices' points, and the geometry of areas
# stored before PostGIS came. Each statement is safe to run again.
POSTGIS_SQL: tuple[str, ...] = (
    "ALTER TABLE areas ADD COLUMN IF NOT EXISTS geom geometry(MultiPolygon, 4326)",
    """
    CREATE OR REPLACE FUNCTION areas_geom_from_geojson() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.geom := ST_SetSRID(ST_GeomFromGeoJSON(NEW.geometry::text), 4326);
        RETURN NEW;
    END $$
    """,
    "DROP TRIGGER IF EXISTS areas_geom ON areas",
    "CREATE TRIGGER areas_geom BEFORE INSERT OR UPDATE OF geometry ON areas"
    " FOR EACH ROW EXECUTE FUNCTION areas_geom_from_geojson()",
    "UPDATE areas SET geometry = geometry WHERE geom IS NULL",
    "CREATE INDEX IF NOT EXISTS areas_geom_gist ON areas USING gist (geom)",
    "CREATE INDEX IF NOT EXISTS devices_point_gist ON devices USING gist"
    " (ST_SetSRID(ST_MakePoint(lon, lat), 4326))",
)


async def enable_postgis(connection: Connection) -> bool:
    """Enable PostGIS for areas where the server has it and this user may; says whether it is on.
    Devices' areas are computed afresh when it comes on, by the engine that serves from now on."""
    if await connection.fetchval("SELECT to_regclass('areas') IS NULL"):
        return False
    available = await connection.fetchval(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'postgis'"
    )
    if not available:
        log.info("PostGIS is not installed on this server; areas are computed with shapely")
        return False
    had_geometry = await detect_engine(connection) is SpatialEngine.POSTGIS
    try:
        await connection.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    except asyncpg.PostgresError as exc:
        # Most often: not a superuser (PostGIS is not a trusted extension).
        log.warning("PostGIS cannot be enabled here (%s); areas are computed with shapely", exc)
        return False
    async with connection.transaction():
        for statement in POSTGIS_SQL:
            await connection.execute(statement)
        if not had_geometry:
            await connection.execute("DELETE FROM device_areas")
            await connection.execute(PLACE_ALL_WITH_POSTGIS_SQL)
    return True
