"""Detectors and alarms through the whole pipeline: MQTT → gateway → Kafka → processor → alarms
in TimescaleDB → API and `ioc.events`. Readings carry their own timestamps (in the recent past),
so patterns over minutes are published in a second.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from ioc_core.domains import DOMAINS
from tests.integration.conftest import FAST_OFFLINE_DOMAIN, SESSION_CITY, System
from tests.integration.harness import Publisher, publish, tail_topic, unique, wait_until

CITY = SESSION_CITY
LOCATION = {"lat": 20.98, "lon": 105.86}


async def register(admin: httpx.AsyncClient, domain: str, **extra: Any) -> str:
    device_id = unique(f"{domain}-alarm")
    body = {"id": device_id, "city": CITY, "domain": domain, "location": LOCATION, **extra}
    response = await admin.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text
    return device_id


def series(
    start: datetime, step_s: float, rows: Sequence[dict[str, float]]
) -> list[tuple[datetime, dict[str, float]]]:
    return [(start + timedelta(seconds=i * step_s), metrics) for i, metrics in enumerate(rows)]


def send(domain: str, device_id: str, readings: Sequence[tuple[datetime, dict[str, float]]]) -> None:
    topic = f"ioc/v1/{CITY}/{domain}/{device_id}/telemetry"
    with Publisher() as publisher:
        publisher.publish_all(
            [(topic, json.dumps({"ts": ts.isoformat(), **metrics}).encode()) for ts, metrics in readings]
        )


def _without_escalation(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    for event in events:
        data = event["data"]
        escalation = (
            event["type"] == "alarm.updated"
            and data.get("escalated")
            and bool(kept)
            and kept[-1]["data"]["severity"] == data["severity"]
        )
        if not escalation:
            kept.append(event)
    return kept


def recent(minutes: float = 50) -> datetime:
    return datetime.now(tz=UTC).replace(microsecond=0) - timedelta(minutes=minutes)


async def alarms_of(admin: httpx.AsyncClient, **filters: str) -> list[dict[str, Any]]:
    response = await admin.get("/v1/alarms", params={"limit": 1000, **filters})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def readings_stored(system: System, domain: str, device_id: str) -> int:
    connection = await asyncpg.connect(system.database_url)
    try:
        count: int = await connection.fetchval(
            f"SELECT count(*) FROM readings_{domain} WHERE device_id = $1", device_id
        )
        return count
    finally:
        await connection.close()


async def wait_for_readings(system: System, domain: str, device_id: str, count: int) -> None:
    async def stored() -> bool | None:
        return True if await readings_stored(system, domain, device_id) >= count else None

    await wait_until(stored, timeout=30, what=f"{count} readings of {device_id}\n{system.logs()}")


async def wait_for_alarm(
    admin: httpx.AsyncClient, system: System, device_id: str, rule: str, **expect: Any
) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        for alarm in await alarms_of(admin, device_id=device_id):
            if alarm["rule"] == rule and all(alarm.get(k) == v for k, v in expect.items()):
                return alarm
        return None

    return await wait_until(found, timeout=30, what=f"alarm {rule} {expect} of {device_id}\n{system.logs()}")


async def test_one_excursion_is_one_alarm_raised_escalated_and_resolved_once(
    system: System, admin: httpx.AsyncClient
) -> None:
    device_id = await register(admin, "flood", name="Trạm Tô Lịch", district="Hoàng Mai")
    consumer = await tail_topic(system.topics.events)
    try:
        # In three steps, so that each lands in a batch of its own whatever the batching. The jump
        # to 3.2 m passes the warning level (medium) and is a fast rise (high): one alarm, named
        # after its worse reason, listing both.
        start = recent()
        send("flood", device_id, series(start, 30, [{"currentLevel": v} for v in (2.0, 3.2, 3.3)]))
        first = await wait_for_alarm(admin, system, device_id, "rate.currentLevel", severity="high")
        send("flood", device_id, [(start + timedelta(seconds=120), {"currentLevel": 4.8})])
        await wait_for_alarm(admin, system, device_id, "threshold.currentLevel", severity="critical")
        calm = series(start + timedelta(seconds=150), 30, [{"currentLevel": 2.0}] * 4)
        send("flood", device_id, calm)
        alarm = await wait_for_alarm(admin, system, device_id, "threshold.currentLevel", state="resolved")

        events: list[dict[str, Any]] = []

        async def until_resolved() -> list[dict[str, Any]] | None:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    event = json.loads(record.value)
                    data = event["data"]
                    if data.get("device_id") == device_id and data.get("metric") == "currentLevel":
                        events.append(event)
            resolved = any(e["type"] == "alarm.resolved" for e in events)
            return events if resolved else None

        await wait_until(until_resolved, timeout=20, what="raised, updated and resolved on ioc.events")
    finally:
        await consumer.stop()

    by_rule = {r["rule"]: r for r in first["reasons"]}
    assert first["reasons"][0]["rule"] == "rate.currentLevel"
    assert by_rule["threshold.currentLevel"]["severity"] == "medium"
    assert by_rule["threshold.currentLevel"]["threshold"] == 3.0

    # The readings are 50 minutes old, past flood's escalation limit: the escalation job may
    # escalate the alarm before the calm readings resolve it, an `alarm.updated` of its own
    # (tested with the webhooks), not detection's doing. A cold first run was slow enough.
    events = _without_escalation(events)
    assert alarm["severity"] == "critical"
    assert alarm["count"] == 3
    assert alarm["value"] is not None and alarm["threshold"] == 4.5
    assert alarm["city"] == CITY and alarm["domain"] == "flood" and alarm["metric"] == "currentLevel"
    assert "Hoàng Mai" in alarm["messages"]["vi"] and "Hoàng Mai" in alarm["messages"]["en"]
    assert alarm["message"].startswith(alarm["messages"]["vi"])
    reasons = {r["rule"]: r for r in alarm["reasons"]}
    assert alarm["reasons"][0]["rule"] == "threshold.currentLevel"
    assert set(reasons) == {"threshold.currentLevel", "rate.currentLevel"}
    assert reasons["threshold.currentLevel"]["severity"] == "critical"
    assert reasons["threshold.currentLevel"]["count"] == 3
    assert reasons["rate.currentLevel"]["severity"] == "high"
    assert not any(r["active"] for r in alarm["reasons"])
    assert all(r["cleared_at"] is not None for r in alarm["reasons"])
    # One alarm from the first reading past a limit to the calm: raised, one update or two (the
    # first readings may fall in one batch or two), resolved; never a second alarm.
    types = [e["type"] for e in events]
    assert types[0] == "alarm.raised" and types[-1] == "alarm.resolved", types
    assert set(types[1:-1]) == {"alarm.updated"} and 1 <= len(types) - 2 <= 2, types
    assert {e["data"]["id"] for e in events} == {alarm["id"]}
    assert events[0]["data"]["severity"] == "high"
    assert {r["rule"] for r in events[0]["data"]["reasons"]} == {
        "threshold.currentLevel",
        "rate.currentLevel",
    }
    assert [e["data"]["severity"] for e in events[-2:]] == ["critical", "critical"]
    assert [a["id"] for a in await alarms_of(admin, device_id=device_id)] == [alarm["id"]]


async def test_a_value_flapping_around_its_limit_gives_one_alarm(
    system: System, admin: httpx.AsyncClient
) -> None:
    device_id = await register(admin, "flood")
    levels = [3.1, 2.5, 3.1, 2.5, 3.1, 2.9, 3.2, 2.6, 3.1]
    send("flood", device_id, series(recent(), 30, [{"currentLevel": v} for v in levels]))
    await wait_for_readings(system, "flood", device_id, len(levels))
    alarm = await wait_for_alarm(admin, system, device_id, "threshold.currentLevel", count=5)
    assert alarm["state"] == "active"
    assert len([a for a in await alarms_of(admin, device_id=device_id) if a["rule"] == alarm["rule"]]) == 1


async def test_late_reading_is_stored_but_raises_nothing(system: System, admin: httpx.AsyncClient) -> None:
    device_id = await register(admin, "flood")
    start = recent()
    send("flood", device_id, series(start, 30, [{"currentLevel": 1.0}] * 5))
    await wait_for_readings(system, "flood", device_id, 5)
    send("flood", device_id, [(start + timedelta(seconds=45), {"currentLevel": 9.0})])
    await wait_for_readings(system, "flood", device_id, 6)
    # A fresh reading afterwards proves the batch with the late one has been processed.
    send("flood", device_id, [(start + timedelta(seconds=300), {"currentLevel": 1.0})])
    await wait_for_readings(system, "flood", device_id, 7)
    latest = (await admin.get(f"/v1/devices/{device_id}")).json()["latest"]
    assert latest["metrics"]["currentLevel"] == 1.0
    assert await alarms_of(admin, device_id=device_id) == []


async def test_rate_of_change_alarm(system: System, admin: httpx.AsyncClient) -> None:
    device_id = await register(
        admin, "flood", thresholds={"currentLevel": {"rise_above": 0.5, "rate_window_s": 600}}
    )
    levels = [1.0, 1.0, 1.05, 1.1, 1.3, 1.5, 1.7]
    send("flood", device_id, series(recent(), 60, [{"currentLevel": v} for v in levels]))
    alarm = await wait_for_alarm(admin, system, device_id, "rate.currentLevel")
    assert alarm["severity"] == "high"
    assert alarm["threshold"] == 0.5


async def test_statistical_detector_fires_on_a_spike_but_not_during_warm_up(
    system: System, admin: httpx.AsyncClient
) -> None:
    # Turbidity has no daily cycle: its statistics speak after 30 readings, not after a day. A
    # spike to 3.5 NTU stays below the warning limit (5) and is 8 floors (0.3) off 1.0.
    rng = random.Random(7)
    seasoned = await register(admin, "water")
    newcomer = await register(admin, "water")
    normal = [{"turbidity": round(1.0 + rng.gauss(0, 0.05), 3)} for _ in range(60)]
    send("water", seasoned, series(recent(), 10, [*normal, {"turbidity": 3.5}]))
    send(
        "water", newcomer, series(recent(), 10, [{"turbidity": 1.0}, {"turbidity": 1.02}, {"turbidity": 3.5}])
    )
    alarm = await wait_for_alarm(admin, system, seasoned, "zscore.turbidity")
    assert alarm["severity"] == "low"
    await wait_for_readings(system, "water", newcomer, 3)
    assert [a for a in await alarms_of(admin, device_id=newcomer) if a["rule"].startswith("zscore")] == []


async def test_a_persistent_moderate_deviation_alarms_where_one_reading_of_its_size_does_not(
    system: System, admin: httpx.AsyncClient
) -> None:
    # Turbidity's spread is at least its floor, 0.3 NTU: 2.4 NTU is 4.7 deviations off 1.0, short
    # of the single-reading limit (6) and of the warning limit (5 NTU). Once it is no alarm; held,
    # the CUSUM of the deviations passes its alarm within four readings (a filter clogging).
    rng = random.Random(11)
    persistent = await register(admin, "water")
    once = await register(admin, "water")

    def normal(count: int) -> list[dict[str, float]]:
        return [{"turbidity": round(1.0 + rng.gauss(0, 0.05), 3)} for _ in range(count)]

    shifted = [{"turbidity": round(2.4 + rng.gauss(0, 0.05), 3)} for _ in range(8)]
    send("water", persistent, series(recent(), 10, [*normal(60), *shifted]))
    send("water", once, series(recent(), 10, [*normal(60), shifted[0], *normal(8)]))
    alarm = await wait_for_alarm(admin, system, persistent, "zscore.turbidity")
    assert alarm["severity"] == "low"
    assert 2.2 < alarm["value"] < 2.6
    await wait_for_readings(system, "water", once, 69)
    assert [a for a in await alarms_of(admin, device_id=once) if a["rule"].startswith("zscore")] == []


async def test_flatline_alarm(system: System, admin: httpx.AsyncClient) -> None:
    device_id = await register(admin, "grid", thresholds={"voltage": {"flatline_s": 120}})
    send("grid", device_id, series(recent(), 30, [{"voltage": 229.7, "frequency": 50.0}] * 8))
    alarm = await wait_for_alarm(admin, system, device_id, "flatline.voltage")
    assert alarm["severity"] == "low"


async def test_silent_device_raises_offline_alarm_which_its_return_resolves(
    system: System, admin: httpx.AsyncClient
) -> None:
    domain = FAST_OFFLINE_DOMAIN
    device_id = await register(admin, domain)
    metrics = DOMAINS[domain].sampler(random.Random(1), datetime.now(tz=UTC), 0.3)
    publish(f"ioc/v1/{CITY}/{domain}/{device_id}/telemetry", json.dumps(metrics).encode())
    alarm = await wait_for_alarm(admin, system, device_id, "offline", state="active")
    assert alarm["severity"] == "medium"
    publish(f"ioc/v1/{CITY}/{domain}/{device_id}/telemetry", json.dumps(metrics).encode())
    resolved = await wait_for_alarm(admin, system, device_id, "offline", state="resolved")
    assert resolved["id"] == alarm["id"]


async def test_stations_of_a_district_flooding_together_raise_one_district_alarm(
    system: System, admin: httpx.AsyncClient
) -> None:
    district = unique("Hoàng Mai")
    stations = [await register(admin, "flood", district=district) for _ in range(3)]
    start = recent()
    for index, station in enumerate(stations):
        if index == 2:  # the third station stays dry and low
            rows = [{"currentLevel": 1.0, "rainfall": 0.0}] * 6
        else:
            rows = [{"currentLevel": 2.4 + 0.2 * i, "rainfall": 80.0} for i in range(6)]
        send("flood", station, series(start, 60, rows))

    subject = f"district:{CITY}:{district}"

    async def district_alarms() -> list[dict[str, Any]] | None:
        found = [a for a in await alarms_of(admin, city=CITY) if a["subject"] == subject]
        return found or None

    found = await wait_until(district_alarms, timeout=30, what=f"district alarm\n{system.logs()}")
    for station in stations:
        await wait_for_readings(system, "flood", station, 6)
    found = await district_alarms() or []
    assert len(found) == 1
    assert found[0]["rule"] == "flood.district" and found[0]["device_id"] is None
    assert found[0]["district"] == district and found[0]["severity"] in ("high", "critical")


async def test_a_districts_stations_moved_into_a_catchment_raise_its_alarm_and_the_district_alarm_passes(
    system: System, admin: httpx.AsyncClient
) -> None:
    """The upgrade from district correlation: stations registered with a district and in no area
    raise the district's alarm; once a catchment is stored around them, their flooding raises the
    catchment's alarm (reaching its area) and the district's alarm passes, nobody touching it."""
    district = unique("Kiến An")
    # Away from every other test's areas and devices.
    west, south, east, north = 106.40, 20.60, 106.44, 20.64
    location = {"lat": 20.62, "lon": 106.42}
    stations = [await register(admin, "flood", district=district, location=location) for _ in range(3)]
    wet, dry = stations[:2], stations[2]
    start = recent(40)
    rising = [{"currentLevel": 2.4 + 0.2 * i, "rainfall": 80.0} for i in range(6)]
    for station in wet:
        send("flood", station, series(start, 60, rising))
    send("flood", dry, series(start, 60, [{"currentLevel": 1.0, "rainfall": 0.0}] * 6))

    async def open_alarm(subject: str) -> dict[str, Any] | None:
        found = [a for a in await alarms_of(admin, city=CITY) if a["subject"] == subject]
        return found[0] if found and found[0]["state"] != "resolved" else None

    legacy = f"district:{CITY}:{district}"
    await wait_until(lambda: open_alarm(legacy), timeout=30, what=f"district alarm\n{system.logs()}")

    catchment = unique("catchment")
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "name_vi": "Lưu vực Thử",
            "name_en": "Test catchment",
            "kind": "catchment",
            "city": CITY,
        },
    }
    response = await admin.put(f"/v1/areas/{catchment}", json=feature)
    assert response.status_code == 201, response.text
    try:
        await _flood_the_catchment(system, admin, catchment, stations, legacy, start)
    finally:
        # The session city's areas are other tests' too (the page lists them).
        assert (await admin.delete(f"/v1/areas/{catchment}")).status_code == 204


async def _flood_the_catchment(
    system: System,
    admin: httpx.AsyncClient,
    catchment: str,
    stations: list[str],
    legacy: str,
    start: datetime,
) -> None:
    wet, dry = stations[:2], stations[2]

    async def open_alarm(subject: str) -> dict[str, Any] | None:
        found = [a for a in await alarms_of(admin, city=CITY) if a["subject"] == subject]
        return found[0] if found and found[0]["state"] != "resolved" else None

    assert (await admin.get(f"/v1/devices/{dry}")).json()["areas"] == [catchment]

    # The processor learns of the area on its next registry refresh: keep the water coming.
    later = start + timedelta(minutes=6)
    subject = f"area:{catchment}"

    async def area_alarm() -> dict[str, Any] | None:
        nonlocal later
        for station in wet:
            send("flood", station, [(later, {"currentLevel": 3.6, "rainfall": 80.0})])
        send("flood", dry, [(later, {"currentLevel": 1.0, "rainfall": 0.0})])
        later += timedelta(seconds=20)
        return await open_alarm(subject)

    alarm = await wait_until(area_alarm, timeout=30, interval=1.0, what=f"catchment alarm\n{system.logs()}")
    assert alarm["rule"] == "flood.district" and alarm["device_id"] is None
    assert alarm["areas"] == [catchment] and alarm["district"] == "Lưu vực Thử"
    assert "Lưu vực Thử" in alarm["messages"]["vi"] and "Test catchment" in alarm["messages"]["en"]
    # A ward office's filter finds it by its area, beside its stations' own alarms.
    in_area = await alarms_of(admin, area=catchment)
    # (The district's alarm may have reached the area too, if a station reported in it after the
    # area was stored and before the processor learnt of it.)
    assert alarm["id"] in [a["id"] for a in in_area]
    assert {a["subject"] for a in in_area if a["device_id"] is None} <= {subject, legacy}
    assert {a["device_id"] for a in in_area} <= {None, *stations}

    async def district_passed() -> dict[str, Any] | None:
        found = [a for a in await alarms_of(admin, city=CITY) if a["subject"] == legacy]
        return found[0] if found and found[0]["state"] == "resolved" else None

    passed = await wait_until(district_passed, timeout=30, what=f"district alarm passing\n{system.logs()}")
    assert len([a for a in await alarms_of(admin, city=CITY) if a["subject"] == legacy]) == 1
    assert passed["resolved_at"] is not None


async def test_normal_data_raises_no_alarm(system: System, admin: httpx.AsyncClient) -> None:
    devices = [(domain, await register(admin, domain)) for domain in sorted(DOMAINS) for _ in range(2)]
    start = recent(30)
    for phase, (domain, device_id) in enumerate(devices):
        rng = random.Random(phase)
        rows = [
            DOMAINS[domain].sampler(rng, start + timedelta(seconds=10 * i), phase / len(devices))
            for i in range(90)
        ]
        send(domain, device_id, series(start, 10, rows))
    for domain, device_id in devices:
        await wait_for_readings(system, domain, device_id, 90)
    raised = [a for domain, device_id in devices for a in await alarms_of(admin, device_id=device_id)]
    assert raised == []


async def test_operator_acknowledges_then_resolves_with_an_audit_trail(
    system: System, admin: httpx.AsyncClient
) -> None:
    device_id = await register(admin, "flood")
    send("flood", device_id, series(recent(), 30, [{"currentLevel": 5.0}] * 2))
    alarm = await wait_for_alarm(admin, system, device_id, "threshold.currentLevel")

    acked = await admin.post(f"/v1/alarms/{alarm['id']}/ack", json={"note": "đội ứng cứu đang đến"})
    assert acked.status_code == 200, acked.text
    assert acked.json()["state"] == "acknowledged"
    again = await admin.post(f"/v1/alarms/{alarm['id']}/ack")
    assert again.status_code == 200 and again.json()["state"] == "acknowledged"

    resolved = await admin.post(f"/v1/alarms/{alarm['id']}/resolve", json={"note": "nước đã rút"})
    assert resolved.status_code == 200, resolved.text
    detail = (await admin.get(f"/v1/alarms/{alarm['id']}")).json()
    assert detail["state"] == "resolved" and detail["resolved_at"] is not None
    # Its reasons are cleared with it: a resolved alarm names no rule as still broken.
    assert detail["reasons"] and all(
        not reason["active"] and reason["cleared_at"] is not None for reason in detail["reasons"]
    )
    assert [(a["action"], a["actor"], a["note"]) for a in detail["audit"]] == [
        ("acknowledged", "admin", "đội ứng cứu đang đến"),
        ("resolved", "admin", "nước đã rút"),
    ]

    for action in ("ack", "resolve"):
        conflict = await admin.post(f"/v1/alarms/{alarm['id']}/{action}")
        assert conflict.status_code == 409
        assert conflict.headers["content-type"].startswith("application/problem+json")
    assert (await admin.post("/v1/alarms/999999999/ack")).status_code == 404
    assert (await admin.get("/v1/alarms", params={"state": "open"})).status_code == 400
    assert (await admin.get("/v1/alarms", params={"severity": "critical,high"})).status_code == 200
    assert (await admin.get("/v1/alarms/abc")).status_code in (400, 422)
