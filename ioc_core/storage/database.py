"""All SQL of the system: schema migrations, storage-tier detection, devices, readings, state.

Readings live in one table per domain with one typed column per metric: the contract fixes each
domain's metrics, so typed columns are smaller than JSON, need no parsing on read, and let
TimescaleDB compress each metric as its own column. The primary key `(device_id, ts)` makes one
row per device and instant (messages of one instant merge into it, a repeat adds nothing) and,
read backwards, serves both "latest for device" and "series for device over a range". Readings
stamped with their receive time are de-duplicated before that (see `_first_copies`). Latest
state has its own small table so screens never scan readings.

On community TimescaleDB, chunks older than seven days are compressed. A late reading for such
a chunk is still inserted or merged: TimescaleDB (2.11 and later; the compose image has 2.19)
decompresses the device's batch of rows that the unique check or the merge touches, and the
compression policy compresses it again. Such writes are slower, and a batch of late readings
spread over many devices of compressed days may decompress more rows than
`timescaledb.max_tuples_decompressed_per_dml_transaction` allows (100,000 by default); it then
fails on every retry until that limit is raised (0 removes it). The unique check of a plain
insert decompressed the same rows before merging existed, so the merge adds no new limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from pydantic import BaseModel

from ioc_core.alarms import (
    ALARM_ACKNOWLEDGED,
    ALARM_RAISED,
    ALARM_RESOLVED,
    ALARM_UPDATED,
    DISTRICT_FLOOD_RULE,
    Alarm,
    AlarmMessages,
    AuditEntry,
    Finding,
    alarm_event,
    bilingual,
    district_subject,
)
from ioc_core.component import Component
from ioc_core.domains import DOMAINS, Domain
from ioc_core.errors import (
    ConflictError,
    NotFoundError,
    StorageError,
    ValidationError,
)
from ioc_core.events import (
    CAUSE_INACTIVITY,
    CAUSE_STATUS_MESSAGE,
    CAUSE_TELEMETRY,
    Event,
    device_status_event,
)
from ioc_core.models import Device, DeviceIn, DeviceRoute, LatestReading, Location, StateItem
from ioc_core.rules import severity_rank
from ioc_core.storage import views
from ioc_core.storage.connections import CONNECTION_ERRORS as _CONNECTION_ERRORS
from ioc_core.storage.connections import TRANSIENT_ERRORS as _TRANSIENT_ERRORS
from ioc_core.storage.connections import unavailable as _unavailable
from ioc_core.storage.schema import MIGRATION_LOCK_ID, MIGRATIONS, StorageTier, domain_table_ddl, ident
from ioc_core.storage.tiers import (
    AGGREGATES,
    DEFAULT_RETENTION,
    DELETE_BATCH_ROWS,
    RETENTION_LOCK_ID,
    Aggregate,
    retention_sql,
    rollup_series_sql,
    rollup_span,
    series_sql,
    tier_objects_sql,
)
from ioc_core.storage.webhooks import WebhookStore, route_deliveries
from ioc_core.telemetry import BusTelemetry, Reading, StoredDeadLetter
from ioc_core.webhooks import routed

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ReadingsStaging:
    """Readings reach their table through a per-connection temporary table: binary COPY into it,
    then one INSERT ... SELECT that skips the (device, ts) rows already there (COPY itself cannot)
    and counts those it stored. At 5,000-row batches on TimescaleDB this stored 5-25 % more rows
    per second than one INSERT of unnest()ed arrays, and skipped repeats about 15 % faster. The
    table is emptied at every commit and kept for the connection's next batch.

    A staged row whose (device, ts) row exists is rarer (a replayed batch, a copy, a second
    message of one instant): `present_sql` tells which metrics that row has, and `merge_sql` adds
    those it lacks. Both name their rows by key arrays, so they touch only those rows, the same
    on every tier; a batch of repeats costs about half as much again as it did when repeats were
    only skipped."""

    table: str
    columns: tuple[str, ...]
    metric_columns: tuple[str, ...]
    create_sql: str
    move_sql: str
    present_sql: str
    merge_sql: str

    @classmethod
    def of(cls, domain: Domain) -> _ReadingsStaging:
        target = ident(domain.table)
        staging = ident(f"staging_{domain.table}")
        metric_columns = tuple(ident(m.column) for m in domain.metrics)
        columns = ("ts", "device_id", "seq", "received_at", *metric_columns)
        listed = ", ".join(columns)
        metric_arrays = ", ".join(f"${n}::float8[]" for n in range(3, 3 + len(metric_columns)))
        return cls(
            table=staging,
            columns=columns,
            metric_columns=metric_columns,
            create_sql=f"CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {target}) ON COMMIT DELETE ROWS",
            # The keys of the rows stored come back only when some staged row was not ($1: the
            # number staged), so the common batch of new readings costs one count.
            move_sql=(
                f"WITH stored AS (INSERT INTO {target} ({listed}) SELECT {listed} FROM {staging}"
                " ON CONFLICT DO NOTHING RETURNING device_id, ts)"
                " SELECT count(*) AS stored,"
                " CASE WHEN count(*) < $1 THEN array_agg(device_id) END AS devices,"
                " CASE WHEN count(*) < $1 THEN array_agg(ts) END AS times"
                " FROM stored"
            ),
            present_sql=(
                "SELECT t.device_id, t.ts, ARRAY["
                + ", ".join(f"t.{c} IS NOT NULL" for c in metric_columns)
                + f"] AS present FROM unnest($1::text[], $2::timestamptz[]) AS u (device_id, ts)"
                f" JOIN {target} t ON t.device_id = u.device_id AND t.ts = u.ts"
            ),
            # The first stored value of a metric stays: a repeat never rewrites a reading.
            merge_sql=(
                f"UPDATE {target} AS t SET "
                + ", ".join(f"{c} = coalesce(t.{c}, u.{c})" for c in metric_columns)
                + f" FROM unnest($1::text[], $2::timestamptz[], {metric_arrays})"
                f" AS u (device_id, ts, {', '.join(metric_columns)})"
                " WHERE t.device_id = u.device_id AND t.ts = u.ts"
            ),
        )


_STAGING: dict[str, _ReadingsStaging] = {name: _ReadingsStaging.of(d) for name, d in DOMAINS.items()}

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
RETURNING x.device_id, x.city, x.domain, x.name, x.district, x.status, x.previous, x.cause, x.at
"""

