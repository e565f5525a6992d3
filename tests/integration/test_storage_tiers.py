"""The storage tiers on real servers, each in a fresh database of its own: community TimescaleDB
(the TimescaleDB service, built by `make services` from TimescaleDB's source), Apache TimescaleDB
(the same build with the Apache licence, port 5434) and plain PostgreSQL (port 5433).

On the community server the continuous aggregates, compression and policies run for real; their
jobs are paused in the test database, and the tests run them when they check them. On the Apache
server every community statement must fail with nothing worse than the licence error, and the
series query that reads the aggregates also runs against plain views of their definitions.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ioc_core.domains import DOMAINS
from ioc_core.errors import ValidationError
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, StorageTier, TelemetryBatch, WriteResult
from ioc_core.storage import migrations as migrations_module
from ioc_core.storage.tiers import (
    AGGREGATES,
    COMPRESS_AFTER,
    DEFAULT_RETENTION,
    ROLLUPS,
    Aggregate,
    community_objects_sql,
    floor_to,
    rollup_query_sql,
    rollup_span,
)
from ioc_core.telemetry import Reading
from tests.integration.conftest import TIER_SERVERS, scratch_database
from tests.integration.harness import services

SERVERS = TIER_SERVERS
NO_COMMUNITY_SERVER = (
    "the TimescaleDB service runs Debian's Apache-licence build: `make services` builds the"
    " community one from TimescaleDB's source (see IOC_TIMESCALEDB_SOURCE in the README)"
)

DOMAIN = DOMAINS["water"]
CITY = "tier-city"
DEVICES = ("tier-water-1", "tier-water-2")
STEP = timedelta(seconds=37)
READINGS_PER_DEVICE = 300  # a little over three hours
OLD_READINGS = 12
# Bucket widths: below, equal to and above each continuous aggregate's, whole and not.
BUCKETS = (
    timedelta(seconds=30),
    timedelta(minutes=5),
    timedelta(minutes=90),
    timedelta(hours=1),
    timedelta(hours=2),
)


@dataclass
class TierDatabase:
    tier: StorageTier
    url: str
    db: Database
    recent: list[Reading]
    old: list[Reading]
    base: datetime
    first_write: WriteResult


def _readings(base: datetime, count: int, seed: int) -> list[Reading]:
    rng = random.Random(seed)
    readings = []
    for index in range(count):
        for device_number, device_id in enumerate(DEVICES):
            ts = base + index * STEP + timedelta(microseconds=rng.randrange(1_000_000))
            metrics = {"pressure": round(3 + rng.random() + device_number, 4), "flow": rng.uniform(50, 400)}
            if index % 3 == 0:  # a metric that only some readings carry
                metrics["turbidity"] = round(rng.uniform(0.4, 1.2), 3)
            readings.append(
                Reading(
                    device_id=device_id,
                    city=CITY,
                    domain=DOMAIN.name,
                    ts=ts,
                    seq=seed * 100_000 + index,
                    metrics=metrics,
                    received_at=ts,
                )
            )
    return readings


def _expected(
    readings: list[Reading],
    device_id: str,
    metric: str,
    start: datetime,
    end: datetime,
    bucket: timedelta,
    agg: Aggregate,
) -> list[tuple[datetime, float]]:
    buckets: dict[datetime, list[float]] = {}
    for reading in sorted(readings, key=lambda r: r.ts):
        if reading.device_id == device_id and metric in reading.metrics and start <= reading.ts < end:
            buckets.setdefault(floor_to(reading.ts, bucket), []).append(reading.metrics[metric])
    value_of = {
        "avg": lambda values: sum(values) / len(values),
        "min": min,
        "max": max,
        "count": lambda values: float(len(values)),
        "last": lambda values: values[-1],
    }[agg]
    return [(t, value_of(values)) for t, values in sorted(buckets.items())]


async def _pause_policies(url: str) -> None:
    """Stop the scheduler from running this database's policies: a retention or compression run
    at a moment of its choosing would change what the tests count. The tests run them instead."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs"
            " WHERE proc_name IN ('policy_refresh_continuous_aggregate', 'policy_compression',"
            " 'policy_retention')"
        )
    finally:
        await connection.close()


_POLICIES_SQL = """
SELECT coalesce(c.view_name, j.hypertable_name) AS relation, j.proc_name, j.job_id, j.scheduled,
       j.schedule_interval, (j.config ->> 'start_offset')::interval AS start_offset,
       (j.config ->> 'end_offset')::interval AS end_offset,
       (j.config ->> 'compress_after')::interval AS compress_after,
       (j.config ->> 'drop_after')::interval AS drop_after
FROM timescaledb_information.jobs j
LEFT JOIN timescaledb_information.continuous_aggregates c
  ON (c.materialization_hypertable_schema, c.materialization_hypertable_name)
   = (j.hypertable_schema, j.hypertable_name)
WHERE j.proc_name IN ('policy_refresh_continuous_aggregate', 'policy_compression', 'policy_retention')
"""


