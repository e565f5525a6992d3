"""The gateway's device registry reads the fleet page by page (real TimescaleDB): every device is
found, pages of any size, and a deleted device is gone after the next refresh."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

import ingest.registry
from ingest.registry import DeviceRegistry
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, drop_database, ensure_database
from ioc_core.supervision import Supervisor
from tests.integration.conftest import POSTGRES_URL

CITY = "ha-noi"


@pytest.fixture
async def database() -> AsyncIterator[Database]:
    url = f"{POSTGRES_URL}/ioc_test_registry_{uuid.uuid4().hex[:8]}"
    await ensure_database(url)
    try:
        async with Database(url, max_size=2) as database:
            await database.migrate()
            yield database
    finally:
        await drop_database(url)


@pytest.mark.parametrize("page", [1, 4, 11, 12, 5000])
async def test_refresh_reads_every_device_whatever_the_page_size(
    database: Database, page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest.registry, "_REFRESH_PAGE", page)
    ids = [f"wl-{n:02d}" for n in range(11)]
    location = Location(lat=21.03, lon=105.85)
    await database.devices.insert_many(
        [DeviceIn(id=d, city=CITY, domain="water", location=location) for d in ids]
    )
    registry = DeviceRegistry(database, Supervisor("gateway"), refresh_s=60)
    await registry.refresh()
    assert len(registry) == 11
    route = await registry.lookup("wl-07")
    assert route is not None and (route.city, route.domain) == (CITY, "water")

    await database.devices.delete("wl-07")
    await registry.refresh()
    assert len(registry) == 10
    assert await registry.lookup("wl-07") is None
