"""What district flood correlation reads back (real TimescaleDB): whether the district's alarm is
open, and its stations' signals, all of them or only the rising ones."""

from __future__ import annotations

from datetime import UTC, datetime

from ioc_core.alarms import DISTRICT_FLOOD_RULE, Finding, district_subject
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database
from processors.detection import StationSignal

CITY = "ha-noi"
DISTRICT = "Hoàng Mai"
# (device, raining, rising): two qualify, one only rises, one is calm.
STATIONS = (("st-1", True, True), ("st-2", True, True), ("st-3", False, True), ("st-4", True, False))


async def test_district_alarm_and_station_signals(fresh_database: Database) -> None:
    at = datetime.now(UTC)
    location = Location(lat=20.98, lon=105.86)
    await fresh_database.devices.insert_many(
        [
            DeviceIn(id=d, city=CITY, domain="flood", district=DISTRICT, location=location)
            for d, _, _ in STATIONS
        ]
    )
    signals = {
        device: StationSignal(
            device_id=device, at=at, raining=raining, rising=rising, level=2.0, level_severity=None
        ).to_json()
        for device, raining, rising in STATIONS
    }
    async with fresh_database.transaction() as transaction:
        await transaction.save_detector_states({device: "{}" for device in signals}, dict(signals))

    async with fresh_database.transaction() as transaction:
        assert not await transaction.district_flood_alarm_open(CITY, DISTRICT)
        rising = await transaction.district_flood_signals(CITY, DISTRICT, rising_only=True)
        every = await transaction.district_flood_signals(CITY, DISTRICT, rising_only=False)
        elsewhere = await transaction.district_flood_signals(CITY, "Ba Đình", rising_only=False)
    assert sorted(s["device_id"] for s in rising) == ["st-1", "st-2", "st-3"]
    assert sorted(s["device_id"] for s in every) == ["st-1", "st-2", "st-3", "st-4"]
    assert elsewhere == []

    finding = Finding(
        subject=district_subject(CITY, DISTRICT),
        device_id=None,
        city=CITY,
        domain="flood",
        district=DISTRICT,
        rule=DISTRICT_FLOOD_RULE,
        metric=None,
        active=True,
        severity="high",
        value=2.0,
        threshold=2.0,
        repeats=1,
        at=at,
        message_vi="Nguy cơ ngập",
        message_en="Flood risk",
    )
    async with fresh_database.transaction() as transaction:
        assert await transaction.apply_findings([finding])

    async with fresh_database.transaction() as transaction:
        assert await transaction.district_flood_alarm_open(CITY, DISTRICT)
        assert not await transaction.district_flood_alarm_open(CITY, "Ba Đình")
