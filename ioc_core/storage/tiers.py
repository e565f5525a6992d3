"""What each storage tier adds to the plain readings tables, as SQL text.

- Community TimescaleDB (licence `timescale`): per domain, continuous aggregates at one minute,
  one hour and one day with real-time results, refresh policies, compression of the readings
  hypertables and retention policies on readings and aggregates. Series read the aggregates where
  they can.
- Apache TimescaleDB: hypertables and `time_bucket`; retention by `drop_chunks`, run by the
  processors on a schedule (policies need the community licence).
- PostgreSQL: `date_bin` for buckets, a BRIN index on time, and retention by batched `DELETE`.

Every function here returns text only; values travel as query parameters, and every identifier
goes through `ident()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

from ioc_core.domains import DOMAINS, Domain, Metric
from ioc_core.storage.schema import StorageTier, ident

Aggregate = Literal["avg", "min", "max", "count", "last"]
AGGREGATES: tuple[Aggregate, ...] = get_args(Aggregate)
# Where a series' whole buckets are read: the readings, or the continuous aggregate of that width.
SeriesSource = Literal["raw", "1m", "1h", "1d"]

# Buckets are aligned to the Unix epoch in UTC on every tier (time_bucket's own default origin is
# 2000-01-03, which would shift buckets that do not divide a week).
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_SQL = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"

DEFAULT_RETENTION = timedelta(days=90)
COMPRESS_AFTER = timedelta(days=7)
# Held by the process applying retention; other processes skip their turn. (Migrations hold
# 0x10C_0001.)
RETENTION_LOCK_ID = 0x10C_0002
# Rows a plain-PostgreSQL retention run deletes per statement: each statement is short, so
# writers are never held up for long and the WAL of one statement stays small.
DELETE_BATCH_ROWS = 50_000


@dataclass(frozen=True)
class Rollup:
    """One continuous aggregate level: per device and bucket of `width`, for each metric its sum,
    count, min, max and last value (sum and count, not the average, so buckets combine exactly)."""

    suffix: SeriesSource
    width: timedelta
    # The newest `refresh_lag` is left to the real-time part of the view. The refresh policy's
    # window reaches back over the whole retention of the readings, so a backfilled reading of any
    # age still kept reaches every level at its next refresh: a refresh recomputes only the
    # buckets whose readings changed (TimescaleDB's invalidation log), so a wide window costs
    # nothing while nothing old arrives. It stops at the retention: beyond, the readings are gone
    # and a refresh would empty the aggregate's buckets. (A retention shorter than three buckets,
    # the least window a policy takes, is widened to that.)
    refresh_lag: timedelta
    refresh_every: timedelta
    # Each level has about 60 times fewer rows than the one below, so it can be kept much longer.
    retention_factor: int

    def view(self, domain: Domain) -> str:
        return ident(f"{domain.table}_{self.suffix}")


# Coarsest first: a series uses the coarsest level whose width divides its bucket.
ROLLUPS: tuple[Rollup, ...] = (
    Rollup(
        "1d",
        timedelta(days=1),
        refresh_lag=timedelta(days=1),
        refresh_every=timedelta(hours=1),
        retention_factor=40,
    ),
    Rollup(
        "1h",
        timedelta(hours=1),
        refresh_lag=timedelta(hours=1),
        refresh_every=timedelta(minutes=30),
        retention_factor=16,
    ),
    Rollup(
        "1m",
        timedelta(minutes=1),
        refresh_lag=timedelta(minutes=1),
        refresh_every=timedelta(minutes=1),
        retention_factor=4,
    ),
)


def interval_sql(span: timedelta) -> str:
    """An interval literal in the largest whole unit, e.g. INTERVAL '90 days'."""
    seconds = int(span.total_seconds())
    if seconds <= 0 or span != timedelta(seconds=seconds):
        raise ValueError(f"{span!r} is not a positive whole number of seconds")
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1)):
        if seconds % size == 0:
            count = seconds // size
            return f"INTERVAL '{count} {unit}{'' if count == 1 else 's'}'"
    raise AssertionError("unreachable: every whole number of seconds is a whole number of seconds")


# The fields a continuous aggregate keeps per metric `c`. last() skips rows whose time is NULL:
# the last reading that carries the metric wins, not the device's last reading.
_ROLLUP_PARTS = {
    "sum": "sum({c})",
    "count": "count({c})",
    "min": "min({c})",
    "max": "max({c})",
    "last": "last({c}, CASE WHEN {c} IS NOT NULL THEN ts END)",
}


# -- community objects ----------------------------------------------------------------------------


def rollup_query_sql(domain: Domain, rollup: Rollup) -> str:
    """The SELECT of a domain's continuous aggregate at one level."""
    columns: list[str] = []
    for metric in domain.metrics:
        column = ident(metric.column)
        columns += [
            f"{expression.format(c=column)} AS {ident(f'{column}_{part}')}"
            for part, expression in _ROLLUP_PARTS.items()
        ]
    return (
        f"SELECT time_bucket({interval_sql(rollup.width)}, ts) AS bucket, device_id,\n    "
        + ",\n    ".join(columns)
        + f"\nFROM {ident(domain.table)}\nGROUP BY bucket, device_id"
    )