# The (device, seq, digest) keys of this batch that are new, or last seen longer ago than the
# window ($5 s): their readings are stored. An entry remembered before digests were (digest 0)
# stands for any values until it expires.
_REMEMBER_SEQS_SQL = """
INSERT INTO reading_seqs AS r (device_id, seq, digest, ts)
SELECT u.device_id, u.seq, u.digest, u.ts
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[]) AS u (device_id, seq, digest, ts)
WHERE NOT EXISTS (
    SELECT 1 FROM reading_seqs l
    WHERE l.device_id = u.device_id AND l.seq = u.seq AND l.digest = 0
      AND l.ts >= u.ts - make_interval(secs => $5)
)
ON CONFLICT (device_id, seq, digest) DO UPDATE SET ts = excluded.ts
    WHERE r.ts < excluded.ts - make_interval(secs => $5)
RETURNING device_id, seq, digest
"""

# First deliveries (no DUP flag) are always stored and remembered, so that a copy can be known.
_REMEMBER_DELIVERIES_SQL = """
INSERT INTO reading_deliveries AS r (device_id, packet_id, digest, received_at)
SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::timestamptz[])
ON CONFLICT (device_id, packet_id, digest) DO UPDATE
    SET received_at = GREATEST(r.received_at, excluded.received_at)
"""

# Redelivered copies (DUP flag): stored only when no delivery with the same packet id and values
# was received within the window ($5 s); those returned are stored.
_REDELIVERIES_SQL = """
INSERT INTO reading_deliveries AS r (device_id, packet_id, digest, received_at)
SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::timestamptz[])
ON CONFLICT (device_id, packet_id, digest) DO UPDATE SET received_at = excluded.received_at
    WHERE r.received_at < excluded.received_at - make_interval(secs => $5)
RETURNING device_id, packet_id, digest
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
          'online' AS previous, '{CAUSE_INACTIVITY}' AS cause, s.status_changed_at AS at
"""

_INSERT_OUTBOX_SQL = """
INSERT INTO outbox (event_id, topic, key, payload)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]::jsonb[])
ON CONFLICT (event_id) DO NOTHING
"""

_ALARM_COLUMNS = """
    a.id, a.subject, a.device_id, a.city, a.domain, a.district, a.rule, a.metric, a.severity,
    a.state, a.started_at, a.last_seen_at, a.acknowledged_at, a.resolved_at, a.value, a.threshold,
    a.count, a.message_vi, a.message_en, a.escalated, a.escalated_at
"""

_SEVERITY_ORDER = "ARRAY['low', 'medium', 'high', 'critical']"

# A repeat bumps the open alarm; a worse severity replaces the stored one (with its limit), a
# milder one does not lower it: an alarm stays as serious as the worst it has been until resolved.
_UPSERT_ALARMS_SQL = f"""
INSERT INTO alarms AS a (subject, device_id, city, domain, district, rule, metric, severity,
                         started_at, last_seen_at, value, threshold, count, message_vi, message_en,
                         serious_since)
SELECT u.subject, u.device_id, u.city, u.domain, u.district, u.rule, u.metric, u.severity,
       u.at, u.at, u.value, u.threshold, u.repeats, u.message_vi, u.message_en,
       CASE WHEN u.severity IN ('high', 'critical') THEN u.at END
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::timestamptz[], $10::float8[], $11::float8[], $12::integer[], $13::text[],
            $14::text[])
     AS u (subject, device_id, city, domain, district, rule, metric, severity, at, value, threshold,
           repeats, message_vi, message_en)
ON CONFLICT (subject, rule) WHERE state <> 'resolved' DO UPDATE SET
    count = a.count + excluded.count,
    last_seen_at = GREATEST(a.last_seen_at, excluded.last_seen_at),
    value = excluded.value,
    previous_severity = a.severity,
    severity = CASE WHEN array_position({_SEVERITY_ORDER}, excluded.severity)
                         > array_position({_SEVERITY_ORDER}, a.severity)
                    THEN excluded.severity ELSE a.severity END,
    threshold = CASE WHEN array_position({_SEVERITY_ORDER}, excluded.severity)
                          > array_position({_SEVERITY_ORDER}, a.severity)
                     THEN excluded.threshold ELSE a.threshold END,
    message_vi = excluded.message_vi,
    message_en = excluded.message_en,
    serious_since = coalesce(a.serious_since, excluded.serious_since),
    updated_at = now()
RETURNING {_ALARM_COLUMNS}, a.previous_severity, (a.xmax = 0) AS inserted
"""

# Active (nobody acknowledged) high or critical alarms older than their domain's limit. Each is
# escalated once, whichever processors run this at the same time: the row lock decides.
_ESCALATE_ALARMS_SQL = f"""
UPDATE alarms AS a SET escalated = true, escalated_at = now(), updated_at = now()
FROM unnest($1::text[], $2::float8[]) AS u (domain, after_s)
WHERE a.domain = u.domain AND a.state = 'active' AND NOT a.escalated AND a.serious_since IS NOT NULL
  AND a.serious_since < now() - make_interval(secs => u.after_s)
RETURNING {_ALARM_COLUMNS}
"""

