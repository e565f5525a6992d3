"""The gateway's device registry reads the fleet page by page (real TimescaleDB): every device is
found, pages of any size, and a deleted device is gone after the next refresh."""

from __future__ import annotations

import pytest

import ingest.registry
from ingest.registry import DeviceRegistry
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database
from ioc_core.supervision import Supervisor

CITY = "ha-noi"


@pytest.mark.parametrize("page", [1, 4, 11, 12, 5000])
async def test_refresh_reads_every_device_whatever_the_page_size(
    fresh_database: Database, page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest.registry, "_REFRESH_PAGE", page)
    ids = [f"wl-{n:02d}" for n in range(11)]
    location = Location(lat=21.03, lon=105.85)
    await fresh_database.devices.insert_many(
        [DeviceIn(id=d, city=CITY, domain="water", location=location) for d in ids]
    )
    registry = DeviceRegistry(fresh_database, Supervisor("gateway"), refresh_s=60)
    await registry.refresh()
    assert len(registry) == 11
    route = await registry.lookup("wl-07")
    assert route is not None and (route.city, route.domain) == (CITY, "water")

    await fresh_database.devices.delete("wl-07")
    await registry.refresh()
    assert len(registry) == 10
    assert await registry.lookup("wl-07") is None