def _refresh_policy_sql(view: str, window: timedelta, rollup: Rollup) -> list[str]:
    """Replace a refresh policy whose window or schedule differs, then add it if missing."""
    start, end, every = (interval_sql(span) for span in (window, rollup.refresh_lag, rollup.refresh_every))
    return [
        f"SELECT remove_continuous_aggregate_policy('{view}', if_exists => true)"
        " FROM timescaledb_information.jobs j"
        " JOIN timescaledb_information.continuous_aggregates c"
        " ON (c.materialization_hypertable_schema, c.materialization_hypertable_name)"
        " = (j.hypertable_schema, j.hypertable_name)"
        " WHERE j.proc_name = 'policy_refresh_continuous_aggregate'"
        f" AND c.view_schema = current_schema() AND c.view_name = '{view}'"
        f" AND ((j.config ->> 'start_offset')::interval <> {start}"
        f" OR (j.config ->> 'end_offset')::interval <> {end} OR j.schedule_interval <> {every})",
        f"SELECT add_continuous_aggregate_policy('{view}', start_offset => {start},"
        f" end_offset => {end}, schedule_interval => {every}, if_not_exists => true)",
    ]


def _retention_policy_sql(relation: str, keep: timedelta) -> list[str]:
    """Replace a retention policy whose horizon differs from `keep`, then add it if missing."""
    drop_after = interval_sql(keep)
    return [
        f"SELECT remove_retention_policy('{relation}', if_exists => true)"
        " FROM timescaledb_information.jobs j"
        " WHERE j.proc_name = 'policy_retention'"
        f" AND (j.config ->> 'drop_after')::interval <> {drop_after}"
        f" AND ((j.hypertable_schema, j.hypertable_name) = (current_schema(), '{relation}')"
        " OR (j.hypertable_schema, j.hypertable_name) IN ("
        " SELECT c.materialization_hypertable_schema, c.materialization_hypertable_name"
        " FROM timescaledb_information.continuous_aggregates c"
        f" WHERE c.view_schema = current_schema() AND c.view_name = '{relation}'))",
        f"SELECT add_retention_policy('{relation}', drop_after => {drop_after}, if_not_exists => true)",
    ]


def community_objects_sql(
    domain: Domain, retention: timedelta, compress_after: timedelta = COMPRESS_AFTER
) -> list[str]:
    """Statements, in order and each safe to repeat, that give a domain's readings their continuous
    aggregates, compression (of chunks older than `compress_after`) and retention on community
    TimescaleDB. Each runs on its own (not in a transaction block); the readings hypertable must
    exist. A changed retention, compression age or refresh schedule replaces its policy."""
    table = ident(domain.table)
    statements: list[str] = []
    for rollup in reversed(ROLLUPS):
        view = rollup.view(domain)
        statements += [
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view}"
            " WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS\n"
            f"{rollup_query_sql(domain, rollup)}\nWITH NO DATA",
            *_refresh_policy_sql(view, max(retention, 3 * rollup.width), rollup),
        ]
    # Changing compression settings fails once chunks are compressed, so they are set only once.
    statements += [
        f"""DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM timescaledb_information.hypertables
        WHERE hypertable_schema = current_schema() AND hypertable_name = '{table}' AND compression_enabled
    ) THEN
        ALTER TABLE {table} SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_id',
                                 timescaledb.compress_orderby = 'ts DESC');
    END IF;
END
$$""",
        f"SELECT remove_compression_policy('{table}', if_exists => true)"
        " FROM timescaledb_information.jobs j"
        " WHERE j.proc_name = 'policy_compression'"
        f" AND (j.hypertable_schema, j.hypertable_name) = (current_schema(), '{table}')"
        f" AND (j.config ->> 'compress_after')::interval <> {interval_sql(compress_after)}",
        f"SELECT add_compression_policy('{table}', compress_after => {interval_sql(compress_after)},"
        " if_not_exists => true)",
        *_retention_policy_sql(table, retention),
    ]
    for rollup in ROLLUPS:
        statements += _retention_policy_sql(rollup.view(domain), retention * rollup.retention_factor)
    return statements


