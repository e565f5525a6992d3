"""`ioc up`: the whole system in one process with the real broker and database, once with the
in-process log bus in place of Kafka (`IOC_KAFKA_BOOTSTRAP` unset) and once with the real Kafka
(set): telemetry reaches the API, alarms reach the live stream, and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from simulators.cities import city_areas, slug
from tests.integration import harness
from tests.integration.conftest import free_port
from tests.integration.harness import Publisher, unique, wait_until
from tests.integration.systems import new_database

CITY = unique("up")[:32]


@pytest.fixture(scope="module", params=["in-process bus", "kafka"])
async def up(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    async with new_database() as database_url:
        run = unique("up")
        kafka = (
            {
                "IOC_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
                "IOC_TOPIC_PREFIX": f"{run}.",
                "IOC_PROCESSOR_GROUP_ID": f"processor-{run}",
            }
            if request.param == "kafka"
            else {}
        )
        data_dir = tmp_path_factory.mktemp("ioc-data")
        port = free_port()
        env = harness.test_env(
            IOC_DATABASE_URL=database_url,
            IOC_MQTT_URL="mqtt://127.0.0.1:1883",
            IOC_API_PORT=str(port),
            IOC_DATA_DIR=str(data_dir),
            IOC_SIMULATOR_DEVICES="0",
            IOC_GATEWAY_CITIES=json.dumps([CITY]),
            IOC_GATEWAY_CLIENT_ID=unique("gw-up"),
            IOC_GATEWAY_SHARE_GROUP=unique("gw-up"),
            IOC_REGISTRY_REFRESH_S="1",
            IOC_STATE_EVENT_INTERVAL_S="0.5",
            **kafka,
        )
        # `ioc up` makes and keeps the key webhook secrets are sealed with.
        del env["IOC_SECRETS_KEY"]
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
                "bus": request.param,
            }
            # SIGTERM stops it cleanly: checked here, after every test of this bus has used it,
            # so that no test order can stop it under another test.
            code = process.stop(signal.SIGTERM, timeout=30)
            assert code == 0 and "Traceback" not in output(), f"ioc up did not stop cleanly:\n{output()}"
        finally:
            process.stop(signal.SIGKILL)
            if kafka:
                await harness.delete_topics(kafka["IOC_TOPIC_PREFIX"])


async def test_up_announces_a_page_link_with_a_kept_admin_key(up: dict[str, Any]) -> None:
    text = up["output"]()
    assert f"{up['url']}/#key={up['key']}" in text
    for kept in ("admin-api-key", "secrets-key", "viewer-api-key"):
        assert (Path(up["data_dir"]) / kept).stat().st_mode & 0o077 == 0, kept
    assert ("in-process log bus" in text) is (up["bus"] == "in-process bus")


async def test_up_announces_a_wall_screen_link_with_a_viewer_key(up: dict[str, Any]) -> None:
    """The wall screen gets a key that reads and changes nothing; the admin key is printed apart."""
    text = up["output"]()
    viewer = (Path(up["data_dir"]) / "viewer-api-key").read_text().strip()
    assert viewer != up["key"]
    [line] = [line for line in text.splitlines() if "wall screen" in line]
    assert line.endswith(f"{up['url']}/#key={viewer}")
    [admin_line] = [line for line in text.splitlines() if "admin API key" in line]
    assert admin_line.split()[-1] == up["key"] and viewer not in admin_line
    # Printed for the person at the terminal only: no log line carries either key.
    logged = [line for line in text.splitlines() if " INFO " in line or " WARNING " in line]
    assert logged and not [line for line in logged if viewer in line or up["key"] in line]
    async with httpx.AsyncClient(base_url=up["url"], headers={"X-API-Key": viewer}, timeout=10) as api:
        assert (await api.get("/v1/state", params={"city": CITY})).status_code == 200
        assert (await api.get("/v1/webhooks")).status_code == 403
        device = {
            "id": unique("wall"),
            "city": CITY,
            "domain": "flood",
            "location": {"lat": 21.0, "lon": 105.8},
        }
        refused = await api.post("/v1/devices", json=device)
        assert refused.status_code == 403


async def test_telemetry_alarms_and_stream_run_on_either_bus(up: dict[str, Any]) -> None:
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


async def test_in_process_bus_loses_and_doubles_nothing_when_the_process_dies(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`ioc up` exits abruptly after storing its first batch, before committing it; the next run
    reads the bus back from disk, replays that batch without doubles and stores the rest."""
    async with new_database() as database_url:
        data_dir = tmp_path_factory.mktemp("ioc-data-crash")
        city = unique("crash")[:32]
        env = harness.test_env(
            IOC_DATABASE_URL=database_url,
            IOC_MQTT_URL="mqtt://127.0.0.1:1883",
            IOC_API_PORT=str(free_port()),
            IOC_DATA_DIR=str(data_dir),
            IOC_SIMULATOR_DEVICES="0",
            IOC_GATEWAY_CITIES=json.dumps([city]),
            IOC_GATEWAY_CLIENT_ID=unique("gw-crash"),
            IOC_GATEWAY_SHARE_GROUP=unique("gw-crash"),
            IOC_REGISTRY_REFRESH_S="1",
            IOC_PROCESSOR_BATCH_MAX="50",
        )
        first = harness.ComponentProcess(
            "up", {**env, "IOC_FAULT_EXIT_AFTER_BATCHES": "1"}, data_dir, name="crash-1"
        )
        second = harness.ComponentProcess("up", env, data_dir, name="crash-2")
        total = 400
        try:
            first.start()
            await first.wait_for_log("operations page", timeout=60)
            key = (data_dir / "admin-api-key").read_text().strip()
            base = f"http://127.0.0.1:{env['IOC_API_PORT']}"
            async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=10) as api:
                device_id = unique("crash-flood")
                created = await api.post(
                    "/v1/devices",
                    json={
                        "id": device_id,
                        "city": city,
                        "domain": "flood",
                        "location": {"lat": 21.0, "lon": 105.8},
                    },
                )
                assert created.status_code == 201, created.text
            await asyncio.sleep(3)  # the gateway's registry refreshes every second
            start = int(time.time()) - total
            topic = f"ioc/v1/{city}/flood/{device_id}/telemetry"
            with Publisher() as publisher:
                publisher.publish_all(
                    [
                        (
                            topic,
                            json.dumps({"ts": start + n, "seq": n, "currentLevel": 1.0 + n / 1000}).encode(),
                        )
                        for n in range(total)
                    ]
                )

            async def exited() -> bool | None:
                return True if not first.running else None

            await wait_until(exited, timeout=60, what="the fault-injected exit")
            assert "fault injection" in first.log_text()
            viewer = (data_dir / "viewer-api-key").read_text()
            second.start()
            await second.wait_for_log("operations page", timeout=60)
            assert (data_dir / "viewer-api-key").read_text() == viewer, "the wall screen's link stays valid"

            async def stored() -> int | None:
                connection = await asyncpg.connect(database_url)
                try:
                    count: int = await connection.fetchval(
                        "SELECT count(*) FROM readings_flood WHERE device_id = $1", device_id
                    )
                finally:
                    await connection.close()
                return count if count >= total else None

            assert (
                await wait_until(stored, timeout=60, what=f"all {total} readings stored", interval=0.5)
                == total
            )
            await asyncio.sleep(1)
            assert await stored() == total
            assert "read back" in second.log_text()
            assert second.stop(signal.SIGTERM, timeout=30) == 0, second.log_text()
        finally:
            first.stop(signal.SIGKILL)
            second.stop(signal.SIGKILL)


