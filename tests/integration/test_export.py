"""History exports against the real services: `GET /v1/export` of a day of a city's water readings
read back as CSV and as Parquet, per reading and in buckets, against the readings written; the
requests it refuses; what a key limited to another city or domain gets; the limit on exports
running at once; `ioc export`; and the storage's export generator on the three storage tiers
(each in a fresh database of its own), chunked, closed early and cut off midway.

The readings are written through the storage API directly (as a processor writes them), to a day
two days back, in devices of two cities of this module's own.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import pty
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pyarrow.parquet as pq
import pytest

from ioc_core.areas import parse_feature
from ioc_core.domains import DOMAINS
from ioc_core.errors import IocError, ValidationError
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, StorageTier, TelemetryBatch
from ioc_core.storage.tiers import floor_to
from ioc_core.telemetry import Reading
from tests.integration.conftest import (
    ADMIN_HEADERS,
    TIER_SERVERS,
    System,
    free_port,
    scratch_database,
)
from tests.integration.harness import ComponentProcess, unique, wait_until

DOMAIN = DOMAINS["water"]
METRICS = [m.name for m in DOMAIN.metrics]
HANOI = timezone(timedelta(hours=7))
CITY_A = unique("export-a")[:32]
CITY_B = unique("export-b")[:32]
STEP = timedelta(minutes=10)
PROBLEM = "application/problem+json"


@dataclass(frozen=True)
class Day:
    """A day of readings (midnight to midnight in Hà Nội) of devices in two cities, and a few
    readings just outside it."""

    start: datetime
    end: datetime
    devices: dict[str, list[str]]  # by city
    readings: list[Reading]

    def params(self, **extra: str) -> dict[str, str]:
        return {"domain": DOMAIN.name, "from": self.start.isoformat(), "to": self.end.isoformat(), **extra}


def _make_day(prefix: str) -> Day:
    start = datetime.combine(datetime.now(HANOI).date() - timedelta(days=2), datetime.min.time(), HANOI)
    end = start + timedelta(days=1)
    devices = {CITY_A: [f"{prefix}-a{n}" for n in (1, 2, 3)], CITY_B: [f"{prefix}-b{n}" for n in (1, 2)]}
    rng = random.Random(prefix)
    readings: list[Reading] = []
    for city, ids in devices.items():
        for number, device_id in enumerate(ids):
            # Devices 1 and 2 of a city report at the same instants, so the order between them is
            # the device's; device 3 a little later.
            offset = timedelta(microseconds=123_457) if number == 2 else timedelta(0)
            instants = [start + i * STEP + offset for i in range(144)]
            instants += [start - timedelta(seconds=1), end]  # outside the half-open day
            for index, ts in enumerate(instants):
                metrics = {"pressure": rng.uniform(2, 5), "flow": rng.uniform(50, 400), "batteryLevel": 0.9}
                if index % 3 == 0:  # a metric only some readings carry
                    metrics["turbidity"] = round(rng.uniform(0.4, 1.2), 3)
                if number != 2:  # and one a device never measures
                    metrics["pH"] = rng.uniform(6.5, 8.5)
                readings.append(
                    Reading(
                        device_id=device_id,
                        city=city,
                        domain=DOMAIN.name,
                        ts=ts.astimezone(UTC),
                        seq=index,
                        metrics=metrics,
                        received_at=ts.astimezone(UTC),
                    )
                )
    return Day(start, end, devices, readings)


def expected_rows(day: Day, cities: Sequence[str], metrics: Sequence[str] = METRICS) -> list[tuple[Any, ...]]:
    devices = {d for city in cities for d in day.devices[city]}
    rows = [
        (r.ts, r.device_id, *(r.metrics.get(m) for m in metrics))
        for r in day.readings
        if r.device_id in devices and day.start <= r.ts < day.end
    ]
    return sorted(rows, key=lambda row: (row[0], row[1]))


def expected_buckets(
    day: Day, cities: Sequence[str], width: timedelta, metrics: Sequence[str] = METRICS
) -> list[tuple[Any, ...]]:
    devices = {d for city in cities for d in day.devices[city]}
    groups: dict[tuple[datetime, str], list[Reading]] = {}
    for r in day.readings:
        if r.device_id in devices and day.start <= r.ts < day.end:
            groups.setdefault((floor_to(r.ts, width), r.device_id), []).append(r)
    rows = []
    for (bucket, device_id), readings in sorted(groups.items()):
        row: list[Any] = [bucket, device_id, len(readings)]
        for metric in metrics:
            values = [r.metrics[metric] for r in readings if metric in r.metrics]
            row += [sum(values) / len(values), min(values), max(values)] if values else [None] * 3
        rows.append(tuple(row))
    return rows


def assert_rows_equal(got: Sequence[Sequence[Any]], expected: Sequence[Sequence[Any]]) -> None:
    """Exactly equal, except averages, which the database sums in its own order."""
    assert len(got) == len(expected)
    for got_row, expected_row in zip(got, expected, strict=True):
        assert len(got_row) == len(expected_row)
        for value, wanted in zip(got_row, expected_row, strict=True):
            if isinstance(wanted, float):
                assert value == pytest.approx(wanted, rel=1e-12), (got_row, expected_row)
            else:
                assert value == wanted, (got_row, expected_row)


def parse_csv(data: bytes) -> tuple[list[str], list[tuple[Any, ...]]]:
    header, *lines = list(csv.reader(io.StringIO(data.decode())))

    def typed(name: str, text: str) -> Any:
        if name in ("ts", "bucket"):
            return datetime.fromisoformat(text)
        if name == "device_id":
            return text
        if name == "readings":
            return int(text)
        return float(text) if text else None

    return header, [tuple(typed(n, t) for n, t in zip(header, line, strict=True)) for line in lines]


def parse_parquet(data: bytes) -> tuple[list[str], list[tuple[Any, ...]]]:
    table = pq.read_table(io.BytesIO(data))
    return table.column_names, [tuple(row.values()) for row in table.to_pylist()]


def bucket_header(metrics: Sequence[str] = METRICS) -> list[str]:
    return ["bucket", "device_id", "readings", *(f"{m}_{s}" for m in metrics for s in ("avg", "min", "max"))]


async def _write(database: Database, day: Day) -> None:
    result = await database.write_batch(TelemetryBatch(records=[(r, 0) for r in day.readings]))
    assert result.stored == len(day.readings)


@pytest.fixture(scope="module")
async def day(system: System) -> AsyncIterator[Day]:
    """The day's devices registered through the API and its readings stored."""
    made = _make_day(unique("exp"))
    async with httpx.AsyncClient(base_url=system.api_url, headers=ADMIN_HEADERS, timeout=10) as admin:
        for city, ids in made.devices.items():
            for device_id in ids:
                body = {
                    "id": device_id,
                    "city": city,
                    "domain": DOMAIN.name,
                    "location": {"lat": 21.03, "lon": 105.85},
                }
                response = await admin.post("/v1/devices", json=body)
                assert response.status_code == 201, response.text
    async with Database(system.database_url, max_size=2) as database:
        await _write(database, made)
    yield made