async def _policies(connection: asyncpg.Connection) -> dict[tuple[str, str], asyncpg.Record]:
    """The database's policies by (relation, kind): the view's name for an aggregate's."""
    return {(r["relation"], r["proc_name"]): r for r in await connection.fetch(_POLICIES_SQL)}


async def _run_policy(connection: asyncpg.Connection, relation: str, kind: str) -> None:
    job = (await _policies(connection))[(relation, kind)]
    await connection.execute("CALL run_job($1)", job["job_id"])


@pytest.fixture(scope="module", params=list(SERVERS), ids=str)
async def tier_database(request: pytest.FixtureRequest) -> AsyncIterator[TierDatabase]:
    tier: StorageTier = request.param
    server = SERVERS[tier]
    async with scratch_database(server) as url, Database(url) as db:
        offered = await db.migrate()
        if offered is not tier:
            if tier is StorageTier.COMMUNITY and offered is StorageTier.APACHE:
                pytest.skip(NO_COMMUNITY_SERVER)
            pytest.fail(f"the server at {server} offers the {offered} tier, not {tier}")
        if tier is StorageTier.COMMUNITY:
            await _pause_policies(url)
        for device_id in DEVICES:
            await db.devices.insert(
                DeviceIn(id=device_id, city=CITY, domain=DOMAIN.name, location=Location(lat=21.0, lon=105.8))
            )
        # Whole days back, so that the old readings share one daily chunk.
        base = floor_to(datetime.now(UTC) - timedelta(days=2), timedelta(days=1)) + timedelta(hours=9)
        recent = _readings(base, READINGS_PER_DEVICE, seed=1)
        old = _readings(base - timedelta(days=200), OLD_READINGS // len(DEVICES), seed=2)
        first_write = await db.write_batch(TelemetryBatch(records=[(r, 0) for r in recent + old]))
        yield TierDatabase(tier, url, db, recent, old, base, first_write)


async def test_migrate_twice_and_detect_the_tier(tier_database: TierDatabase) -> None:
    db = tier_database.db
    assert await db.migrate() is tier_database.tier
    assert await db.detect_tier() is tier_database.tier
    connection = await asyncpg.connect(tier_database.url)
    try:
        extension = await connection.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        )
        tables = {f"readings_{name}" for name in DOMAINS}
        if tier_database.tier is StorageTier.COMMUNITY:
            assert extension is not None
            await _check_community_objects(connection)
        elif tier_database.tier is StorageTier.APACHE:
            assert extension is not None
            hypertables = await connection.fetch(
                "SELECT hypertable_name FROM timescaledb_information.hypertables"
            )
            assert tables <= {r["hypertable_name"] for r in hypertables}
        else:
            assert extension is None
            indexes = await connection.fetch(
                "SELECT indexname FROM pg_indexes WHERE indexname LIKE '%_ts_brin'"
            )
            assert {f"{t}_ts_brin" for t in tables} == {r["indexname"] for r in indexes}
    finally:
        await connection.close()


async def _check_community_objects(connection: asyncpg.Connection) -> None:
    """Every domain's aggregates, compression settings and policies, with the configured values."""
    aggregates = {
        r["view_name"]: r["materialized_only"]
        for r in await connection.fetch(
            "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates"
        )
    }
    compression = {
        (r["hypertable_name"], r["attname"]): r
        for r in await connection.fetch(
            "SELECT hypertable_name, attname, segmentby_column_index, orderby_column_index, orderby_asc"
            " FROM timescaledb_information.compression_settings"
        )
    }
    policies = await _policies(connection)
    for domain in DOMAINS.values():
        table = domain.table
        assert compression[(table, "device_id")]["segmentby_column_index"] == 1
        ts = compression[(table, "ts")]
        assert (ts["orderby_column_index"], ts["orderby_asc"]) == (1, False)
        assert policies[(table, "policy_compression")]["compress_after"] == COMPRESS_AFTER
        assert policies[(table, "policy_retention")]["drop_after"] == DEFAULT_RETENTION
        for rollup in ROLLUPS:
            view = rollup.view(domain)
            assert aggregates[view] is False, f"{view} must answer in real time"
            refresh = policies[(view, "policy_refresh_continuous_aggregate")]
            assert refresh["start_offset"] == max(DEFAULT_RETENTION, 3 * rollup.width)
            assert (refresh["end_offset"], refresh["schedule_interval"]) == (
                rollup.refresh_lag,
                rollup.refresh_every,
            )
            kept = policies[(view, "policy_retention")]["drop_after"]
            assert kept == DEFAULT_RETENTION * rollup.retention_factor
    assert len(policies) == len(DOMAINS) * (2 + 2 * len(ROLLUPS))