async def test_up_stores_its_simulated_citys_approximate_areas(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With the simulator on, `ioc up` stores its city's generated province, wards and catchments
    at every start (replacing them), and the simulated devices lie in them: one ward each."""
    city = "da-nang"
    async with new_database() as database_url:
        data_dir = tmp_path_factory.mktemp("ioc-data-areas")
        env = harness.test_env(
            IOC_DATABASE_URL=database_url,
            IOC_MQTT_URL="mqtt://127.0.0.1:1883",
            IOC_API_PORT=str(free_port()),
            IOC_DATA_DIR=str(data_dir),
            IOC_SIMULATOR_CITY=city,
            IOC_SIMULATOR_DEVICES="10",
            IOC_GATEWAY_CITIES=json.dumps([city]),
            IOC_GATEWAY_CLIENT_ID=unique("gw-areas"),
            IOC_GATEWAY_SHARE_GROUP=unique("gw-areas"),
        )
        expected = {feature["id"]: feature for feature in city_areas(city)}
        wards = sorted(area_id for area_id, f in expected.items() if f["properties"]["kind"] == "ward")
        runs = [harness.ComponentProcess("up", env, data_dir, name=f"up-areas-{n}") for n in (1, 2)]
        try:
            for run in runs:
                run.start()
                await run.wait_for_log("operations page", timeout=90)
                key = (data_dir / "admin-api-key").read_text().strip()
                base = f"http://127.0.0.1:{env['IOC_API_PORT']}"
                async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=10) as api:
                    found = await api.get("/v1/areas", params={"city": city, "kind": "ward"})
                    assert found.status_code == 200, found.text
                    features = found.json()["features"]
                    assert sorted(f["id"] for f in features) == wards
                    for feature in features:
                        properties = feature["properties"]
                        assert (
                            properties["approximate"] is True and properties["parent"] == f"{city}.province"
                        )
                        assert properties["name_vi"] == expected[feature["id"]]["properties"]["name_vi"]
                    everything = (await api.get("/v1/areas", params={"city": city})).json()["features"]
                    assert sorted(f["id"] for f in everything) == sorted(expected)
                    devices = (await api.get("/v1/devices", params={"city": city, "limit": 100})).json()
                    assert len(devices["items"]) == 10
                    for device in devices["items"]:
                        in_wards = [area for area in device["areas"] if ".ward." in area]
                        assert in_wards == [f"{city}.ward.{slug(device['district'])}"], device
                        assert f"{city}.province" in device["areas"], device
                assert run.stop(signal.SIGTERM, timeout=30) == 0, run.log_text()
                assert "Traceback" not in run.log_text(), run.log_text()
        finally:
            for run in runs:
                run.stop(signal.SIGKILL)
