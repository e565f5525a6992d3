"""The schema: storage tiers, versioned migrations and the per-domain readings tables."""

from __future__ import annotations

import enum
import re

from ioc_core.domains import Domain

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# One lock id for every migrating process, so concurrent `ioc migrate` runs apply each step once.
MIGRATION_LOCK_ID = 0x10C_0001


class StorageTier(enum.StrEnum):
    """What the database offers, best first; the schema and queries adapt to it."""

    COMMUNITY = "timescaledb-community"
    APACHE = "timescaledb-apache"
    POSTGRES = "postgresql"

    @property
    def has_hypertables(self) -> bool:
        return self is not StorageTier.POSTGRES


def ident(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{name!r} is not a safe SQL identifier")
    return name


# Versioned schema steps; each runs once, in order, inside the migration lock.
MIGRATIONS: tuple[tuple[int, str], ...] = (
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
    (
        2,
        """
        -- Readings without a device timestamp are stamped with their receive time, which
        -- changes on every redelivery; their (device, seq) pairs are remembered for a window.
        CREATE TABLE reading_seqs (
            device_id  text NOT NULL,
            seq        bigint NOT NULL,
            ts         timestamptz NOT NULL,
            PRIMARY KEY (device_id, seq)
        );
        CREATE INDEX reading_seqs_ts ON reading_seqs (ts);

        -- The Kafka partition a device's records arrive on, so that each processor judges
        -- silence only for the devices whose partitions it owns and has caught up with.
        ALTER TABLE device_state ADD COLUMN bus_partition integer;
        CREATE INDEX device_state_online_last_seen ON device_state (last_seen) WHERE status = 'online';

        CREATE TABLE dead_letters (
            id            bigserial PRIMARY KEY,
            source        text NOT NULL UNIQUE,
            received_at   timestamptz NOT NULL,
            topic         text NOT NULL,
            reason        text NOT NULL,
            detail        text NOT NULL,
            payload       text NOT NULL,
            payload_size  integer NOT NULL,
            stored_at     timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX dead_letters_reason ON dead_letters (reason, id);

        -- Events are recorded in the transaction that causes them and relayed to Kafka after.
        CREATE TABLE outbox (
            id            bigserial PRIMARY KEY,
            event_id      uuid NOT NULL UNIQUE,
            topic         text NOT NULL,
            key           text,
            payload       jsonb NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now(),
            published_at  timestamptz
        );
        CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
        """,
    ),
)


def domain_table_ddl(domain: Domain, tier: StorageTier) -> list[str]:
    """Create or extend a domain's readings table; safe to run at every migration."""
    table = ident(domain.table)
    columns = [f"{ident(m.column)} double precision" for m in domain.metrics]
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