def postgres_objects_sql(domain: Domain) -> list[str]:
    """Statements, safe to repeat, that plain PostgreSQL needs beyond the readings table: a BRIN
    index on time (tiny, since readings arrive roughly in time order) for retention deletes."""
    table = ident(domain.table)
    return [f"CREATE INDEX IF NOT EXISTS {ident(table + '_ts_brin')} ON {table} USING brin (ts)"]


def tier_objects_sql(
    tier: StorageTier, domain: Domain, retention: timedelta, compress_after: timedelta = COMPRESS_AFTER
) -> list[str]:
    """What `migrate` applies for a domain after its readings table exists."""
    if tier is StorageTier.COMMUNITY:
        return community_objects_sql(domain, retention, compress_after)
    if tier is StorageTier.POSTGRES:
        return postgres_objects_sql(domain)
    return []


# -- read-only access -------------------------------------------------------------------------------

# A role that may read the city's measurements and nothing else: dashboards (Grafana) and analysts
# connect as it. Keys, webhook secrets, the audit log and the outbox stay out of its reach.
READER_ROLE = "ioc_reader"
READER_RELATIONS = ("devices", "device_state", "alarms")


def reader_relations(tier: StorageTier) -> list[str]:
    """What the read-only role may select: the registry, the latest state, alarms, every domain's
    readings and, on community TimescaleDB, their rollups."""
    relations = [*READER_RELATIONS, *(ident(domain.table) for domain in DOMAINS.values())]
    if tier is StorageTier.COMMUNITY:
        relations += [rollup.view(domain) for domain in DOMAINS.values() for rollup in ROLLUPS]
    return relations


def reader_role_sql(tier: StorageTier) -> str:
    """Create the read-only role if missing (a user that may not create roles skips it, with a
    notice) and grant it what it may read; safe to repeat, and from several databases at once.

    Only missing grants are made: TimescaleDB passes a grant on to every chunk, and a grant
    racing a policy job that touches the same catalog rows fails ("tuple concurrently updated"),
    so a migration that finds everything granted changes nothing."""
    role = ident(READER_ROLE)
    relations = ", ".join(f"'{relation}'" for relation in reader_relations(tier))
    return f"""DO $$
DECLARE
    relation text;
BEGIN
    BEGIN
        CREATE ROLE {role} NOLOGIN;
    EXCEPTION
        WHEN duplicate_object OR unique_violation THEN NULL;
        WHEN insufficient_privilege THEN
            RAISE NOTICE 'role {role} not created: this user may not create roles';
            RETURN;
    END;
    IF NOT has_schema_privilege('{role}', current_schema(), 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO {role}', current_schema());
    END IF;
    FOREACH relation IN ARRAY ARRAY[{relations}] LOOP
        IF NOT has_table_privilege('{role}', relation, 'SELECT') THEN
            EXECUTE format('GRANT SELECT ON %I TO {role}', relation);
        END IF;
    END LOOP;
END
$$"""


# -- series ---------------------------------------------------------------------------------------


def floor_to(moment: datetime, width: timedelta) -> datetime:
    return EPOCH + (moment - EPOCH) // width * width


def ceil_to(moment: datetime, width: timedelta) -> datetime:
    return EPOCH - (EPOCH - moment) // width * width


@dataclass(frozen=True)
class RollupSpan:
    """The whole `rollup` buckets [inner_start, inner_end) inside a series' range; the rest of the
    range, at either end, is read from the readings."""

    rollup: Rollup
    inner_start: datetime
    inner_end: datetime


