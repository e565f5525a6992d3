"""What flood correlation by zone reads and writes (real databases, PostGIS and shapely): each
station's zone (the catchment containing it, else its ward, else its registered district), the
zone's stored signals with the areas of their stations, which zones have an open alarm, and an
area alarm's `areas` as the alarm list filters them."""

from __future__ import annotations

from datetime import UTC, datetime

from ioc_core.alarms import DISTRICT_FLOOD_RULE, Finding, area_subject, district_subject
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, StoredSignal
from processors.detection import StationSignal
from tests.integration import test_areas
from tests.integration.test_areas import AREAS, CITY, _areas

# Both engines, as the areas' own tests run them.
database = test_areas.database

# Station → ((lon, lat), registered district, expected zone).
STATIONS: dict[str, tuple[tuple[float, float], str | None, str | None]] = {
    "in-a": ((106.655, 20.855), None, "area:ward-a"),
    # On the line two wards share: the wards are alike in size, so the first by id.
    "on-border": ((106.70, 20.87), "Lê Chân", "area:ward-a"),
    # In the catchment and in ward B: water gathers by catchment.
    "in-l-bottom": ((106.75, 20.81), None, "area:catchment-l"),
    "in-l-column": ((106.61, 20.95), "Lê Chân", "area:catchment-l"),
    # In no area: the district it was registered with, or no zone at all.
    "far": ((105.85, 21.03), "Hoàng Mai", district_subject(CITY, "Hoàng Mai")),
    "nowhere": ((105.86, 21.04), None, None),
}


def _station(device_id: str) -> DeviceIn:
    (lon, lat), district, _ = STATIONS[device_id]
    return DeviceIn(
        id=device_id, city=CITY, domain="flood", district=district, location=Location(lat=lat, lon=lon)
    )


async def test_stations_are_judged_in_their_zone_and_an_area_alarm_reaches_its_wards(
    database: Database,
) -> None:
    await database.areas.put_many(_areas(AREAS))
    await database.devices.insert_many([_station(device_id) for device_id in STATIONS])
    await database.devices.insert(
        DeviceIn(id="meter-in-a", city=CITY, domain="grid", location=Location(lat=20.855, lon=106.655))
    )

    profiles = {row.id: row for row in await database.devices.profiles([*STATIONS, "meter-in-a"])}
    zones = {device_id: row.zone_area and area_subject(row.zone_area) for device_id, row in profiles.items()}
    for device_id, (_, district, expected) in STATIONS.items():
        if expected is not None and expected.startswith("district:"):
            assert zones[device_id] is None and profiles[device_id].district == district
        else:
            assert zones[device_id] == expected, device_id
    assert profiles["meter-in-a"].zone_area is None  # only flood stations are correlated
    assert profiles["in-l-bottom"].zone_name_vi == "Khu catchment-l"

    at = datetime.now(UTC)
    # Both catchment stations rain and rise; ward A's station only rises.
    rising = {"in-l-bottom": True, "in-l-column": True, "in-a": True, "on-border": False, "far": True}
    signals = {
        device_id: StoredSignal(
            StationSignal(
                device_id=device_id,
                at=at,
                raining=True,
                rising=rising[device_id],
                level=2.0,
                level_severity=None,
            ).to_json(),
            STATIONS[device_id][2],
        )
        for device_id in rising
    }
    async with database.transaction() as transaction:
        await transaction.save_detector_states({device_id: "{}" for device_id in signals}, signals)

    async with database.transaction() as transaction:
        catchment = await transaction.zone_flood_signals("area:catchment-l", rising_only=True)
        ward_a_rising = await transaction.zone_flood_signals("area:ward-a", rising_only=True)
        ward_a = await transaction.zone_flood_signals("area:ward-a", rising_only=False)
        district = await transaction.zone_flood_signals(
            district_subject(CITY, "Hoàng Mai"), rising_only=False
        )
        assert await transaction.open_zone_alarms(["area:catchment-l", "area:ward-a"]) == set()
    assert {s.signal["device_id"]: s.areas for s in catchment} == {
        "in-l-bottom": ("catchment-l", "ward-b"),
        "in-l-column": ("catchment-l",),
    }
    assert [s.signal["device_id"] for s in ward_a_rising] == ["in-a"]
    assert sorted(s.signal["device_id"] for s in ward_a) == ["in-a", "on-border"]
    assert [s.signal["device_id"] for s in district] == ["far"]

    # A station's signal keeps the zone it was judged in until its next signal: none here.
    async with database.transaction() as transaction:
        await transaction.save_detector_states({"in-a": "{}"}, {"in-a": None})
        assert len(await transaction.zone_flood_signals("area:ward-a", rising_only=True)) == 1

    finding = Finding(
        subject=area_subject("catchment-l"),
        device_id=None,
        city=CITY,
        domain="flood",
        district="Khu catchment-l",
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
        areas=("catchment-l", "ward-b"),
    )
    async with database.transaction() as transaction:
        assert await transaction.apply_findings([finding])
    # A later finding of the same alarm adds the areas of the stations that joined it.
    joined = Finding(**{**finding.__dict__, "areas": ("catchment-l", "ward-a")})
    async with database.transaction() as transaction:
        await transaction.apply_findings([joined])
        assert await transaction.open_zone_alarms(["area:catchment-l", "area:ward-a"]) == {"area:catchment-l"}

    # A ward office sees the catchment's alarm over its ward; another area's filter does not.
    [alarm] = await database.alarms.page(limit=10, areas=["ward-b"])
    assert alarm.subject == "area:catchment-l" and alarm.device_id is None
    assert alarm.areas == ["catchment-l", "ward-a", "ward-b"]
    assert await database.alarms.page(limit=10, areas=["feeder-2"]) == []
