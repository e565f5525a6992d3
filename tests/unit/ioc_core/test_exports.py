"""History exports: what a request may ask, the SQL that reads them on each tier, and the CSV and
Parquet encoders fed chunk by chunk."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ioc_core.domains import DOMAINS
from ioc_core.errors import ValidationError
from ioc_core.exports import (
    CsvEncoder,
    ExportColumn,
    ParquetEncoder,
    check_range,
    choose_metrics,
    encoder,
    export_columns,
    file_name,
    parse_bucket,
    parse_format,
)
from ioc_core.storage import StorageTier
from ioc_core.storage.tiers import export_sql

WATER = DOMAINS["water"]
T0 = datetime(2026, 11, 20, 7, 59, tzinfo=UTC)
HANOI = timezone(timedelta(hours=7))


def _names(columns: list[ExportColumn]) -> list[str]:
    return [c.name for c in columns]


def test_every_metric_in_declared_order_by_default() -> None:
    assert choose_metrics(WATER, None) == WATER.metrics
    assert WATER.metrics[-1].name == "batteryLevel"


def test_chosen_metrics_keep_the_request_order_once() -> None:
    chosen = choose_metrics(WATER, "flow, pressure,flow,")
    assert [m.name for m in chosen] == ["flow", "pressure"]


def test_a_metric_the_domain_lacks_is_named() -> None:
    with pytest.raises(ValidationError, match="'currentLevel' is not a metric of the water domain"):
        choose_metrics(WATER, "pressure,currentLevel")
    with pytest.raises(ValidationError, match="at least one"):
        choose_metrics(WATER, " , ")


@pytest.mark.parametrize(
    ("text", "width"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("1d", timedelta(days=1)),
        ("90m", timedelta(minutes=90)),
    ],
)
def test_buckets_take_the_series_syntax(text: str, width: timedelta) -> None:
    assert parse_bucket(text) == width


@pytest.mark.parametrize("text", ["", "0s", "1w", "1.5h", "h", "-1h", "1 h", "1234567s"])
def test_other_buckets_are_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="bucket must be"):
        parse_bucket(text)


def test_formats() -> None:
    assert parse_format("csv") == "csv"
    assert parse_format("parquet") == "parquet"
    with pytest.raises(ValidationError, match="format must be csv or parquet, not 'xlsx'"):
        parse_format("xlsx")


def test_ranges_need_offsets_an_order_and_a_bound() -> None:
    check_range(T0, T0 + timedelta(days=366), 366)
    with pytest.raises(ValidationError, match="`from` must be RFC 3339 with an offset"):
        check_range(T0.replace(tzinfo=None), T0 + timedelta(hours=1))
    with pytest.raises(ValidationError, match="`to` must be RFC 3339 with an offset"):
        check_range(T0, (T0 + timedelta(hours=1)).replace(tzinfo=None))
    with pytest.raises(ValidationError, match="`from` must be before `to`"):
        check_range(T0, T0)
    with pytest.raises(ValidationError, match="at most 366 days"):
        check_range(T0, T0 + timedelta(days=366, seconds=1), 366)
    # Offsets count: the same instant written in two zones is no range at all.
    with pytest.raises(ValidationError, match="before"):
        check_range(T0.astimezone(HANOI), T0)


def test_columns_with_and_without_buckets() -> None:
    metrics = choose_metrics(WATER, "pressure,flow")
    assert _names(export_columns(metrics, bucketed=False)) == ["ts", "device_id", "pressure", "flow"]
    assert _names(export_columns(metrics, bucketed=True)) == [
        "bucket",
        "device_id",
        "readings",
        "pressure_avg",
        "pressure_min",
        "pressure_max",
        "flow_avg",
        "flow_min",
        "flow_max",
    ]


def test_file_names_are_in_utc_without_colons() -> None:
    start = datetime(2026, 11, 20, tzinfo=HANOI)
    assert (
        file_name("ha-noi", "flood", start, start + timedelta(days=1), "csv")
        == "ha-noi-flood-20261119T170000Z-20261120T170000Z.csv"
    )
    assert file_name(None, "water", T0, T0 + timedelta(hours=1), "parquet").startswith("all-water-")


def _csv_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


def test_csv_header_first_then_rows_in_utc_with_empty_fields_for_absent_values() -> None:
    columns = export_columns(choose_metrics(WATER, "pressure,turbidity"), bucketed=False)
    encode = CsvEncoder(columns)
    first = [
        (T0, "hn-water-1", 3.25, None),
        (T0.astimezone(HANOI) + timedelta(microseconds=5), "hn-water-2", 0.1, 0.7),
    ]
    second = [(T0 + timedelta(seconds=1), "hn-water-1", 1 / 3, 1e-300)]
    data = encode.start() + encode.encode(first) + encode.encode(second) + encode.finish()
    assert data.startswith(b"ts,device_id,pressure,turbidity\r\n")
    assert _csv_rows(data) == [
        ["ts", "device_id", "pressure", "turbidity"],
        ["2026-11-20T07:59:00Z", "hn-water-1", "3.25", ""],
        ["2026-11-20T07:59:00.000005Z", "hn-water-2", "0.1", "0.7"],
        ["2026-11-20T07:59:01Z", "hn-water-1", repr(1 / 3), "1e-300"],
    ]
    # Every float reads back exactly.
    assert float(_csv_rows(data)[3][2]) == 1 / 3


def test_csv_of_nothing_is_its_header() -> None:
    encode = encoder("csv", export_columns(choose_metrics(WATER, "flow"), bucketed=True))
    assert encode.start() + encode.encode([]) + encode.finish() == (
        b"bucket,device_id,readings,flow_avg,flow_min,flow_max\r\n"
    )


def _bucket_rows(start: int, count: int) -> list[tuple[object, ...]]:
    return [
        (
            T0 + timedelta(hours=i),
            f"dev-{i % 3}",
            i + 1,
            float(i) if i % 4 else None,
            0.5 * i,
            2.0 * i,
        )
        for i in range(start, start + count)
    ]


def test_parquet_round_trip_one_row_group_per_chunk() -> None:
    columns = export_columns(choose_metrics(WATER, "flow"), bucketed=True)
    encode = ParquetEncoder(columns)
    chunks = [_bucket_rows(0, 7), _bucket_rows(7, 5), _bucket_rows(12, 1)]
    parts = [encode.start()]
    for chunk in chunks:
        part = encode.encode(chunk)
        # Each chunk's row group leaves with the chunk: nothing is held back for the end.
        assert len(part) > 100
        parts.append(part)
    footer = encode.finish()
    parts.append(footer)
    assert parts[0] == b"PAR1"
    assert footer.endswith(b"PAR1")
    parquet = pq.ParquetFile(io.BytesIO(b"".join(parts)))
    assert parquet.metadata.num_row_groups == 3
    assert [parquet.metadata.row_group(i).num_rows for i in range(3)] == [7, 5, 1]
    table = parquet.read()
    assert table.schema == pa.schema(
        [
            ("bucket", pa.timestamp("us", tz="UTC")),
            ("device_id", pa.string()),
            ("readings", pa.int64()),
            ("flow_avg", pa.float64()),
            ("flow_min", pa.float64()),
            ("flow_max", pa.float64()),
        ]
    )
    expected = [row for chunk in chunks for row in chunk]
    assert [tuple(row.values()) for row in table.to_pylist()] == expected
    assert table.column("flow_avg").null_count == 4


def test_parquet_times_are_utc_microseconds_whatever_their_offset() -> None:
    columns = export_columns(choose_metrics(WATER, "pressure"), bucketed=False)
    encode = ParquetEncoder(columns)
    moment = datetime(2026, 11, 20, 14, 59, 0, 123456, tzinfo=HANOI)
    data = encode.start() + encode.encode([(moment, "d", None)]) + encode.finish()
    row = pq.read_table(io.BytesIO(data)).to_pylist()[0]
    assert row == {"ts": moment.astimezone(UTC), "device_id": "d", "pressure": None}
    assert row["ts"].tzinfo is not None
    assert row["ts"].utcoffset() == timedelta(0)


def test_parquet_of_nothing_has_the_schema_and_no_rows() -> None:
    columns = export_columns(WATER.metrics, bucketed=False)
    encode = encoder("parquet", columns)
    data = encode.start() + encode.encode([]) + encode.finish()
    table = pq.read_table(io.BytesIO(data))
    assert table.num_rows == 0
    assert table.column_names == ["ts", "device_id", *(m.name for m in WATER.metrics)]


@pytest.mark.parametrize("tier", list(StorageTier))
def test_export_sql_per_reading(tier: StorageTier) -> None:
    metrics = choose_metrics(WATER, "flow,pressure")
    sql = export_sql(tier, WATER, metrics, bucketed=False, by_city=False)
    assert sql == (
        "SELECT r.ts, r.device_id, r.flow, r.pressure FROM readings_water r"
        " JOIN devices d ON d.id = r.device_id WHERE r.ts >= $1 AND r.ts < $2"
        " ORDER BY r.ts, r.device_id"
    )
    by_city = export_sql(tier, WATER, metrics, bucketed=False, by_city=True)
    assert "AND d.city = ANY($3::text[]) ORDER BY" in by_city


@pytest.mark.parametrize("tier", list(StorageTier))
def test_export_sql_in_buckets_aligned_to_the_epoch(tier: StorageTier) -> None:
    sql = export_sql(tier, WATER, choose_metrics(WATER, "batteryLevel"), bucketed=True, by_city=True)
    bucket_of = "time_bucket" if tier.has_hypertables else "date_bin"
    assert sql.startswith(
        f"SELECT {bucket_of}($3::interval, r.ts, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS bucket,"
        " r.device_id, count(*) AS readings, avg(r.battery_level), min(r.battery_level), max(r.battery_level)"
    )
    assert "AND d.city = ANY($4::text[])" in sql
    assert sql.endswith("GROUP BY bucket, r.device_id ORDER BY bucket, r.device_id")
    assert len(re.findall(r"\$\d", sql)) == 4
