"""A processor reads its devices' rules again as soon as the rules version or the device profiles
version moves (checked every IOC_RULES_REFRESH_S), and otherwise keeps its cached profiles."""

from __future__ import annotations

import dataclasses

from ioc_core.rules import RuleLayer
from ioc_core.storage import DeviceProfileRow
from ioc_core.supervision import Supervisor
from processors.batches import BatchWriter
from tests.unit.processors.fakes import FakeDatabase

ROW = DeviceProfileRow(
    id="hn-flood-9", city="ha-noi", domain="flood", name=None, district=None, thresholds={}
)
LOWER = (RuleLayer("city", {"currentLevel": {"warn_above": 2.0}}),)


async def test_a_rules_version_change_refreshes_cached_profiles_within_the_check_period() -> None:
    database = FakeDatabase([], [ROW])
    writer = BatchWriter(
        database,  # type: ignore[arg-type]
        Supervisor("test"),
        rules_refresh_s=0,
    )
    first = await writer._device_profiles({ROW.id})
    assert first[ROW.id].rules["currentLevel"].warn_above == 3.0

    # Stored without the version moving: the cached profile stays.
    database.profiles[ROW.id] = dataclasses.replace(ROW, rule_layers=LOWER)
    assert (await writer._device_profiles({ROW.id}))[ROW.id] is first[ROW.id]

    database.rules.current += 1
    changed = await writer._device_profiles({ROW.id})
    assert changed[ROW.id].rules["currentLevel"].warn_above == 2.0


async def test_between_checks_the_version_is_not_read() -> None:
    database = FakeDatabase([], [ROW])
    writer = BatchWriter(
        database,  # type: ignore[arg-type]
        Supervisor("test"),
        rules_refresh_s=3600,
    )
    first = await writer._device_profiles({ROW.id})
    database.profiles[ROW.id] = dataclasses.replace(ROW, rule_layers=LOWER)
    database.rules.current += 1
    assert (await writer._device_profiles({ROW.id}))[ROW.id] is first[ROW.id]


async def test_a_device_profiles_version_change_refreshes_cached_profiles() -> None:
    database = FakeDatabase([], [ROW])
    writer = BatchWriter(database, Supervisor("test"), rules_refresh_s=0)  # type: ignore[arg-type]
    first = await writer._device_profiles({ROW.id})
    database.profiles[ROW.id] = dataclasses.replace(ROW, thresholds={"currentLevel": {"warn_above": 2.5}})
    assert (await writer._device_profiles({ROW.id}))[ROW.id] is first[ROW.id]

    database.devices.profiles_version += 1
    changed = await writer._device_profiles({ROW.id})
    assert changed[ROW.id].rules["currentLevel"].warn_above == 2.5
    # Read again only once per move.
    assert (await writer._device_profiles({ROW.id}))[ROW.id] is changed[ROW.id]
