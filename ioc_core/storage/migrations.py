"""Schema migrations and the storage tier: enabling TimescaleDB where the server can load it,
telling which tier the database offers, and creating or upgrading the schema for it."""

from __future__ import annotations

import logging
from datetime import timedelta

import asyncpg

from ioc_core.domains import DOMAINS
from ioc_core.storage.pool import Connection, Pool
from ioc_core.storage.schema import MIGRATION_LOCK_ID, MIGRATIONS, StorageTier, domain_table_ddl
from ioc_core.storage.tiers import DEFAULT_RETENTION, tier_objects_sql

log = logging.getLogger(__name__)


async def detect_tier(pool: Pool) -> StorageTier:
    row = await pool.fetchrow(
        "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS version,"
        " current_setting('timescaledb.license', true) AS license"
    )
    if row is None or row["version"] is None:
        return StorageTier.POSTGRES
    return StorageTier.COMMUNITY if row["license"] == "timescale" else StorageTier.APACHE


async def migrate(pool: Pool, *, retention: timedelta = DEFAULT_RETENTION) -> StorageTier:
    """Create or upgrade the schema; safe to run twice and from several processes at once.

    On community TimescaleDB this also sets up continuous aggregates, compression and the
    retention policies, readings being kept for `retention` (IOC_RETENTION_DAYS)."""
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
                for statement in tier_objects_sql(tier, domain, retention):
                    await connection.execute(statement)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    log.info("schema is up to date on storage tier %s", tier)
    return tier


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
