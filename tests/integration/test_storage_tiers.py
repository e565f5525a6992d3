"""The storage tiers on real servers: Apache TimescaleDB (the TimescaleDB service) and plain
PostgreSQL (the `postgres` service on port 5433), each in a fresh database of its own.

Community TimescaleDB cannot run here (Debian builds only the Apache-licensed part), so its
objects are checked on the Apache server: every statement must fail with nothing worse than the
licence error, and the series query that reads the continuous aggregates runs against plain views
with the aggregates' own definitions.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ioc_core.domains import DOMAINS
from ioc_core.errors import ValidationError
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, StorageTier, TelemetryBatch, WriteResult
from ioc_core.storage.tiers import (
    AGGREGATES,
    ROLLUPS,
    Aggregate,
    community_objects_sql,
    floor_to,
    rollup_query_sql,
    rollup_span,
)
from ioc_core.telemetry import Reading
from tests.integration.conftest import POSTGRES_URL

PLAIN_POSTGRES_URL = os.environ.get("IOC_TEST_PLAIN_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5433")
SERVERS = {StorageTier.APACHE: POSTGRES_URL, StorageTier.POSTGRES: PLAIN_POSTGRES_URL}

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


async def _connect_admin(server: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(f"{server}/postgres", timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL server at {server} is not reachable ({exc}); start it with `make services`")


@pytest.fixture(scope="module", params=list(SERVERS), ids=str)
async def tier_database(request: pytest.FixtureRequest) -> AsyncIterator[TierDatabase]:
    tier: StorageTier = request.param
    server = SERVERS[tier]
    name = f"ioc_test_{int(time.time())}_{uuid.uuid4().hex[:8]}"
    admin = await _connect_admin(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = f"{server}/{name}"
    try:
        async with Database(url) as db:
            await db.migrate()
            for device_id in DEVICES:
                await db.devices.insert(
                    DeviceIn(
                        id=device_id, city=CITY, domain=DOMAIN.name, location=Location(lat=21.0, lon=105.8)
                    )
                )
            # Whole days back, so that the old readings share one daily chunk.
            base = floor_to(datetime.now(UTC) - timedelta(days=2), timedelta(days=1)) + timedelta(hours=9)
            recent = _readings(base, READINGS_PER_DEVICE, seed=1)
            old = _readings(base - timedelta(days=200), OLD_READINGS // len(DEVICES), seed=2)
            first_write = await db.write_batch(TelemetryBatch(records=[(r, 0) for r in recent + old]))
            yield TierDatabase(tier, url, db, recent, old, base, first_write)
    finally:
        admin = await _connect_admin(server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


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
        if tier_database.tier is StorageTier.APACHE:
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
