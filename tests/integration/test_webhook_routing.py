"""Which endpoints an event is routed to, decided by the storage layer's routing statement in the
transaction that records the event (the same statement the processors run)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from ioc_core.audit import AuditEntry, audit_event
from ioc_core.events import Event
from ioc_core.sealing import SecretSealer
from ioc_core.storage import Database
from ioc_core.storage.webhooks import route_deliveries
from ioc_core.webhooks import WebhookFilter, new_secret, routed
from tests.integration.conftest import System
from tests.integration.harness import SECRETS_KEY, unique

CITY = unique("route")[:32]
OTHER = unique("route-x")[:32]


def alarm(
    severity: str = "critical", *, city: str = CITY, escalated: bool = False, areas: list[str] | None = None
) -> Event:
    return Event(
        id=f"5b0f8c7e-4c1b-4b8a-9a57-{unique('e')[-12:]}",
        type="alarm.raised",
        subject="d1",
        time=datetime.now(UTC),
        data={
            "id": 7,
            "city": city,
            "domain": "flood",
            "severity": severity,
            "escalated": escalated,
            "areas": areas or [],
        },
    )


def offline(areas: list[str] | None = None) -> Event:
    return Event(
        id=f"0d8f1f52-1111-4e1e-9b1e-{unique('e')[-12:]}",
        type="device.offline",
        subject="d1",
        time=datetime.now(UTC),
        data={"device_id": "d1", "city": CITY, "domain": "flood", "status": "offline", "areas": areas or []},
    )


def audit(cities: list[str] | None) -> Event:
    """An audit entry's event about a flood device of `cities` (None: an object of every city)."""
    entry = AuditEntry(
        id=1,
        at=datetime.now(UTC),
        event_id=str(uuid.uuid4()),
        actor_key_id=None,
        actor_name="admin",
        client_address="127.0.0.1",
        action="device.create",
        object_type="device",
        object_id="d1",
        outcome="done",
        cities=cities,
        domains=["flood"],
        detail={},
    )
    return audit_event(entry)


@pytest.fixture
async def database(system: System) -> AsyncIterator[Database]:
    async with Database(system.database_url, max_size=2, sealer=SecretSealer(SECRETS_KEY)) as db:
        yield db


async def routes_to(
    database: Database, webhook_filter: dict[str, Any], event: Event, *, enabled: bool = True
) -> bool:
    """Whether an endpoint with this filter gets the event. The endpoint exists only for the test,
    and the routing is rolled back, so nothing is ever sent."""
    endpoint_id = "wh_" + unique("x")[-16:].replace("-", "0")
    store = database.webhooks
    await store.create_endpoint(
        endpoint_id=endpoint_id,
        url="https://203.0.113.7/hook",
        description=None,
        secret=new_secret(),
        webhook_filter=WebhookFilter.model_validate(webhook_filter),
        created_by="test",
    )
    try:
        if not enabled:
            await store.update_endpoint(
                endpoint_id, url=None, description=None, webhook_filter=None, enabled=False
            )
        async with database.pool.acquire() as connection:
            transaction = connection.transaction()
            await transaction.start()
            try:
                await route_deliveries(connection, routed([event]))
                made = await connection.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = $1", endpoint_id
                )
            finally:
                await transaction.rollback()
        return bool(made)
    finally:
        await store.delete_endpoint(endpoint_id)


@pytest.mark.parametrize(
    ("webhook_filter", "event", "expected"),
    [
        ({"cities": [CITY]}, alarm("low"), True),
        ({"cities": [OTHER]}, alarm(), False),
        ({"cities": [CITY], "domains": ["flood"]}, alarm(), True),
        ({"cities": [CITY], "domains": ["water"]}, alarm(), False),
        ({"cities": [CITY], "min_severity": "high"}, alarm("medium"), False),
        ({"cities": [CITY], "min_severity": "high"}, alarm("high"), True),
        ({"cities": [CITY], "types": ["alarm.resolved"]}, alarm(), False),
        ({"cities": [CITY], "escalated_only": True}, alarm(), False),
        ({"cities": [CITY], "escalated_only": True}, alarm(escalated=True), True),
        # Device events have no severity: a severity filter lets them through only when named.
        ({"cities": [CITY]}, offline(), True),
        ({"cities": [CITY], "min_severity": "low"}, offline(), False),
        ({"cities": [CITY], "min_severity": "high", "types": ["device.offline"]}, offline(), True),
        # Audit entries go only where `types` names them, never to an endpoint made for alarms.
        ({}, audit([CITY]), False),
        ({"cities": [CITY]}, audit([CITY]), False),
        ({"types": ["audit.recorded"]}, audit([CITY]), True),
        ({"types": ["audit.recorded"], "cities": [CITY], "domains": ["flood"]}, audit([CITY]), True),
        ({"types": ["audit.recorded"], "cities": [OTHER]}, audit([CITY]), False),
        ({"types": ["audit.recorded"], "domains": ["water"]}, audit([CITY]), False),
        # An object of several cities (or every one) reaches only endpoints of every city.
        ({"types": ["audit.recorded"], "cities": [CITY]}, audit([CITY, OTHER]), False),
        ({"types": ["audit.recorded"], "cities": [CITY]}, audit(None), False),
        ({"types": ["audit.recorded"]}, audit(None), True),
        # No severity: named in `types`, an entry passes a severity filter, as device events do.
        ({"types": ["audit.recorded"], "min_severity": "high"}, audit([CITY]), True),
        # A ward office's endpoint: alarms of devices in one of its areas, nothing that names none.
        ({"areas": ["hp.ward.le-chan"]}, alarm(areas=["hp.catchment.tam-bac", "hp.ward.le-chan"]), True),
        ({"areas": ["hp.ward.le-chan", "hp.ward.an-bien"]}, alarm(areas=["hp.ward.an-bien"]), True),
        ({"areas": ["hp.ward.le-chan"]}, alarm(areas=["hp.ward.an-bien"]), False),
        ({"areas": ["hp.ward.le-chan"]}, alarm(), False),
        ({"areas": ["hp.ward.le-chan"]}, offline(), False),
        ({"areas": ["hp.ward.le-chan"]}, offline(["hp.ward.le-chan"]), True),
        ({}, alarm(areas=["hp.ward.an-bien"]), True),
    ],
)
async def test_routing(
    database: Database, webhook_filter: dict[str, Any], event: Event, expected: bool
) -> None:
    assert await routes_to(database, webhook_filter, event) is expected


async def test_a_disabled_endpoint_gets_nothing(database: Database) -> None:
    assert await routes_to(database, {"cities": [CITY]}, alarm()) is True
    assert await routes_to(database, {"cities": [CITY]}, alarm(), enabled=False) is False
