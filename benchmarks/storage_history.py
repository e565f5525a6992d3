"""The storage tiers' read side (`benchmarks.storage --history`): what weeks of history cost on
each tier, on disk and to read.

    .venv/bin/python -m benchmarks.storage --history [--tiers community,apache,postgres]
        [--devices 1000] [--days 14] [--domain water] [--repeat 5]

For each tier, on its own server (community TimescaleDB: IOC_BENCH_POSTGRES_URL, 5432; Apache
TimescaleDB: IOC_TEST_APACHE_POSTGRES_URL, 5434; plain PostgreSQL: IOC_TEST_PLAIN_POSTGRES_URL,
5433), a database of its own (removed at the end), migrated, with `--devices` devices of one domain
registered and `--days` days of readings, one a minute per device up to the start of the current
hour, generated on the server with each metric following a daily curve fitted to the domain's
simulator plus noise. Then:

- load: the time to insert the readings, and rows a second;
- on community TimescaleDB, the time to refresh each continuous aggregate over the whole range
  (with the policy jobs paused, so that nothing runs behind the measurement);
- disk: the readings before compression and, on community TimescaleDB, after compressing every
  chunk (with the time that took), and the continuous aggregates;
- the median of `--repeat` runs, after one warm-up, in milliseconds, of an hourly series of one
  device over the whole range, as the API reads it (`ReadingStore.series`, with the source that
  served it) and from the readings; and of a city-wide daily summary of one metric (average and
  maximum across devices), from the readings and, on community TimescaleDB, from the daily
  aggregate (which must agree). Community TimescaleDB reads the readings before and after
  compression.

Prints one JSON object per tier, with the same keys on every tier (null where not applicable).
"""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from ioc_core.domains import Domain, Metric
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, StorageTier, drop_database, ensure_database
from ioc_core.storage.readings import SeriesRows
from ioc_core.storage.schema import ident
from ioc_core.storage.tiers import ROLLUPS, ceil_to, floor_to, interval_sql, series_sql

