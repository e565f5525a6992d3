"""Processors under faults, on a bus of their own (a private topic prefix and consumer group over
the session's database): killed between write and commit, partitions moving between members, and
two processors racing on the same alarms. Readings are produced straight into Kafka, as the
gateway would, so the counts are exact.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from ioc_core.bus import BusProducer, Topics, ensure_topics
from ioc_core.telemetry import Reading
from processors.telemetry import FAULT_EXIT_CODE
from tests.integration.conftest import SESSION_CITY, System
from tests.integration.harness import ComponentProcess, delete_topics, unique, wait_until

CITY = SESSION_CITY
LOCATION = {"lat": 20.86, "lon": 106.68}
# Level readings every 10 s, all above the flood station's alert level and every tenth (the first
# among them) above its danger level: each device has one threshold alarm, raised once and
# repeated by every reading.
STEP_S = 10


@dataclass
class PrivateBus:
    topics: Topics
    env: dict[str, str]
    log_dir: Path
    processes: list[ComponentProcess]

    def processor(self, name: str, **settings: str) -> ComponentProcess:
        process = ComponentProcess("processor", {**self.env, **settings}, self.log_dir, name=name)
        process.start()
        self.processes.append(process)
        return process

    async def produce(self, readings: list[Reading]) -> None:
        async with BusProducer("127.0.0.1:9092") as producer:
            futures = [
                await producer.send(self.topics.telemetry(r.domain), r.to_bytes(), key=r.device_id)
                for r in readings
            ]
            await asyncio.gather(*futures)


@pytest.fixture
async def private_bus(system: System, log_dir: Path) -> AsyncIterator[PrivateBus]:
    run = unique("pb")
    topics = Topics(f"{run}.")
    await ensure_topics("127.0.0.1:9092", topics.all(), partitions=6)
    env = {
        **system.env,
        "IOC_TOPIC_PREFIX": topics.prefix,
        "IOC_PROCESSOR_GROUP_ID": f"{run}-processors",
        "IOC_PROCESSOR_BATCH_MAX": "500",
    }
    bus = PrivateBus(topics, env, log_dir, [])
    try:
        yield bus
    finally:
        for process in bus.processes:
            process.stop()
        await delete_topics(topics.prefix)


async def register_many(admin: httpx.AsyncClient, count: int) -> list[str]:
    ids = [unique("fault-flood") for _ in range(count)]
    for device_id in ids:
        response = await admin.post(
            "/v1/devices", json={"id": device_id, "city": CITY, "domain": "flood", "location": LOCATION}
        )
        assert response.status_code == 201, response.text
    return ids


def level_readings(device_ids: list[str], per_device: int) -> Iterator[Reading]:
    start = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(hours=3)
    for index in range(per_device):
        ts = start + timedelta(seconds=index * STEP_S)
        # The first reading is at the danger level: the alarm's tracker does not change after it.
        level = 5.0 if index % 10 == 0 else 3.5
        for device_id in device_ids:
            yield Reading(
                device_id=device_id,
                city=CITY,
                domain="flood",
                ts=ts,
                seq=index,
                metrics={"currentLevel": level},
                received_at=ts,
            )


async def fetch(system: System, query: str, *args: object) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(system.database_url)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


async def stored_per_device(system: System, device_ids: list[str]) -> dict[str, int]:
    rows = await fetch(
        system,
        "SELECT device_id, count(*) AS n FROM readings_flood WHERE device_id = ANY($1) GROUP BY 1",
        device_ids,
    )
    return {r["device_id"]: r["n"] for r in rows}


async def alarm_rows(system: System, device_ids: list[str]) -> list[asyncpg.Record]:
    return await fetch(
        system,
        "SELECT device_id, rule, state, count FROM alarms"
        " WHERE device_id = ANY($1) AND rule = 'threshold.currentLevel' ORDER BY id",
        device_ids,
    )


async def wait_for_all(system: System, device_ids: list[str], per_device: int, timeout: float = 90) -> None:
    async def complete() -> bool | None:
        counts = await stored_per_device(system, device_ids)
        return True if sum(counts.values()) >= per_device * len(device_ids) else None

    await wait_until(complete, timeout=timeout, what=f"{per_device * len(device_ids)} readings stored")


async def assert_exactly_once(system: System, device_ids: list[str], per_device: int) -> None:
    counts = await stored_per_device(system, device_ids)
    assert counts == {device_id: per_device for device_id in device_ids}
    alarms = await alarm_rows(system, device_ids)
    assert sorted(a["device_id"] for a in alarms) == sorted(device_ids), "one alarm per device"
    assert {(a["rule"], a["state"]) for a in alarms} == {("threshold.currentLevel", "active")}
    # Every violating reading counted once: none lost, none counted again after a replay.
    assert {a["count"] for a in alarms} == {per_device}


async def states_behind_readings(system: System, device_ids: list[str]) -> int:
    """How many of the devices have a stored detector state older than their newest reading."""
    rows = await fetch(
        system,
        "SELECT s.device_id FROM detector_state s JOIN readings_flood r USING (device_id)"
        " WHERE s.device_id = ANY($1) GROUP BY s.device_id, s.state"
        " HAVING (s.state::jsonb ->> 'last_ts')::timestamptz < max(r.ts)",
        device_ids,
    )
    return len(rows)


@pytest.mark.parametrize("state_write_s", ["0", "3600"])
async def test_processor_killed_between_write_and_commit_replays_without_doubles(
    system: System, admin: httpx.AsyncClient, private_bus: PrivateBus, state_write_s: str
) -> None:
    devices = await register_many(admin, 20)
    per_device, opening = 100, 10
    readings = list(level_readings(devices, per_device))
    # The alarms open (and their trackers are written) before the crashing processor starts, so
    # that every reading it takes leaves its alarm's tracker as it was.
    await private_bus.produce(readings[: opening * len(devices)])
    opener = private_bus.processor("processor-opening", IOC_PROCESSOR_STATE_WRITE_S=state_write_s)
    await wait_for_all(system, devices, opening)
    assert opener.stop() == 0, opener.tail()
    await private_bus.produce(readings[opening * len(devices) :])

    crashing = private_bus.processor(
        "processor-crash", IOC_FAULT_EXIT_AFTER_BATCHES="2", IOC_PROCESSOR_STATE_WRITE_S=state_write_s
    )
    for _ in range(600):
        if not crashing.running:
            break
        await asyncio.sleep(0.1)
    assert crashing.stop() == FAULT_EXIT_CODE, crashing.tail()
    written_before_crash = sum((await stored_per_device(system, devices)).values())
    assert opening * len(devices) < written_before_crash < per_device * len(devices)
    # Held unwritten, what the baselines learned since the alarms last changed dies with the
    # processor; the readings and the alarms' counts must not.
    behind = await states_behind_readings(system, devices)
    assert behind > 0 if state_write_s != "0" else behind == 0

    private_bus.processor("processor-after-crash", IOC_PROCESSOR_STATE_WRITE_S=state_write_s)
    await wait_for_all(system, devices, per_device)
    await asyncio.sleep(1)
    await assert_exactly_once(system, devices, per_device)


async def test_rebalance_between_processors_loses_and_doubles_nothing(
    system: System, admin: httpx.AsyncClient, private_bus: PrivateBus
) -> None:
    devices = await register_many(admin, 40)
    per_device = 300
    readings = list(level_readings(devices, per_device))
    first = private_bus.processor("processor-a")
    await first.wait_for_log("processor owns")
    third = len(readings) // 3
    await private_bus.produce(readings[:third])

    second = private_bus.processor("processor-b")
    await private_bus.produce(readings[third : 2 * third])
    await second.wait_for_log("processor owns")
    # The first member leaves while work is under way: its partitions move to the second.
    first.stop()
    await private_bus.produce(readings[2 * third :])

    await wait_for_all(system, devices, per_device, timeout=120)
    await asyncio.sleep(1)
    await assert_exactly_once(system, devices, per_device)


async def test_two_processors_racing_on_the_same_readings_keep_one_open_alarm(
    system: System, admin: httpx.AsyncClient, private_bus: PrivateBus
) -> None:
    devices = await register_many(admin, 30)
    # Two consumer groups: both processors read every record, so each device's alarm is raised
    # by both at nearly the same moment; the database's unique index keeps one open.
    for name in ("racer-a", "racer-b"):
        process = private_bus.processor(name, IOC_PROCESSOR_GROUP_ID=unique(name))
        await process.wait_for_log("processor owns")
    start = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(minutes=10)
    await private_bus.produce(
        [
            Reading(
                device_id=d,
                city=CITY,
                domain="flood",
                ts=start,
                seq=1,
                metrics={"currentLevel": 5.0},
                received_at=start,
            )
            for d in devices
        ]
    )

    async def all_raised() -> list[asyncpg.Record] | None:
        rows = await alarm_rows(system, devices)
        return rows if {r["device_id"] for r in rows} == set(devices) else None

    await wait_until(all_raised, timeout=60, what="an alarm for every device")
    await asyncio.sleep(2)
    rows = await alarm_rows(system, devices)
    open_per_device = {
        d: sum(1 for r in rows if r["device_id"] == d and r["state"] != "resolved") for d in devices
    }
    assert set(open_per_device.values()) == {1}, json.dumps(open_per_device)
