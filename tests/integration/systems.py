"""A system of a test module's own: its database, topics, gateway, processor and API processes,
for tests whose settings (retry timings, silence limits, private webhook addresses) or faults
must not touch the session's system."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from tests.integration.conftest import ADMIN_KEY, POSTGRES_URL, free_port
from tests.integration.harness import ComponentProcess, delete_topics, test_env, unique

_READY_LINE = {
    "processor": "processor joined group",
    "gateway": "gateway health listening",
    "api": "API listening",
    "webhooks": "webhook worker",
}


@dataclass
class OwnSystem:
    name: str
    env: dict[str, str]
    processes: dict[str, ComponentProcess]
    log_dir: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['IOC_API_PORT']}"

    @property
    def database_url(self) -> str:
        return self.env["IOC_DATABASE_URL"]

    async def register_devices(self, city: str, domain: str, count: int, prefix: str) -> list[str]:
        """Register `count` new devices through the API; their ids."""
        ids = [unique(prefix) for _ in range(count)]
        async with httpx.AsyncClient(
            base_url=self.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
        ) as api:
            for device_id in ids:
                device = {
                    "id": device_id,
                    "city": city,
                    "domain": domain,
                    "location": {"lat": 20.8, "lon": 106.7},
                }
                response = await api.post("/v1/devices", json=device)
                assert response.status_code == 201, response.text
        return ids

    async def restart(self, command: str) -> ComponentProcess:
        """Start `command` again (after the test stopped or killed it) under a new log name."""
        process = ComponentProcess(command, self.env, self.log_dir, name=f"{command}-{unique(self.name)}")
        self.processes[command] = process
        process.start()
        await process.wait_for_log(_READY_LINE[command])
        return process


@contextlib.asynccontextmanager
async def new_database() -> AsyncIterator[str]:
    """The URL of a database name no one uses (created by whoever migrates it), dropped at the end."""
    name = f"ioc_test_{int(time.time())}_{uuid.uuid4().hex[:8]}"
    try:
        yield f"{POSTGRES_URL}/{name}"
    finally:
        admin = await asyncpg.connect(f"{POSTGRES_URL}/postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def own_system(
    log_dir: Path,
    name: str,
    cities: list[str],
    *,
    commands: tuple[str, ...] = ("processor", "gateway", "api"),
    **settings: str,
) -> AsyncIterator[OwnSystem]:
    """Migrate a new database and run `commands` against it, its gateway taking `cities`;
    `settings` (IOC_* variables) override the defaults. Everything is removed at the end."""
    async with (
        new_database() as database_url,
        _running(log_dir, name, cities, commands, database_url, settings) as system,
    ):
        yield system


@contextlib.asynccontextmanager
async def _running(
    log_dir: Path,
    name: str,
    cities: list[str],
    commands: tuple[str, ...],
    database_url: str,
    settings: dict[str, str],
) -> AsyncIterator[OwnSystem]:
    run = unique(name)
    env = test_env(
        IOC_DATABASE_URL=database_url,
        IOC_API_PORT=str(free_port()),
        IOC_ADMIN_API_KEY=ADMIN_KEY,
        IOC_GATEWAY_CLIENT_ID=f"gw-{run}",
        IOC_GATEWAY_SHARE_GROUP=f"gw-{run}",
        IOC_GATEWAY_CITIES=json.dumps(cities),
        IOC_GATEWAY_HEALTH_PORT=str(free_port()),
        IOC_MQTT_SESSION_EXPIRY_S="300",
        IOC_PROCESSOR_GROUP_ID=f"processor-{run}",
        IOC_TOPIC_PREFIX=f"{run}.",
        IOC_REGISTRY_REFRESH_S="1",
        IOC_SILENCE_CHECK_S="1",
        IOC_OUTBOX_POLL_S="0.5",
        **settings,
    )
    migrated = subprocess.run(
        [sys.executable, "-m", "ioc.cli", "migrate"], env=env, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    system = OwnSystem(
        name=name,
        env=env,
        processes={c: ComponentProcess(c, env, log_dir, name=f"{c}-{name}") for c in commands},
        log_dir=log_dir,
    )
    for process in system.processes.values():
        process.start()
    try:
        for command, process in system.processes.items():
            await process.wait_for_log(_READY_LINE[command])
        yield system
    finally:
        for process in system.processes.values():
            process.stop()
        # On the Kafka the system ran on (a test may point it at a cluster of its own).
        await delete_topics(env["IOC_TOPIC_PREFIX"], env.get("IOC_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