POSTGRES = os.environ.get("IOC_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
# The servers of `--history`, one per tier, by the name `--tiers` gives them.
HISTORY_SERVERS = {
    "community": POSTGRES,
    "apache": os.environ.get("IOC_TEST_APACHE_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5434"),
    "postgres": os.environ.get("IOC_TEST_PLAIN_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5433"),
}
CITY = "ha-noi"
TIER_NAMES = {
    StorageTier.COMMUNITY: "community",
    StorageTier.APACHE: "apache",
    StorageTier.POSTGRES: "postgres",
}

T = TypeVar("T")

# Community TimescaleDB's background jobs would refresh, compress or drop chunks in the middle of
# the measurement; the benchmark runs each of those itself, timed.
PAUSE_JOBS_SQL = (
    "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs"
    " WHERE proc_name IN ('policy_refresh_continuous_aggregate', 'policy_compression', 'policy_retention')"
)
SERIES_BUCKET = timedelta(hours=1)
SUMMARY_BUCKET = timedelta(days=1)
# How many times a metric's simulator is sampled over one day to fit its curve.
FIT_SAMPLES = 96


@dataclass(frozen=True)
class Curve:
    """A metric's simulated value at phase `p` (0 to 1, one per device) and time of day `w`
    (radians from midnight UTC): level + a·cos w + b·sin w, each term linear in `p`, plus uniform
    noise of standard deviation `noise`, rounded to `decimals` as the simulator rounds it."""

    level: tuple[float, float]
    cos: tuple[float, float]
    sin: tuple[float, float]
    noise: tuple[float, float]
    decimals: int


def _fit_at(
    domain: Domain, metric: Metric, phase: float
) -> tuple[tuple[float, float, float, float], list[float]]:
    """Level, first daily harmonic (a, b) and noise of a metric's simulator at one phase, from
    two draws at each of `FIT_SAMPLES` times of one day; and every value drawn."""
    rng = random.Random(11)
    midnight = datetime(2025, 3, 3, tzinfo=UTC)
    means: list[tuple[float, float]] = []
    drawn: list[float] = []
    squared_gaps = 0.0
    for index in range(FIT_SAMPLES):
        t = midnight + index * timedelta(days=1) / FIT_SAMPLES
        first, second = (domain.sampler(rng, t, phase).get(metric.name) for _ in range(2))
        if first is None or second is None:
            continue
        means.append((2 * math.pi * index / FIT_SAMPLES, (first + second) / 2))
        drawn += [first, second]
        # Two draws at the same moment differ by the noise alone (twice its variance).
        squared_gaps += (first - second) ** 2
    if not means:
        return (0.0, 0.0, 0.0, 0.0), []
    level = statistics.fmean(v for _, v in means)
    a = 2 * statistics.fmean(v * math.cos(w) for w, v in means)
    b = 2 * statistics.fmean(v * math.sin(w) for w, v in means)
    return (level, a, b, math.sqrt(squared_gaps / len(means) / 2)), drawn


def fit_curve(domain: Domain, metric: Metric) -> Curve | None:
    """The curve of a metric's simulated values, or None when the simulator does not give it
    (its column then stays NULL, as it does for the simulated fleet)."""
    (low, low_drawn), (high, high_drawn) = _fit_at(domain, metric, 0.0), _fit_at(domain, metric, 1.0)
    drawn = low_drawn + high_drawn
    if not drawn:
        return None
    decimals = next((d for d in range(7) if all(round(v, d) == v for v in drawn)), 6)
    level, a, b, noise = ((low[i], high[i] - low[i]) for i in range(4))
    return Curve(level, a, b, noise, decimals)


def _literal(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"{value!r} has no SQL literal")
    return f"({float(value)!r})"


def _curve_sql(curve: Curve, metric: Metric) -> str:
    """The value of a metric for one reading, in terms of the columns of `load_day_sql`."""

    def linear(pair: tuple[float, float]) -> str:
        return f"({_literal(pair[0])} + {_literal(pair[1])} * d.p)"

    # Uniform noise in [-0.5, 0.5) has a standard deviation of 1/sqrt(12).
    value = (
        f"{linear(curve.level)} + {linear(curve.cos)} * g.c + {linear(curve.sin)} * g.s"
        f" + {linear(curve.noise)} * {_literal(math.sqrt(12))} * (random() - 0.5)"
    )
    scale = _literal(10.0**curve.decimals)
    return (
        f"least(greatest(round(({value}) * {scale}) / {scale},"
        f" {_literal(metric.minimum)}), {_literal(metric.maximum)})"
    )


def load_day_sql(domain: Domain) -> str:
    """One reading a minute of every device over [$1, $2): $3 the device ids, $4 their phases.

    Readings arrive in time order, every device each minute, so the primary key (device_id, ts)
    and the chunks are built in that order, not one device's day at a time: the devices are a
    lateral subquery of the minutes (OFFSET 0 keeps the planner from flattening it and turning the
    join round)."""
    curves = {metric: fit_curve(domain, metric) for metric in domain.metrics}
    filled = [(metric, curve) for metric, curve in curves.items() if curve is not None]
    if not filled:
        raise ValueError(f"the {domain.name} simulator gives none of the domain's metrics")
    columns = ", ".join(ident(metric.column) for metric, _ in filled)
    values = "".join(
        f",\n            {_curve_sql(curve, metric)} AS {ident(metric.column)}" for metric, curve in filled
    )
    return f"""
    INSERT INTO {ident(domain.table)} (ts, seq, received_at, device_id, {columns})
    SELECT g.t, g.seq, g.t + random() * INTERVAL '500 milliseconds', r.*
    FROM (
        SELECT t, cos(w) AS c, sin(w) AS s, (extract(epoch FROM t) / 60)::bigint AS seq
        FROM generate_series($1::timestamptz, $2::timestamptz - INTERVAL '1 minute',
                             INTERVAL '1 minute') AS t,
        LATERAL (SELECT 2 * pi() * extract(epoch FROM t)::float8 / 86400 AS w) AS a
    ) AS g
    CROSS JOIN LATERAL (
        SELECT d.id{values}
        FROM unnest($3::text[], $4::float8[]) AS d(id, p)
        OFFSET 0
    ) AS r
    """


def summary_raw_sql(tier: StorageTier, domain: Domain, metric: Metric) -> str:
    """Per day over [$1, $2), the average and the maximum of one metric across every device, from
    the readings, in the daily aggregate's buckets."""
    width = interval_sql(SUMMARY_BUCKET)
    bucket = (
        f"time_bucket({width}, ts)"
        if tier.has_hypertables
        else f"date_bin({width}, ts, TIMESTAMPTZ '1970-01-01 00:00:00+00')"
    )
    column = ident(metric.column)
    return (
        f"SELECT {bucket} AS bucket, avg({column}) AS mean, max({column}) AS peak"
        f" FROM {ident(domain.table)} WHERE ts >= $1 AND ts < $2 GROUP BY bucket ORDER BY bucket"
    )


def summary_rollup_sql(domain: Domain, metric: Metric) -> str:
    """`summary_raw_sql` from the daily continuous aggregate: its sums and counts combine exactly."""
    daily = next(rollup for rollup in ROLLUPS if rollup.width == SUMMARY_BUCKET)
    column = ident(metric.column)
    total, count, peak = (ident(f"{column}_{part}") for part in ("sum", "count", "max"))
    return (
        f"SELECT bucket, sum({total}) / sum({count})::float8 AS mean, max({peak}) AS peak"
        f" FROM {daily.view(domain)} WHERE bucket >= $1 AND bucket < $2 GROUP BY bucket ORDER BY bucket"
    )


def check_agree(
    what: str,
    expected: Sequence[tuple[datetime, float | None]],
    found: Sequence[tuple[datetime, float | None]],
) -> None:
    """Raise when two answers differ in their buckets or, beyond rounding, in their values."""
    if [t for t, _ in expected] != [t for t, _ in found]:
        raise RuntimeError(f"{what}: the buckets differ: {len(expected)} against {len(found)}")
    for (t, a), (_, b) in zip(expected, found, strict=True):
        same = a is b if a is None or b is None else math.isclose(a, b, rel_tol=1e-9)
        if not same:
            raise RuntimeError(f"{what}: {a!r} against {b!r} at {t.isoformat()}")


def _summary_values(rows: list[asyncpg.Record], field: str) -> list[tuple[datetime, float | None]]:
    return [(r["bucket"], r[field]) for r in rows]


async def median_ms(run: Callable[[], Awaitable[T]], repeat: int) -> tuple[float, T]:
    """The median time of `repeat` runs after one warm-up, in milliseconds, and the last answer."""
    result = await run()
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = await run()
        seconds.append(time.perf_counter() - started)
    return round(1000 * statistics.median(seconds), 2), result


def _mib(size: int) -> float:
    return round(size / 2**20, 2)


async def readings_size(connection: asyncpg.Connection, tier: StorageTier, domain: Domain) -> int:
    size = "hypertable_size" if tier.has_hypertables else "pg_total_relation_size"
    found: int = await connection.fetchval(f"SELECT {size}($1::regclass)", ident(domain.table))
    return found


async def rollup_sizes(connection: asyncpg.Connection, domain: Domain) -> dict[str, float]:
    """Each continuous aggregate's size on disk (its materialization hypertable's), in MiB."""
    suffixes = {rollup.view(domain): rollup.suffix for rollup in reversed(ROLLUPS)}
    rows = await connection.fetch(
        "SELECT view_name, hypertable_size(format('%I.%I', materialization_hypertable_schema,"
        " materialization_hypertable_name)::regclass) AS size"
        " FROM timescaledb_information.continuous_aggregates"
        " WHERE view_schema = current_schema() AND view_name = ANY($1::text[])",
        list(suffixes),
    )
    sizes = {r["view_name"]: r["size"] for r in rows}
    return {suffix: _mib(sizes[view]) for view, suffix in suffixes.items()}


async def load_history(
    connection: asyncpg.Connection, domain: Domain, ids: list[str], start: datetime, days: int
) -> tuple[int, float]:
    """Insert the readings of `days` days from `start`, a statement a day; rows and seconds."""
    sql = load_day_sql(domain)
    # Evenly spread phases: the fleet covers the simulator's whole range of stations.
    phases = [(index + 0.5) / len(ids) for index in range(len(ids))]
    rows, seconds = 0, 0.0
    for day in range(days):
        first = start + timedelta(days=day)
        started = time.perf_counter()
        status = await connection.execute(sql, first, first + timedelta(days=1), ids, phases)
        seconds += time.perf_counter() - started
        rows += int(status.split()[-1])
        print(f"  day {day + 1}/{days}: {rows:,} rows in {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows, seconds


async def vacuum_analyze(connection: asyncpg.Connection, domain: Domain) -> None:
    started = time.perf_counter()
    await connection.execute(f"VACUUM ANALYZE {ident(domain.table)}")
    print(f"  VACUUM ANALYZE in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


async def measure_history(
    database: Database,
    connection: asyncpg.Connection,
    tier: StorageTier,
    domain: Domain,
    devices: int,
    days: int,
    repeat: int,
) -> dict[str, Any]:
    """Load, refresh, compress and read one migrated database; the figures of `--history`."""
    community = tier is StorageTier.COMMUNITY
    if community:
        await connection.execute(PAUSE_JOBS_SQL)
    ids = [f"hist-{index:05d}" for index in range(devices)]
    location = Location(lat=21.03, lon=105.85)
    fleet = [DeviceIn(id=d, city=CITY, domain=domain.name, location=location) for d in ids]
    for first in range(0, len(fleet), 20_000):
        await database.devices.insert_many(fleet[first : first + 20_000])

    end = floor_to(datetime.now(UTC), timedelta(hours=1))
    start = end - timedelta(days=days)
    print(f"  loading {days} days of {devices} devices, from {start.isoformat()}", file=sys.stderr)
    rows, load_s = await load_history(connection, domain, ids, start, days)

    refresh_s: dict[str, float] | None = None
    if community:
        refresh_s = {}
        for rollup in reversed(ROLLUPS):
            started = time.perf_counter()
            await connection.execute(
                f"CALL refresh_continuous_aggregate('{rollup.view(domain)}', NULL, NULL)"
            )
            refresh_s[rollup.suffix] = round(time.perf_counter() - started, 2)
            print(f"  refreshed {rollup.view(domain)} in {refresh_s[rollup.suffix]} s", file=sys.stderr)

    await vacuum_analyze(connection, domain)
    before = await readings_size(connection, tier, domain)
    rollups = await rollup_sizes(connection, domain) if community else None

    metric = domain.metrics[0]
    device_id = ids[0]
    raw_series = series_sql(tier, domain, metric, "avg")

    async def api_series() -> SeriesRows:
        return await database.readings.series(
            device_id, domain.name, metric.name, start, end, SERIES_BUCKET, "avg"
        )

    async def series_from_raw() -> list[asyncpg.Record]:
        return list(await database.pool.fetch(raw_series, SERIES_BUCKET, device_id, start, end))

    # The summary covers whole days, so that the readings and the daily aggregate answer for the
    # same buckets (the first and the last hold part of a day's readings).
    day_start, day_end = floor_to(start, SUMMARY_BUCKET), ceil_to(end, SUMMARY_BUCKET)
    raw_summary = summary_raw_sql(tier, domain, metric)

    async def summary_from_raw() -> list[asyncpg.Record]:
        return list(await database.pool.fetch(raw_summary, day_start, day_end))

    async def summary_from_rollup() -> list[asyncpg.Record]:
        return list(await database.pool.fetch(summary_rollup_sql(domain, metric), day_start, day_end))

    api_ms, api_rows = await median_ms(api_series, repeat)
    raw_ms, raw_rows = await median_ms(series_from_raw, repeat)
    check_agree(
        "hourly series, API against the readings", [(r["t"], r["value"]) for r in raw_rows], list(api_rows)
    )
    summary_ms, summary_rows = await median_ms(summary_from_raw, repeat)
    rollup_ms: float | None = None
    if community:
        rollup_ms, rollup_rows = await median_ms(summary_from_rollup, repeat)
        for field in ("mean", "peak"):
            check_agree(
                f"daily summary ({field}), the daily aggregate against the readings",
                _summary_values(summary_rows, field),
                _summary_values(rollup_rows, field),
            )
    print(f"  series and summary read ({len(raw_rows)} hours, {len(summary_rows)} days)", file=sys.stderr)

    after: int | None = None
    compress_s: float | None = None
    raw_compressed_ms: float | None = None
    summary_compressed_ms: float | None = None
    if community:
        started = time.perf_counter()
        chunks = await connection.fetchval(
            "SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks($1::regclass) c",
            ident(domain.table),
        )
        compress_s = round(time.perf_counter() - started, 2)
        print(f"  compressed {chunks} chunks in {compress_s} s", file=sys.stderr, flush=True)
        await vacuum_analyze(connection, domain)
        after = await readings_size(connection, tier, domain)
        raw_compressed_ms, compressed_rows = await median_ms(series_from_raw, repeat)
        check_agree(
            "hourly series, compressed readings against uncompressed",
            [(r["t"], r["value"]) for r in raw_rows],
            [(r["t"], r["value"]) for r in compressed_rows],
        )
        summary_compressed_ms, compressed_summary = await median_ms(summary_from_raw, repeat)
        for field in ("mean", "peak"):
            check_agree(
                f"daily summary ({field}), compressed readings against uncompressed",
                _summary_values(summary_rows, field),
                _summary_values(compressed_summary, field),
            )

    return {
        "rows": rows,
        "load_s": round(load_s, 2),
        "load_rows_per_s": round(rows / load_s),
        "refresh_s": refresh_s,
        "disk_mib": {
            "before": _mib(before),
            "after": None if after is None else _mib(after),
            "ratio": None if after is None else round(before / after, 2),
            "rollups": rollups,
        },
        "compress_s": compress_s,
        "hourly_series_ms": {
            "api": api_ms,
            "api_source": api_rows.source,
            "raw": raw_ms,
            "raw_compressed": raw_compressed_ms,
        },
        "daily_summary_ms": {"raw": summary_ms, "raw_compressed": summary_compressed_ms, "rollup": rollup_ms},
    }


async def history_tier(server: str, domain: Domain, devices: int, days: int, repeat: int) -> dict[str, Any]:
    """`--history` on one server, in a database of its own, dropped at the end whatever happens."""
    url = f"{HISTORY_SERVERS[server]}/ioc_bench_history_{uuid.uuid4().hex[:8]}"
    await ensure_database(url)
    try:
        async with Database(url, max_size=2) as database:
            tier = await database.migrate()
            print(f"{server}: storage tier {tier}", file=sys.stderr, flush=True)
            if TIER_NAMES[tier] != server:
                print(f"{server}: the server offers {TIER_NAMES[tier]}, not {server}", file=sys.stderr)
            # Loading, refreshing and compressing take longer than the pool's statement bound.
            connection = await asyncpg.connect(url)
            try:
                figures = await measure_history(database, connection, tier, domain, devices, days, repeat)
            finally:
                await connection.close()
    finally:
        await drop_database(url)
    return {
        "server": server,
        "tier": TIER_NAMES[tier],
        "domain": domain.name,
        "metric": domain.metrics[0].name,
        "devices": devices,
        "days": days,
        **figures,
    }