def rollup_span(bucket: timedelta, start: datetime, end: datetime) -> RollupSpan | None:
    """The coarsest aggregate level that can serve series buckets of `bucket` over [start, end),
    or None when only the readings can."""
    for rollup in ROLLUPS:
        if bucket % rollup.width:
            continue
        inner_start, inner_end = ceil_to(start, rollup.width), floor_to(end, rollup.width)
        if inner_start < inner_end:
            return RollupSpan(rollup, inner_start, inner_end)
    return None


def _raw_aggregate(tier: StorageTier, column: str, agg: Aggregate) -> str:
    if agg == "avg":
        return f"avg({column})"
    if agg in ("min", "max"):
        return f"{agg}({column})"
    if agg == "count":
        return f"count({column})::float8"
    if tier.has_hypertables:
        return f"last({column}, ts)"
    return f"(array_agg({column} ORDER BY ts DESC))[1]"


def series_sql(tier: StorageTier, domain: Domain, metric: Metric, agg: Aggregate) -> str:
    """One metric of one device in buckets, read from the readings.

    Parameters: $1 bucket (interval), $2 device id, $3 start, $4 end (half-open)."""
    bucket_of = "time_bucket" if tier.has_hypertables else "date_bin"
    column = ident(metric.column)
    value = _raw_aggregate(tier, column, agg)
    return (
        f"SELECT {bucket_of}($1::interval, ts, {_EPOCH_SQL}) AS t, {value} AS value"
        f" FROM {ident(domain.table)}"
        f" WHERE device_id = $2 AND ts >= $3 AND ts < $4 AND {column} IS NOT NULL"
        " GROUP BY t ORDER BY t"
    )


def export_sql(
    tier: StorageTier,
    domain: Domain,
    metrics: Sequence[Metric],
    *,
    bucketed: bool,
    by_city: bool,
    by_area: bool = False,
) -> str:
    """A domain's readings over a range, of registered devices only (and, `by_city`, only those of
    some cities), for an export read through a cursor.

    Not `bucketed`: (ts, device_id, each metric) per reading, ordered by ts and device. Bucketed:
    per device and bucket aligned to the Unix epoch in UTC, (bucket, device_id, readings, then
    each metric's avg, min and max), ordered by bucket and device; always from the readings, since
    the continuous aggregates keep no count of readings.

    Parameters: $1 start, $2 end (half-open); bucketed, $3 the bucket (interval); `by_city`, the
    cities (text[]); `by_area`, last, the area ids (text[]) one of which a device must lie in."""
    table = ident(domain.table)
    columns = [ident(m.column) for m in metrics]
    where = "r.ts >= $1 AND r.ts < $2"
    parameter = 4 if bucketed else 3
    if by_city:
        where += f" AND d.city = ANY(${parameter}::text[])"
        parameter += 1
    if by_area:
        where += (
            " AND EXISTS (SELECT 1 FROM device_areas m"
            f" WHERE m.device_id = d.id AND m.area_id = ANY(${parameter}::text[]))"
        )
    source = f" FROM {table} r JOIN devices d ON d.id = r.device_id WHERE {where}"
    if not bucketed:
        values = "".join(f", r.{c}" for c in columns)
        return f"SELECT r.ts, r.device_id{values}{source} ORDER BY r.ts, r.device_id"
    bucket_of = "time_bucket" if tier.has_hypertables else "date_bin"
    statistics = "".join(f", avg(r.{c}), min(r.{c}), max(r.{c})" for c in columns)
    return (
        f"SELECT {bucket_of}($3::interval, r.ts, {_EPOCH_SQL}) AS bucket, r.device_id,"
        f" count(*) AS readings{statistics}{source}"
        " GROUP BY bucket, r.device_id ORDER BY bucket, r.device_id"
    )


# Readings sampled at each end of a series' range to estimate what the series would read.
SCAN_SAMPLE_ROWS = 1000


def scan_sample_sql(domain: Domain) -> str:
    """The readings of one device in a range, sampled at both ends: how many of them there are
    up to $4 (so all of them when fewer), and the time the newest $4 and the oldest $4 cover.
    Two short index scans, whatever the range.

    Parameters: $1 device id, $2 start, $3 end (half-open), $4 rows sampled at each end."""
    table = ident(domain.table)
    where = "device_id = $1 AND ts >= $2 AND ts < $3"
    span = "extract(epoch FROM max(ts) - min(ts))::float8"
    return (
        f"WITH newest AS (SELECT ts FROM {table} WHERE {where} ORDER BY ts DESC LIMIT $4),"
        f" oldest AS (SELECT ts FROM {table} WHERE {where} ORDER BY ts LIMIT $4)"
        " SELECT (SELECT count(*) FROM newest) AS rows,"
        f" (SELECT {span} FROM newest) AS newest_span_s,"
        f" (SELECT {span} FROM oldest) AS oldest_span_s"
    )