_RESOLVE_ALARMS_SQL = f"""
UPDATE alarms AS a SET state = 'resolved', resolved_at = u.at, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u (subject, rule, at)
WHERE a.subject = u.subject AND a.rule = u.rule AND a.state <> 'resolved'
RETURNING {_ALARM_COLUMNS}
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
    # The readings stored by this batch (repeats left out), and the status changes it caused.
    kept: list[Reading] = field(default_factory=list)
    transitions: list[StatusTransition] = field(default_factory=list)


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


async def _first_copies(connection: Connection, readings: Sequence[Reading], window_s: float) -> list[bool]:
    """Which readings to store, leaving out copies of messages already stored. Only readings
    stamped with their receive time are judged here (the others are de-duplicated by their
    (device, ts) row):

    - with a `seq`: the same device, `seq` and values within the window is a copy (a broker's
      redelivery, a device's own retransmission, a replayed bus record); a device that restarted
      its `seq` sends other values and is stored. The first of a batch stands for its copies.
    - without a `seq`, delivered at QoS 1 or 2: a message the broker flags as redelivered (DUP)
      with the packet id and values of a delivery received within the window is a copy. Messages
      without the flag are always stored, so a device that reports the same values every few
      minutes keeps every report.
    """
    keep = [True] * len(readings)
    by_seq: dict[tuple[str, int, int], int] = {}
    by_delivery: dict[tuple[str, int, int], list[int]] = {}
    for index, reading in enumerate(readings):
        if reading.device_time:
            continue
        if reading.seq is not None:
            key = (reading.device_id, reading.seq, reading.content_digest())
            if key in by_seq:
                keep[index] = False
            else:
                by_seq[key] = index
        elif reading.packet_id is not None:
            key = (reading.device_id, reading.packet_id, reading.content_digest())
            by_delivery.setdefault(key, []).append(index)
    if by_seq:
        rows = await connection.fetch(
            _REMEMBER_SEQS_SQL,
            [k[0] for k in by_seq],
            [k[1] for k in by_seq],
            [k[2] for k in by_seq],
            [readings[i].ts for i in by_seq.values()],
            window_s,
        )
        accepted = {(row["device_id"], row["seq"], row["digest"]) for row in rows}
        for key, index in by_seq.items():
            keep[index] = key in accepted
    first: dict[tuple[str, int, int], datetime] = {}
    copies: dict[tuple[str, int, int], int] = {}
    for key, indices in by_delivery.items():
        originals = [i for i in indices if not readings[i].redelivered]
        if originals:
            # A flagged copy beside a first delivery with its packet id and values is its copy.
            first[key] = max(readings[i].received_at for i in originals)
            for index in indices:
                keep[index] = not readings[index].redelivered
        else:
            copies[key] = indices[0]
            for index in indices[1:]:
                keep[index] = False
    if first:
        await connection.execute(
            _REMEMBER_DELIVERIES_SQL,
            [k[0] for k in first],
            [k[1] for k in first],
            [k[2] for k in first],
            list(first.values()),
        )
    if copies:
        rows = await connection.fetch(
            _REDELIVERIES_SQL,
            [k[0] for k in copies],
            [k[1] for k in copies],
            [k[2] for k in copies],
            [readings[i].received_at for i in copies.values()],
            window_s,
        )
        accepted = {(row["device_id"], row["packet_id"], row["digest"]) for row in rows}
        for key, index in copies.items():
            keep[index] = key in accepted
    return keep


def _first_values(metric_sets: Iterable[dict[str, float]]) -> dict[str, float]:
    """The metrics of readings of one device and instant, each with its first value."""
    merged: dict[str, float] = {}
    for metrics in metric_sets:
        for name, value in metrics.items():
            merged.setdefault(name, value)
    return merged


def _stored_readings(
    readings: Sequence[tuple[Reading, int]], added: Sequence[dict[str, float]]
) -> list[tuple[Reading, int]]:
    """What a batch changed in the readings, with their partitions: one reading per (device, ts)
    row it inserted or merged into, carrying only the metrics the batch stored there, which is
    what latest state and the detectors are to see."""
    stored: dict[tuple[str, datetime], tuple[Reading, int]] = {}
    for (reading, partition), metrics in zip(readings, added, strict=True):
        if not metrics:
            continue
        key = (reading.device_id, reading.ts)
        previous = stored.get(key)
        if previous is not None:
            stored[key] = (replace(previous[0], metrics={**previous[0].metrics, **metrics}), previous[1])
        elif metrics is reading.metrics:
            stored[key] = (reading, partition)  # all of it stored: no copy needed
        else:
            stored[key] = (replace(reading, metrics=dict(metrics)), partition)
    return list(stored.values())


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
    # Timestamps that PostgreSQL renders itself (JSON built in SQL) come out in UTC.
    await connection.execute("SET TIME ZONE 'UTC'")
    for type_name in ("jsonb", "json"):
        await connection.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
        )


async def _maintenance_connection(url: str) -> tuple[str, asyncpg.Connection]:
    """The name of the database in `url`, and a connection to the server's `postgres` database
    from which it can be created or dropped."""
    parts = urlsplit(url)
    name = ident(parts.path.lstrip("/"))
    try:
        return name, await asyncpg.connect(parts._replace(path="/postgres").geturl(), timeout=10)
    except _CONNECTION_ERRORS as exc:
        raise _unavailable(url, exc) from exc


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
    name, admin = await _maintenance_connection(url)
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
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        seq_window_s: float = 3600,
        timeout_s: float | None = None,
    ) -> None:
        self._url = url
        # Bounds every statement, on the server (statement_timeout) and in the client (a server
        # that hangs, answering nothing): either way the caller gets a retriable error instead of
        # waiting forever. None keeps the long default, for migrations.
        self._timeout_s = timeout_s
        self.seq_window_s = seq_window_s
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self.tier: StorageTier | None = None
        # Webhook endpoints, deliveries and attempts, over this pool.
        self.webhooks = WebhookStore(lambda: self.pool, url)

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=self._min_size,
                max_size=self._max_size,
                init=_init_connection,
                # A connection attempt to a server that hangs waits no longer than a statement.
                timeout=10 if self._timeout_s is None else min(10.0, self._timeout_s),
                command_timeout=60 if self._timeout_s is None else self._timeout_s + 2,
                server_settings=(
                    {} if self._timeout_s is None else {"statement_timeout": str(int(self._timeout_s * 1000))}
                ),
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

    async def migrate(self, *, retention: timedelta = DEFAULT_RETENTION) -> StorageTier:
        """Create or upgrade the schema; safe to run twice and from several processes at once.

        On community TimescaleDB this also sets up continuous aggregates, compression and the
        retention policies, readings being kept for `retention` (IOC_RETENTION_DAYS)."""
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
                # Each on its own: TimescaleDB refuses some of these inside a transaction block.
                for domain in DOMAINS.values():
                    for statement in tier_objects_sql(tier, domain, retention):
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
        # Loading TimescaleDB without it being preloaded is FATAL: it would end this connection.
        preloaded = await connection.fetchval(
            "SELECT 'timescaledb' = ANY (SELECT regexp_replace(trim(both ' \"' FROM library), '^.*/', '')"
            " FROM unnest(string_to_array(current_setting('shared_preload_libraries'), ',')) AS library)"
        )
        if not preloaded:
            log.warning(
                "TimescaleDB is installed but not in shared_preload_libraries; using plain PostgreSQL"
            )
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
            async with self.transaction() as transaction:
                await transaction.connection.execute(
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
                transaction.touch(device.city, device.domain)
        except StorageError as exc:
            if isinstance(exc.__cause__, asyncpg.UniqueViolationError):
                raise ConflictError(f"device {device.id!r} already exists") from exc
            raise
        return await self.get_device(device.id)

    async def get_device(self, device_id: str) -> Device:
        row = await self._fetchrow(
            f"SELECT {_DEVICE_COLUMNS} FROM devices d LEFT JOIN device_state s ON s.device_id = d.id"
            " WHERE d.id = $1",
            device_id,
        )
        if row is None:
            raise NotFoundError(f"device {device_id!r} not found")
        return _device_of(row)

    async def device_routes(self) -> list[DeviceRoute]:
        rows = await self._fetch("SELECT id, city, domain FROM devices")
        return [DeviceRoute(id=r["id"], city=r["city"], domain=r["domain"]) for r in rows]

    async def device_route(self, device_id: str) -> DeviceRoute | None:
        row = await self._fetchrow("SELECT id, city, domain FROM devices WHERE id = $1", device_id)
        return None if row is None else DeviceRoute(id=row["id"], city=row["city"], domain=row["domain"])

    async def device_profiles(self, device_ids: Sequence[str]) -> list[DeviceProfileRow]:
        """What detection needs of each registered device among `device_ids`."""
        rows = await self._fetch(
            "SELECT id, city, domain, name, district, thresholds FROM devices WHERE id = ANY($1::text[])",
            list(device_ids),
        )
        return [
            DeviceProfileRow(r["id"], r["city"], r["domain"], r["name"], r["district"], r["thresholds"])
            for r in rows
        ]

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

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[BatchTransaction]:
        """One unit of work: everything done through the yielded object commits together when
        the block ends, or not at all. Durable when the block has ended."""
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                transaction = BatchTransaction(self, connection)
                yield transaction
                await transaction.flush_versions()
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"a storage transaction failed: {exc}", retriable=isinstance(exc, _TRANSIENT_ERRORS)
            ) from exc

    async def write_batch(self, batch: TelemetryBatch) -> WriteResult:
        """Store one poll of the bus in one transaction (see `BatchTransaction.write`)."""
        async with self.transaction() as transaction:
            return await transaction.write(batch)

    async def _insert_readings(
        self, connection: Connection, readings: Sequence[Reading]
    ) -> list[dict[str, float]]:
        """Store readings, one row per device and time. A reading whose row exists (stored before,
        or earlier in `readings`) adds the metrics the row lacks; a metric the row has keeps its
        first stored value, so a repeat changes nothing. Returns, per reading, the metrics it
        added: all of them for a new row, none for a repeat."""
        if not readings:
            return []
        if not connection.is_in_transaction():
            # The staging table empties at commit: copy and move must share one transaction.
            async with connection.transaction():
                return await self._insert_readings(connection, readings)
        # Each entry is replaced, never changed in place, so one empty dict can stand for all.
        added: list[dict[str, float]] = [{}] * len(readings)
        by_domain: dict[str, list[int]] = {}
        for index, reading in enumerate(readings):
            by_domain.setdefault(reading.domain, []).append(index)
        for domain_name, indices in by_domain.items():
            await self._store_rows(
                connection, _STAGING[domain_name], DOMAINS[domain_name], readings, indices, added
            )
        return added

    async def _store_rows(
        self,
        connection: Connection,
        staging: _ReadingsStaging,
        domain: Domain,
        readings: Sequence[Reading],
        indices: Sequence[int],
        added: list[dict[str, float]],
    ) -> None:
        """`_insert_readings` for the readings at `indices`, all of `domain`; fills `added`."""
        names = [m.name for m in domain.metrics]
        # One staged row per (device, ts), in order of arrival: one statement may not touch a row
        # twice, and the first value of a metric is the one kept.
        first: dict[tuple[str, datetime], int] = {}
        later: dict[tuple[str, datetime], list[int]] = {}
        for index in indices:
            key = (readings[index].device_id, readings[index].ts)
            if first.setdefault(key, index) != index:
                later.setdefault(key, []).append(index)
        folded = {
            key: _first_values(readings[i].metrics for i in (first[key], *more))
            for key, more in later.items()
        }
        await connection.execute(staging.create_sql)
        records = []
        for key, index in first.items():
            reading = readings[index]
            metrics = folded.get(key, reading.metrics)
            records.append(
                (reading.ts, reading.device_id, reading.seq, reading.received_at, *map(metrics.get, names))
            )
        await connection.copy_records_to_table(staging.table, records=records, columns=staging.columns)
        moved = await connection.fetchrow(staging.move_sql, len(records))
        assert moved is not None
        every_row_new = moved["stored"] == len(records)
        if every_row_new and not later:
            # Every row is new, each made by one reading: the common case, kept cheap.
            for index in indices:
                added[index] = readings[index].metrics
            return
        inserted = set(zip(moved["devices"] or (), moved["times"] or (), strict=True))
        existing = [] if every_row_new else [key for key in first if key not in inserted]
        present: dict[tuple[str, datetime], set[str]] = {}
        if existing:
            found = await connection.fetch(
                staging.present_sql, [k[0] for k in existing], [k[1] for k in existing]
            )
            present = {
                (row["device_id"], row["ts"]): {
                    n for n, has in zip(names, row["present"], strict=True) if has
                }
                for row in found
            }
        merges: list[tuple[str, datetime]] = []
        for key, index in first.items():
            known = set(present.get(key, ()))
            for member in (index, *later.get(key, ())):
                new = {n: v for n, v in readings[member].metrics.items() if n not in known}
                added[member] = new
                known.update(new)
            if key in present and known != present[key]:
                merges.append(key)
        if merges:
            await connection.execute(
                staging.merge_sql,
                [k[0] for k in merges],
                [k[1] for k in merges],
                *([folded.get(k, readings[first[k]].metrics).get(name) for k in merges] for name in names),
            )

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
                "DELETE FROM reading_seqs WHERE ts < now() - make_interval(secs => $1)", self.seq_window_s
            )
            await self.pool.execute(
                "DELETE FROM reading_deliveries WHERE received_at < now() - make_interval(secs => $1)",
                self.seq_window_s,
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

    # -- alarms -------------------------------------------------------------------------------

    async def list_alarms(
        self,
        *,
        limit: int,
        before_id: int | None = None,
        states: Sequence[str] | None = None,
        cities: Sequence[str] | None = None,
        domains: Sequence[str] | None = None,
        severities: Sequence[str] | None = None,
        device_id: str | None = None,
    ) -> list[Alarm]:
        """Alarms matching every filter given, newest first; `cities`/`domains` None = every one."""
        rows = await self._fetch(
            f"SELECT {_ALARM_COLUMNS} FROM alarms a"
            " WHERE ($1::bigint IS NULL OR a.id < $1)"
            " AND ($2::text[] IS NULL OR a.state = ANY($2))"
            " AND ($3::text[] IS NULL OR a.city = ANY($3))"
            " AND ($4::text[] IS NULL OR a.domain = ANY($4))"
            " AND ($5::text[] IS NULL OR a.severity = ANY($5))"
            " AND ($6::text IS NULL OR a.device_id = $6)"
            " ORDER BY a.id DESC LIMIT $7",
            before_id,
            list(states) if states else None,
            _text_list(cities),
            _text_list(domains),
            list(severities) if severities else None,
            device_id,
            limit,
        )
        return [_alarm_of(r) for r in rows]

    async def get_alarm(self, alarm_id: int) -> Alarm:
        """One alarm with its audit trail."""
        row = await self._fetchrow(f"SELECT {_ALARM_COLUMNS} FROM alarms a WHERE a.id = $1", alarm_id)
        if row is None:
            raise NotFoundError(f"alarm {alarm_id} not found")
        alarm = _alarm_of(row)
        audit = await self._fetch(
            "SELECT action, actor, note, at FROM alarm_audit WHERE alarm_id = $1 ORDER BY id", alarm_id
        )
        alarm.audit = [AuditEntry(**dict(r)) for r in audit]
        return alarm

    async def acknowledge_alarm(self, alarm_id: int, *, actor: str, note: str | None) -> Alarm:
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
        )

    async def resolve_alarm(self, alarm_id: int, *, actor: str, note: str | None) -> Alarm:
        """Resolve an open alarm by hand; the detectors raise a new one if the condition persists."""
        return await self._operator_action(
            alarm_id,
            actor=actor,
            note=note,
            action="resolved",
            sql="UPDATE alarms SET state = 'resolved', resolved_at = now(), updated_at = now()"
            " WHERE id = $1 AND state <> 'resolved' RETURNING id",
            event_type=ALARM_RESOLVED,
            unchanged_state=None,
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
    ) -> Alarm:
        async with self.transaction() as transaction:
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
                await _insert_outbox(connection, [event])
        return await self.get_alarm(alarm_id)

    # -- device changes -----------------------------------------------------------------------

    async def update_device(self, device: DeviceIn) -> Device:
        """Store a device's name, district, location and thresholds; its id, city and domain stay."""
        async with self.transaction() as transaction:
            row = await transaction.connection.fetchrow(
                "UPDATE devices SET name = $2, district = $3, lat = $4, lon = $5, thresholds = $6,"
                " updated_at = now() WHERE id = $1 RETURNING city, domain",
                device.id,
                device.name,
                device.district,
                device.location.lat,
                device.location.lon,
                device.thresholds,
            )
            if row is None:
                raise NotFoundError(f"device {device.id!r} not found")
            transaction.touch(row["city"], row["domain"])
        return await self.get_device(device.id)

    async def delete_device(self, device_id: str) -> None:
        """Remove a device from the registry (its state goes with it; stored readings stay)."""
        async with self.transaction() as transaction:
            row = await transaction.connection.fetchrow(
                "DELETE FROM devices WHERE id = $1 RETURNING city, domain", device_id
            )
            if row is None:
                raise NotFoundError(f"device {device_id!r} not found")
            transaction.touch(row["city"], row["domain"])

    # -- operations views ---------------------------------------------------------------------

    async def state_version(self, cities: Sequence[str] | None, domains: Sequence[str] | None) -> str:
        """Changes whenever anything shown about the devices in scope changes (see `views`)."""
        row = await self._fetchrow(views.STATE_VERSIONS_SQL, _text_list(cities), _text_list(domains))
        return str(row[0]) if row is not None else ""

    async def state_page(
        self,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        *,
        after: str | None,
        limit: int,
    ) -> views.StatePage:
        """The latest state of devices in scope, in id order, as JSON built by the database."""
        row = await self._fetchrow(
            views.STATE_PAGE_SQL, _text_list(cities), _text_list(domains), after, limit
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
    ) -> tuple[int, str]:
        """GeoJSON features (a JSON array text) of the devices in scope, with how many there are."""
        row = await self._fetchrow(
            views.LAYER_SQL, _text_list(cities), _text_list(domains), list(bbox) if bbox else None
        )
        return (row["n"], row["features"]) if row is not None else (0, "[]")

    async def list_devices(
        self,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        *,
        status: str | None,
        bbox: tuple[float, float, float, float] | None,
        after: str | None,
        limit: int,
    ) -> list[Device]:
        rows = await self._fetch(
            views.DEVICE_PAGE_SQL,
            _text_list(cities),
            _text_list(domains),
            status,
            list(bbox) if bbox else None,
            after,
            limit,
        )
        return [_device_of(row) for row in rows]

    async def summary_inputs(
        self, cities: Sequence[str] | None, domains: Sequence[str] | None, city: str | None
    ) -> tuple[list[views.SummaryDevice], list[tuple[str, str, str, int]]]:
        """Devices in scope with their open alarms, and open alarms counted by (domain, state,
        severity): what a summary's figures are computed from."""
        scope = (_text_list(cities), _text_list(domains), city)
        device_rows = await self._fetch(views.SUMMARY_DEVICES_SQL, *scope)
        alarm_rows = await self._fetch(views.SUMMARY_ALARMS_SQL, *scope)
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

    async def cities(
        self, cities: Sequence[str] | None, domains: Sequence[str] | None
    ) -> list[views.CityRow]:
        rows = await self._fetch(views.CITIES_SQL, _text_list(cities), _text_list(domains))
        return [
            views.CityRow(
                city=r["city"],
                devices=r["devices"],
                lat=r["lat"],
                lon=r["lon"],
                bbox=(r["min_lon"], r["min_lat"], r["max_lon"], r["max_lat"]),
            )
            for r in rows
        ]

    async def public_alarms(
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
        rows = await self._fetch(
            views.PUBLIC_ALARMS_SQL.format(alarm_columns=_ALARM_COLUMNS),
            [domain for domain, _ in rules],
            [rule for _, rule in rules],
            list(severities),
            city,
            alarm_id,
            limit,
        )
        return [
            views.PublicAlarmRow(
                alarm=_alarm_of(r),
                device_name=r["device_name"],
                location=(r["lat"], r["lon"]) if r["lat"] is not None else None,
                district_points=list(zip(r["district_lats"] or (), r["district_lons"] or (), strict=True)),
            )
            for r in rows
        ]

    # -- API keys -----------------------------------------------------------------------------

    async def create_api_key(
        self,
        *,
        key_id: str,
        name: str | None,
        role: str,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        key_hash: bytes,
        created_by: str,
    ) -> views.ApiKeyRow:
        row = await self._fetchrow(
            "INSERT INTO api_keys (id, name, role, cities, domains, key_hash, created_by)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {views.API_KEY_COLUMNS}",
            key_id,
            name,
            role,
            _text_list(cities),
            _text_list(domains),
            key_hash,
            created_by,
        )
        assert row is not None
        return views.ApiKeyRow(**dict(row))

    async def api_key_by_hash(self, key_hash: bytes) -> views.ApiKeyRow | None:
        """The live (not revoked) key with this digest."""
        row = await self._fetchrow(
            f"SELECT {views.API_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            key_hash,
        )
        return views.ApiKeyRow(**dict(row)) if row is not None else None

    async def list_api_keys(
        self, cities: Sequence[str] | None, domains: Sequence[str] | None, *, after: str | None, limit: int
    ) -> list[views.ApiKeyRow]:
        """Keys whose scope lies within `cities` and `domains` (None = no limit), in id order."""
        rows = await self._fetch(
            f"SELECT {views.API_KEY_COLUMNS} FROM api_keys"
            " WHERE ($1::text[] IS NULL OR cities <@ $1) AND ($2::text[] IS NULL OR domains <@ $2)"
            " AND ($3::text IS NULL OR id > $3) ORDER BY id LIMIT $4",
            _text_list(cities),
            _text_list(domains),
            after,
            limit,
        )
        return [views.ApiKeyRow(**dict(r)) for r in rows]

    async def get_api_key(self, key_id: str) -> views.ApiKeyRow:
        row = await self._fetchrow(f"SELECT {views.API_KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id)
        if row is None:
            raise NotFoundError(f"API key {key_id!r} not found")
        return views.ApiKeyRow(**dict(row))

    async def revoke_api_key(self, key_id: str) -> views.ApiKeyRow:
        """Revoke a key (again: no change); it stops working within the API's key cache time."""
        row = await self._fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1"
            f" RETURNING {views.API_KEY_COLUMNS}",
            key_id,
        )
        if row is None:
            raise NotFoundError(f"API key {key_id!r} not found")
        return views.ApiKeyRow(**dict(row))

    # -- series and retention -----------------------------------------------------------------

    async def series(
        self,
        device_id: str,
        domain: str,
        metric: str,
        start: datetime,
        end: datetime,
        bucket: timedelta,
        agg: Aggregate,
    ) -> list[tuple[datetime, float | None]]:
        """One metric of one device over [start, end) in buckets of `bucket` aligned to the Unix
        epoch in UTC: (bucket start, value) in time order; buckets without the metric are left out.
        Naive datetimes are taken as UTC. The same on every tier; community TimescaleDB reads the
        continuous aggregates where the bucket is a whole number of their buckets."""
        domain_def = DOMAINS.get(domain)
        if domain_def is None:
            raise ValidationError(f"{domain!r} is not a domain; known: {', '.join(DOMAINS)}")
        metric_def = domain_def.metric(metric)
        if metric_def is None:
            known = ", ".join(m.name for m in domain_def.metrics)
            raise ValidationError(f"{metric!r} is not a metric of the {domain} domain; known: {known}")
        if agg not in AGGREGATES:
            raise ValidationError(f"{agg!r} is not an aggregate; known: {', '.join(AGGREGATES)}")
        if bucket <= timedelta(0):
            raise ValidationError(f"bucket must be positive, not {bucket}")
        start, end = (t if t.tzinfo is not None else t.replace(tzinfo=UTC) for t in (start, end))
        if start >= end:
            return []
        tier = self.tier if self.tier is not None else await self.detect_tier()
        span = rollup_span(bucket, start, end) if tier is StorageTier.COMMUNITY else None
        try:
            if span is not None:
                try:
                    rows = await self._fetch(
                        rollup_series_sql(domain_def, metric_def, agg, span.rollup),
                        bucket,
                        device_id,
                        start,
                        end,
                        span.inner_start,
                        span.inner_end,
                    )
                    return [(r["t"], r["value"]) for r in rows]
                except asyncpg.UndefinedTableError:
                    log.warning(
                        "continuous aggregate %s is missing (run `ioc migrate`); reading the readings",
                        span.rollup.view(domain_def),
                    )
            sql = series_sql(tier, domain_def, metric_def, agg)
            rows = await self._fetch(sql, bucket, device_id, start, end)
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"reading the {metric} series of {device_id!r} failed: {exc}",
                retriable=isinstance(exc, _TRANSIENT_ERRORS),
            ) from exc
        return [(r["t"], r["value"]) for r in rows]

    async def apply_retention(self, older_than: timedelta) -> int:
        """Remove readings older than `older_than`: whole chunks on TimescaleDB (`drop_chunks`, so
        up to a day more may stay), rows on PostgreSQL. Returns the number of chunks or rows removed.

        Safe to call from several processors at once: one of them does the work, the others return 0.
        """
        if older_than <= timedelta(0):
            raise ValidationError(f"retention must be positive, not {older_than}")
        tier = self.tier if self.tier is not None else await self.detect_tier()
        removed = 0
        try:
            async with self.pool.acquire() as connection:
                if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_ID):
                    log.debug("retention is being applied by another process")
                    return 0
                try:
                    for domain in DOMAINS.values():
                        removed += await _remove_old_readings(connection, tier, domain, older_than)
                finally:
                    await connection.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_ID)
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(self._url, exc) from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"removing readings older than {older_than} failed: {exc}",
                retriable=isinstance(exc, _TRANSIENT_ERRORS),
            ) from exc
        if removed:
            unit = "chunks" if tier.has_hypertables else "rows"
            log.info("retention removed %d %s of readings older than %s", removed, unit, older_than)
        return removed

    async def count_readings(self) -> int:
        """How many readings are stored, over every domain (an exact count: it scans them)."""
        row = await self._fetchrow(_COUNT_READINGS_SQL)
        return int(row["n"]) if row is not None else 0


