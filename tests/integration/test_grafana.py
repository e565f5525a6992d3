"""The Grafana dashboards' queries against a real community TimescaleDB server, as the read-only
role the provisioned datasource connects as: every panel and variable runs, and the panels with
data show it; the role reads the measurements and nothing else."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ioc.grafana import DASHBOARDS_DIR
from ioc_core.domains import DOMAINS
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, StorageTier, TelemetryBatch
from ioc_core.storage.tiers import READER_ROLE, ROLLUPS
from ioc_core.telemetry import Reading
from tests.integration.conftest import POSTGRES_URL, scratch_database

CITY = "grafana-city"
HOURS = 6


def _reading(device_id: str, domain: str, ts: datetime, index: int) -> Reading:
    metrics = {
        metric.name: metric.minimum + (metric.maximum - metric.minimum) * (0.3 + 0.01 * (index % 7))
        for metric in DOMAINS[domain].metrics
    }
    return Reading(
        device_id=device_id, city=CITY, domain=domain, ts=ts, seq=index, metrics=metrics, received_at=ts
    )


@pytest.fixture(scope="module")
async def city_database() -> AsyncIterator[str]:
    async with scratch_database(POSTGRES_URL) as url:
        async with Database(url) as db:
            if await db.migrate(reader_password="reader-password-for-tests") is not StorageTier.COMMUNITY:
                pytest.skip("the dashboards read the community tier's rollups; the server lacks it")
            end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            readings = []
            for domain in DOMAINS:
                device_id = f"grafana-{domain}"
                await db.devices.insert(
                    DeviceIn(id=device_id, city=CITY, domain=domain, location=Location(lat=20.86, lon=106.68))
                )
                readings += [
                    _reading(device_id, domain, end - timedelta(minutes=10 * i), i)
                    for i in range(1, HOURS * 6)
                ]
            await db.write_batch(TelemetryBatch(records=[(r, 0) for r in readings]))
        connection = await asyncpg.connect(url)
        try:
            # One open alarm, for the alarms panel.
            await connection.execute(
                "INSERT INTO alarms (subject, device_id, city, domain, rule, metric, severity, started_at,"
                " last_seen_at, value, threshold, message_vi, message_en)"
                " VALUES ('grafana-flood', 'grafana-flood', $1, 'flood', 'threshold.currentLevel',"
                " 'currentLevel', 'high', now(), now(), 4.6, 4.5, 'Mực nước cao', 'Water level high')",
                CITY,
            )
            for domain in DOMAINS.values():
                for rollup in ROLLUPS:
                    await connection.execute(
                        f"CALL refresh_continuous_aggregate('{rollup.view(domain)}', NULL, NULL)"
                    )
        finally:
            await connection.close()
        yield url


def _expand(sql: str, domain: str) -> str:
    """What Grafana sends for a week up to now, with the variables chosen."""
    now = datetime.now(UTC)
    week = f"'{(now - timedelta(days=7)).isoformat()}' AND '{now.isoformat()}'"
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 BETWEEN {week}", sql)
    sql = sql.replace("$__interval_ms", "300000")
    sql = sql.replace("$city", CITY).replace("$domain", domain).replace("$device", f"grafana-{domain}")
    assert "$" not in sql, sql
    return sql


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, SQL) of every panel target and query variable."""
    queries = [(v["name"], v["query"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for panel in dashboard["panels"]:
        queries += [(panel["title"], target["rawSql"]) for target in panel.get("targets", [])]
    return queries


async def _as_reader(url: str) -> asyncpg.Connection:
    _, rest = url.split("://", 1)[1].split("@", 1)
    return await asyncpg.connect(f"postgresql://{READER_ROLE}:reader-password-for-tests@{rest}")


@pytest.mark.parametrize("file_name", ["city-overview.json", "device-series.json"])
async def test_every_dashboard_query_runs_as_the_read_only_role(city_database: str, file_name: str) -> None:
    dashboard = json.loads((DASHBOARDS_DIR / file_name).read_text(encoding="utf-8"))
    connection = await _as_reader(city_database)
    try:
        assert await connection.fetchval("SELECT current_user") == READER_ROLE
        for title, sql in _queries(dashboard):
            domain = next((d for d in DOMAINS if f"readings_{d}_" in sql), "water")
            rows = await connection.fetch(_expand(sql, domain))
            assert rows, f"{file_name}: {title!r} returned nothing"
    finally:
        await connection.close()


async def test_the_city_average_is_the_readings_average(city_database: str) -> None:
    dashboard = json.loads((DASHBOARDS_DIR / "city-overview.json").read_text(encoding="utf-8"))
    (title, sql) = next(
        q for q in _queries(dashboard) if "readings_water_1h" in q[1] and "Water pressure" in q[1]
    )
    connection = await _as_reader(city_database)
    try:
        panel = {r["time"]: r["Water pressure"] for r in await connection.fetch(_expand(sql, "water"))}
        raw = await connection.fetch(
            "SELECT time_bucket('1 hour', ts) AS hour, avg(pressure) AS pressure FROM readings_water"
            " GROUP BY hour ORDER BY hour"
        )
        assert panel == {r["hour"]: pytest.approx(r["pressure"], rel=1e-9) for r in raw}, title
    finally:
        await connection.close()


async def test_the_read_only_role_reads_no_keys_secrets_or_audit(city_database: str) -> None:
    connection = await _as_reader(city_database)
    try:
        for table in ("api_keys", "webhook_endpoints", "audit_log", "outbox", "detector_state"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.fetch(f"SELECT * FROM {table} LIMIT 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute("DELETE FROM devices")
    finally:
        await connection.close()
