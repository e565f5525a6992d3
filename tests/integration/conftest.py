"""The real services (Mosquitto, Kafka, TimescaleDB started by `make services`) and a running
system of `ioc gateway`, `ioc processor` and `ioc api` processes against them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, async_playwright

from ioc_core.bus import Topics
from ioc_core.storage import Database, StorageTier, drop_database, ensure_database
from ioc_core.storage.schema import MIGRATIONS
from tests.integration.harness import ComponentProcess, delete_topics, test_env, unique

SERVICES = {"Mosquitto": ("127.0.0.1", 1883), "Kafka": ("127.0.0.1", 9092)}
ADMIN_KEY = "test-admin-key-0123456789abcdef"
# /metrics of every component takes the admin key (or a metrics key).
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
# The session's gateway takes telemetry of this city only; tests that run gateways of their own
# use cities of their own, so each message has exactly one gateway group.
SESSION_CITY = unique("city")[:32]
# Waste devices go offline after a few seconds of silence in these tests.
FAST_OFFLINE_DOMAIN, FAST_OFFLINE_S = "waste", 4
_STALE_TEST_DATABASE_S = 6 * 3600
POSTGRES_URL = os.environ.get("IOC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
# The other storage tiers' servers of `make services`: TimescaleDB with the Apache licence, and
# PostgreSQL without TimescaleDB. (The one above has the community licence where it was built.)
APACHE_POSTGRES_URL = os.environ.get("IOC_TEST_APACHE_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5434")
PLAIN_POSTGRES_URL = os.environ.get("IOC_TEST_PLAIN_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5433")
TIER_SERVERS = {
    StorageTier.COMMUNITY: POSTGRES_URL,
    StorageTier.APACHE: APACHE_POSTGRES_URL,
    StorageTier.POSTGRES: PLAIN_POSTGRES_URL,
}


@asynccontextmanager
async def scratch_database(server: str) -> AsyncIterator[str]:
    """The URL of a database of its own on `server` (a URL without a database), dropped after."""
    url = f"{server}/ioc_test_{int(time.time())}_{uuid.uuid4().hex[:8]}"
    await ensure_database(url)
    try:
        yield url
    finally:
        await drop_database(url)


async def migrate_to(connection: asyncpg.Connection, below: int) -> None:
    """The schema as a release before migration `below` left it, for tests of an upgrade."""
    await connection.execute(
        "CREATE TABLE schema_migrations ("
        " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, sql in MIGRATIONS:
        if version < below:
            await connection.execute(sql)
            await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def real_services() -> None:
    missing = []
    for name, (host, port) in SERVICES.items():
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError:
            missing.append(f"{name} on {host}:{port}")
    database = urlsplit(POSTGRES_URL)
    try:
        socket.create_connection((database.hostname, database.port or 5432), timeout=2).close()
    except OSError:
        missing.append(f"TimescaleDB on {database.hostname}:{database.port or 5432}")
    if missing:
        pytest.fail(f"real services not running: {', '.join(missing)}; start them with `make services`")


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    name = f"ioc_test_{int(time.time())}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{POSTGRES_URL}/postgres")
    try:
        # Databases of earlier runs that died before cleaning up; runs going on beside this one
        # are younger than a few hours.
        for row in await admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'ioc_test_%'"):
            created = row["datname"].split("_")[2]
            if created.isdigit() and int(created) < time.time() - _STALE_TEST_DATABASE_S:
                await admin.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
    finally:
        await admin.close()
    yield f"{POSTGRES_URL}/{name}"
    admin = await asyncpg.connect(f"{POSTGRES_URL}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def fresh_database() -> AsyncIterator[Database]:
    """A migrated database of the test's own, started, and dropped when the test ends."""
    url = f"{POSTGRES_URL}/ioc_test_fresh_{uuid.uuid4().hex[:8]}"
    await ensure_database(url)
    try:
        async with Database(url, max_size=2) as database:
            await database.migrate()
            yield database
    finally:
        await drop_database(url)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("component-logs")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class System:
    env: dict[str, str]
    api_url: str
    database_url: str
    processes: dict[str, ComponentProcess]

    @property
    def topics(self) -> Topics:
        return Topics(self.env["IOC_TOPIC_PREFIX"])

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{p.tail(15)}" for name, p in self.processes.items())


@pytest.fixture(scope="session")
def system_env(database_url: str) -> dict[str, str]:
    run = unique("t")
    return test_env(
        IOC_DATABASE_URL=database_url,
        IOC_API_PORT=str(free_port()),
        IOC_ADMIN_API_KEY=ADMIN_KEY,
        IOC_GATEWAY_CLIENT_ID=f"ioc-gateway-{run}",
        IOC_GATEWAY_SHARE_GROUP=f"gw-{run}",
        IOC_MQTT_SESSION_EXPIRY_S="300",
        IOC_PROCESSOR_GROUP_ID=f"ioc-processor-{run}",
        IOC_TOPIC_PREFIX=f"{run}.",
        IOC_REGISTRY_REFRESH_S="2",
        IOC_GATEWAY_CITIES=json.dumps([SESSION_CITY]),
        IOC_GATEWAY_HEALTH_PORT=str(free_port()),
        IOC_OFFLINE_AFTER_S=json.dumps({FAST_OFFLINE_DOMAIN: FAST_OFFLINE_S}),
        IOC_SILENCE_CHECK_S="1",
        IOC_OUTBOX_POLL_S="0.5",
    )


@pytest.fixture(scope="session")
async def system(system_env: dict[str, str], log_dir: Path) -> AsyncIterator[System]:
    migrated = subprocess.run(
        [sys.executable, "-m", "ioc.cli", "migrate"],
        env=system_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, f"ioc migrate failed:\n{migrated.stdout}{migrated.stderr}"
    processes = {
        "processor": ComponentProcess("processor", system_env, log_dir),
        "gateway": ComponentProcess("gateway", system_env, log_dir),
        "api": ComponentProcess("api", system_env, log_dir),
    }
    for process in processes.values():
        process.start()
    try:
        await processes["processor"].wait_for_log("processor joined group")
        await processes["gateway"].wait_for_log("gateway health listening")
        await processes["api"].wait_for_log("API listening")
        yield System(
            env=system_env,
            api_url=f"http://127.0.0.1:{system_env['IOC_API_PORT']}",
            database_url=system_env["IOC_DATABASE_URL"],
            processes=processes,
        )
    finally:
        for process in processes.values():
            process.stop()
        await delete_topics(system_env["IOC_TOPIC_PREFIX"])


@pytest.fixture
def gateways(system: System, log_dir: Path) -> Iterator[Callable[..., ComponentProcess]]:
    """Start extra `ioc gateway` processes for one test; all are stopped at its end."""
    started: list[ComponentProcess] = []

    def start(name: str, **settings: str) -> ComponentProcess:
        env = {**system.env, "IOC_GATEWAY_HEALTH_PORT": str(free_port()), **settings}
        process = ComponentProcess("gateway", env, log_dir, name=name)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, which `make services` installs, driven by Playwright (the page tests)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "Chromium is not installed (no `chromium` on PATH): run `make services`, which installs it"
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def admin(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ) as client:
        yield client