@dataclass(frozen=True)
class ScanSample:
    """What `scan_sample_sql` found: `rows` readings (at most the sample size), the newest of
    them covering `newest_span_s` seconds and the oldest `oldest_span_s`."""

    rows: int
    newest_span_s: float
    oldest_span_s: float

    def readings_per_s(self) -> float:
        """The denser of both ends' reporting rates."""
        span_s = max(min(self.newest_span_s, self.oldest_span_s), 1e-3)
        return max(self.rows - 1, 1) / span_s


def series_scan_estimate(
    sample: ScanSample, start: datetime, end: datetime, span: RollupSpan | None, sample_size: int
) -> int:
    """Rows a series over [start, end) reads: the readings in the range, or with an aggregate
    serving it (`span`), its rows plus the readings of the partial buckets at either end.

    Fewer readings than the sample size means the sample holds all of them: exact. Otherwise the
    readings are taken to come at the denser of the rates at both ends of the range throughout.
    That is exact for a device reporting steadily and errs high for one that was silent for part
    of the range; it errs low only for one that reported faster in the middle of the range than
    at both its ends, where the statement timeout still bounds the cost."""

    def readings(seconds: float) -> int:
        if sample.rows < sample_size:
            return sample.rows  # every reading of the range, wherever in it
        return math.ceil(sample.readings_per_s() * seconds)

    if span is None:
        return readings((end - start).total_seconds())
    edges_s = ((span.inner_start - start) + (end - span.inner_end)).total_seconds()
    # An aggregate holds at most one row per bucket, and none for a bucket without readings.
    inner_s = (span.inner_end - span.inner_start).total_seconds()
    buckets = (span.inner_end - span.inner_start) // span.rollup.width
    return min(buckets, readings(inner_s)) + readings(edges_s)


# Per aggregate: what a reading contributes, what an aggregate row contributes, and how the
# contributions (a float `a`, a count `b`) combine into the bucket's value.
_PARTS: dict[Aggregate, tuple[str, str, str]] = {
    "avg": ("{c}, 1::bigint", "{c_sum}, {c_count}", "sum(a) / sum(b)::float8"),
    "min": ("{c}, NULL::bigint", "{c_min}, NULL::bigint", "min(a)"),
    "max": ("{c}, NULL::bigint", "{c_max}, NULL::bigint", "max(a)"),
    "count": ("NULL::float8, 1::bigint", "NULL::float8, {c_count}", "sum(b)::float8"),
    # Aggregate rows are ordered by their bucket start: buckets do not overlap each other or the
    # readings at either end of the range.
    "last": ("{c}, NULL::bigint", "{c_last}, NULL::bigint", "last(a, at)"),
}


def rollup_series_sql(domain: Domain, metric: Metric, agg: Aggregate, rollup: Rollup) -> str:
    """Like `series_sql`, on community TimescaleDB: whole aggregate buckets from the continuous
    aggregate where it is up to date, the rest from the readings: the partial buckets at both ends
    of the range, and the stale ones (see `stale_rollup_sql`).

    Parameters: $1 bucket (a whole multiple of the rollup's width), $2 device id, $3 and $4 the
    starts and ends of the windows read from the readings (arrays), $5 and $6 the span of whole
    rollup buckets inside the range, $7 and $8 the starts and ends of the stale parts of that span
    (arrays; each also one of the windows)."""
    column = ident(metric.column)
    names = {"c": column, **{f"c_{part}": ident(f"{column}_{part}") for part in _ROLLUP_PARTS}}
    from_reading, from_rollup, combined = (part.format(**names) for part in _PARTS[agg])
    return (
        "WITH parts (at, a, b) AS ("
        f" SELECT r.ts, {from_reading}"
        " FROM unnest($3::timestamptz[], $4::timestamptz[]) AS w (lo, hi)"
        f" CROSS JOIN LATERAL (SELECT ts, {column} FROM {ident(domain.table)}"
        f" WHERE device_id = $2 AND ts >= w.lo AND ts < w.hi AND {column} IS NOT NULL) r"
        " UNION ALL"
        f" SELECT bucket, {from_rollup} FROM {rollup.view(domain)}"
        f" WHERE device_id = $2 AND bucket >= $5 AND bucket < $6 AND {names['c_count']} > 0"
        " AND NOT EXISTS (SELECT 1 FROM unnest($7::timestamptz[], $8::timestamptz[]) AS s (lo, hi)"
        " WHERE bucket >= s.lo AND bucket < s.hi)"
        f") SELECT time_bucket($1::interval, at, {_EPOCH_SQL}) AS t, {combined} AS value"
        " FROM parts GROUP BY t ORDER BY t"
    )