_COUNT_READINGS_SQL = (
    "SELECT " + " + ".join(f"(SELECT count(*) FROM {ident(d.table)})" for d in DOMAINS.values()) + " AS n"
)


async def _remove_old_readings(
    connection: Connection, tier: StorageTier, domain: Domain, older_than: timedelta
) -> int:
    sql = retention_sql(tier, domain)
    if tier.has_hypertables:
        return int(await connection.fetchval(sql, older_than))
    removed = 0
    while True:
        status = await connection.execute(sql, older_than, DELETE_BATCH_ROWS)
        deleted = int(status.rsplit(" ", 1)[-1])
        removed += deleted
        if deleted < DELETE_BATCH_ROWS:
            return removed


async def _insert_outbox(connection: Connection, events: Sequence[Event]) -> None:
    """Record events for the relay to Kafka, and their webhook deliveries, in the caller's
    transaction."""
    if not events:
        return
    await connection.execute(
        _INSERT_OUTBOX_SQL,
        [e.id for e in events],
        ["events" for _ in events],
        [e.key for e in events],
        [json.dumps(e.to_cloudevent(), ensure_ascii=False) for e in events],
    )
    await route_deliveries(connection, routed(events))


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


@dataclass(frozen=True, slots=True)
class DeviceProfileRow:
    id: str
    city: str
    domain: str
    name: str | None
    district: str | None
    thresholds: dict[str, dict[str, float | None]]


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