async def test_write_readings_once(tier_database: TierDatabase) -> None:
    written = tier_database.recent + tier_database.old
    first = tier_database.first_write
    assert (first.stored, first.duplicates) == (len(written), 0)
    # A batch of repeats and new readings stores only the new ones.
    new = _readings(tier_database.base - timedelta(days=1), 5, seed=3)
    again = await tier_database.db.write_batch(TelemetryBatch(records=[(r, 0) for r in written[:500] + new]))
    assert (again.stored, again.duplicates) == (len(new), 500)


@pytest.mark.parametrize("agg", AGGREGATES)
async def test_series_matches_the_readings(tier_database: TierDatabase, agg: Aggregate) -> None:
    db, readings, base = tier_database.db, tier_database.recent, tier_database.base
    # Neither end on a minute, so every bucket width has partial buckets at both ends.
    start, end = base + timedelta(minutes=13, seconds=7), base + timedelta(hours=2, minutes=41, seconds=3)
    for metric in ("pressure", "turbidity"):
        for bucket in BUCKETS:
            series = await db.readings.series(DEVICES[0], DOMAIN.name, metric, start, end, bucket, agg)
            expected = _expected(readings, DEVICES[0], metric, start, end, bucket, agg)
            assert [t for t, _ in series] == [t for t, _ in expected], (metric, bucket)
            assert [v for _, v in series] == pytest.approx([v for _, v in expected], rel=1e-9), (
                metric,
                bucket,
            )


async def test_series_of_the_whole_data_and_of_nothing(tier_database: TierDatabase) -> None:
    db, base = tier_database.db, tier_database.base
    day, minute = timedelta(days=1), timedelta(minutes=1)
    midnight = floor_to(base, day)
    counts = await db.readings.series(DEVICES[1], DOMAIN.name, "flow", midnight, midnight + day, day, "count")
    assert counts == [(midnight, float(READINGS_PER_DEVICE))]
    # Naive datetimes count as UTC.
    naive = midnight.replace(tzinfo=None)
    assert (
        await db.readings.series(DEVICES[1], DOMAIN.name, "flow", naive, naive + day, day, "count") == counts
    )
    assert await db.readings.series(DEVICES[0], DOMAIN.name, "flow", base + day, base, minute, "avg") == []
    assert await db.readings.series(DEVICES[0], DOMAIN.name, "flow", base, base, minute, "avg") == []
    quiet = base - timedelta(days=150)
    assert await db.readings.series(DEVICES[0], DOMAIN.name, "flow", quiet, quiet + day, minute, "max") == []
    assert (
        await db.readings.series("no-such-device", DOMAIN.name, "flow", midnight, midnight + day, day, "max")
        == []
    )


async def test_series_rejects_what_the_domain_does_not_measure(tier_database: TierDatabase) -> None:
    db, base = tier_database.db, tier_database.base
    hour = timedelta(hours=1)
    with pytest.raises(ValidationError, match="not a metric of the water domain"):
        await db.readings.series(DEVICES[0], DOMAIN.name, "voltage", base, base + hour, hour, "avg")
    with pytest.raises(ValidationError, match="not a domain"):
        await db.readings.series(DEVICES[0], "weather", "pressure", base, base + hour, hour, "avg")
    with pytest.raises(ValidationError, match="bucket must be positive"):
        await db.readings.series(DEVICES[0], DOMAIN.name, "pressure", base, base + hour, timedelta(0), "avg")


async def test_retention_removes_old_readings_only(tier_database: TierDatabase) -> None:
    db = tier_database.db
    connection = await asyncpg.connect(tier_database.url)
    try:
        count_sql = "SELECT count(*) FROM readings_water WHERE ts < now() - INTERVAL '90 days'"
        kept_sql = "SELECT count(*) FROM readings_water WHERE ts >= now() - INTERVAL '90 days'"
        assert await connection.fetchval(count_sql) == OLD_READINGS
        kept = await connection.fetchval(kept_sql)
        assert kept >= len(tier_database.recent)
        # Two processors at once: one removes, the other finds the work taken.
        removed = await asyncio.gather(*(db.readings.apply_retention(timedelta(days=90)) for _ in range(2)))
        expected = 1 if tier_database.tier.has_hypertables else OLD_READINGS  # one daily chunk, or rows
        assert sum(removed) == expected, removed
        assert await connection.fetchval(count_sql) == 0
        assert await connection.fetchval(kept_sql) == kept
        assert await db.readings.apply_retention(timedelta(days=90)) == 0
    finally:
        await connection.close()


