"""Readings: the write path (one row per device and instant, merged through a staging table),
series over them on every storage tier, retention, and counting.

Readings live in one table per domain with one typed column per metric: the contract fixes each
domain's metrics, so typed columns are smaller than JSON, need no parsing on read, and let
TimescaleDB compress each metric as its own column. The primary key `(device_id, ts)` makes one
row per device and instant (messages of one instant merge into it, a repeat adds nothing) and,
read backwards, serves both "latest for device" and "series for device over a range". Readings
stamped with their receive time are de-duplicated before that (see `copies.first_copies`).
Latest state has its own small table so screens never scan readings (see `status`).

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

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ioc_core.domains import DOMAINS, Domain
from ioc_core.errors import StorageError, ValidationError
from ioc_core.storage.connections import TRANSIENT_ERRORS
from ioc_core.storage.copies import forget_expired
from ioc_core.storage.pool import Connection, Pool
from ioc_core.storage.schema import StorageTier, ident
from ioc_core.storage.tiers import (
    AGGREGATES,
    DELETE_BATCH_ROWS,
    RETENTION_LOCK_ID,
    SCAN_SAMPLE_ROWS,
    Aggregate,
    ScanSample,
    SeriesSource,
    export_sql,
    read_windows,
    retention_sql,
    rollup_series_sql,
    rollup_span,
    scan_sample_sql,
    series_scan_estimate,
    series_sql,
    stale_rollup_sql,
    unix_microseconds,
)
from ioc_core.telemetry import Reading

log = logging.getLogger(__name__)

_Row = tuple[str, datetime]


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

_COUNT_READINGS_SQL = (
    "SELECT " + " + ".join(f"(SELECT count(*) FROM {ident(d.table)})" for d in DOMAINS.values()) + " AS n"
)


def _first_values(metric_sets: Iterable[dict[str, float]]) -> dict[str, float]:
    """The metrics of readings of one device and instant, each with its first value."""
    merged: dict[str, float] = {}
    for metrics in metric_sets:
        for name, value in metrics.items():
            merged.setdefault(name, value)
    return merged


def stored_readings(
    readings: Sequence[tuple[Reading, int]], added: Sequence[dict[str, float]]
) -> list[tuple[Reading, int]]:
    """What a batch changed in the readings, with their partitions: one reading per (device, ts)
    row it inserted or merged into, carrying only the metrics the batch stored there, which is
    what latest state and the detectors are to see."""
    stored: dict[_Row, tuple[Reading, int]] = {}
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


@dataclass
class _StagedRows:
    """The readings of one domain as staged: one row per (device, ts), in order of arrival (one
    statement may not touch a row twice, and the first value of a metric is the one kept)."""

    # (device, ts) -> the first reading of the batch for it.
    first: dict[_Row, int]
    # (device, ts) -> the later readings of the batch for it.
    later: dict[_Row, list[int]]
    # (device, ts) with later readings -> its metrics, each with its first value.
    folded: dict[_Row, dict[str, float]]

    @classmethod
    def of(cls, readings: Sequence[Reading], indices: Sequence[int]) -> _StagedRows:
        first: dict[_Row, int] = {}
        later: dict[_Row, list[int]] = {}
        for index in indices:
            key = (readings[index].device_id, readings[index].ts)
            if first.setdefault(key, index) != index:
                later.setdefault(key, []).append(index)
        folded = {
            key: _first_values(readings[i].metrics for i in (first[key], *more))
            for key, more in later.items()
        }
        return cls(first, later, folded)

    def metrics(self, readings: Sequence[Reading], key: _Row) -> dict[str, float]:
        """The metrics staged for the row `key`."""
        return self.folded.get(key, readings[self.first[key]].metrics)


def _added_metrics(
    readings: Sequence[Reading],
    staged: _StagedRows,
    present: dict[_Row, set[str]],
    added: list[dict[str, float]],
) -> list[_Row]:
    """Fill `added` for the staged readings, given the metrics rows that existed already have
    (`present`); returns the existing rows that lack some metric the batch brings."""
    merges: list[_Row] = []
    for key, index in staged.first.items():
        known = set(present.get(key, ()))
        for member in (index, *staged.later.get(key, ())):
            new = {n: v for n, v in readings[member].metrics.items() if n not in known}
            added[member] = new
            known.update(new)
        if key in present and known != present[key]:
            merges.append(key)
    return merges


async def insert_readings(connection: Connection, readings: Sequence[Reading]) -> list[dict[str, float]]:
    """Store readings, one row per device and time. A reading whose row exists (stored before,
    or earlier in `readings`) adds the metrics the row lacks; a metric the row has keeps its
    first stored value, so a repeat changes nothing. Returns, per reading, the metrics it
    added: all of them for a new row, none for a repeat."""
    if not readings:
        return []
    if not connection.is_in_transaction():
        # The staging table empties at commit: copy and move must share one transaction.
        async with connection.transaction():
            return await insert_readings(connection, readings)
    # Each entry is replaced, never changed in place, so one empty dict can stand for all.
    added: list[dict[str, float]] = [{}] * len(readings)
    by_domain: dict[str, list[int]] = {}
    for index, reading in enumerate(readings):
        by_domain.setdefault(reading.domain, []).append(index)
    for domain_name, indices in by_domain.items():
        await _store_rows(connection, _STAGING[domain_name], DOMAINS[domain_name], readings, indices, added)
    return added


async def _store_rows(
    connection: Connection,
    staging: _ReadingsStaging,
    domain: Domain,
    readings: Sequence[Reading],
    indices: Sequence[int],
    added: list[dict[str, float]],
) -> None:
    """`insert_readings` for the readings at `indices`, all of `domain`; fills `added`."""
    names = [m.name for m in domain.metrics]
    staged = _StagedRows.of(readings, indices)
    inserted = await _stage_and_move(connection, staging, names, readings, staged)
    if inserted is None and not staged.later:
        # Every row is new, each made by one reading: the common case, kept cheap.
        for index in indices:
            added[index] = readings[index].metrics
        return
    existing = [] if inserted is None else [key for key in staged.first if key not in inserted]
    present: dict[_Row, set[str]] = {}
    if existing:
        found = await connection.fetch(
            staging.present_sql, [k[0] for k in existing], [k[1] for k in existing]
        )
        present = {
            (row["device_id"], row["ts"]): {n for n, has in zip(names, row["present"], strict=True) if has}
            for row in found
        }
    merges = _added_metrics(readings, staged, present, added)
    if merges:
        await connection.execute(
            staging.merge_sql,
            [k[0] for k in merges],
            [k[1] for k in merges],
            *([staged.metrics(readings, k).get(name) for k in merges] for name in names),
        )


async def _stage_and_move(
    connection: Connection,
    staging: _ReadingsStaging,
    names: Sequence[str],
    readings: Sequence[Reading],
    staged: _StagedRows,
) -> set[_Row] | None:
    """Copy the staged rows into the staging table and move those whose row is new into the
    readings; returns the rows it inserted, or None when every staged row was new."""
    await connection.execute(staging.create_sql)
    records = []
    for key, index in staged.first.items():
        reading = readings[index]
        metrics = staged.metrics(readings, key)
        records.append(
            (reading.ts, reading.device_id, reading.seq, reading.received_at, *map(metrics.get, names))
        )
    await connection.copy_records_to_table(staging.table, records=records, columns=staging.columns)
    moved = await connection.fetchrow(staging.move_sql, len(records))
    assert moved is not None
    if moved["stored"] == len(records):
        return None
    return set(zip(moved["devices"] or (), moved["times"] or (), strict=True))


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


class SeriesRows(list[tuple[datetime, float | None]]):
    """A series' (bucket start, value) rows in time order, and where its whole buckets were read:
    `raw` (the readings) or the suffix of the continuous aggregate that served them (`1m`, `1h`,
    `1d`)."""

    def __init__(
        self, rows: Iterable[tuple[datetime, float | None]] = (), source: SeriesSource = "raw"
    ) -> None:
        super().__init__(rows)
        self.source = source


class ReadingStore:
    """Series, retention and counts of the readings, over a started pool. `tier` tells the
    storage tier the database offers; `seq_window_s` how long a copy is recognised."""

    def __init__(self, pool: Pool, tier: Callable[[], Awaitable[StorageTier]], seq_window_s: float) -> None:
        self._pool = pool
        self._tier = tier
        self.seq_window_s = seq_window_s

    async def series(
        self,
        device_id: str,
        domain: str,
        metric: str,
        start: datetime,
        end: datetime,
        bucket: timedelta,
        agg: Aggregate,
        *,
        max_rows: int | None = None,
    ) -> SeriesRows:
        """One metric of one device over [start, end) in buckets of `bucket` aligned to the Unix
        epoch in UTC: (bucket start, value) in time order; buckets without the metric are left out.
        Naive datetimes are taken as UTC. The same on every tier; community TimescaleDB reads the
        continuous aggregates where the bucket is a whole number of their buckets (`source` says
        which served). With `max_rows`,
        a series estimated to read more stored rows than that is refused (`ValidationError`) before
        it is read (see `tiers.series_scan_estimate`)."""
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
            return SeriesRows()
        tier = await self._tier()
        try:
            if max_rows is not None:
                await self._check_scan(tier, device_id, domain_def, start, end, bucket, max_rows)
            rows, source = await self._series_rows(
                tier, device_id, domain_def, metric, start, end, bucket, agg
            )
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"reading the {metric} series of {device_id!r} failed: {exc}",
                retriable=isinstance(exc, TRANSIENT_ERRORS),
            ) from exc
        return SeriesRows(((r["t"], r["value"]) for r in rows), source)

    async def _check_scan(
        self,
        tier: StorageTier,
        device_id: str,
        domain: Domain,
        start: datetime,
        end: datetime,
        bucket: timedelta,
        max_rows: int,
    ) -> None:
        """Refuse a series that would read more than `max_rows` stored rows, saying so."""
        found = await self._pool.fetchrow(scan_sample_sql(domain), device_id, start, end, SCAN_SAMPLE_ROWS)
        assert found is not None
        sample = ScanSample(found["rows"], found["newest_span_s"] or 0.0, found["oldest_span_s"] or 0.0)
        span = rollup_span(bucket, start, end) if tier is StorageTier.COMMUNITY else None
        estimate = series_scan_estimate(sample, start, end, span, SCAN_SAMPLE_ROWS)
        if estimate <= max_rows:
            return
        rate = (
            ""
            if sample.rows < SCAN_SAMPLE_ROWS
            else f", at up to {sample.readings_per_s() * 60:.3g} a minute"
        )
        raise ValidationError(
            f"this series would read about {estimate} stored rows (the device's readings in that"
            f" range{rate}); one request may read at most {max_rows}: ask for a shorter range"
        )

    async def _series_rows(
        self,
        tier: StorageTier,
        device_id: str,
        domain: Domain,
        metric: str,
        start: datetime,
        end: datetime,
        bucket: timedelta,
        agg: Aggregate,
    ) -> tuple[list[asyncpg.Record], SeriesSource]:
        """`series` once its arguments are checked: from a continuous aggregate where one
        serves, else from the readings; with the source that served it."""
        metric_def = domain.metric(metric)
        assert metric_def is not None
        span = rollup_span(bucket, start, end) if tier is StorageTier.COMMUNITY else None
        if span is not None:
            try:
                # Stale buckets (late readings not folded in yet) are read from the readings.
                stale = await self._pool.fetch(
                    stale_rollup_sql(),
                    domain.table,
                    span.rollup.view(domain),
                    unix_microseconds(span.inner_start),
                    unix_microseconds(span.inner_end),
                )
                windows, stale_parts = read_windows(span, start, end, [(r["lo"], r["hi"]) for r in stale])
                rows = await self._pool.fetch(
                    rollup_series_sql(domain, metric_def, agg, span.rollup),
                    bucket,
                    device_id,
                    [lo for lo, _ in windows],
                    [hi for _, hi in windows],
                    span.inner_start,
                    span.inner_end,
                    [lo for lo, _ in stale_parts],
                    [hi for _, hi in stale_parts],
                )
                return rows, span.rollup.suffix
            except asyncpg.UndefinedTableError:
                log.warning(
                    "continuous aggregate %s is missing (run `ioc migrate`); reading the readings",
                    span.rollup.view(domain),
                )
            except asyncpg.InsufficientPrivilegeError as exc:
                # Without TimescaleDB's catalog, stale buckets cannot be told: the readings are exact.
                log.warning("cannot tell which rollup buckets are stale (%s); reading the readings", exc)
        sql = series_sql(tier, domain, metric_def, agg)
        rows = await self._pool.fetch(sql, bucket, device_id, start, end)
        return rows, "raw"

    async def export(
        self,
        *,
        domain: str,
        cities: Sequence[str] | None,
        start: datetime,
        end: datetime,
        metrics: Sequence[str] | None = None,
        bucket: timedelta | None = None,
        chunk_rows: int = 5000,
        areas: Sequence[str] | None = None,
    ) -> AsyncGenerator[list[tuple[Any, ...]], None]:
        """A domain's readings over [start, end) of the registered devices of `cities` (None:
        every city) lying in one of `areas` (None: anywhere), in chunks of at most `chunk_rows`
        rows: per reading (ts, device_id, each of `metrics`, None where the reading lacks it), or
        with `bucket`, per device and bucket aligned to the Unix epoch in UTC (bucket, device_id,
        readings, each metric's avg, min and max); see `tiers.export_sql`. `metrics` default to
        all of the domain's, in their declared order. Naive datetimes are taken as UTC.

        One pooled connection is held, in one read-only transaction, until the generator ends or
        is closed: the rows come through a server-side cursor, so however many there are, only
        one chunk is in memory. Close the generator (`aclose`) when stopping early."""
        domain_def = DOMAINS.get(domain)
        if domain_def is None:
            raise ValidationError(f"unknown domain {domain!r}")
        chosen = []
        for name in metrics if metrics is not None else [m.name for m in domain_def.metrics]:
            metric_def = domain_def.metric(name)
            if metric_def is None:
                raise ValidationError(f"{name!r} is not a metric of the {domain} domain")
            chosen.append(metric_def)
        if bucket is not None and bucket <= timedelta(0):
            raise ValidationError(f"bucket must be positive, not {bucket}")
        if chunk_rows <= 0:
            raise ValidationError(f"chunk_rows must be positive, not {chunk_rows}")
        start, end = (t if t.tzinfo is not None else t.replace(tzinfo=UTC) for t in (start, end))
        if start >= end or cities == []:
            return
        tier = await self._tier()
        sql = export_sql(
            tier,
            domain_def,
            chosen,
            bucketed=bucket is not None,
            by_city=cities is not None,
            by_area=areas is not None,
        )
        args: list[Any] = [start, end]
        if bucket is not None:
            args.append(bucket)
        if cities is not None:
            args.append(list(cities))
        if areas is not None:
            args.append(list(areas))
        try:
            async with (
                self._pool.guard(),
                self._pool.pool.acquire() as connection,
                connection.transaction(readonly=True),
            ):
                cursor = await connection.cursor(sql, *args)
                while rows := await cursor.fetch(chunk_rows):
                    yield [tuple(row) for row in rows]
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"exporting the {domain} readings failed: {exc}",
                retriable=isinstance(exc, TRANSIENT_ERRORS),
            ) from exc

    async def apply_retention(self, older_than: timedelta) -> int:
        """Remove readings older than `older_than`: whole chunks on TimescaleDB (`drop_chunks`, so
        up to a day more may stay), rows on PostgreSQL. Returns the number of chunks or rows removed.

        Safe to call from several processors at once: one of them does the work, the others return 0.
        """
        if older_than <= timedelta(0):
            raise ValidationError(f"retention must be positive, not {older_than}")
        tier = await self._tier()
        removed = 0
        try:
            async with self._pool.guard(), self._pool.pool.acquire() as connection:
                if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_ID):
                    log.debug("retention is being applied by another process")
                    return 0
                try:
                    for domain in DOMAINS.values():
                        removed += await _remove_old_readings(connection, tier, domain, older_than)
                finally:
                    await connection.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_ID)
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"removing readings older than {older_than} failed: {exc}",
                retriable=isinstance(exc, TRANSIENT_ERRORS),
            ) from exc
        if removed:
            unit = "chunks" if tier.has_hypertables else "rows"
            log.info("retention removed %d %s of readings older than %s", removed, unit, older_than)
        return removed

    async def count(self) -> int:
        """How many readings are stored, over every domain (an exact count: it scans them)."""
        row = await self._pool.fetchrow(_COUNT_READINGS_SQL)
        return int(row["n"]) if row is not None else 0

    async def forget_expired_windows(self) -> None:
        """Forget the de-duplication windows (see `copies`) that have expired."""
        async with self._pool.guard():
            await forget_expired(self._pool.pool, self.seq_window_s)