def _device_of(row: asyncpg.Record) -> Device:
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


def _text_list(values: Sequence[str] | None) -> list[str] | None:
    return list(values) if values is not None else None


def _rule_and_metric(item: str) -> tuple[str, str | None]:
    rule, _, metric = item.partition("|")
    return rule, metric or None


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
    )


def _in_rounds(findings: Sequence[Finding]) -> list[list[Finding]]:
    """Split findings so that no round names a (subject, rule) twice, keeping each key's order:
    one statement may not touch a row twice, and a recovery must follow the raise before it."""
    rounds: list[list[Finding]] = []
    seen: dict[tuple[str, str], int] = {}
    for finding in findings:
        index = seen.get(finding.key, -1) + 1
        seen[finding.key] = index
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(finding)
    return rounds


class BatchTransaction:
    """The statements of one storage transaction (see `Database.transaction`)."""

    def __init__(self, database: Database, connection: Connection) -> None:
        self._database = database
        self._connection = connection
        # (city, domain) pairs whose screens change when this transaction commits.
        self.touched: set[tuple[str, str]] = set()

    @property
    def connection(self) -> Connection:
        return self._connection

    def touch(self, city: str, domain: str) -> None:
        self.touched.add((city, domain))

    async def flush_versions(self) -> None:
        """Bump the touched pairs' state versions; the last statement, so the rows stay locked
        only until the commit that follows."""
        if not self.touched:
            return
        pairs = sorted(self.touched)
        await self._connection.execute(
            views.BUMP_STATE_VERSIONS_SQL, [p[0] for p in pairs], [p[1] for p in pairs]
        )
        self.touched.clear()

    async def write(self, batch: TelemetryBatch) -> WriteResult:
        """Store one poll of the bus: readings (each once), latest state, status transitions with
        their events in the outbox, and dead letters."""
        connection = self._connection
        readings = [(r, p) for r, p in batch.records if isinstance(r, Reading)]
        statuses = _final_statuses(batch.records)
        result = WriteResult()
        keep = await _first_copies(connection, [r for r, _ in readings], self._database.seq_window_s)
        candidates = [pair for pair, kept_ in zip(readings, keep, strict=True) if kept_]
        added = await self._database._insert_readings(connection, [r for r, _ in candidates])
        # A reading counts as stored when it made a row or added a metric to one.
        result.stored = sum(1 for metrics in added if metrics)
        result.duplicates = len(readings) - result.stored
        kept = _stored_readings(candidates, added)
        result.kept = [r for r, _ in kept]
        self.touched.update((r.city, r.domain) for r, _ in kept)
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
                _ENSURE_STATE_SQL, list(reported_only), [s.bus_partition for s in reported_only.values()]
            )
        if statuses:
            rows = await connection.fetch(
                _APPLY_STATUS_SQL,
                list(statuses),
                [s.status for s in statuses.values()],
                [s.at for s in statuses.values()],
                [s.cause for s in statuses.values()],
            )
            result.transitions = [_transition_of(row) for row in rows]
            self.touched.update((t.city, t.domain) for t in result.transitions)
            result.events = [_status_event(t) for t in result.transitions]
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
        return result

    async def sweep_silent(
        self, owned: Sequence[tuple[str, int]], offline_after_s: dict[str, float]
    ) -> list[StatusTransition]:
        """Mark offline the online devices, among those whose (domain, partition) is in `owned`,
        that have been silent longer than their domain allows; records their events."""
        if not owned:
            return []
        limits = list(offline_after_s.items())
        rows = await self._connection.fetch(
            _SWEEP_SILENT_SQL,
            [o[0] for o in owned],
            [o[1] for o in owned],
            [limit[0] for limit in limits],
            [limit[1] for limit in limits],
        )
        transitions = [_transition_of(row) for row in rows]
        self.touched.update((t.city, t.domain) for t in transitions)
        await _insert_outbox(self._connection, [_status_event(t) for t in transitions])
        return transitions

    async def detector_states(self, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows = await self._connection.fetch(
            "SELECT device_id, state FROM detector_state WHERE device_id = ANY($1::text[])", list(device_ids)
        )
        return {row["device_id"]: row["state"] for row in rows}

    async def save_detector_states(
        self, states: dict[str, dict[str, Any]], flood_signals: dict[str, dict[str, Any] | None]
    ) -> None:
        """Store detector state (and, for flood stations, their signal) of registered devices."""
        if not states:
            return
        ids = sorted(states)  # one lock order for processors racing on the same devices
        await self._connection.execute(
            """
            INSERT INTO detector_state AS d (device_id, state, flood_signal)
            SELECT u.device_id, u.state::jsonb, u.flood_signal::jsonb
            FROM unnest($1::text[], $2::text[], $3::text[]) AS u (device_id, state, flood_signal)
            JOIN devices ON devices.id = u.device_id
            ON CONFLICT (device_id) DO UPDATE SET
                state = excluded.state,
                flood_signal = coalesce(excluded.flood_signal, d.flood_signal),
                updated_at = now()
            """,
            ids,
            [json.dumps(states[i], separators=(",", ":")) for i in ids],
            [json.dumps(flood_signals[i]) if flood_signals.get(i) is not None else None for i in ids],
        )

    async def district_flood_signals(self, city: str, district: str) -> tuple[list[dict[str, Any]], bool]:
        """The stored signals of a district's flood stations, and whether its district alarm is open."""
        rows = await self._connection.fetch(
            "SELECT s.flood_signal FROM detector_state s JOIN devices d ON d.id = s.device_id"
            " WHERE d.city = $1 AND d.district = $2 AND d.domain = 'flood' AND s.flood_signal IS NOT NULL",
            city,
            district,
        )
        open_alarm = await self._connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM alarms WHERE subject = $1 AND rule = $2 AND state <> 'resolved')",
            district_subject(city, district),
            DISTRICT_FLOOD_RULE,
        )
        return [row["flood_signal"] for row in rows], bool(open_alarm)

    async def escalate_alarms(self, after_s: dict[str, float]) -> list[Event]:
        """Escalate the alarms nobody acknowledged in time; records `alarm.updated` events with
        `escalated: true`."""
        rows = await self._connection.fetch(_ESCALATE_ALARMS_SQL, list(after_s), list(after_s.values()))
        now = datetime.now(UTC)
        events = [alarm_event(ALARM_UPDATED, _alarm_of(row), now) for row in rows]
        self.touched.update((e.data["city"], e.data["domain"]) for e in events)
        await _insert_outbox(self._connection, events)
        return events

    async def apply_findings(self, findings: Sequence[Finding]) -> list[Event]:
        """Raise, repeat, escalate or resolve alarms; records and returns their lifecycle events."""
        events: list[Event] = []
        for round_ in _in_rounds(findings):
            # In key order, so that processors racing on the same alarms lock them in one order.
            raised = sorted((f for f in round_ if f.active), key=lambda f: f.key)
            recovered = sorted((f for f in round_ if not f.active), key=lambda f: f.key)
            if raised:
                rows = await self._connection.fetch(
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
                )
                for row in rows:
                    alarm = _alarm_of(row)
                    if row["inserted"]:
                        events.append(alarm_event(ALARM_RAISED, alarm, alarm.last_seen_at))
                    elif severity_rank(alarm.severity) > severity_rank(row["previous_severity"]):
                        events.append(alarm_event(ALARM_UPDATED, alarm, alarm.last_seen_at))
            if recovered:
                rows = await self._connection.fetch(
                    _RESOLVE_ALARMS_SQL,
                    [f.subject for f in recovered],
                    [f.rule for f in recovered],
                    [f.at for f in recovered],
                )
                events.extend(
                    alarm_event(ALARM_RESOLVED, a, a.resolved_at or a.last_seen_at)
                    for a in map(_alarm_of, rows)
                )
        self.touched.update((e.data["city"], e.data["domain"]) for e in events)
        await _insert_outbox(self._connection, events)
        return events


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
    )


def _status_event(transition: StatusTransition) -> Event:
    return device_status_event(
        device_id=transition.device_id,
        city=transition.city,
        domain=transition.domain,
        status=transition.status,
        previous=transition.previous,
        cause=transition.cause,
        at=transition.at,
    )


async def drop_database(url: str) -> None:
    """Remove the database named in `url`, disconnecting its sessions (benchmarks and tests)."""
    name, admin = await _maintenance_connection(url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()
    log.info("dropped database %s", name)