async def test_community_objects_fail_only_for_the_licence(tier_database: TierDatabase) -> None:
    if tier_database.tier is not StorageTier.APACHE:
        return  # the licence check needs a TimescaleDB server
    connection = await asyncpg.connect(tier_database.url)
    transaction = connection.transaction()
    await transaction.start()
    refused: list[str] = []
    try:
        for domain in DOMAINS.values():
            for statement in community_objects_sql(domain, timedelta(days=90)):
                try:
                    async with connection.transaction():  # a savepoint
                        await connection.execute(statement)
                except asyncpg.FeatureNotSupportedError as exc:
                    assert "license" in str(exc), statement
                    refused.append(statement)
                except asyncpg.PostgresError as exc:
                    pytest.fail(f"{type(exc).__name__}: {exc}\nin:\n{statement}")
                for rollup in ROLLUPS:
                    if statement.startswith(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {rollup.view(domain)} "):
                        # Stand in for the aggregate so that later statements naming it resolve.
                        await connection.execute(
                            f"CREATE VIEW {rollup.view(domain)} AS {rollup_query_sql(domain, rollup)}"
                        )
    finally:
        await transaction.rollback()
        await connection.close()
    for verb in (
        "CREATE MATERIALIZED VIEW",
        "SELECT add_continuous_aggregate_policy",
        "DO $$",
        "SELECT add_compression_policy",
        "SELECT add_retention_policy",
    ):
        statements = [s for d in DOMAINS.values() for s in community_objects_sql(d, timedelta(days=90))]
        wanted = [s for s in statements if s.startswith(verb)]
        assert wanted, verb
        assert all(s in refused for s in wanted), f"{verb} ran on the Apache server without the licence"


async def test_community_series_over_the_aggregates(tier_database: TierDatabase) -> None:
    """The series query that reads the continuous aggregates, against views with the aggregates'
    definitions (what a real-time aggregate returns), gives what the readings give."""
    if tier_database.tier is not StorageTier.APACHE:
        return
    db, readings, base = tier_database.db, tier_database.recent, tier_database.base
    connection = await asyncpg.connect(tier_database.url)
    try:
        for rollup in ROLLUPS:
            await connection.execute(
                f"CREATE VIEW {rollup.view(DOMAIN)} AS {rollup_query_sql(DOMAIN, rollup)}"
            )
        db.tier = StorageTier.COMMUNITY
        start, end = base + timedelta(minutes=13, seconds=7), base + timedelta(hours=2, minutes=41, seconds=3)
        used = set()
        for bucket in BUCKETS:
            span = rollup_span(bucket, start, end)
            used.add(span.rollup.suffix if span else None)
            for agg in AGGREGATES:
                for metric in ("pressure", "turbidity"):
                    series = await db.readings.series(
                        DEVICES[0], DOMAIN.name, metric, start, end, bucket, agg
                    )
                    expected = _expected(readings, DEVICES[0], metric, start, end, bucket, agg)
                    assert [t for t, _ in series] == [t for t, _ in expected], (metric, bucket, agg)
                    assert [v for _, v in series] == pytest.approx([v for _, v in expected], rel=1e-9), (
                        metric,
                        bucket,
                        agg,
                    )
        assert used == {"1h", "1m", None}
    finally:
        db.tier = tier_database.tier
        for rollup in ROLLUPS:
            await connection.execute(f"DROP VIEW IF EXISTS {rollup.view(DOMAIN)}")
        await connection.close()


async def test_insert_many_registers_a_fleet_once(tier_database: TierDatabase) -> None:
    db = tier_database.db
    fleet = [
        DeviceIn(
            id=f"tier-many-{i}",
            city=CITY,
            domain="flood",
            name=f"Trạm {i}",
            district="Hoàn Kiếm" if i % 2 else None,
            location=Location(lat=21.0 + i / 1000, lon=105.8),
            thresholds={"currentLevel": {"warn_above": 2.0 + i, "crit_above": None}},
        )
        for i in range(50)
    ]
    assert await db.devices.insert_many(fleet) == 50
    # Registered ones are left as they are; only the new one counts.
    changed = fleet[3].model_copy(update={"name": "renamed"})
    extra = DeviceIn(id="tier-many-new", city=CITY, domain="flood", location=Location(lat=21.0, lon=105.8))
    assert await db.devices.insert_many([changed, extra]) == 1
    stored = await db.devices.get("tier-many-7")
    assert (stored.name, stored.district, stored.thresholds) == (
        "Trạm 7",
        "Hoàn Kiếm",
        {"currentLevel": {"warn_above": 9.0, "crit_above": None}},
    )
    assert (await db.devices.get("tier-many-3")).name == "Trạm 3"
    assert stored.location == Location(lat=21.007, lon=105.8)


# -- the community tier, for real ----------------------------------------------------------------


# Devices of their own for the tests that add readings, so those run in any order.
LATE_DEVICE = "tier-water-late"
BACKFILL_DEVICE = "tier-water-backfill"


async def _register(db: Database, device_id: str) -> None:
    # Registered once, by whichever test needs it first.
    await db.devices.insert_many(
        [DeviceIn(id=device_id, city=CITY, domain=DOMAIN.name, location=Location(lat=21.0, lon=105.8))]
    )


def _late_readings(start: datetime, count: int, seed: int, device_id: str = LATE_DEVICE) -> list[Reading]:
    return [
        Reading(
            device_id=device_id,
            city=CITY,
            domain=DOMAIN.name,
            ts=start + index * STEP,
            seq=seed * 100_000 + index,
            metrics={"pressure": 2.0 + index / 100, "flow": 100.0 + index},
            received_at=datetime.now(UTC),
        )
        for index in range(count)
    ]


async def _materialized_rows(connection: asyncpg.Connection, view: str) -> int:
    relation = await connection.fetchrow(
        "SELECT materialization_hypertable_schema AS schema, materialization_hypertable_name AS name"
        " FROM timescaledb_information.continuous_aggregates WHERE view_name = $1",
        view,
    )
    assert relation is not None, view
    return int(await connection.fetchval(f'SELECT count(*) FROM "{relation["schema"]}"."{relation["name"]}"'))


async def test_refreshed_aggregates_equal_the_readings(tier_database: TierDatabase) -> None:
    if tier_database.tier is not StorageTier.COMMUNITY:
        return
    db, readings, base = tier_database.db, tier_database.recent, tier_database.base
    connection = await asyncpg.connect(tier_database.url)
    try:
        since = floor_to(base, timedelta(days=1))
        for rollup in ROLLUPS:
            view = rollup.view(DOMAIN)
            # The policy itself: its window, its end short of the newest buckets.
            await _run_policy(connection, view, "policy_refresh_continuous_aggregate")
            assert await _materialized_rows(connection, view) > 0, view
            stored = await connection.fetch(
                f"SELECT * FROM {view} WHERE bucket >= $1 ORDER BY bucket, device_id", since
            )
            computed = await connection.fetch(
                f"SELECT * FROM ({rollup_query_sql(DOMAIN, rollup)}) raw"
                " WHERE bucket >= $1 ORDER BY bucket, device_id",
                since,
            )
            assert [(r["bucket"], r["device_id"]) for r in stored] == [
                (r["bucket"], r["device_id"]) for r in computed
            ], view
            for mine, theirs in zip(stored, computed, strict=True):
                # Sums may add up in another order; times and counts must be equal.
                close = {
                    k: pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for k, v in theirs.items()
                }
                assert dict(mine) == close, view
        start, end = base + timedelta(minutes=13, seconds=7), base + timedelta(hours=2, minutes=41, seconds=3)
        for bucket in BUCKETS:
            for agg in AGGREGATES:
                series = await db.readings.series(
                    DEVICES[0], DOMAIN.name, "pressure", start, end, bucket, agg
                )
                expected = _expected(readings, DEVICES[0], "pressure", start, end, bucket, agg)
                assert [t for t, _ in series] == [t for t, _ in expected], (bucket, agg)
                assert [v for _, v in series] == pytest.approx([v for _, v in expected], rel=1e-9)
                span = rollup_span(bucket, start, end)
                assert series.source == (span.rollup.suffix if span else "raw"), (bucket, agg)
        day = await db.readings.series(
            DEVICES[1], DOMAIN.name, "flow", since, since + timedelta(days=1), timedelta(days=1), "count"
        )
        assert (day, day.source) == ([(since, float(READINGS_PER_DEVICE))], "1d")
    finally:
        await connection.close()


async def test_backfilled_readings_reach_every_rollup(tier_database: TierDatabase) -> None:
    """Readings that arrive late, below what the aggregates have materialized (a day back, and a
    month back, further than a refresh used to look), are in every level after its next refresh."""
    if tier_database.tier is not StorageTier.COMMUNITY:
        return
    db, base = tier_database.db, tier_database.base
    await _register(db, BACKFILL_DEVICE)
    connection = await asyncpg.connect(tier_database.url)
    try:
        for rollup in ROLLUPS:
            await _run_policy(connection, rollup.view(DOMAIN), "policy_refresh_continuous_aggregate")
        day = timedelta(days=1)
        for ago, seed in ((timedelta(0), 5), (timedelta(days=30), 6)):
            start = floor_to(base - ago, day) + timedelta(hours=3)
            late = _late_readings(start, 40, seed, BACKFILL_DEVICE)
            written = await db.write_batch(TelemetryBatch(records=[(r, 0) for r in late]))
            assert (written.stored, written.duplicates) == (len(late), 0)
            for rollup in ROLLUPS:
                await _run_policy(connection, rollup.view(DOMAIN), "policy_refresh_continuous_aggregate")
            midnight = floor_to(start, day)
            for rollup in ROLLUPS:
                series = await db.readings.series(
                    BACKFILL_DEVICE, DOMAIN.name, "flow", midnight, midnight + day, rollup.width, "count"
                )
                assert series.source == rollup.suffix
                assert sum(v or 0 for _, v in series) == len(late), (ago, rollup.suffix)
                materialized = await connection.fetchval(
                    f"SELECT sum(flow_count) FROM {rollup.view(DOMAIN)}"
                    " WHERE device_id = $1 AND bucket >= $2 AND bucket < $3",
                    BACKFILL_DEVICE,
                    midnight,
                    midnight + day,
                )
                assert materialized == len(late), (ago, rollup.suffix)
    finally:
        await connection.close()


async def test_a_late_reading_is_in_the_series_before_the_next_refresh(tier_database: TierDatabase) -> None:
    """A reading for a bucket the aggregates have already materialized (a device's buffer sent
    after an outage) is in every series at once: stale buckets are read from the readings."""
    if tier_database.tier is not StorageTier.COMMUNITY:
        return
    db, base = tier_database.db, tier_database.base
    device_id = "tier-water-latecomer"
    await _register(db, device_id)
    connection = await asyncpg.connect(tier_database.url)
    try:
        at = floor_to(base, timedelta(hours=1)) + timedelta(hours=4, minutes=7, seconds=5)
        first = _late_readings(at, 3, seed=11, device_id=device_id)
        await db.write_batch(TelemetryBatch(records=[(r, 0) for r in first]))
        for rollup in ROLLUPS:
            await _run_policy(connection, rollup.view(DOMAIN), "policy_refresh_continuous_aggregate")
        late = _late_readings(at + timedelta(minutes=20), 2, seed=12, device_id=device_id)
        await db.write_batch(TelemetryBatch(records=[(r, 0) for r in late]))
        midnight = floor_to(at, timedelta(days=1))
        for rollup in ROLLUPS:
            series = await db.readings.series(
                device_id, DOMAIN.name, "flow", midnight, midnight + timedelta(days=1), rollup.width, "count"
            )
            assert series.source == rollup.suffix
            assert sum(v or 0 for _, v in series) == len(first) + len(late), rollup.suffix
            # The hourly and daily aggregates have not folded the late readings in yet: they lie
            # below their watermarks (the end of the newest bucket they materialized). The minute
            # one's watermark is the minute after the first readings, so it reads them in real time.
            materialized = await connection.fetchval(
                f"SELECT sum(flow_count) FROM {rollup.view(DOMAIN)} WHERE device_id = $1", device_id
            )
            if rollup.suffix != "1m":
                assert materialized == len(first), rollup.suffix
    finally:
        await connection.close()


async def test_compressed_chunks_answer_series_and_take_late_readings(tier_database: TierDatabase) -> None:
    if tier_database.tier is not StorageTier.COMMUNITY:
        return
    db, readings, base = tier_database.db, tier_database.recent, tier_database.base
    await _register(db, LATE_DEVICE)
    connection = await asyncpg.connect(tier_database.url)
    compressed_sql = (
        "SELECT count(*) FROM timescaledb_information.chunks"
        " WHERE hypertable_name = $1 AND is_compressed AND range_end > $2 AND range_start <= $2"
    )
    try:
        # The policy compresses what is older than its age (a day of a month ago)...
        month_ago = floor_to(base - timedelta(days=30), timedelta(days=1)) + timedelta(hours=8)
        month_old = _late_readings(month_ago, 10, seed=10)
        await db.write_batch(TelemetryBatch(records=[(r, 0) for r in month_old]))
        await _run_policy(connection, DOMAIN.table, "policy_compression")
        assert await connection.fetchval(compressed_sql, DOMAIN.table, month_ago) == 1
        assert await connection.fetchval(compressed_sql, DOMAIN.table, base) == 0
        # ...and a chunk of two days ago, compressed by hand, still answers and takes readings.
        await connection.execute(
            "SELECT compress_chunk(c, if_not_compressed => true)"
            " FROM show_chunks($1::regclass, older_than => now() - INTERVAL '1 day') c",
            DOMAIN.table,
        )
        assert await connection.fetchval(compressed_sql, DOMAIN.table, base) == 1
        start, end = base + timedelta(minutes=13, seconds=7), base + timedelta(hours=2, minutes=41, seconds=3)
        for bucket in (timedelta(seconds=30), timedelta(minutes=5)):
            for agg in ("avg", "last"):
                series = await db.readings.series(
                    DEVICES[0], DOMAIN.name, "pressure", start, end, bucket, agg
                )
                expected = _expected(readings, DEVICES[0], "pressure", start, end, bucket, agg)
                assert series == [(t, pytest.approx(v, rel=1e-9)) for t, v in expected], (bucket, agg)
        late = _late_readings(base + timedelta(hours=5, seconds=11), 25, seed=7)
        written = await db.write_batch(TelemetryBatch(records=[(r, 0) for r in late]))
        assert (written.stored, written.duplicates) == (len(late), 0)
        again = await db.write_batch(TelemetryBatch(records=[(r, 0) for r in late]))
        assert (again.stored, again.duplicates) == (0, len(late))
        hour = floor_to(late[0].ts, timedelta(hours=1))
        counts = await db.readings.series(
            LATE_DEVICE,
            DOMAIN.name,
            "pressure",
            hour,
            hour + timedelta(hours=1),
            timedelta(seconds=30),
            "count",
        )
        assert sum(v or 0 for _, v in counts) == len(late)
        # Old readings of a month ago too, into the chunk the policy compressed.
        older = _late_readings(month_ago + timedelta(hours=2), 10, seed=8)
        written = await db.write_batch(TelemetryBatch(records=[(r, 0) for r in older]))
        assert (written.stored, written.duplicates) == (len(older), 0)
    finally:
        await connection.close()


async def test_the_scheduler_runs_the_policies(tier_database: TierDatabase) -> None:
    """TimescaleDB's own scheduler (a background worker, not `run_job` from a session) runs a
    refresh policy to success."""
    if tier_database.tier is not StorageTier.COMMUNITY:
        return
    connection = await asyncpg.connect(tier_database.url)
    view = ROLLUPS[-1].view(DOMAIN)
    job = (await _policies(connection))[(view, "policy_refresh_continuous_aggregate")]["job_id"]
    stats_sql = (
        "SELECT total_successes, total_failures, last_run_status FROM timescaledb_information.job_stats"
        " WHERE job_id = $1"
    )
    try:
        before = await connection.fetchrow(stats_sql, job)
        # A job that has not finished a run yet has a row of nulls.
        successes, failures = (
            (before["total_successes"] or 0, before["total_failures"] or 0) if before else (0, 0)
        )
        await connection.execute("SELECT alter_job($1, scheduled => true, next_start => now())", job)
        deadline = time.monotonic() + 60
        while True:
            stats = await connection.fetchrow(stats_sql, job)
            if stats is not None and (stats["total_successes"] or 0) > successes:
                break
            assert stats is None or (stats["total_failures"] or 0) == failures, (
                f"job {job} failed: {dict(stats)}"
            )
            assert time.monotonic() < deadline, f"the scheduler did not run job {job}: {stats}"
            await asyncio.sleep(0.2)
        assert stats["last_run_status"] == "Success"
    finally:
        await connection.execute("SELECT alter_job($1, scheduled => false)", job)
        await connection.close()


async def test_an_apache_tier_database_gains_the_community_objects_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A database made while the server had only the Apache licence (the tier is forced here, on
    the community server) is upgraded in place by `migrate`: aggregates over the readings it
    already holds, compression and policies; a second `migrate` changes nothing."""
    async with scratch_database(SERVERS[StorageTier.COMMUNITY]) as url, Database(url) as db:
        await db.pool.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        if await db.detect_tier() is not StorageTier.COMMUNITY:
            pytest.skip(NO_COMMUNITY_SERVER)
        real_detect = migrations_module.detect_tier

        async def apache(pool: object) -> StorageTier:
            return StorageTier.APACHE

        monkeypatch.setattr(migrations_module, "detect_tier", apache)
        assert await db.migrate() is StorageTier.APACHE
        here = Location(lat=21.0, lon=105.8)
        await db.devices.insert_many(
            [DeviceIn(id=d, city=CITY, domain=DOMAIN.name, location=here) for d in DEVICES]
        )
        base = floor_to(datetime.now(UTC) - timedelta(days=3), timedelta(days=1))
        readings = _readings(base, 100, seed=9)
        await db.write_batch(TelemetryBatch(records=[(r, 0) for r in readings]))
        connection = await asyncpg.connect(url)
        try:
            aggregates_sql = "SELECT count(*) FROM timescaledb_information.continuous_aggregates"
            assert await connection.fetchval(aggregates_sql) == 0
            monkeypatch.setattr(migrations_module, "detect_tier", real_detect)
            for _ in range(2):
                async with Database(url) as upgraded:
                    assert await upgraded.migrate() is StorageTier.COMMUNITY
                await _check_community_objects(connection)
            await _pause_policies(url)
            view = ROLLUPS[0].view(DOMAIN)
            await _run_policy(connection, view, "policy_refresh_continuous_aggregate")
            assert await connection.fetchval(f"SELECT sum(flow_count) FROM {view}") == len(readings)
        finally:
            await connection.close()


async def _set_apache_server_licence(licence: str | None) -> None:
    """Restart the Apache-licence server of `make services` with `licence` (None: its own
    settings' licence, 'apache'): `ALTER SYSTEM` outranks the file `services.sh` writes."""
    admin = await asyncpg.connect(f"{SERVERS[StorageTier.APACHE]}/postgres")
    try:
        if licence is None:
            await admin.execute("ALTER SYSTEM RESET timescaledb.license")
        else:
            await admin.execute(f"ALTER SYSTEM SET timescaledb.license = '{licence}'")
    finally:
        await admin.close()
    await asyncio.to_thread(services, "stop", "apache")
    await asyncio.to_thread(services, "up")


async def test_a_server_that_gains_the_licence_upgrades_its_databases_in_place() -> None:
    """The Apache-licence server restarted with the community licence, as a deployment moves to
    Timescale's image: `migrate` gives a database made on the Apache tier its aggregates over the
    readings it already holds, compression and policies, and a second `migrate` changes nothing.
    The server gets its own licence back at the end."""
    async with scratch_database(SERVERS[StorageTier.COMMUNITY]) as probe_url, Database(probe_url) as probe:
        await probe.pool.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        if await probe.detect_tier() is not StorageTier.COMMUNITY:
            pytest.skip(NO_COMMUNITY_SERVER)
    async with scratch_database(SERVERS[StorageTier.APACHE]) as url:
        async with Database(url) as db:
            assert await db.migrate() is StorageTier.APACHE
            here = Location(lat=21.0, lon=105.8)
            await db.devices.insert_many(
                [DeviceIn(id=d, city=CITY, domain=DOMAIN.name, location=here) for d in DEVICES]
            )
            readings = _readings(
                floor_to(datetime.now(UTC) - timedelta(days=3), timedelta(days=1)), 100, seed=5
            )
            await db.write_batch(TelemetryBatch(records=[(r, 0) for r in readings]))
        try:
            await _set_apache_server_licence("timescale")
            for _ in range(2):
                async with Database(url) as upgraded:
                    assert await upgraded.migrate() is StorageTier.COMMUNITY
            connection = await asyncpg.connect(url)
            try:
                await _check_community_objects(connection)
                await _pause_policies(url)
                view = ROLLUPS[0].view(DOMAIN)
                await _run_policy(connection, view, "policy_refresh_continuous_aggregate")
                assert await connection.fetchval(f"SELECT sum(flow_count) FROM {view}") == len(readings)
            finally:
                await connection.close()
        finally:
            await _set_apache_server_licence(None)
        async with Database(url) as back:
            assert await back.detect_tier() is StorageTier.APACHE


async def test_migrate_brings_timescaledb_up_to_the_installed_version() -> None:
    """A database made under an older TimescaleDB (a new server image keeps its version) is
    updated by `migrate`, whose update runs first in a session of its own."""
    versions_sql = (
        "SELECT installed_version, default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    async with scratch_database(SERVERS[StorageTier.APACHE]) as url:
        connection = await asyncpg.connect(url)
        try:
            older_versions = await connection.fetch(
                "SELECT version FROM pg_available_extension_versions WHERE name = 'timescaledb'"
                " AND version <> (SELECT default_version FROM pg_available_extensions"
                " WHERE name = 'timescaledb') AND version ~ '^2\\.1[4-9]\\.'"
            )
            if not older_versions:
                pytest.skip("the server has no older TimescaleDB to start from")
            older = sorted(r["version"] for r in older_versions)[-1]
            await connection.execute(f"CREATE EXTENSION timescaledb VERSION '{older}'")
        finally:
            await connection.close()
        async with Database(url) as db:
            assert await db.migrate() is StorageTier.APACHE
        connection = await asyncpg.connect(url)
        try:
            installed, default = await connection.fetchrow(versions_sql)
        finally:
            await connection.close()
        assert installed == default != older