@pytest.fixture
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=system.api_url, headers=ADMIN_HEADERS, timeout=30) as client:
        yield client


async def _viewer(api: httpx.AsyncClient, **scope: list[str]) -> dict[str, str]:
    response = await api.post("/v1/api-keys", json={"role": "viewer", "name": "export planner", **scope})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


# -- over HTTP ----------------------------------------------------------------------------------


async def test_a_days_readings_as_csv(api: httpx.AsyncClient, day: Day) -> None:
    response = await api.get("/v1/export", params=day.params(city=CITY_A))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    start = day.start.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    end = day.end.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    assert response.headers["content-disposition"] == (
        f'attachment; filename="{CITY_A}-water-{start}-{end}.csv"'
    )
    header, rows = parse_csv(response.content)
    assert header == ["ts", "device_id", *METRICS]
    expected = expected_rows(day, [CITY_A])
    assert len(expected) == 3 * 144
    # Exact: times to the microsecond, every float as stored, empty where a reading lacks one.
    assert rows == expected
    assert response.text.splitlines()[1].split(",")[0].endswith("Z")


async def test_a_days_readings_as_parquet(api: httpx.AsyncClient, day: Day) -> None:
    response = await api.get("/v1/export", params=day.params(city=CITY_A, format="parquet"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    assert response.headers["content-disposition"].endswith('.parquet"')
    # Already compressed: the API does not gzip it again.
    assert "content-encoding" not in response.headers
    columns, rows = parse_parquet(response.content)
    assert columns == ["ts", "device_id", *METRICS]
    assert rows == expected_rows(day, [CITY_A])
    table = pq.read_table(io.BytesIO(response.content))
    assert str(table.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert table.column("pH").null_count == 144


@pytest.mark.parametrize("export_format", ["csv", "parquet"])
@pytest.mark.parametrize("bucket", ["1h", "1d"])
async def test_a_day_in_buckets(api: httpx.AsyncClient, day: Day, export_format: str, bucket: str) -> None:
    metrics = ["flow", "pH"]
    params = day.params(city=CITY_A, bucket=bucket, format=export_format, metrics=",".join(metrics))
    response = await api.get("/v1/export", params=params)
    assert response.status_code == 200, response.text
    parse = parse_csv if export_format == "csv" else parse_parquet
    header, rows = parse(response.content)
    assert header == bucket_header(metrics)
    width = timedelta(hours=1) if bucket == "1h" else timedelta(days=1)
    expected = expected_buckets(day, [CITY_A], width, metrics)
    # Buckets are aligned to the epoch in UTC: Hà Nội's day spans two days in UTC.
    assert len(expected) == 3 * (24 if bucket == "1h" else 2)
    assert_rows_equal(rows, expected)


async def test_chosen_metrics_in_the_order_asked(api: httpx.AsyncClient, day: Day) -> None:
    response = await api.get("/v1/export", params=day.params(city=CITY_A, metrics="turbidity,pressure"))
    header, rows = parse_csv(response.content)
    assert header == ["ts", "device_id", "turbidity", "pressure"]
    assert rows == expected_rows(day, [CITY_A], ["turbidity", "pressure"])


@pytest.mark.parametrize(
    ("change", "status", "detail"),
    [
        ({"metrics": "pressure,currentLevel"}, 400, "'currentLevel' is not a metric of the water domain"),
        ({"from": "2026-11-21T00:00:00+07:00", "to": "2026-11-20T00:00:00+07:00"}, 400, "before `to`"),
        ({"from": "2025-11-20T00:00:00+07:00", "to": "2026-11-22T00:00:00+07:00"}, 400, "at most 366 days"),
        ({"format": "xlsx"}, 400, "format must be csv or parquet"),
        ({"from": "2026-11-20T00:00:00"}, 400, "`from` must be RFC 3339 with an offset"),
        ({"bucket": "1w"}, 400, "bucket must be"),
        ({"cty": CITY_A}, 400, "unknown query parameter cty"),
        ({"from": "1969-12-31T00:00:00Z"}, 400, "years 1970 to 2200"),
        ({"domain": "sewage"}, 422, "not valid"),
    ],
)
async def test_bad_requests_are_refused(
    api: httpx.AsyncClient, day: Day, change: dict[str, str], status: int, detail: str
) -> None:
    response = await api.get("/v1/export", params={**day.params(city=CITY_A), **change})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    assert detail in response.json()["detail"]


async def test_a_key_sees_only_its_scope(api: httpx.AsyncClient, day: Day) -> None:
    async with httpx.AsyncClient(
        base_url=str(api.base_url), headers=await _viewer(api, cities=[CITY_B]), timeout=30
    ) as city_b:
        # Another city's readings: nothing, as in every list the key reads.
        response = await city_b.get("/v1/export", params=day.params(city=CITY_A))
        assert response.status_code == 200
        assert parse_csv(response.content) == (["ts", "device_id", *METRICS], [])
        assert response.headers["content-disposition"].startswith(f'attachment; filename="{CITY_A}-')
        # No city: every city of its scope, which is its own.
        response = await city_b.get("/v1/export", params=day.params(format="parquet"))
        assert parse_parquet(response.content)[1] == expected_rows(day, [CITY_B])
    async with httpx.AsyncClient(
        base_url=str(api.base_url), headers=await _viewer(api, domains=["flood"]), timeout=30
    ) as flood_only:
        response = await flood_only.get("/v1/export", params=day.params(city=CITY_A))
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM
        assert "not within this key's scope" in response.json()["detail"]


async def test_exports_at_once_are_limited_per_api_process(system: System, day: Day, log_dir: Path) -> None:
    """One export held up by a lock on the readings holds the only slot: another is a 429, and
    once the first ends the slot is free again."""
    env = {**system.env, "IOC_API_PORT": str(free_port()), "IOC_API_MAX_EXPORTS": "1"}
    process = ComponentProcess("api", env, log_dir, name="api-one-export")
    process.start()
    locker = await asyncpg.connect(system.database_url)
    watcher = await asyncpg.connect(system.database_url)
    try:
        await process.wait_for_log("API listening")
        url = f"http://127.0.0.1:{env['IOC_API_PORT']}"
        async with httpx.AsyncClient(base_url=url, headers=ADMIN_HEADERS, timeout=30) as client:
            transaction = locker.transaction()
            await transaction.start()
            try:
                await locker.execute(f"LOCK TABLE {DOMAIN.table} IN ACCESS EXCLUSIVE MODE")
                first = asyncio.create_task(client.get("/v1/export", params=day.params(city=CITY_A)))

                async def waiting_on_the_lock() -> bool | None:
                    # Not through `locker`: a transaction sees the activity of its first look.
                    waiting = await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND query LIKE $1",
                        f"%FROM {DOMAIN.table} r%",
                    )
                    return True if waiting else None

                await wait_until(waiting_on_the_lock, timeout=10, what="the export to wait on the lock")
                refused = await client.get("/v1/export", params=day.params(city=CITY_B))
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "5"
                assert refused.headers["content-type"] == PROBLEM
                assert "at most 1 exports at once" in refused.json()["detail"]
            finally:
                await transaction.rollback()
            response = await first
            assert response.status_code == 200
            assert parse_csv(response.content)[1] == expected_rows(day, [CITY_A])
            again = await client.get("/v1/export", params=day.params(city=CITY_B))
            assert again.status_code == 200
            assert parse_csv(again.content)[1] == expected_rows(day, [CITY_B])
        await process.wait_for_log(f"{len(expected_rows(day, [CITY_B]))} rows,", timeout=10)
        line = re.search(
            rf"export of water in {CITY_A} from .* by key 'admin': (\d+) rows, (\d+) bytes in ",
            process.log_text(),
        )
        assert line is not None, process.tail()
        assert int(line.group(1)) == 3 * 144
        assert int(line.group(2)) == len(response.content)
    finally:
        await locker.close()
        await watcher.close()
        process.stop()


def _ioc_export(system: System, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ioc.cli", "export", *args],
        env=system.env,
        capture_output="stdout" not in kwargs,
        timeout=120,
        check=False,
        **kwargs,
    )


def _files(directory: Path) -> list[str]:
    """What a directory holds: a failed export leaves nothing, a whole one no partial file."""
    return sorted(p.name for p in directory.iterdir())


def _cli_range(day: Day) -> list[str]:
    return ["--domain", DOMAIN.name, "--from", day.start.isoformat(), "--to", day.end.isoformat()]


async def test_ioc_export_writes_a_file(
    api: httpx.AsyncClient, system: System, day: Day, tmp_path: Path
) -> None:
    out = tmp_path / "day.csv"
    done = _ioc_export(system, *_cli_range(day), "--city", CITY_A, "--out", str(out))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode().strip().endswith(f"ioc export: {3 * 144} rows")
    # The same bytes as the API's.
    response = await api.get("/v1/export", params=day.params(city=CITY_A))
    assert out.read_bytes() == response.content
    assert _files(tmp_path) == [out.name]

    out = tmp_path / "day.parquet"
    done = _ioc_export(
        system, *_cli_range(day), "--city", CITY_B, "--bucket", "1h", "--format", "parquet", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr.decode()
    header, rows = parse_parquet(out.read_bytes())
    assert header == bucket_header()
    assert_rows_equal(rows, expected_buckets(day, [CITY_B], timedelta(hours=1)))

    # To standard output, CSV by default.
    done = _ioc_export(system, *_cli_range(day), "--city", CITY_B, "--metrics", "flow")
    assert done.returncode == 0, done.stderr.decode()
    assert parse_csv(done.stdout) == (["ts", "device_id", "flow"], expected_rows(day, [CITY_B], ["flow"]))


async def test_ioc_export_refusals_are_one_line(system: System, day: Day, tmp_path: Path) -> None:
    out = tmp_path / "none.csv"
    done = _ioc_export(system, *_cli_range(day), "--metrics", "flow,depth", "--out", str(out))
    assert done.returncode == 1
    assert done.stderr.decode().strip() == (
        "ioc export: 'depth' is not a metric of the water domain; known: " + ", ".join(METRICS)
    )
    assert _files(tmp_path) == []
    # Parquet is binary: not to a terminal.
    controller, terminal = pty.openpty()
    try:
        done = _ioc_export(
            system, *_cli_range(day), "--format", "parquet", stdout=terminal, stderr=subprocess.PIPE
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == 2
    assert b"give --out FILE" in done.stderr


# -- the storage's export on each tier ---------------------------------------------------------

SERVERS = TIER_SERVERS


@dataclass
class TierDay:
    tier: StorageTier
    url: str
    db: Database
    day: Day


@pytest.fixture(scope="module", params=list(SERVERS), ids=str)
async def tier_day(request: pytest.FixtureRequest) -> AsyncIterator[TierDay]:
    tier: StorageTier = request.param
    server = SERVERS[tier]
    async with scratch_database(server) as url, Database(url, max_size=2) as db:
        offered = await db.migrate()
        if offered is not tier and not (tier is StorageTier.COMMUNITY and offered is StorageTier.APACHE):
            pytest.fail(f"the server at {server} offers the {offered} tier, not {tier}")
        made = _make_day("tier")
        here = Location(lat=21.0, lon=105.8)
        await db.devices.insert_many(
            [
                DeviceIn(id=device_id, city=city, domain=DOMAIN.name, location=here)
                for city, ids in made.devices.items()
                for device_id in ids
            ]
        )
        await _write(db, made)
        yield TierDay(offered, url, db, made)


async def _export(db: Database, day: Day, **options: Any) -> list[list[tuple[Any, ...]]]:
    chunks = []
    async for chunk in db.readings.export(domain=DOMAIN.name, start=day.start, end=day.end, **options):
        chunks.append(chunk)
    return chunks


async def test_storage_export_reads_in_chunks(tier_day: TierDay) -> None:
    day = tier_day.day
    chunks = await _export(tier_day.db, day, cities=[CITY_A], chunk_rows=100)
    assert [len(c) for c in chunks] == [100, 100, 100, 100, 32]
    assert [row for chunk in chunks for row in chunk] == expected_rows(day, [CITY_A])
    everything = await _export(tier_day.db, day, cities=None)
    assert [row for chunk in everything for row in chunk] == expected_rows(day, [CITY_A, CITY_B])
    assert await _export(tier_day.db, day, cities=[]) == []
    assert await _export(tier_day.db, day, cities=["nowhere"]) == []


@pytest.mark.parametrize("width", [timedelta(minutes=25), timedelta(hours=1), timedelta(days=1)])
async def test_storage_export_in_buckets(tier_day: TierDay, width: timedelta) -> None:
    day = tier_day.day
    chunks = await _export(
        tier_day.db, day, cities=[CITY_B, CITY_A], metrics=["turbidity", "pH"], bucket=width, chunk_rows=7
    )
    assert all(len(c) <= 7 for c in chunks)
    rows = [row for chunk in chunks for row in chunk]
    assert_rows_equal(rows, expected_buckets(day, [CITY_A, CITY_B], width, ["turbidity", "pH"]))


async def test_storage_export_checks_what_it_is_asked(tier_day: TierDay) -> None:
    day = tier_day.day
    with pytest.raises(ValidationError, match="'depth' is not a metric of the water domain"):
        await _export(tier_day.db, day, cities=None, metrics=["depth"])
    with pytest.raises(ValidationError, match="unknown domain"):
        await anext(tier_day.db.readings.export(domain="sewage", cities=None, start=day.start, end=day.end))


async def test_storage_export_closed_early_gives_its_connection_back(tier_day: TierDay) -> None:
    day = tier_day.day
    async with Database(tier_day.url, max_size=1) as db:
        rows = db.readings.export(
            domain=DOMAIN.name, cities=None, start=day.start, end=day.end, chunk_rows=10
        )
        assert len(await anext(rows)) == 10
        await rows.aclose()
        # The pool's only connection is free again, and out of the export's transaction.
        await asyncio.wait_for(db.ping(), 5)
        assert await db.readings.count() == len(day.readings)


async def test_storage_export_cut_off_midway_fails_retriably(tier_day: TierDay) -> None:
    day = tier_day.day
    async with Database(tier_day.url, max_size=1) as db:
        rows = db.readings.export(
            domain=DOMAIN.name, cities=None, start=day.start, end=day.end, chunk_rows=10
        )
        assert len(await anext(rows)) == 10
        connection = await asyncpg.connect(tier_day.url)
        try:
            killed = await connection.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND state = 'idle in transaction'"
            )
        finally:
            await connection.close()
        assert killed == 1
        with pytest.raises(IocError) as failure:
            async for _ in rows:
                pass
        assert failure.value.retriable
        await rows.aclose()
        await asyncio.wait_for(db.ping(), 10)


def test_the_day_orders_two_devices_at_one_instant_by_device() -> None:
    made = _make_day("check")
    first, second = expected_rows(made, [CITY_A])[:2]
    assert first[0] == second[0] == made.start
    assert (first[1], second[1]) == tuple(made.devices[CITY_A][:2])


async def test_storage_export_of_an_area(tier_day: TierDay) -> None:
    """Only the devices lying in the areas asked for; an area is its city's, so the other city's
    devices at the same place are not in it."""
    day, db = tier_day.day, tier_day.db
    around = [[105.79, 20.99], [105.81, 20.99], [105.81, 21.01], [105.79, 21.01], [105.79, 20.99]]
    await db.areas.put(
        parse_feature(
            {
                "type": "Feature",
                "id": "export-ward",
                "geometry": {"type": "Polygon", "coordinates": [around]},
                "properties": {"name_vi": "Phường xuất dữ liệu", "kind": "ward", "city": CITY_A},
            }
        )
    )
    rows = [row for chunk in await _export(db, day, cities=None, areas=["export-ward"]) for row in chunk]
    assert_rows_equal(rows, expected_rows(day, [CITY_A]))
    width = timedelta(hours=1)
    buckets = await _export(db, day, cities=[CITY_A, CITY_B], areas=["export-ward"], bucket=width)
    assert_rows_equal([row for chunk in buckets for row in chunk], expected_buckets(day, [CITY_A], width))
    assert await _export(db, day, cities=None, areas=["no-such-area"]) == []
