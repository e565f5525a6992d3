"""The SQL text of each storage tier, and the bucket arithmetic that picks a continuous aggregate."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from ioc_core.domains import DOMAINS, Domain
from ioc_core.errors import IocError, ValidationError
from ioc_core.settings import Settings
from ioc_core.storage import StorageTier
from ioc_core.storage.readings import _STAGING, stored_readings
from ioc_core.storage.schema import MIGRATIONS
from ioc_core.storage.tiers import (
    AGGREGATES,
    ROLLUPS,
    SCAN_SAMPLE_ROWS,
    ScanSample,
    ceil_to,
    community_objects_sql,
    floor_to,
    interval_sql,
    read_windows,
    reader_role_sql,
    retention_sql,
    rollup_query_sql,
    rollup_series_sql,
    rollup_span,
    scan_sample_sql,
    series_scan_estimate,
    series_sql,
    stale_rollup_sql,
    tier_objects_sql,
    unix_microseconds,
)
from ioc_core.telemetry import Reading

T0 = datetime(2025, 3, 10, 10, 30, 15, tzinfo=UTC)
NINETY_DAYS = timedelta(days=90)


def test_intervals_are_written_in_their_largest_whole_unit() -> None:
    assert interval_sql(timedelta(days=90)) == "INTERVAL '90 days'"
    assert interval_sql(timedelta(hours=1)) == "INTERVAL '1 hour'"
    assert interval_sql(timedelta(minutes=90)) == "INTERVAL '90 minutes'"
    assert interval_sql(timedelta(seconds=61)) == "INTERVAL '61 seconds'"
    for bad in (timedelta(0), timedelta(seconds=-5), timedelta(milliseconds=1500)):
        with pytest.raises(ValueError):
            interval_sql(bad)


def test_rounding_is_to_the_epoch_in_utc() -> None:
    hour = timedelta(hours=1)
    assert floor_to(T0, hour) == datetime(2025, 3, 10, 10, tzinfo=UTC)
    assert ceil_to(T0, hour) == datetime(2025, 3, 10, 11, tzinfo=UTC)
    assert ceil_to(datetime(2025, 3, 10, 10, tzinfo=UTC), hour) == datetime(2025, 3, 10, 10, tzinfo=UTC)
    # Seven days from the epoch (a Thursday), not from time_bucket's default Monday.
    assert floor_to(T0, timedelta(days=7)) == datetime(2025, 3, 6, tzinfo=UTC)
    # Another time zone names the same instant.
    plus7 = T0.astimezone(datetime.fromisoformat("2025-01-01T00:00:00+07:00").tzinfo)
    assert floor_to(plus7, hour) == floor_to(T0, hour)


@pytest.mark.parametrize(
    ("bucket", "start", "end", "expected"),
    [
        # The coarsest level whose width divides the bucket, over the whole buckets inside the range.
        (
            timedelta(days=1),
            T0,
            T0 + timedelta(days=3),
            ("1d", T0.replace(hour=0, minute=0, second=0) + timedelta(days=1)),
        ),
        (
            timedelta(days=7),
            T0 - timedelta(days=30),
            T0,
            ("1d", (T0 - timedelta(days=30)).replace(hour=0, minute=0, second=0) + timedelta(days=1)),
        ),
        # A day's bucket over less than one whole day falls back to hours.
        (
            timedelta(days=1),
            T0,
            T0 + timedelta(hours=20),
            ("1h", T0.replace(minute=0, second=0) + timedelta(hours=1)),
        ),
        (
            timedelta(hours=2),
            T0,
            T0 + timedelta(hours=5),
            ("1h", T0.replace(minute=0, second=0) + timedelta(hours=1)),
        ),
        (
            timedelta(minutes=90),
            T0,
            T0 + timedelta(hours=5),
            ("1m", T0.replace(second=0) + timedelta(minutes=1)),
        ),
        (
            timedelta(minutes=5),
            T0,
            T0 + timedelta(hours=1),
            ("1m", T0.replace(second=0) + timedelta(minutes=1)),
        ),
        # Not a whole number of minutes: the readings only.
        (timedelta(seconds=30), T0, T0 + timedelta(hours=5), None),
        (timedelta(seconds=90), T0, T0 + timedelta(hours=5), None),
        # An hour's bucket over less than one whole hour falls back to minutes.
        (
            timedelta(hours=1),
            T0,
            T0 + timedelta(minutes=40),
            ("1m", T0.replace(second=0) + timedelta(minutes=1)),
        ),
        # Less than one whole minute: nothing to read from the aggregates.
        (timedelta(minutes=1), T0, T0 + timedelta(seconds=40), None),
    ],
)
def test_rollup_span(
    bucket: timedelta, start: datetime, end: datetime, expected: tuple[str, datetime] | None
) -> None:
    span = rollup_span(bucket, start, end)
    if expected is None:
        assert span is None
        return
    assert span is not None
    assert (span.rollup.suffix, span.inner_start) == expected
    assert span.inner_end == floor_to(end, span.rollup.width)
    assert start <= span.inner_start < span.inner_end <= end


@pytest.mark.parametrize("domain", list(DOMAINS.values()), ids=lambda d: d.name)
def test_community_objects(domain: Domain) -> None:
    statements = community_objects_sql(domain, NINETY_DAYS)
    text = "\n".join(statements)
    table = domain.table
    for rollup in ROLLUPS:
        view = f"{table}_{rollup.suffix}"
        create = next(
            s for s in statements if s.startswith(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view} ")
        )
        assert "timescaledb.continuous" in create
        assert "timescaledb.materialized_only = false" in create
        assert create.endswith("WITH NO DATA")
        assert f"time_bucket({interval_sql(rollup.width)}, ts) AS bucket, device_id" in create
        assert "GROUP BY bucket, device_id" in create
        for metric in domain.metrics:
            c = metric.column
            for part in (f"sum({c}) AS {c}_sum", f"count({c}) AS {c}_count", f"min({c}) AS {c}_min"):
                assert part in create
            assert f"max({c}) AS {c}_max" in create
            assert f"last({c}, CASE WHEN {c} IS NOT NULL THEN ts END) AS {c}_last" in create
        assert create.count(" AS ") == 1 + 5 * len(domain.metrics)  # the bucket, then each field
        policy = next(
            s for s in statements if s.startswith(f"SELECT add_continuous_aggregate_policy('{view}'")
        )
        assert "if_not_exists => true" in policy
        # Backfilled readings of any age still kept reach the aggregate at its next refresh.
        assert f"start_offset => {interval_sql(NINETY_DAYS)}" in policy
        assert f"end_offset => {interval_sql(rollup.refresh_lag)}" in policy
        assert f"schedule_interval => {interval_sql(rollup.refresh_every)}" in policy
        # A changed window or schedule replaces the policy: remove only where one differs.
        replace = next(
            s for s in statements if s.startswith(f"SELECT remove_continuous_aggregate_policy('{view}'")
        )
        assert f"c.view_name = '{view}'" in replace
        assert f"(j.config ->> 'start_offset')::interval <> {interval_sql(NINETY_DAYS)}" in replace
        assert statements.index(replace) < statements.index(policy)
        kept = interval_sql(NINETY_DAYS * rollup.retention_factor)
        assert (
            f"SELECT add_retention_policy('{view}', drop_after => {kept}, if_not_exists => true)"
            in statements
        )
        assert rollup.retention_factor > 1
    assert (
        f"ALTER TABLE {table} SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_id'" in text
    )
    assert "timescaledb.compress_orderby = 'ts DESC'" in text
    assert f"hypertable_name = '{table}' AND compression_enabled" in text
    compression = f"SELECT add_compression_policy('{table}', compress_after => INTERVAL '7 days'"
    assert f"{compression}, if_not_exists => true)" in statements
    assert (
        f"SELECT add_retention_policy('{table}', drop_after => INTERVAL '90 days', if_not_exists => true)"
        in statements
    )
    # A changed retention replaces the policy: remove only where the horizon differs.
    assert f"SELECT remove_retention_policy('{table}', if_exists => true)" in text
    assert "(j.config ->> 'drop_after')::interval <> INTERVAL '90 days'" in text
    # Aggregates exist before the statements that name them.
    first_create = min(i for i, s in enumerate(statements) if s.startswith("CREATE MATERIALIZED VIEW"))
    first_policy = min(i for i, s in enumerate(statements) if "policy(" in s)
    assert first_create < first_policy


def test_a_changed_compression_age_replaces_the_policy() -> None:
    statements = community_objects_sql(DOMAINS["water"], NINETY_DAYS, timedelta(days=3))
    replace = next(s for s in statements if s.startswith("SELECT remove_compression_policy('readings_water'"))
    assert "(j.config ->> 'compress_after')::interval <> INTERVAL '3 days'" in replace
    policy = "SELECT add_compression_policy('readings_water', compress_after => INTERVAL '3 days'"
    assert f"{policy}, if_not_exists => true)" in statements
    assert statements.index(replace) < statements.index(f"{policy}, if_not_exists => true)")


def test_refresh_never_reaches_past_the_retention() -> None:
    statements = community_objects_sql(DOMAINS["flood"], timedelta(days=1))
    policies = [s for s in statements if s.startswith("SELECT add_continuous_aggregate_policy")]
    assert len(policies) == len(ROLLUPS)
    for rollup, policy in zip(reversed(ROLLUPS), policies, strict=True):
        # The retention, or the three buckets a policy needs at least.
        window = "INTERVAL '3 days'" if rollup.suffix == "1d" else "INTERVAL '1 day'"
        assert f"SELECT add_continuous_aggregate_policy('readings_flood_{rollup.suffix}'" in policy
        assert f"start_offset => {window}" in policy


def test_tier_objects() -> None:
    domain = DOMAINS["grid"]
    assert tier_objects_sql(StorageTier.COMMUNITY, domain, NINETY_DAYS) == community_objects_sql(
        domain, NINETY_DAYS
    )
    assert tier_objects_sql(StorageTier.APACHE, domain, NINETY_DAYS) == []
    assert tier_objects_sql(StorageTier.POSTGRES, domain, NINETY_DAYS) == [
        "CREATE INDEX IF NOT EXISTS readings_grid_ts_brin ON readings_grid USING brin (ts)"
    ]


@pytest.mark.parametrize("agg", AGGREGATES)
def test_series_sql(agg: str) -> None:
    domain = DOMAINS["traffic"]
    metric = domain.metric("averageVehicleSpeed")
    assert metric is not None
    timescale = series_sql(StorageTier.APACHE, domain, metric, agg)  # type: ignore[arg-type]
    postgres = series_sql(StorageTier.POSTGRES, domain, metric, agg)  # type: ignore[arg-type]
    epoch = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"
    assert f"time_bucket($1::interval, ts, {epoch}) AS t" in timescale
    assert f"date_bin($1::interval, ts, {epoch}) AS t" in postgres
    for sql in (timescale, postgres):
        assert "FROM readings_traffic WHERE device_id = $2 AND ts >= $3 AND ts < $4" in sql
        assert "average_vehicle_speed IS NOT NULL" in sql
        assert set(re.findall(r"\$\d", sql)) == {"$1", "$2", "$3", "$4"}
        assert sql.endswith("GROUP BY t ORDER BY t")
    if agg == "last":
        assert "last(average_vehicle_speed, ts)" in timescale
        assert "array_agg(average_vehicle_speed ORDER BY ts DESC)" in postgres
        assert "last(" not in postgres


@pytest.mark.parametrize("agg", AGGREGATES)
def test_rollup_series_sql(agg: str) -> None:
    domain = DOMAINS["water"]
    metric = domain.metric("pH")
    assert metric is not None
    for rollup in ROLLUPS:
        sql = rollup_series_sql(domain, metric, agg, rollup)  # type: ignore[arg-type]
        assert (
            f"FROM readings_water_{rollup.suffix} WHERE device_id = $2 AND bucket >= $5 AND bucket < $6"
            in sql
        )
        assert "FROM unnest($3::timestamptz[], $4::timestamptz[]) AS w (lo, hi)" in sql
        assert "WHERE device_id = $2 AND ts >= w.lo AND ts < w.hi AND ph IS NOT NULL" in sql
        assert "NOT EXISTS (SELECT 1 FROM unnest($7::timestamptz[], $8::timestamptz[]) AS s (lo, hi)" in sql
        assert "ph_count > 0" in sql
        assert "time_bucket($1::interval, at, TIMESTAMPTZ '1970-01-01 00:00:00+00')" in sql
    sql = rollup_series_sql(domain, metric, agg, ROLLUPS[0])  # type: ignore[arg-type]
    combined = {
        "avg": "sum(a) / sum(b)::float8",
        "min": "min(a)",
        "max": "max(a)",
        "count": "sum(b)::float8",
        "last": "last(a, at)",
    }[agg]
    assert f"{combined} AS value" in sql


def test_retention_sql() -> None:
    domain = DOMAINS["waste"]
    for tier in (StorageTier.COMMUNITY, StorageTier.APACHE):
        assert retention_sql(tier, domain) == (
            "SELECT count(*) AS n FROM drop_chunks('readings_waste', older_than => now() - $1::interval)"
        )
    delete = retention_sql(StorageTier.POSTGRES, domain)
    assert delete.startswith("DELETE FROM readings_waste WHERE ctid = ANY (ARRAY(")
    assert "ts < now() - $1::interval LIMIT $2" in delete


def test_rollup_query_is_the_view_body() -> None:
    domain = DOMAINS["flood"]
    for rollup in ROLLUPS:
        query = rollup_query_sql(domain, rollup)
        create = f"CREATE MATERIALIZED VIEW IF NOT EXISTS {rollup.view(domain)} "
        statement = next(s for s in community_objects_sql(domain, NINETY_DAYS) if s.startswith(create))
        assert query in statement


def test_retention_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOC_RETENTION_DAYS", raising=False)
    monkeypatch.delenv("IOC_RETENTION_CHECK_S", raising=False)
    settings = Settings()
    assert (settings.retention_days, settings.retention_check_s) == (90, 3600)
    assert settings.compress_after_days == 7
    monkeypatch.setenv("IOC_RETENTION_DAYS", "30")
    monkeypatch.setenv("IOC_RETENTION_CHECK_S", "600")
    assert (Settings().retention_days, Settings().retention_check_s) == (30, 600)
    monkeypatch.setenv("IOC_RETENTION_DAYS", "0")
    with pytest.raises(ValueError):
        Settings()


def test_validation_error_is_not_retriable() -> None:
    assert issubclass(ValidationError, IocError)
    assert ValidationError("x").retriable is False


def test_migrations_are_appended_in_order() -> None:
    versions = [version for version, _ in MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    sql = dict(MIGRATIONS)[6]
    # The remembered seqs gain a digest of the values in their key; deliveries are remembered apart.
    assert "ADD PRIMARY KEY (device_id, seq, digest)" in sql
    assert "CREATE TABLE reading_deliveries" in sql


@pytest.mark.parametrize("domain", list(DOMAINS.values()), ids=lambda d: d.name)
def test_readings_merge_keeps_the_first_value_of_every_metric(domain: Domain) -> None:
    staging = _STAGING[domain.name]
    columns = [m.column for m in domain.metrics]
    assert staging.metric_columns == tuple(columns)
    assignments = re.findall(r"(\w+) = coalesce\(t\.(\w+), u\.(\w+)\)", staging.merge_sql)
    assert assignments == [(c, c, c) for c in columns]
    assert staging.merge_sql.count(" = ") == len(columns) + 2  # the assignments and the key match
    assert f"${2 + len(columns)}::float8[]" in staging.merge_sql
    assert all(f"t.{c} IS NOT NULL" in staging.present_sql for c in columns)
    assert "ON CONFLICT DO NOTHING" in staging.move_sql


def test_stored_readings_are_one_per_instant_with_what_was_stored() -> None:
    def reading(device: str, seconds: int, **metrics: float) -> Reading:
        return Reading(device, "c", "water", T0 + timedelta(seconds=seconds), None, metrics, T0)

    first, second, repeat, other = (
        reading("a", 0, pressure=1.0),
        reading("a", 0, flow=2.0, pressure=9.0),
        reading("a", 0, pressure=1.0),
        reading("b", 5, pressure=3.0),
    )
    stored = stored_readings(
        [(first, 1), (second, 1), (repeat, 1), (other, 4)],
        [first.metrics, {"flow": 2.0}, {}, other.metrics],
    )
    assert [(r.device_id, r.metrics, p) for r, p in stored] == [
        ("a", {"pressure": 1.0, "flow": 2.0}, 1),
        ("b", {"pressure": 3.0}, 4),
    ]
    assert stored[1][0] is other  # stored whole: not copied


def test_a_series_scan_is_counted_when_the_sample_holds_every_reading() -> None:
    sample = ScanSample(rows=400, newest_span_s=3600, oldest_span_s=3600)
    ten_years = (T0 - timedelta(days=3650), T0)
    assert series_scan_estimate(sample, *ten_years, None, SCAN_SAMPLE_ROWS) == 400


def test_a_series_scan_is_estimated_from_the_denser_end_of_the_range() -> None:
    # 1000 readings a minute apart at the newest end, ten seconds apart at the oldest.
    sample = ScanSample(rows=SCAN_SAMPLE_ROWS, newest_span_s=999 * 60, oldest_span_s=999 * 10)
    day = (T0 - timedelta(days=1), T0)
    assert series_scan_estimate(sample, *day, None, SCAN_SAMPLE_ROWS) == 8640
    assert sample.readings_per_s() == pytest.approx(0.1)


def test_an_aggregate_serving_a_series_reads_its_rows_and_the_edges() -> None:
    sample = ScanSample(rows=SCAN_SAMPLE_ROWS, newest_span_s=999.0, oldest_span_s=999.0)  # 1 a second
    start, end = T0 - timedelta(days=30), T0
    span = rollup_span(timedelta(hours=1), start, end)
    assert span is not None and span.rollup.width == timedelta(hours=1)
    edges_s = ((span.inner_start - start) + (end - span.inner_end)).total_seconds()
    assert series_scan_estimate(sample, start, end, span, SCAN_SAMPLE_ROWS) == 30 * 24 - 1 + edges_s


def test_scan_sample_sql_reads_both_ends_of_the_range() -> None:
    sql = scan_sample_sql(DOMAINS["flood"])
    assert "ORDER BY ts DESC LIMIT $4" in sql and "ORDER BY ts LIMIT $4" in sql
    assert sql.count("device_id = $1 AND ts >= $2 AND ts < $3") == 2


def test_read_windows_read_stale_rollup_buckets_from_the_readings() -> None:
    minute = timedelta(minutes=1)
    start, end = T0, T0 + timedelta(hours=2)
    span = rollup_span(minute, start, end)
    assert span is not None and span.rollup.suffix == "1m"
    us = unix_microseconds
    # Nothing stale: the two partial minutes at the ends only.
    windows, stale = read_windows(span, start, end, [])
    assert stale == []
    assert windows == [(start, span.inner_start), (span.inner_end, end)]
    # A late reading (one instant, as the hypertable's log has it) makes its minute stale; a range
    # beyond the span (above the watermark, to "infinity") is clipped to it; touching ones merge.
    late = span.inner_start + timedelta(minutes=10, seconds=7)
    watermark = span.inner_start + timedelta(minutes=90)
    windows, stale = read_windows(
        span,
        start,
        end,
        [
            (us(late), us(late)),
            (us(watermark), 2**63 - 1),
            (us(late + minute), us(late + minute)),
            (-(2**63), us(span.inner_start) - 1),  # before the span: nothing
        ],
    )
    late_minute = floor_to(late, minute)
    assert stale == [(late_minute, late_minute + 2 * minute), (watermark, span.inner_end)]
    assert windows == [(start, span.inner_start), (span.inner_end, end), *stale]
    # Unix microseconds: the internal time of TimescaleDB's invalidation logs.
    assert us(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)) == 1_000_000


def test_stale_rollup_sql_reads_both_invalidation_logs() -> None:
    sql = stale_rollup_sql()
    assert "_timescaledb_catalog.continuous_aggs_hypertable_invalidation_log" in sql
    assert "_timescaledb_catalog.continuous_aggs_materialization_invalidation_log" in sql
    assert sql.count("l.greatest_modified_value >= $3 AND l.lowest_modified_value < $4") == 2


def test_an_aggregate_is_estimated_at_no_more_rows_than_readings() -> None:
    # Three readings in ten years: a daily series reads at most three rollup rows, not 3,650.
    sample = ScanSample(rows=3, newest_span_s=60.0, oldest_span_s=60.0)
    start, end = T0 - timedelta(days=3650), T0
    span = rollup_span(timedelta(days=1), start, end)
    assert span is not None
    assert series_scan_estimate(sample, start, end, span, 1000) == 3 + 3


def test_the_reader_is_granted_only_what_it_lacks_and_only_measurements() -> None:
    community = reader_role_sql(StorageTier.COMMUNITY)
    assert "has_table_privilege('ioc_reader', relation, 'SELECT')" in community
    assert "'readings_water_1d'" in community and "'devices'" in community
    for secret in ("api_keys", "webhook", "audit_log", "outbox", "detector_state"):
        assert secret not in community
    assert "'readings_water_1m'" not in reader_role_sql(StorageTier.APACHE)
    assert "WHEN insufficient_privilege THEN" in community
