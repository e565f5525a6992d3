"""The audit log against the running system: admin and operator actions are recorded with who,
what, when and from where; attempts refused because of a key's scope are recorded too; a change
and its entry commit together; `GET /v1/audit` filters and pages; entries go out on the events
topic and on the live stream to admins; housekeeping forgets old entries.

Cities of their own keep the scoped checks exact; no telemetry is sent (alarms are made in the
database directly).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from ioc_core.audit import Actor, AuditRecord
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database
from tests.integration.conftest import System
from tests.integration.harness import tail_topic, unique, wait_until
from tests.integration.test_stream import STREAM_TIMEOUT, Frame, Stream, open_stream, wait_for_stream

CITY_A = unique("audit-a")[:32]
CITY_B = unique("audit-b")[:32]
LOCATION = {"lat": 21.03, "lon": 105.85}
OUTSIDE = {"status": 404, "reason": "the object lies outside the key's scope"}

ClientFor = Callable[[str], httpx.AsyncClient]


@pytest.fixture
async def client_for(system: System) -> AsyncIterator[ClientFor]:
    clients: list[httpx.AsyncClient] = []

    def make(key: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            base_url=system.api_url, headers={"X-API-Key": key}, timeout=STREAM_TIMEOUT
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def database(system: System) -> AsyncIterator[Database]:
    async with Database(system.database_url, max_size=2) as db:
        yield db


async def make_key(client: httpx.AsyncClient, role: str, **scope: Any) -> dict[str, Any]:
    response = await client.post("/v1/api-keys", json={"role": role, "name": unique(role), **scope})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def register(client: httpx.AsyncClient, city: str, **extra: Any) -> str:
    device_id = unique("audit-dev")
    body = {"id": device_id, "city": city, "domain": "flood", "location": LOCATION, **extra}
    response = await client.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text
    return device_id


async def entries(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/audit", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def at(item: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(item["at"])


# -- Who, what, when, from where -------------------------------------------------------------------


async def test_device_changes_are_recorded_with_who_what_when_and_from_where(
    admin: httpx.AsyncClient, client_for: ClientFor
) -> None:
    key = await make_key(admin, "admin", cities=[CITY_A])
    desk = client_for(key["key"])
    started = datetime.now(UTC)
    # A forwarding header is anyone's to write: the address stays the connection's peer.
    desk.headers["X-Forwarded-For"] = "203.0.113.9"
    device_id = await register(desk, CITY_A, name="Cống Tô Lịch")
    patch = {"name": "Cống Tô Lịch 2", "thresholds": {"currentLevel": {"warn_above": 3.0}}}
    assert (await desk.patch(f"/v1/devices/{device_id}", json=patch)).status_code == 200
    assert (await desk.delete(f"/v1/devices/{device_id}")).status_code == 204
    ended = datetime.now(UTC)

    items = await entries(admin, object_type="device", object_id=device_id)
    assert [i["action"] for i in items] == ["device.delete", "device.update", "device.create"]
    for item in items:
        assert item["actor"] == {"key_id": key["id"], "name": key["name"], "address": "127.0.0.1"}
        assert item["object"] == {"type": "device", "id": device_id}
        assert (item["outcome"], item["cities"], item["domains"]) == ("done", [CITY_A], ["flood"])
        assert started - timedelta(seconds=1) <= at(item) <= ended + timedelta(seconds=1)
    assert items[2]["detail"] == {"name": "Cống Tô Lịch", "district": None}
    assert items[1]["detail"] == {"changes": patch}
    assert items[0]["detail"] == {"name": "Cống Tô Lịch 2"}
    # Within its scope, the desk sees its own entries.
    assert await entries(desk, object_id=device_id) == items


async def test_key_and_webhook_changes_are_recorded_without_their_secrets(admin: httpx.AsyncClient) -> None:
    key = await make_key(admin, "viewer", cities=[CITY_A])
    assert (await admin.delete(f"/v1/api-keys/{key['id']}")).status_code == 204
    body = {"url": "https://8.8.8.8/hooks/ioc?token=s3cret-token", "filter": {"types": ["alarm.raised"]}}
    created = await admin.post(
        "/v1/webhooks", json={**body, "filter": {**body["filter"], "cities": [CITY_A]}}
    )
    assert created.status_code == 201, created.text
    webhook = created.json()
    changed = await admin.patch(
        f"/v1/webhooks/{webhook['id']}", json={"enabled": False, "description": "PCTT"}
    )
    assert changed.status_code == 200, changed.text
    assert (await admin.delete(f"/v1/webhooks/{webhook['id']}")).status_code == 204

    key_items = await entries(admin, object_id=key["id"], actor_key_id="IOC_ADMIN_API_KEY")
    assert [i["action"] for i in key_items] == ["api_key.revoke", "api_key.create"]
    assert key_items[1]["actor"] == {"key_id": None, "name": "admin", "address": "127.0.0.1"}
    assert key_items[1]["detail"] == {"role": "viewer", "name": key["name"]}
    hook_items = await entries(admin, object_type="webhook", object_id=webhook["id"])
    assert [i["action"] for i in hook_items] == ["webhook.delete", "webhook.update", "webhook.create"]
    assert hook_items[2]["detail"]["url"] == "https://8.8.8.8/hooks/ioc?…"
    assert hook_items[1]["detail"] == {"changes": {"enabled": False, "description": "PCTT"}}
    recorded = json.dumps([*key_items, *hook_items])
    assert key["key"] not in recorded and webhook["secret"] not in recorded and "s3cret" not in recorded


async def make_alarm(system: System, city: str) -> int:
    """An open alarm of a device of `city`, made in the database (no telemetry in this module)."""
    connection = await asyncpg.connect(system.database_url)
    try:
        alarm_id: int = await connection.fetchval(
            "INSERT INTO alarms (subject, device_id, city, domain, rule, severity, started_at,"
            " last_seen_at, message_vi, message_en) VALUES ($1, $1, $2, 'flood', 'threshold.currentLevel',"
            " 'high', now(), now(), 'mực nước cao', 'water level high') RETURNING id",
            unique("audit-alarm"),
            city,
        )
    finally:
        await connection.close()
    return alarm_id


async def test_operator_actions_on_alarms_are_recorded(
    system: System, admin: httpx.AsyncClient, client_for: ClientFor
) -> None:
    alarm_id = await make_alarm(system, CITY_A)
    operator = await make_key(admin, "operator", cities=[CITY_A])
    desk = client_for(operator["key"])
    note = {"note": "đội ứng cứu đã đến"}
    assert (await desk.post(f"/v1/alarms/{alarm_id}/ack", json=note)).status_code == 200
    assert (await desk.post(f"/v1/alarms/{alarm_id}/resolve")).status_code == 200

    items = await entries(admin, object_type="alarm", object_id=str(alarm_id))
    assert [i["action"] for i in items] == ["alarm.resolve", "alarm.acknowledge"]
    assert all(i["actor"]["key_id"] == operator["id"] for i in items)
    assert items[1]["detail"]["note"] == note["note"] and items[1]["detail"]["severity"] == "high"


# -- Refused attempts ------------------------------------------------------------------------------


async def test_attempts_outside_the_keys_scope_are_recorded(
    system: System, admin: httpx.AsyncClient, client_for: ClientFor
) -> None:
    key = await make_key(admin, "admin", cities=[CITY_A])
    desk = client_for(key["key"])
    other_device = await register(admin, CITY_B)
    other_alarm = await make_alarm(system, CITY_B)
    assert (await desk.patch(f"/v1/devices/{other_device}", json={"name": "x"})).status_code == 404
    assert (await desk.get(f"/v1/devices/{other_device}")).status_code == 404
    assert (await desk.post(f"/v1/alarms/{other_alarm}/ack")).status_code == 404
    assert (await desk.post("/v1/api-keys", json={"role": "viewer"})).status_code == 403
    body = {"id": unique("audit-dev"), "city": CITY_B, "domain": "flood", "location": LOCATION}
    assert (await desk.post("/v1/devices", json=body)).status_code == 403
    # A missing object is no scope refusal.
    assert (await desk.get(f"/v1/devices/{unique('missing')}")).status_code == 404

    refused = await entries(admin, actor_key_id=key["id"], outcome="refused")
    by_action = {item["action"]: item for item in refused}
    assert sorted(by_action) == [
        "alarm.acknowledge",
        "api_key.create",
        "device.create",
        "device.read",
        "device.update",
    ]
    update = by_action["device.update"]
    assert update["object"] == {"type": "device", "id": other_device} and update["detail"] == OUTSIDE
    assert update["cities"] == [CITY_B] and update["actor"]["address"] == "127.0.0.1"
    assert by_action["alarm.acknowledge"]["object"]["id"] == str(other_alarm)
    assert by_action["api_key.create"]["detail"]["status"] == 403
    assert by_action["api_key.create"]["cities"] is None
    assert by_action["device.create"]["object"]["id"] == body["id"]
    # Those objects are outside the desk's scope, and so are the entries about them.
    assert await entries(desk, actor_key_id=key["id"], outcome="refused") == []


# -- One transaction -------------------------------------------------------------------------------


async def test_a_change_and_its_entry_commit_or_roll_back_together(database: Database) -> None:
    device = DeviceIn(id=unique("audit-tx"), city=CITY_A, domain="flood", location=Location(lat=21, lon=105))
    record = AuditRecord(
        actor=Actor(key_id=None, name="test", address=None),
        action="device.create",
        object_type="device",
        object_id=device.id,
        cities=(CITY_A,),
        domains=("flood",),
    )
    with pytest.raises(RuntimeError):
        async with database.unit_of_work() as transaction:
            await database.devices.insert(device, within=transaction)
            await database.audit.record(record, within=transaction)
            raise RuntimeError("the request fails after both were written")
    assert await database.devices.route(device.id) is None
    count = "SELECT count(*) FROM audit_log WHERE object_id = $1"
    assert await database.pool.fetchval(count, device.id) == 0

    async with database.unit_of_work() as transaction:
        await database.devices.insert(device, within=transaction)
        entry = await database.audit.record(record, within=transaction)
    assert await database.devices.route(device.id) is not None
    assert await database.pool.fetchval(count, device.id) == 1
    outbox = "SELECT payload->>'type' FROM outbox WHERE event_id = $1::uuid"
    assert await database.pool.fetchval(outbox, entry.event_id) == "audit.recorded"


async def test_a_refused_change_records_nothing(admin: httpx.AsyncClient) -> None:
    device_id = await register(admin, CITY_A)
    body = {"id": device_id, "city": CITY_A, "domain": "flood", "location": LOCATION}
    assert (await admin.post("/v1/devices", json=body)).status_code == 409
    assert [i["action"] for i in await entries(admin, object_id=device_id)] == ["device.create"]


# -- Filters and cursor ----------------------------------------------------------------------------


async def test_filters_and_the_cursor_page_through_the_entries(
    admin: httpx.AsyncClient, client_for: ClientFor
) -> None:
    desk_key = await make_key(admin, "admin")
    desk = client_for(desk_key["key"])
    made = [await make_key(desk, "viewer", cities=[CITY_A]) for _ in range(5)]
    ids = [k["id"] for k in reversed(made)]  # newest first

    pages, cursor = [], None
    while True:
        params = {"actor_key_id": desk_key["id"], "action": "api_key.create,api_key.revoke", "limit": 2}
        response = await admin.get("/v1/audit", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        pages.append([i["object"]["id"] for i in response.json()["items"]])
        cursor = response.json()["next"]
        if cursor is None:
            break
    assert pages == [ids[0:2], ids[2:4], ids[4:5]]

    items = await entries(admin, actor_key_id=desk_key["id"])
    window = {"from": items[3]["at"], "to": items[1]["at"], "actor_key_id": desk_key["id"]}
    assert [i["object"]["id"] for i in await entries(admin, **window)] == ids[2:4]
    assert await entries(admin, actor_key_id=desk_key["id"], object_type="webhook") == []
    assert await entries(admin, actor_key_id=desk_key["id"], action="api_key.revoke") == []
    assert len(await entries(admin, actor_key_id=desk_key["id"], object_type="api_key")) == 5
    # Filters are parameters, never SQL.
    assert await entries(admin, object_id="' OR '1'='1") == []


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"from": "2026-11-21T08:00:00"}, 422),
        ({"to": "0.5"}, 422),
        ({"from": "2026-13-21T08:00:00Z"}, 400),
        ({"from": "2026-11-21T09:00:00Z", "to": "2026-11-21T08:00:00Z"}, 400),
        ({"action": "device.explode"}, 400),
        ({"cursor": "not-a-cursor"}, 400),
        ({"actorKeyId": "key_0123456789abcdef"}, 400),
        ({"object_type": "city"}, 422),
        ({"actor_key_id": "admin"}, 422),
    ],
)
async def test_bad_audit_queries_are_problems(
    admin: httpx.AsyncClient, params: dict[str, str], status: int
) -> None:
    response = await admin.get("/v1/audit", params=params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"


async def test_only_admins_read_the_audit_log(admin: httpx.AsyncClient, client_for: ClientFor) -> None:
    operator = client_for((await make_key(admin, "operator"))["key"])
    assert (await operator.get("/v1/audit")).status_code == 403


# -- Events ----------------------------------------------------------------------------------------


async def test_an_entry_goes_out_on_the_events_topic(system: System, admin: httpx.AsyncClient) -> None:
    consumer = await tail_topic(system.topics.events)
    try:
        key = await make_key(admin, "viewer", cities=[CITY_A])
        [entry] = await entries(admin, object_id=key["id"])

        async def published() -> tuple[bytes, dict[str, Any]] | None:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    event = json.loads(record.value)
                    if event["type"] == "audit.recorded" and event["data"]["object"]["id"] == key["id"]:
                        return record.key, event
            return None

        record_key, event = await wait_until(published, timeout=30, what="the audit.recorded event")
    finally:
        await consumer.stop()
    assert record_key == f"api_key/{key['id']}".encode()
    assert event["source"] == "urn:ioc:api" and event["subject"] == f"api_key/{key['id']}"
    data = event["data"]
    assert {k: data[k] for k in entry} == entry | {"at": data["at"]}
    assert at(data) == at(entry) and (data["city"], data["domain"]) == (CITY_A, "")


def objects(frames: list[Frame]) -> set[str]:
    return {f.data["data"]["object"]["id"] for f in frames if f.event == "audit" and f.data}


async def read_audit(stream: Stream, object_ids: set[str]) -> set[str]:
    frames = await stream.read_until(
        lambda frames: objects(frames) >= object_ids, timeout=30, what=f"audit events of {object_ids}"
    )
    assert all(f.event == "audit" for f in frames)
    return objects(frames)


async def test_admins_follow_the_audit_log_on_the_live_stream(
    admin: httpx.AsyncClient, client_for: ClientFor
) -> None:
    everyone = client_for((await make_key(admin, "admin"))["key"])
    desk = client_for((await make_key(admin, "admin", cities=[CITY_A]))["key"])
    viewer = client_for((await make_key(admin, "viewer"))["key"])
    await wait_for_stream(everyone)
    assert (await viewer.get("/v1/stream", params={"types": "audit"})).status_code == 403
    audit_only = {"types": "audit"}
    async with open_stream(everyone, audit_only) as all_stream, open_stream(desk, audit_only) as desk_stream:
        in_a, in_b = await register(admin, CITY_A), await register(admin, CITY_B)
        await read_audit(all_stream, {in_a, in_b})
        # The hub offers each event to every stream at once: whatever the desk was to get of the
        # two is queued before an entry made only now.
        later = await register(admin, CITY_A)
        seen = await read_audit(desk_stream, {in_a, later})
    assert in_b not in seen


# -- Housekeeping ----------------------------------------------------------------------------------


async def test_housekeeping_forgets_entries_past_the_retention(database: Database) -> None:
    def record(object_id: str) -> AuditRecord:
        actor = Actor(key_id=None, name="test", address="127.0.0.1")
        return AuditRecord(actor, "api_key.create", "api_key", object_id, None, None)

    old, fresh = unique("old"), unique("fresh")
    await database.audit.record(record(old))
    await database.audit.record(record(fresh))
    await database.pool.execute(
        "UPDATE audit_log SET at = now() - interval '400 days' WHERE object_id = $1", old
    )
    await database.housekeeping(audit_keep_days=365)
    count = "SELECT count(*) FROM audit_log WHERE object_id = $1"
    assert await database.pool.fetchval(count, old) == 0
    assert await database.pool.fetchval(count, fresh) == 1
