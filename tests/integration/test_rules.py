"""Rules at run time against the real services: overrides of a domain's rules for a city, an area or
a device through the API (versioned, audited, checked like device thresholds, scoped), a device's
effective rules with their sources in precedence order, a city override reaching two running
processors within seconds without a restart, and `ioc detect --rules` back-testing proposed rules
on a device's stored history."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.partitioner import DefaultPartitioner

from ioc_core.bus import BusProducer, Topics, ensure_topics
from ioc_core.storage import Database, TelemetryBatch
from ioc_core.telemetry import Reading
from tests.integration.conftest import System
from tests.integration.harness import ComponentProcess, delete_topics, unique, wait_until

log = logging.getLogger(__name__)

LAT, LON = 20.80, 106.70
PARTITIONS = 6


def _square(half: float, lat: float = LAT, lon: float = LON) -> dict[str, Any]:
    ring = [
        [lon - half, lat - half],
        [lon + half, lat - half],
        [lon + half, lat + half],
        [lon - half, lat + half],
        [lon - half, lat - half],
    ]
    return {"type": "Polygon", "coordinates": [ring]}


async def _put_area(admin: httpx.AsyncClient, area_id: str, city: str, half: float) -> None:
    feature = {
        "type": "Feature",
        "geometry": _square(half),
        "properties": {"name_vi": area_id, "kind": "custom", "city": city},
    }
    response = await admin.put(f"/v1/areas/{area_id}", json=feature)
    assert response.status_code in (200, 201), response.text


async def _register(
    admin: httpx.AsyncClient,
    city: str,
    *,
    device_id: str | None = None,
    domain: str = "flood",
    thresholds: dict[str, Any] | None = None,
) -> str:
    device_id = device_id or unique("rules-dev")
    body: dict[str, Any] = {
        "id": device_id,
        "city": city,
        "domain": domain,
        "location": {"lat": LAT, "lon": LON},
    }
    if thresholds is not None:
        body["thresholds"] = thresholds
    response = await admin.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text
    return device_id


def _city() -> str:
    return unique("rules")[:32]


async def test_an_override_is_versioned_audited_and_changed_only_at_the_version_read(
    admin: httpx.AsyncClient,
) -> None:
    city = _city()
    where = {"domain": "flood", "city": city}
    assert (await admin.get("/v1/rules", params=where)).status_code == 404

    created = await admin.put("/v1/rules", params=where, json={"currentLevel": {"warn_above": 2.0}})
    assert created.status_code == 201, created.text
    first = created.json()
    assert first["level"] == "city" and first["scope"] == city and first["domain"] == "flood"
    assert first["rules"] == {"currentLevel": {"warn_above": 2.0}}
    assert created.headers["etag"] == f'"{first["version"]}"'
    read = await admin.get("/v1/rules", params=where)
    assert read.status_code == 200 and read.json() == first
    assert read.headers["etag"] == created.headers["etag"]

    changed = await admin.put(
        "/v1/rules",
        params=where,
        json={"currentLevel": {"warn_above": 2.2, "crit_above": 4.0}},
        headers={"If-Match": created.headers["etag"]},
    )
    assert changed.status_code == 200, changed.text
    second = changed.json()
    assert second["version"] > first["version"]

    stale = await admin.put(
        "/v1/rules",
        params=where,
        json={"currentLevel": {"warn_above": 9.0}},
        headers={"If-Match": created.headers["etag"]},
    )
    assert stale.status_code == 409, stale.text
    assert stale.headers["content-type"].startswith("application/problem+json")
    assert (await admin.get("/v1/rules", params=where)).json()["rules"]["currentLevel"]["warn_above"] == 2.2

    assert (
        await admin.delete("/v1/rules", params=where, headers={"If-Match": f'"{first["version"]}"'})
    ).status_code == 409
    assert (
        await admin.delete("/v1/rules", params=where, headers={"If-Match": f'"{second["version"]}"'})
    ).status_code == 204
    assert (await admin.get("/v1/rules", params=where)).status_code == 404
    assert (await admin.delete("/v1/rules", params=where)).status_code == 404

    audit = await admin.get(
        "/v1/audit", params={"object_type": "rules", "object_id": f"city:{city}:flood", "limit": 10}
    )
    assert audit.status_code == 200, audit.text
    entries = audit.json()["items"]
    assert [e["action"] for e in entries] == ["rules.delete", "rules.update", "rules.update"]
    update = entries[1]
    assert update["cities"] == [city] and update["domains"] == ["flood"]
    assert update["detail"]["version"] == second["version"]
    assert update["detail"]["previous_version"] == first["version"]
    assert update["detail"]["rules"] == {"currentLevel": {"warn_above": 2.2, "crit_above": 4.0}}


async def test_concurrent_changes_at_one_version_let_exactly_one_through(admin: httpx.AsyncClient) -> None:
    city = _city()
    where = {"domain": "flood", "city": city}
    created = await admin.put("/v1/rules", params=where, json={"currentLevel": {"warn_above": 2.0}})
    assert created.status_code == 201, created.text
    tag = created.headers["etag"]

    async def put(value: float) -> int:
        response = await admin.put(
            "/v1/rules", params=where, json={"currentLevel": {"warn_above": value}}, headers={"If-Match": tag}
        )
        return response.status_code

    async def delete() -> int:
        return (await admin.delete("/v1/rules", params=where, headers={"If-Match": tag})).status_code

    codes = await asyncio.gather(*(put(2.0 + n / 10) for n in range(1, 6)), delete())
    assert sorted(codes).count(409) == len(codes) - 1, codes
    assert set(codes) - {409} <= {200, 204}, codes


async def test_rules_that_device_thresholds_could_not_be_are_refused_with_a_4xx(
    admin: httpx.AsyncClient,
) -> None:
    city = _city()
    device_id = await _register(admin, city, domain="water")
    where = {"domain": "flood", "city": city}
    refused = {
        "a metric of another domain": ({"pressure": {"warn_above": 1.0}}, where),
        "a negative z-score": ({"currentLevel": {"zscore": -1.0}}, where),
        "a string for a number": ({"currentLevel": {"warn_above": "3"}}, where),
        "an unknown rule key": ({"currentLevel": {"warn_over": 3.0}}, where),
        "no metric at all": ({}, where),
        "not an object": ([1, 2], where),
        "an infinite limit": ({"currentLevel": {"warn_above": 1e400}}, where),
    }
    for what, (body, params) in refused.items():
        response = await admin.put("/v1/rules", params=params, content=json.dumps(body))
        assert response.status_code == 422, f"{what}: {response.status_code} {response.text}"
        assert response.headers["content-type"].startswith("application/problem+json")

    bad_requests = {
        "two scopes": {"domain": "flood", "city": city, "area": "somewhere"},
        "no scope": {"domain": "flood"},
        "no domain for a city": {"city": city},
        "another domain than the device's": {"domain": "flood", "device": device_id},
        "an unknown parameter": {**where, "ward": "x"},
    }
    body = {"currentLevel": {"warn_above": 2.0}}
    for what, params in bad_requests.items():
        response = await admin.put("/v1/rules", params=params, json=body)
        assert response.status_code == 400, f"{what}: {response.status_code} {response.text}"
    response = await admin.put("/v1/rules", params=where, json=body, headers={"If-Match": "yesterday"})
    assert response.status_code == 400, response.text
    assert (await admin.put("/v1/rules", params={**where, "domain": "sewage"}, json=body)).status_code == 422
    missing_area = {"domain": "flood", "area": unique("no-such-area")}
    assert (await admin.put("/v1/rules", params=missing_area, json=body)).status_code == 404
    missing_device = {"device": unique("no-such-device")}
    assert (await admin.put("/v1/rules", params=missing_device, json=body)).status_code == 404
    assert (await admin.get("/v1/rules", params=where)).status_code == 404


async def test_effective_rules_come_from_the_most_specific_level_key_by_key(admin: httpx.AsyncClient) -> None:
    city = _city()
    big, small = unique("rules-big"), unique("rules-small")
    await _put_area(admin, big, city, 0.05)
    await _put_area(admin, small, city, 0.01)
    plain = await _register(admin, city)
    registered = await _register(
        admin, city, thresholds={"currentLevel": {"warn_above": 2.9, "crit_above": 3.9}}
    )

    async def put(params: dict[str, str], body: dict[str, Any]) -> None:
        response = await admin.put("/v1/rules", params=params, json=body)
        assert response.status_code in (200, 201), response.text

    await put(
        {"domain": "flood", "city": city},
        {"currentLevel": {"warn_above": 2.0, "crit_above": 4.0, "hysteresis": 0.2}},
    )
    await put({"domain": "flood", "area": big}, {"currentLevel": {"warn_above": 2.4, "crit_above": 3.6}})
    await put({"domain": "flood", "area": small}, {"currentLevel": {"warn_above": 2.6}})
    await put({"device": registered}, {"currentLevel": {"crit_above": 4.2, "zscore": None}})

    async def effective(device_id: str) -> dict[str, dict[str, Any]]:
        response = await admin.get(f"/v1/devices/{device_id}/rules")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["device_id"] == device_id and body["domain"] == "flood"
        assert isinstance(body["rules_version"], int)
        level: dict[str, dict[str, Any]] = body["metrics"]["currentLevel"]
        return level

    level = await effective(plain)
    # Two areas disagree on warn_above: the smaller one holds.
    assert level["warn_above"] == {"value": 2.6, "source": f"area:{small}"}
    assert level["crit_above"] == {"value": 3.6, "source": f"area:{big}"}
    assert level["hysteresis"] == {"value": 0.2, "source": "city"}
    assert level["zscore"] == {"value": 6.0, "source": "domain"}

    level = await effective(registered)
    assert level["warn_above"] == {"value": 2.9, "source": "thresholds"}
    assert level["crit_above"] == {"value": 4.2, "source": "device"}
    assert level["zscore"] == {"value": None, "source": "device"}
    assert level["hysteresis"] == {"value": 0.2, "source": "city"}

    # Removing the device's override returns it to its thresholds.
    assert (await admin.delete("/v1/rules", params={"device": registered})).status_code == 204
    level = await effective(registered)
    assert level["crit_above"] == {"value": 3.9, "source": "thresholds"}
    assert level["zscore"] == {"value": 6.0, "source": "domain"}

    # Areas of the same size: the smaller id holds.
    tie = unique("rules-tie")
    await _put_area(admin, f"{tie}-b", city, 0.002)
    await _put_area(admin, f"{tie}-a", city, 0.002)
    await put({"domain": "flood", "area": f"{tie}-b"}, {"currentLevel": {"warn_above": 2.8}})
    await put({"domain": "flood", "area": f"{tie}-a"}, {"currentLevel": {"warn_above": 2.7}})
    assert (await effective(plain))["warn_above"] == {"value": 2.7, "source": f"area:{tie}-a"}

    # An area's overrides go with it.
    assert (await admin.delete(f"/v1/areas/{tie}-a")).status_code == 204
    assert (await effective(plain))["warn_above"] == {"value": 2.8, "source": f"area:{tie}-b"}
    assert (await admin.get("/v1/devices/no-such-device-here/rules")).status_code == 404


async def test_keys_see_and_change_only_the_rules_of_their_scope(
    system: System, admin: httpx.AsyncClient
) -> None:
    city, other = _city(), _city()
    device_id = await _register(admin, city)
    where = {"domain": "flood", "city": city}
    assert (
        await admin.put("/v1/rules", params=where, json={"currentLevel": {"warn_above": 2.0}})
    ).status_code == 201

    async def key(role: str, cities: list[str]) -> httpx.AsyncClient:
        response = await admin.post("/v1/api-keys", json={"role": role, "cities": cities})
        assert response.status_code == 201, response.text
        return httpx.AsyncClient(
            base_url=system.api_url, headers={"X-API-Key": response.json()["key"]}, timeout=10
        )

    async with (
        await key("viewer", [city]) as viewer,
        await key("viewer", [other]) as outsider,
        await key("operator", [city]) as operator,
        await key("admin", [other]) as other_admin,
    ):
        assert (await viewer.get("/v1/rules", params=where)).status_code == 200
        assert (await viewer.get(f"/v1/devices/{device_id}/rules")).status_code == 200
        assert (await outsider.get("/v1/rules", params=where)).status_code == 404
        assert (await outsider.get(f"/v1/devices/{device_id}/rules")).status_code == 404
        body = {"currentLevel": {"warn_above": 1.0}}
        assert (await viewer.put("/v1/rules", params=where, json=body)).status_code == 403
        assert (await operator.put("/v1/rules", params=where, json=body)).status_code == 403
        assert (await other_admin.put("/v1/rules", params=where, json=body)).status_code == 403
        assert (
            await other_admin.put("/v1/rules", params={"device": device_id}, json=body)
        ).status_code == 404
    assert (await admin.get("/v1/rules", params=where)).json()["rules"] == {
        "currentLevel": {"warn_above": 2.0}
    }


# --- a rule change reaching two running processors ---


def _partition(device_id: str) -> int:
    partitions = list(range(PARTITIONS))
    return int(DefaultPartitioner()(device_id.encode(), partitions, partitions))


def _ids_over_every_partition(per_partition: int) -> list[str]:
    """Device ids whose records land on every partition of a topic, `per_partition` on each."""
    found: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    while any(len(ids) < per_partition for ids in found.values()):
        candidate = unique("rules-proc")
        bucket = found[_partition(candidate)]
        if len(bucket) < per_partition:
            bucket.append(candidate)
    return [device_id for ids in found.values() for device_id in ids]


@pytest.fixture
async def two_processors(
    system: System, log_dir: Path
) -> AsyncIterator[tuple[Topics, list[ComponentProcess]]]:
    """Two processors in one consumer group of their own, on topics of their own, over the
    session's database. The registry is re-read only hourly: a rule change must come through the
    rules version, not the registry refresh."""
    run = unique("rp")
    topics = Topics(f"{run}.")
    await ensure_topics("127.0.0.1:9092", topics.all(), partitions=PARTITIONS)
    env = {
        **system.env,
        "IOC_TOPIC_PREFIX": topics.prefix,
        "IOC_PROCESSOR_GROUP_ID": f"{run}-processors",
        "IOC_REGISTRY_REFRESH_S": "3600",
        "IOC_RULES_REFRESH_S": "1",
    }
    processes = [ComponentProcess("processor", env, log_dir, name=f"processor-{run}-{n}") for n in "ab"]
    try:
        processes[0].start()
        await processes[0].wait_for_log("processor owns")
        processes[1].start()
        await processes[1].wait_for_log("processor owns")

        async def shared() -> bool | None:
            # The first member's second assignment: the partitions are split between the two.
            return True if processes[0].log_text().count("processor owns") >= 2 else None

        await wait_until(shared, timeout=60, what="the partitions split between the two processors")
        yield topics, processes
    finally:
        for process in processes:
            process.stop()
        await delete_topics(topics.prefix)


async def _threshold_alarms(system: System, device_ids: list[str]) -> set[str]:
    connection = await asyncpg.connect(system.database_url)
    try:
        rows = await connection.fetch(
            "SELECT device_id FROM alarms WHERE device_id = ANY($1) AND rule = 'threshold.currentLevel'"
            " AND state <> 'resolved'",
            device_ids,
        )
    finally:
        await connection.close()
    return {row["device_id"] for row in rows}


async def _stored(system: System, device_ids: list[str]) -> int:
    connection = await asyncpg.connect(system.database_url)
    try:
        return int(
            await connection.fetchval(
                "SELECT count(*) FROM readings_flood WHERE device_id = ANY($1)", device_ids
            )
        )
    finally:
        await connection.close()


async def test_a_city_override_reaches_two_running_processors_within_seconds(
    system: System, admin: httpx.AsyncClient, two_processors: tuple[Topics, list[ComponentProcess]]
) -> None:
    topics, processes = two_processors
    city = _city()
    device_ids = _ids_over_every_partition(2)
    for device_id in device_ids:
        await _register(admin, city, device_id=device_id)
    level = 2.5  # below the flood domain's warn level (3.0), above the override's
    seq = 0

    async def send_round() -> None:
        nonlocal seq
        seq += 1
        now = datetime.now(tz=UTC)
        async with BusProducer("127.0.0.1:9092") as producer:
            futures = [
                await producer.send(
                    topics.telemetry("flood"),
                    Reading(
                        device_id=d,
                        city=city,
                        domain="flood",
                        ts=now,
                        seq=seq,
                        metrics={"currentLevel": level},
                        received_at=now,
                    ).to_bytes(),
                    key=d,
                )
                for d in device_ids
            ]
            await asyncio.gather(*futures)

    # Both processors judge every device once under the domain's rules, and keep the profiles.
    await send_round()

    async def stored_first() -> bool | None:
        return True if await _stored(system, device_ids) >= len(device_ids) else None

    await wait_until(stored_first, timeout=60, what="the first readings stored")
    assert await _threshold_alarms(system, device_ids) == set()

    changed_at = time.monotonic()
    response = await admin.put(
        "/v1/rules", params={"domain": "flood", "city": city}, json={"currentLevel": {"warn_above": 2.0}}
    )
    assert response.status_code == 201, response.text

    async def all_alarmed() -> bool | None:
        if await _threshold_alarms(system, device_ids) == set(device_ids):
            return True
        await send_round()
        await asyncio.sleep(0.5)
        return None

    await wait_until(all_alarmed, timeout=30, what="threshold alarms on every device", interval=0.1)
    elapsed = time.monotonic() - changed_at
    assert elapsed < 15, f"the override took {elapsed:.1f}s to be in force everywhere"
    # Every partition held some of the devices, and each processor read the rules again.
    assert {_partition(d) for d in device_ids} == set(range(PARTITIONS))
    for process in processes:
        assert process.running, process.tail()
        assert "rules changed" in process.log_text(), process.tail()
    log.info("city override in force on %d devices over two processors in %.1fs", len(device_ids), elapsed)


# --- ioc detect --rules ---


def _detect(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ioc.cli", "detect", *args],
        env=system.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_detect_back_tests_proposed_rules_on_a_device_s_stored_week(
    system: System, admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    city = _city()
    device_id = await _register(admin, city)
    now = datetime.now(tz=UTC).replace(microsecond=0)
    start = now - timedelta(days=8)
    # Half-hourly readings at 2.1 m, with three excursions to 2.55 m within the last week and one
    # eight days ago: never past the domain's warn level (3.0), past a proposed 2.5 three times.
    excursions = {now - timedelta(days=d) for d in (1, 3, 5)} | {start + timedelta(hours=2)}
    readings = []
    at, seq = start, 0
    while at < now - timedelta(minutes=5):
        high = any(timedelta(0) <= at - e < timedelta(hours=1) for e in excursions)
        readings.append(
            Reading(
                device_id=device_id,
                city=city,
                domain="flood",
                ts=at,
                seq=seq,
                metrics={"currentLevel": 2.55 if high else 2.1},
                received_at=at,
            )
        )
        at, seq = at + timedelta(minutes=30), seq + 1
    async with Database(system.database_url, max_size=2) as database:
        await database.write_batch(TelemetryBatch(records=[(r, 0) for r in readings]))

    proposed = tmp_path / "rules.json"
    proposed.write_text(json.dumps({"currentLevel": {"warn_above": 2.5}}))
    result = _detect(system, "--rules", str(proposed), "--device", device_id, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    in_week = [r for r in readings if r.ts >= now - timedelta(days=7)]
    assert abs(report["readings"] - len(in_week)) <= 1
    thresholds_now = [a for a in report["current"]["raised"] if a["rule"] == "threshold.currentLevel"]
    thresholds_proposed = [a for a in report["proposed"]["raised"] if a["rule"] == "threshold.currentLevel"]
    assert thresholds_now == []
    assert len(thresholds_proposed) == 3
    assert {a["severity"] for a in thresholds_proposed} == {"medium"}
    assert all(a["threshold"] == 2.5 and a["value"] == 2.55 for a in thresholds_proposed)

    text = _detect(system, "--rules", str(proposed), "--device", device_id, "--days", "7")
    assert text.returncode == 0, text.stderr
    assert f"proposed rules: {report['proposed']['alarms']} alarms" in text.stdout

    # Wrong rules, an unknown device, half the options: one clear line and a non-zero exit.
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"pressure": {"warn_above": 1.0}}))
    failed = _detect(system, "--rules", str(wrong), "--device", device_id)
    assert failed.returncode == 2 and "not a flood metric" in failed.stderr, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    unknown = _detect(system, "--rules", str(proposed), "--device", unique("no-such-device"))
    assert unknown.returncode == 1 and "not found" in unknown.stderr, unknown.stderr
    assert _detect(system, "--device", device_id).returncode == 2
