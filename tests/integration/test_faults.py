"""Faults injected into the running pipeline: a gateway killed mid-stream, Kafka stopped and
started again. Nothing acknowledged by the broker may be lost, nothing may be stored twice."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.integration.conftest import ADMIN_HEADERS, System
from tests.integration.harness import Publisher, services, unique, wait_until
from tests.integration.test_gateway import _at_least, count_readings, register


def flood_messages(city: str, devices: list[str], count: int) -> list[tuple[str, bytes]]:
    start = datetime.now(tz=UTC) - timedelta(minutes=4)
    return [
        (
            f"ioc/v1/{city}/flood/{devices[i % len(devices)]}/telemetry",
            json.dumps(
                {
                    "ts": (start + timedelta(milliseconds=i * 10)).isoformat(),
                    "seq": i,
                    "currentLevel": 1 + i % 7 / 10,
                }
            ).encode(),
        )
        for i in range(count)
    ]


def publish_in_background(messages: list[tuple[str, bytes]], rate: float) -> threading.Thread:
    """Publish at about `rate` messages/s from a thread; the broker acks each (QoS 1)."""

    def run() -> None:
        with Publisher() as publisher:
            step = max(1, int(rate / 20))
            for index in range(0, len(messages), step):
                publisher.publish_all(messages[index : index + step])
                time.sleep(step / rate)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def gateway_metric(gateway: Any, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{gateway.health_url}/metrics", timeout=5, headers=ADMIN_HEADERS)).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from the gateway's metrics")


async def test_gateway_killed_mid_stream_loses_and_doubles_nothing(
    system: System, admin: httpx.AsyncClient, gateways: Any
) -> None:
    city = unique("kill")[:32]
    settings = {
        "IOC_GATEWAY_CITIES": json.dumps([city]),
        "IOC_GATEWAY_SHARE_GROUP": unique("grp"),
        "IOC_GATEWAY_CLIENT_ID": unique("gw-kill"),
    }
    gateway = gateways("gateway-killed", **settings)
    await gateway.wait_for_log("gateway health listening")
    devices = [await register(admin, "flood", city=city) for _ in range(20)]
    total = 6000
    publisher = publish_in_background(flood_messages(city, devices, total), rate=1500)

    await wait_until(
        lambda: _at_least(count_readings(system.database_url, "readings_flood", devices), 500),
        timeout=30,
        what="the first readings stored",
    )
    gateway.stop(sig=signal.SIGKILL)
    stored_at_kill = await count_readings(system.database_url, "readings_flood", devices)
    await asyncio.to_thread(publisher.join, 60)
    assert stored_at_kill < total, "the stream ended before the kill; nothing was in flight"

    restarted = gateways("gateway-restarted", **settings)
    await restarted.wait_for_log("gateway health listening")
    await wait_until(
        lambda: _at_least(count_readings(system.database_url, "readings_flood", devices), total),
        timeout=90,
        what=f"all {total} readings after the restart (had {stored_at_kill} at the kill)",
    )
    await asyncio.sleep(2)  # anything redelivered twice would land by now
    assert await count_readings(system.database_url, "readings_flood", devices) == total


async def test_kafka_stopped_then_restarted_backlog_drains(
    system: System, admin: httpx.AsyncClient, gateways: Any
) -> None:
    city = unique("kafka")[:32]
    gateway = gateways(
        "gateway-kafka-outage",
        IOC_GATEWAY_CITIES=json.dumps([city]),
        IOC_GATEWAY_SHARE_GROUP=unique("grp"),
        IOC_GATEWAY_CLIENT_ID=unique("gw-outage"),
        IOC_GATEWAY_QUEUE_SIZE="200",
    )
    await gateway.wait_for_log("gateway health listening")
    devices = [await register(admin, "flood", city=city) for _ in range(10)]
    total = 3000
    services("stop", "kafka")
    try:
        with Publisher() as publisher:
            publisher.publish_all(flood_messages(city, devices, total))

        async def gateway_held_back() -> bool | None:
            backlog = await gateway_metric(gateway, "ioc_gateway_backlog")
            return True if backlog >= 200 else None

        await wait_until(gateway_held_back, timeout=60, what="the gateway's bounded backlog filling up")
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"{gateway.health_url}/ready", timeout=5)
        assert ready.status_code == 503, ready.text
        assert await gateway_metric(gateway, "ioc_gateway_acked_total") == 0
        assert await count_readings(system.database_url, "readings_flood", devices) == 0
    finally:
        services("up")
    await wait_until(
        lambda: _at_least(count_readings(system.database_url, "readings_flood", devices), total),
        timeout=180,
        what=f"all {total} readings after Kafka came back\n{system.logs()}",
        interval=0.5,
    )
    assert await count_readings(system.database_url, "readings_flood", devices) == total
    assert all(process.running for process in system.processes.values()), system.logs()
