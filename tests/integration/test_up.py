"""`ioc up`: the whole system in one process, here with the in-process log bus in place of Kafka
(`IOC_KAFKA_BOOTSTRAP` unset) and the real broker and database: telemetry reaches the API,
alarms reach the live stream, and SIGTERM stops it cleanly after storing what the bus held."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration import harness
from tests.integration.conftest import POSTGRES_URL, free_port
from tests.integration.harness import Publisher, unique, wait_until

CITY = unique("up")[:32]


@pytest.fixture(scope="module")
async def up(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    name = f"ioc_test_{int(time.time())}_{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path_factory.mktemp("ioc-data")
    port = free_port()
    env = harness.test_env(
        IOC_DATABASE_URL=f"{POSTGRES_URL}/{name}",
        IOC_MQTT_URL="mqtt://127.0.0.1:1883",
        IOC_API_PORT=str(port),
        IOC_DATA_DIR=str(data_dir),
        IOC_SIMULATOR_DEVICES="0",
        IOC_GATEWAY_CITIES=json.dumps([CITY]),
        IOC_GATEWAY_CLIENT_ID=unique("gw-up"),
        IOC_GATEWAY_SHARE_GROUP=unique("gw-up"),
        IOC_REGISTRY_REFRESH_S="1",
        IOC_STATE_EVENT_INTERVAL_S="0.5",
    )
    process = harness.ComponentProcess("up", env, data_dir, name="up")
    process.start()

    def output() -> str:
        return process.log_text()

    async def announced() -> str | None:
        if not process.running:
            raise AssertionError(f"ioc up exited:\n{output()}")
        text = output()
        return text if "operations page" in text else None

    try:
        await wait_until(announced, timeout=90, what="ioc up to announce itself", interval=0.2)
        key = (data_dir / "admin-api-key").read_text().strip()
        yield {
            "process": process,
            "url": f"http://127.0.0.1:{port}",
            "key": key,
            "output": output,
            "data_dir": data_dir,
        }
    finally:
        process.stop(signal.SIGKILL)
        admin = await asyncpg.connect(f"{POSTGRES_URL}/postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_up_announces_a_page_link_with_a_kept_admin_key(up: dict[str, Any]) -> None:
    text = up["output"]()
    assert f"{up['url']}/#key={up['key']}" in text
    assert (Path(up["data_dir"]) / "admin-api-key").stat().st_mode & 0o077 == 0
    assert "in-process log bus" in text


async def test_telemetry_alarms_and_stream_run_on_the_in_process_bus(up: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {up['key']}"}
    async with httpx.AsyncClient(base_url=up["url"], headers=headers, timeout=10) as api:
        assert (await api.get("/ready")).status_code == 200
        device_id = unique("up-flood")
        created = await api.post(
            "/v1/devices",
            json={"id": device_id, "city": CITY, "domain": "flood", "location": {"lat": 21.0, "lon": 105.8}},
        )
        assert created.status_code == 201, created.text
        async with api.stream("GET", "/v1/stream", params={"city": CITY, "types": "alarm"}) as stream:
            assert stream.status_code == 200
            topic = f"ioc/v1/{CITY}/flood/{device_id}/telemetry"
            payload = json.dumps({"ts": datetime.now(UTC).isoformat(), "currentLevel": 4.9}).encode()

            async def registered() -> bool | None:
                # The gateway learns the device from its registry refresh (every second here).
                with Publisher() as publisher:
                    publisher.publish_all([(topic, payload)])
                latest = (await api.get(f"/v1/devices/{device_id}")).json().get("latest")
                return True if latest else None

            await wait_until(
                registered, timeout=30, what="the reading through the in-process bus", interval=1
            )
            async for line in stream.aiter_lines():
                if line.startswith("data:") and device_id in line:
                    event = json.loads(line.removeprefix("data:"))
                    assert event["type"] == "alarm.raised" and event["data"]["severity"] == "critical"
                    break


async def test_sigterm_stops_cleanly(up: dict[str, Any]) -> None:
    process: harness.ComponentProcess = up["process"]
    assert process.stop(signal.SIGTERM, timeout=30) == 0, up["output"]()
    assert "Traceback" not in up["output"]()
