"""One excursion, one alarm (real TimescaleDB): the threshold, rate and statistical findings about
one device's metric open, bump and resolve one alarm whose `reasons` list them; other rules stay
alarms of their own; processors racing on one excursion still leave one open alarm; and the
migration folds the open alarms of an older schema into one per excursion."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ioc_core.alarms import Finding
from ioc_core.events import Event
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database
from ioc_core.storage import migrations as migrations_module
from ioc_core.storage.schema import MIGRATIONS
from tests.integration.conftest import POSTGRES_URL, drop_database, ensure_database

CITY = "ha-noi"
DEVICE = "flood-excursion-1"
START = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)


def finding(
    rule: str, *, active: bool = True, severity: str | None = None, minute: int = 0, **extra: Any
) -> Finding:
    metric = rule.partition(".")[2] or None
    body: dict[str, Any] = {
        "subject": DEVICE,
        "device_id": DEVICE,
        "city": CITY,
        "domain": "flood",
        "district": "Hoàng Mai",
        "rule": rule,
        "metric": metric,
        "active": active,
        "severity": severity if active else None,
        "value": 3.2,
        "threshold": 3.0,
        "repeats": 1 if active else 0,
        "at": START + timedelta(minutes=minute),
        "message_vi": f"{rule} vi",
        "message_en": f"{rule} en",
    }
    body.update(extra)
    return Finding(**body)


async def apply(database: Database, *findings: Finding) -> list[Event]:
    async with database.transaction() as transaction:
        return await transaction.apply_findings(list(findings))


async def open_alarms(database: Database) -> list[dict[str, Any]]:
    alarms = await database.alarms.page(limit=100, states=["active", "acknowledged"], device_id=DEVICE)
    return [a.model_dump() for a in alarms]


@pytest.fixture
async def flood_database(fresh_database: Database) -> Database:
    location = Location(lat=20.98, lon=105.86)
    await fresh_database.devices.insert_many(
        [DeviceIn(id=DEVICE, city=CITY, domain="flood", district="Hoàng Mai", location=location)]
    )
    return fresh_database


async def test_one_excursion_opens_one_alarm_until_every_reason_recovers(flood_database: Database) -> None:
    db = flood_database
    # One batch: past the warning level and rising fast. One alarm, named after the worse reason.
    events = await apply(
        db,
        finding("threshold.currentLevel", severity="medium"),
        finding("rate.currentLevel", severity="high"),
    )
    assert [e.type for e in events] == ["alarm.raised"]
    [alarm] = await open_alarms(db)
    assert alarm["rule"] == "rate.currentLevel" and alarm["severity"] == "high"
    assert [r["rule"] for r in alarm["reasons"]] == ["rate.currentLevel", "threshold.currentLevel"]
    assert events[0].data["id"] == alarm["id"] and len(events[0].data["reasons"]) == 2

    # The rise stops: its reason clears, the alarm stays open for the level.
    assert await apply(db, finding("rate.currentLevel", active=False, minute=1)) == []
    [alarm] = await open_alarms(db)
    reasons = {r["rule"]: r for r in alarm["reasons"]}
    assert not reasons["rate.currentLevel"]["active"] and reasons["rate.currentLevel"]["cleared_at"]
    assert reasons["threshold.currentLevel"]["active"]

    # Past the danger level: the limit takes over the alarm, with its own value and limit.
    events = await apply(
        db, finding("threshold.currentLevel", severity="critical", minute=2, value=4.8, threshold=4.5)
    )
    assert [(e.type, e.data["severity"], e.data["rule"]) for e in events] == [
        ("alarm.updated", "critical", "threshold.currentLevel")
    ]
    # A statistical finding joins it: told once, the alarm's rule stays the limit.
    events = await apply(db, finding("zscore.currentLevel", severity="low", minute=3, threshold=None))
    assert [e.type for e in events] == ["alarm.updated"]
    # A repeat of an active reason changes nothing an agency must hear of.
    assert await apply(db, finding("threshold.currentLevel", severity="critical", minute=4)) == []
    [alarm] = await open_alarms(db)
    assert alarm["rule"] == "threshold.currentLevel" and alarm["severity"] == "critical"
    # The limit of its worst breach; the value of its rule's latest reading.
    assert alarm["threshold"] == 4.5 and alarm["value"] == 3.2
    assert [r["rule"] for r in alarm["reasons"]] == [
        "threshold.currentLevel",
        "rate.currentLevel",
        "zscore.currentLevel",
    ]
    assert {r["rule"]: r["count"] for r in alarm["reasons"]}["threshold.currentLevel"] == 3
    assert alarm["count"] == 3

    # A stuck sensor is its own alarm, not part of the excursion.
    await apply(db, finding("flatline.currentLevel", severity="low", minute=4))
    assert sorted(a["rule"] for a in await open_alarms(db)) == [
        "flatline.currentLevel",
        "threshold.currentLevel",
    ]

    # Back in band: the last reason to recover resolves the alarm, once.
    events = await apply(
        db,
        finding("threshold.currentLevel", active=False, minute=5),
        finding("zscore.currentLevel", active=False, minute=5),
    )
    assert [(e.type, e.data["id"]) for e in events] == [("alarm.resolved", alarm["id"])]
    assert [a["rule"] for a in await open_alarms(db)] == ["flatline.currentLevel"]
    resolved = await db.alarms.get(alarm["id"])
    assert resolved.state == "resolved" and resolved.resolved_at == START + timedelta(minutes=5)
    assert not any(r.active for r in resolved.reasons)

    # A new excursion is a new alarm.
    events = await apply(db, finding("rate.currentLevel", severity="high", minute=9))
    assert [e.type for e in events] == ["alarm.raised"] and events[0].data["id"] != alarm["id"]


async def test_a_reason_that_recovers_and_breaks_again_in_one_batch_keeps_the_alarm(
    flood_database: Database,
) -> None:
    db = flood_database
    await apply(db, finding("threshold.currentLevel", severity="medium"))
    [before] = await open_alarms(db)
    # As the detectors order one batch: the recovery of a rule that broke again, its new breach,
    # the rate's breach and the rate's recovery by the batch's end.
    events = await apply(
        db,
        finding("threshold.currentLevel", active=False, minute=1),
        finding("threshold.currentLevel", severity="medium", minute=2),
        finding("rate.currentLevel", severity="high", minute=2),
        finding("rate.currentLevel", active=False, minute=3),
    )
    # The threshold reason was the alarm's only one: its recovery resolved it, and the breach
    # after it opened the next alarm (with the rate as its worse, already cleared, reason).
    assert [e.type for e in events] == ["alarm.resolved", "alarm.raised"]
    [after] = await open_alarms(db)
    assert after["id"] != before["id"] and after["rule"] == "rate.currentLevel"
    assert {r["rule"]: r["active"] for r in after["reasons"]} == {
        "threshold.currentLevel": True,
        "rate.currentLevel": False,
    }


async def test_processors_racing_on_one_excursion_leave_one_open_alarm(flood_database: Database) -> None:
    db = flood_database
    rules = ["threshold.currentLevel", "rate.currentLevel", "zscore.currentLevel"]
    for round_ in range(5):
        await asyncio.gather(*(apply(db, finding(rule, severity="high", minute=round_)) for rule in rules))
    [alarm] = await open_alarms(db)
    assert sorted(r["rule"] for r in alarm["reasons"]) == sorted(rules)
    assert alarm["rule"] == "threshold.currentLevel"
    assert {r["count"] for r in alarm["reasons"]} == {5}


@pytest.fixture
async def old_schema_url() -> AsyncIterator[str]:
    url = f"{POSTGRES_URL}/ioc_test_excursions_{uuid.uuid4().hex[:8]}"
    await ensure_database(url)
    try:
        yield url
    finally:
        await drop_database(url)


async def test_the_migration_folds_open_alarms_of_one_excursion(
    old_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Database(old_schema_url, max_size=2) as db:
        monkeypatch.setattr(migrations_module, "MIGRATIONS", MIGRATIONS[:9])
        await db.migrate()
        connection = await asyncpg.connect(old_schema_url)
        try:
            # (rule, metric, severity, state): an excursion open as two alarms, a closed one, an
            # offline alarm, and another metric's threshold alarm.
            rows = [
                ("threshold.currentLevel", "currentLevel", "medium", "active"),
                ("rate.currentLevel", "currentLevel", "high", "acknowledged"),
                ("zscore.currentLevel", "currentLevel", "low", "resolved"),
                ("offline", None, "medium", "active"),
                ("threshold.rainfall", "rainfall", "medium", "active"),
            ]
            ids = {}
            for minute, (rule, metric, severity, state) in enumerate(rows):
                ids[rule] = await connection.fetchval(
                    "INSERT INTO alarms (subject, device_id, city, domain, rule, metric, severity, state,"
                    " started_at, last_seen_at, value, threshold, count, message_vi, message_en)"
                    " VALUES ($1, $1, $2, 'flood', $3, $4, $5, $6, $7, $7, 3.2, 3.0, 2, 'vi', 'en')"
                    " RETURNING id",
                    DEVICE,
                    CITY,
                    rule,
                    metric,
                    severity,
                    state,
                    START + timedelta(minutes=minute),
                )
            monkeypatch.setattr(migrations_module, "MIGRATIONS", MIGRATIONS)
            await db.migrate()
            await db.migrate()  # safe to repeat

            open_ = {a.rule: a for a in await db.alarms.page(limit=10, states=["active", "acknowledged"])}
            assert set(open_) == {"rate.currentLevel", "offline", "threshold.rainfall"}
            merged = open_["rate.currentLevel"]
            assert merged.id == ids["rate.currentLevel"] and merged.state == "acknowledged"
            assert [(r.rule, r.active) for r in merged.reasons] == [
                ("rate.currentLevel", True),
                ("threshold.currentLevel", True),
            ]
            assert merged.started_at == START
            assert [r.rule for r in open_["offline"].reasons] == ["offline"]
            absorbed = await db.alarms.get(ids["threshold.currentLevel"])
            assert absorbed.state == "resolved"
            assert absorbed.audit and absorbed.audit[0].note == (
                f"merged into alarm {ids['rate.currentLevel']}, the same excursion"
            )
            closed = await db.alarms.get(ids["zscore.currentLevel"])
            assert [(r.rule, r.active) for r in closed.reasons] == [("zscore.currentLevel", False)]

            # The migrated alarm goes on as one excursion.
            async with db.transaction() as transaction:
                events = await transaction.apply_findings(
                    [finding("threshold.currentLevel", severity="critical", minute=9)]
                )
            assert [(e.type, e.data["id"], e.data["rule"]) for e in events] == [
                ("alarm.updated", merged.id, "threshold.currentLevel")
            ]
        finally:
            await connection.close()
