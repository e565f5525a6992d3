"""What a processor holds of a device for detection is read again when anything it is made of
changes: the device profiles version moves with a device's update or removal and with any area's,
the rules version with any override, and neither with a registration or with readings."""

from __future__ import annotations

from datetime import UTC, datetime

from ioc_core.areas import parse_feature
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, TelemetryBatch
from ioc_core.storage.rules import RuleScope
from ioc_core.telemetry import Reading
from tests.integration.conftest import POSTGRES_URL, scratch_database
from tests.integration.test_areas import WARD_A


def _device(thresholds: dict[str, dict[str, float | None]] | None = None) -> DeviceIn:
    return DeviceIn(
        id="hp-flood-1",
        city="hai-phong",
        domain="flood",
        location=Location(lat=20.855, lon=106.655),
        thresholds=thresholds or {},
    )


async def test_the_versions_move_with_what_detection_reads_and_only_with_it() -> None:
    async with scratch_database(POSTGRES_URL) as url, Database(url, max_size=2) as database:
        await database.migrate()
        versions = [await database.devices.detection_version()]

        async def moved() -> tuple[bool, bool]:
            versions.append(await database.devices.detection_version())
            (rules_before, devices_before), (rules_now, devices_now) = versions[-2:]
            return rules_now != rules_before, devices_now != devices_before

        await database.devices.insert(_device())
        assert await moved() == (False, False)
        now = datetime.now(tz=UTC)
        reading = Reading("hp-flood-1", "hai-phong", "flood", now, 1, {"currentLevel": 1.2}, now)
        async with database.transaction() as transaction:
            await transaction.write(TelemetryBatch(records=[(reading, 0)]))
        assert await moved() == (False, False)

        await database.devices.update(_device({"currentLevel": {"warn_above": 2.0}}))
        assert await moved() == (False, True)
        await database.areas.put(parse_feature(WARD_A))
        assert await moved() == (False, True)
        await database.rules.put(
            RuleScope("city", "hai-phong", "flood"), {"currentLevel": {"warn_above": 2.5}}, updated_by="test"
        )
        assert await moved() == (True, False)
        # Removing an area or a device removes its overrides too, which may move the rules version.
        await database.areas.delete("ward-a")
        assert (await moved())[1]
        await database.devices.delete("hp-flood-1")
        assert (await moved())[1]
