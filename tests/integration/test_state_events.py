"""The processor's `state.changed` events on a real Kafka, on topics of its own: what committed
batches leave for the next flush, and how the flush cuts it per place and in chunks."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer

from ioc_core.bus import Topics, ensure_topics
from ioc_core.settings import Settings
from ioc_core.storage import StatusTransition, TelemetryBatch
from ioc_core.telemetry import Reading
from processors.detection import DeviceProfile
from processors.telemetry import TelemetryProcessor
from tests.integration.harness import delete_topics, unique, wait_until

BOOTSTRAP = "127.0.0.1:9092"
PARTITIONS = 6


def _profile(device_id: str, city: str, domain: str) -> DeviceProfile:
    return DeviceProfile.of(id=device_id, city=city, domain=domain, name=None, district=None, thresholds={})


def _batches(now: datetime) -> tuple[list[list[Reading]], dict[str, DeviceProfile]]:
    """1200 grid devices in one place and one water device in another; then the water device
    again, a late reading of it, and a device no longer registered."""

    def reading(device_id: str, city: str, domain: str, ts: datetime, **metrics: float) -> Reading:
        return Reading(device_id, city, domain, ts, None, metrics, now)

    profiles = {f"g-{i}": _profile(f"g-{i}", "ha-noi", "grid") for i in range(1200)}
    profiles["w-1"] = _profile("w-1", "can-tho", "water")
    first = [reading(f"g-{i}", "ha-noi", "grid", now, voltage=220.0) for i in range(1200)]
    first += [reading("w-1", "can-tho", "water", now, pressure=2.0, flow=10.0)]
    second = [
        reading("w-1", "can-tho", "water", now + timedelta(seconds=5), pressure=2.5),
        reading("w-1", "can-tho", "water", now - timedelta(seconds=60), pressure=9.9),  # late
        reading("not-registered", "can-tho", "water", now, pressure=1.0),
    ]
    return [first, second], profiles


async def _received(consumer: AIOKafkaConsumer) -> list[dict[str, Any]]:
    await consumer.start()
    events: list[dict[str, Any]] = []

    async def four_events() -> list[dict[str, Any]] | None:
        for records in (await consumer.getmany(timeout_ms=200)).values():
            events.extend(json.loads(r.value) for r in records)
        return events if len(events) >= 4 else None

    await wait_until(four_events, timeout=20, what="state.changed events")
    await asyncio.sleep(1)
    for records in (await consumer.getmany(timeout_ms=500)).values():
        events.extend(json.loads(r.value) for r in records)
    return events


async def test_the_processor_sends_the_latest_state_per_place_in_chunks() -> None:
    topics = Topics(f"{unique('state')}.")
    await ensure_topics(BOOTSTRAP, [topics.events], partitions=PARTITIONS)
    processor = TelemetryProcessor(Settings(kafka_bootstrap=BOOTSTRAP, topic_prefix=topics.prefix))
    consumer = AIOKafkaConsumer(topics.events, bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest")
    now = datetime.now(tz=UTC).replace(microsecond=0)
    try:
        batches, profiles = _batches(now)
        for readings in batches:
            batch = TelemetryBatch(records=[(r, 0) for r in readings])
            processor._state_events.remember(batch, readings, [], profiles)
        offline = StatusTransition(
            "w-1", "can-tho", "water", None, None, "offline", "online", "status_message", now
        )
        processor._state_events.note_status([offline])
        await processor._producer.start()
        await processor._state_events.run_once()
        await processor._state_events.run_once()  # nothing new: nothing sent
        events = await _received(consumer)
    finally:
        await consumer.stop()
        await processor.stop()  # only its producer was started
        await delete_topics(topics.prefix)

    assert len(events) == 4 and processor.state_events_sent == 4
    assert {e["type"] for e in events} == {"state.changed"}
    grid = [e for e in events if e["subject"] == "ha-noi/grid"]
    assert sorted(len(e["data"]["items"]) for e in grid) == [200, 500, 500]
    assert len({i["device_id"] for e in grid for i in e["data"]["items"]}) == 1200
    [water] = [e for e in events if e["subject"] == "can-tho/water"]
    assert water["data"]["city"] == "can-tho" and water["data"]["domain"] == "water"
    # Latest wins, metrics merge, the late reading changes nothing, the status is the newest.
    assert water["data"]["items"] == [
        {
            "device_id": "w-1",
            "status": "offline",
            "ts": (now + timedelta(seconds=5)).isoformat(),
            "metrics": {"pressure": 2.5, "flow": 10.0},
        }
    ]