def stale_rollup_sql() -> str:
    """The parts of a continuous aggregate that do not hold what the readings hold, in TimescaleDB's
    internal time (microseconds since the Unix epoch), overlapping [$3, $4): readings written below
    what it has materialized and not folded in yet (the hypertable's invalidation log), and what it
    has not materialized, or must recompute, at its next refresh (its own invalidation log: also
    everything above its watermark, which the real-time view reads from the readings anyway, and
    everything before its refresh window).

    A real-time aggregate reads materialized buckets only, below its watermark: a reading that
    arrives late (a device's buffer sent after an outage) would be missing from them until the next
    refresh. These catalog tables are TimescaleDB's own (stable since 2.0); reading them costs two
    index scans.

    Parameters: $1 the readings table, $2 the aggregate's view (both in the current schema)."""
    overlapping = "l.greatest_modified_value >= $3 AND l.lowest_modified_value < $4"
    return (
        "SELECT l.lowest_modified_value AS lo, l.greatest_modified_value AS hi"
        " FROM _timescaledb_catalog.continuous_aggs_hypertable_invalidation_log l"
        " JOIN _timescaledb_catalog.hypertable h ON h.id = l.hypertable_id"
        f" WHERE h.schema_name = current_schema() AND h.table_name = $1 AND {overlapping}"
        " UNION ALL"
        " SELECT l.lowest_modified_value, l.greatest_modified_value"
        " FROM _timescaledb_catalog.continuous_aggs_materialization_invalidation_log l"
        " JOIN _timescaledb_catalog.continuous_agg c ON c.mat_hypertable_id = l.materialization_id"
        f" WHERE c.user_view_schema = current_schema() AND c.user_view_name = $2 AND {overlapping}"
    )


def unix_microseconds(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def read_windows(
    span: RollupSpan, start: datetime, end: datetime, stale: list[tuple[int, int]]
) -> tuple[list[tuple[datetime, datetime]], list[tuple[datetime, datetime]]]:
    """The windows a series over [start, end) reads from the readings, and the stale parts of the
    span: `stale` ranges (inclusive, internal time, as `stale_rollup_sql` gives them) clipped to
    the span, widened to whole rollup buckets and merged."""
    width = span.rollup.width
    low, high = unix_microseconds(span.inner_start), unix_microseconds(span.inner_end)
    parts: list[tuple[datetime, datetime]] = []
    for lo, hi in sorted(stale):
        lo, hi = max(lo, low), min(hi, high - 1)
        if lo > hi:
            continue
        first = floor_to(EPOCH + timedelta(microseconds=lo), width)
        last = floor_to(EPOCH + timedelta(microseconds=hi), width) + width
        if parts and first <= parts[-1][1]:
            parts[-1] = (parts[-1][0], max(parts[-1][1], last))
        else:
            parts.append((first, last))
    edges = [(start, span.inner_start), (span.inner_end, end)]
    return [window for window in edges if window[0] < window[1]] + parts, parts


# -- retention ------------------------------------------------------------------------------------


def retention_sql(tier: StorageTier, domain: Domain) -> str:
    """Remove a domain's readings older than $1 (interval).

    TimescaleDB: drops whole chunks and returns their number as `n`. PostgreSQL: deletes at most
    $2 rows (run it until it deletes fewer) and its status tag carries the count."""
    table = ident(domain.table)
    if tier.has_hypertables:
        return f"SELECT count(*) AS n FROM drop_chunks('{table}', older_than => now() - $1::interval)"
    # A TID list makes each batch an index-free, direct delete of the rows just found.
    return (
        f"DELETE FROM {table} WHERE ctid = ANY (ARRAY("
        f"SELECT ctid FROM {table} WHERE ts < now() - $1::interval LIMIT $2))"
    )
