"""Webhooks to agencies (§8) end to end: a reading crosses a flood level, the processor records the
alarm, and an `ioc webhooks` worker POSTs it to a real HTTP receiver on loopback.

This module runs a system of its own (database, topics, gateway, processor, API and a separate
webhook worker) so that its retry timings, allowed networks and escalation limit are its own,
and so that killing the worker touches no other test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.fernet import Fernet
from standardwebhooks import Webhook as ReferenceVerifier
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from delivery.sending import send_once, webhook_client
from ioc_core.http import HttpServer
from ioc_core.settings import load_settings
from ioc_core.storage.webhooks import DeliveryJob
from tests.conftest import Figures
from tests.integration.conftest import ADMIN_KEY, System, free_port
from tests.integration.harness import (
    SECRETS_KEY,
    Publisher,
    services,
    unique,
    wait_until,
)
from tests.integration.systems import OwnSystem, own_system

CITY = unique("hooks")[:32]
# Loopback for the receiver; carrier-grade NAT and the link-local block around the metadata
# address, to show what listing opens and what it never opens.
ALLOWED_NETWORKS = "127.0.0.0/8, 100.64.0.0/10, 169.254.169.0/24"
TIMEOUT_S = 2
RETRY_WINDOW_S = 12
ESCALATE_AFTER_S = 4


# -- a receiver on loopback -------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: bytes = b"ok"
    # Held until the test opens it (or for `delay_s` at most).
    gate: asyncio.Event | None = None


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """An agency's endpoint: answers each path from a plan of replies, then 200; records all."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Received] = []
        self._plans: dict[str, list[Reply]] = {}
        self.app = Starlette(routes=[Route("/{name}", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.requests.append(
            Received(
                name, {k.lower(): v for k, v in request.headers.items()}, await request.body(), time.time()
            )
        )
        plan = self._plans.get(name) or []
        reply = plan.pop(0) if plan else Reply()
        if reply.gate is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reply.gate.wait(), reply.delay_s)
        elif reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return Response(status_code=reply.status, headers=reply.headers, content=reply.body)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def plan(self, name: str, *replies: Reply) -> None:
        self._plans[name] = list(replies)

    def of(self, name: str) -> list[Received]:
        return [r for r in self.requests if r.path == name]

    async def wait_for(self, name: str, count: int, *, timeout: float = 30) -> list[Received]:
        async def enough() -> list[Received] | None:
            got = self.of(name)
            return got if len(got) >= count else None

        return await wait_until(enough, timeout=timeout, what=f"{count} requests at /{name}")


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    hub = Receiver()
    async with HttpServer(hub.app, host="127.0.0.1", port=hub.port, name="test receiver"):
        yield hub


# -- a system of the module's own -------------------------------------------------------------


@pytest.fixture(scope="module")
async def hooks(log_dir: Path) -> AsyncIterator[OwnSystem]:
    async with own_system(
        log_dir,
        "hooks",
        [CITY],
        commands=("processor", "gateway", "api", "webhooks"),
        IOC_WEBHOOK_ALLOWED_NETWORKS=ALLOWED_NETWORKS,
        IOC_WEBHOOK_WORKER="false",
        IOC_WEBHOOK_TIMEOUT_S=str(TIMEOUT_S),
        IOC_WEBHOOK_RETRY_WINDOW_S=str(RETRY_WINDOW_S),
        IOC_WEBHOOK_BACKOFF_INITIAL_S="0.3",
        IOC_WEBHOOK_BACKOFF_MAX_S="2",
        IOC_ESCALATE_AFTER_S=json.dumps({"flood": ESCALATE_AFTER_S}),
    ) as system:
        yield system


@pytest.fixture
async def api(hooks: OwnSystem) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=hooks.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ) as client:
        yield client


async def register_hook(api: httpx.AsyncClient, url: str, **webhook_filter: Any) -> dict[str, Any]:
    response = await api.post(
        "/v1/webhooks", json={"url": url, "description": "test agency", "filter": webhook_filter}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def flood_station(api: httpx.AsyncClient) -> str:
    device_id = unique("hook-flood")
    response = await api.post(
        "/v1/devices",
        json={
            "id": device_id,
            "city": CITY,
            "domain": "flood",
            "name": "Trạm Cầu Rào",
            "district": "Lê Chân",
            "location": {"lat": 20.84, "lon": 106.69},
        },
    )
    assert response.status_code == 201, response.text
    return device_id


def publish_level(device_id: str, level: float) -> float:
    """Publish one water level (acknowledged by the broker); returns when it was sent."""
    topic = f"ioc/v1/{CITY}/flood/{device_id}/telemetry"
    payload = json.dumps({"ts": datetime.now(UTC).isoformat(), "currentLevel": level}).encode()
    with Publisher() as publisher:
        sent = time.time()
        publisher.publish_all([(topic, payload)])
    return sent


async def deliveries(api: httpx.AsyncClient, webhook_id: str, **params: str) -> list[dict[str, Any]]:
    response = await api.get(f"/v1/webhooks/{webhook_id}/deliveries", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def wait_for_delivery_state(
    api: httpx.AsyncClient, webhook_id: str, state: str, *, timeout: float = 30
) -> dict[str, Any]:
    async def settled() -> dict[str, Any] | None:
        items = await deliveries(api, webhook_id, state=state)
        return items[0] if items else None

    return await wait_until(
        settled, timeout=timeout, what=f"a {state} delivery of {webhook_id}", interval=0.2
    )


def of_device(requests: list[Received], device_id: str) -> list[Received]:
    return [r for r in requests if r.json["data"].get("device_id") == device_id]


# -- tests ------------------------------------------------------------------------------------


async def test_alarm_arrives_signed_as_standard_webhooks(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    hook = await register_hook(
        api, receiver.url("signed"), cities=[CITY], types=["alarm.raised"], domains=["flood"]
    )
    assert hook["secret"].startswith("whsec_") and hook["enabled"] is True
    listed = (await api.get("/v1/webhooks")).json()["items"]
    assert [h["id"] for h in listed if h["id"] == hook["id"]] and all("secret" not in h for h in listed)
    assert "secret" not in (await api.get(f"/v1/webhooks/{hook['id']}")).json()
    # At rest the secret is sealed with IOC_SECRETS_KEY: the column holds neither it nor its key.
    connection = await asyncpg.connect(hooks.database_url)
    try:
        raw = await connection.fetchval("SELECT secret FROM webhook_endpoints WHERE id = $1", hook["id"])
    finally:
        await connection.close()
    assert hook["secret"] not in raw and hook["secret"].removeprefix("whsec_") not in raw
    assert Fernet(SECRETS_KEY.encode()).decrypt(raw.encode()).decode() == hook["secret"]

    device_id = await flood_station(api)
    publish_level(device_id, 5.0)
    [request] = await receiver.wait_for("signed", 1)

    payload = ReferenceVerifier(hook["secret"]).verify(request.body, request.headers)
    assert set(payload) == {"type", "timestamp", "data"}
    assert payload["type"] == "alarm.raised"
    assert payload["data"]["device_id"] == device_id and payload["data"]["severity"] == "critical"
    assert payload["data"]["rule"] == "threshold.currentLevel" and payload["data"]["escalated"] is False
    assert request.headers["webhook-id"].startswith("msg_")
    assert request.headers["content-type"] == "application/json"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 30
    # The receiver has the request before the worker records the answer: wait for the record.
    delivery = await wait_for_delivery_state(api, hook["id"], "delivered")
    assert len(await deliveries(api, hook["id"])) == 1
    assert delivery["message_id"] == request.headers["webhook-id"]
    assert delivery["attempts"][0]["status_code"] == 200 and delivery["attempts"][0]["latency_ms"] >= 0


async def test_server_error_is_retried_and_delivered_once(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.plan("flaky", Reply(500), Reply(502))
    hook = await register_hook(api, receiver.url("flaky"), cities=[CITY], types=["alarm.raised"])
    device_id = await flood_station(api)
    publish_level(device_id, 4.9)
    requests = await receiver.wait_for("flaky", 3)
    await asyncio.sleep(1.5)
    requests = receiver.of("flaky")
    assert len(requests) == 3, "delivered once after two failures, and never again"
    assert len({r.headers["webhook-id"] for r in requests}) == 1
    delivery = await wait_for_delivery_state(api, hook["id"], "delivered")
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 502, 200]
    assert delivery["attempts"][0]["next_attempt_at"] is not None
    assert delivery["attempt_count"] == 3 and delivery["next_attempt_at"] is None


async def test_too_many_requests_waits_for_retry_after(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.plan("busy", Reply(429, {"Retry-After": "3"}))
    hook = await register_hook(api, receiver.url("busy"), cities=[CITY], types=["alarm.raised"])
    device_id = await flood_station(api)
    publish_level(device_id, 4.8)
    first, second = await receiver.wait_for("busy", 2, timeout=20)
    assert second.at - first.at >= 2.9, "the retry came before Retry-After allowed it"
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    delivery = await wait_for_delivery_state(api, hook["id"], "delivered")
    assert [a["status_code"] for a in delivery["attempts"]] == [429, 200]


async def test_gone_disables_the_endpoint(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.plan("gone", Reply(410))
    hook = await register_hook(
        api, receiver.url("gone"), cities=[CITY], types=["alarm.raised"], domains=["flood"]
    )
    first = await flood_station(api)
    publish_level(first, 4.7)
    await receiver.wait_for("gone", 1)
    failed = await wait_for_delivery_state(api, hook["id"], "failed")
    assert "410" in failed["failure_reason"]
    endpoint = (await api.get(f"/v1/webhooks/{hook['id']}")).json()
    assert endpoint["enabled"] is False and "410" in endpoint["disabled_reason"]

    second = await flood_station(api)
    publish_level(second, 4.7)
    await asyncio.sleep(3)
    assert len(receiver.of("gone")) == 1, "a disabled endpoint got another event"
    retry = await api.post(f"/v1/webhooks/{hook['id']}/deliveries/{failed['id']}/retry")
    assert retry.status_code == 409

    enabled = await api.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": True})
    assert enabled.json()["enabled"] is True and enabled.json()["disabled_reason"] is None
    retry = await api.post(f"/v1/webhooks/{hook['id']}/deliveries/{failed['id']}/retry")
    assert retry.status_code == 202, retry.text
    again = await receiver.wait_for("gone", 2)
    assert again[1].headers["webhook-id"] == again[0].headers["webhook-id"]


async def test_hung_receiver_times_out_and_is_retried(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.plan("hung", Reply(200, delay_s=TIMEOUT_S + 3))
    hook = await register_hook(api, receiver.url("hung"), cities=[CITY], types=["alarm.raised"])
    device_id = await flood_station(api)
    publish_level(device_id, 4.6)
    delivery = await wait_for_delivery_state(api, hook["id"], "delivered", timeout=30)
    first, second = delivery["attempts"]
    assert first["status_code"] is None and f"within {TIMEOUT_S} s" in first["error"]
    assert TIMEOUT_S * 1000 <= first["latency_ms"] < (TIMEOUT_S + 2) * 1000
    assert second["status_code"] == 200


async def test_worker_killed_mid_retry_resumes_and_repeats_nothing_delivered(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    done = await register_hook(api, receiver.url("before-kill"), cities=[CITY], types=["alarm.raised"])
    early = await flood_station(api)
    publish_level(early, 4.6)
    await wait_for_delivery_state(api, done["id"], "delivered")

    receiver.plan("kill", Reply(503, {"Retry-After": "4"}))
    hook = await register_hook(api, receiver.url("kill"), cities=[CITY], types=["alarm.raised"])
    device_id = await flood_station(api)
    publish_level(device_id, 4.6)
    await receiver.wait_for("kill", 1)
    await asyncio.sleep(0.5)
    assert hooks.processes["webhooks"].stop(signal.SIGKILL) == -signal.SIGKILL
    pending = await deliveries(api, hook["id"], state="pending")
    assert len(pending) == 1 and pending[0]["attempts"][0]["status_code"] == 503

    await hooks.restart("webhooks")
    delivery = await wait_for_delivery_state(api, hook["id"], "delivered", timeout=30)
    assert [a["status_code"] for a in delivery["attempts"]] == [503, 200]
    second = receiver.of("kill")[1]
    assert second.at - receiver.of("kill")[0].at >= 3.9
    await asyncio.sleep(1.5)
    assert len(receiver.of("kill")) == 2
    assert len(of_device(receiver.of("before-kill"), early)) == 1, "a delivered event was sent again"


async def test_database_restart_while_an_answer_is_in_flight_sends_nothing_twice(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    gate = asyncio.Event()
    receiver.plan("restart", Reply(200, delay_s=TIMEOUT_S - 0.5, gate=gate))
    hook = await register_hook(api, receiver.url("restart"), cities=[CITY], types=["alarm.raised"])
    device_id = await flood_station(api)
    publish_level(device_id, 4.6)
    await receiver.wait_for("restart", 1)
    await asyncio.to_thread(services, "stop", "timescaledb")
    try:
        gate.set()  # the agency answers 200 while the database is down
        await hooks.processes["webhooks"].wait_for_log("recording attempts failed", timeout=10)
        await asyncio.sleep(2)
    finally:
        await asyncio.to_thread(services, "up")
    delivery = await wait_for_delivery_state(api, hook["id"], "delivered", timeout=60)
    assert [a["status_code"] for a in delivery["attempts"]] == [200]
    await asyncio.sleep(1)
    assert len(receiver.of("restart")) == 1
    assert hooks.processes["webhooks"].running


async def test_retry_window_ends_in_a_visible_failure_an_admin_can_retry(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.plan("down", *[Reply(500)] * 200)
    hook = await register_hook(
        api, receiver.url("down"), cities=[CITY], types=["alarm.raised"], domains=["flood"]
    )
    device_id = await flood_station(api)
    publish_level(device_id, 4.6)
    failed = await wait_for_delivery_state(api, hook["id"], "failed", timeout=RETRY_WINDOW_S + 20)
    assert "retry window ended" in failed["failure_reason"]
    assert failed["attempt_count"] >= 3 and all(a["status_code"] == 500 for a in failed["attempts"])
    count = len(receiver.of("down"))
    await asyncio.sleep(2)
    assert len(receiver.of("down")) == count, "a failed delivery was tried again by itself"

    receiver.plan("down")
    response = await api.post(f"/v1/webhooks/{hook['id']}/deliveries/{failed['id']}/retry")
    assert response.status_code == 202 and response.json()["state"] == "pending"
    delivered = await wait_for_delivery_state(api, hook["id"], "delivered")
    assert delivered["id"] == failed["id"] and delivered["attempts"][-1]["status_code"] == 200
    again = await api.post(f"/v1/webhooks/{hook['id']}/deliveries/{failed['id']}/retry")
    assert again.status_code == 409


async def test_routing_by_city_domain_severity_and_type(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    critical_only = await register_hook(api, receiver.url("critical"), cities=[CITY], min_severity="critical")
    water_only = await register_hook(api, receiver.url("water"), cities=[CITY], domains=["water"])
    resolved_only = await register_hook(
        api, receiver.url("resolved"), cities=[CITY], types=["alarm.resolved"]
    )
    elsewhere = await register_hook(api, receiver.url("elsewhere"), cities=["another-city"])
    device_id = await flood_station(api)
    publish_level(device_id, 3.5)  # above the alert level only: medium
    await asyncio.sleep(0.5)
    publish_level(device_id, 4.9)  # danger: the same alarm becomes critical (alarm.updated)
    await asyncio.sleep(0.5)
    for _ in range(3):  # back to normal for three readings in a row: resolved
        publish_level(device_id, 1.0)
        await asyncio.sleep(0.2)

    def threshold_events(name: str) -> list[str]:
        return [
            r.json["type"]
            for r in of_device(receiver.of(name), device_id)
            if r.json["data"]["rule"] == "threshold.currentLevel"
        ]

    async def resolved() -> list[str] | None:
        return threshold_events("resolved") or None

    assert await wait_until(resolved, timeout=30, what="the resolution") == ["alarm.resolved"]
    await asyncio.sleep(1)
    # It was raised as medium, below this endpoint's minimum: it hears of it from the escalation on.
    assert threshold_events("critical") == ["alarm.updated", "alarm.resolved"]
    assert all(r.json["type"] == "alarm.resolved" for r in receiver.of("resolved"))
    assert of_device(receiver.of("water"), device_id) == []
    assert receiver.of("elsewhere") == []
    for hook in (critical_only, water_only, resolved_only, elsewhere):
        assert (await api.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
    assert (await api.get(f"/v1/webhooks/{elsewhere['id']}")).status_code == 404


async def test_unacknowledged_critical_alarm_is_escalated_once(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    escalations = await register_hook(api, receiver.url("escalations"), cities=[CITY], escalated_only=True)
    everything = await register_hook(api, receiver.url("everything"), cities=[CITY], domains=["flood"])
    ignored = await flood_station(api)
    handled = await flood_station(api)
    publish_level(ignored, 4.9)
    publish_level(handled, 4.9)

    async def alarm_of(device_id: str) -> dict[str, Any] | None:
        items = (await api.get("/v1/alarms", params={"device_id": device_id})).json()["items"]
        return items[0] if items else None

    handled_alarm = await wait_until(lambda: alarm_of(handled), timeout=20, what="the second alarm")
    ack = await api.post(f"/v1/alarms/{handled_alarm['id']}/ack", json={"note": "đội trực đã nhận"})
    assert ack.status_code == 200, ack.text

    # Critical alarms of the city that earlier tests left open are escalated too: only these two
    # stations' count.
    def ours() -> list[Received]:
        return of_device(receiver.of("escalations"), ignored) + of_device(receiver.of("escalations"), handled)

    async def escalated() -> list[Received] | None:
        return ours() or None

    [escalation] = await wait_until(escalated, timeout=ESCALATE_AFTER_S + 20, what="the escalation")
    assert escalation.json["type"] == "alarm.updated"
    assert escalation.json["data"]["device_id"] == ignored and escalation.json["data"]["escalated"] is True
    await asyncio.sleep(ESCALATE_AFTER_S + 2)
    assert len(ours()) == 1, "escalated twice, or an acknowledged alarm escalated"
    seen = [
        (r.json["type"], r.json["data"]["escalated"])
        for r in of_device(receiver.of("everything"), ignored)
        if r.json["type"].startswith("alarm.") and r.json["data"]["rule"] == "threshold.currentLevel"
    ]
    assert seen == [("alarm.raised", False), ("alarm.updated", True)]
    assert (await alarm_of(ignored) or {})["escalated"] is True
    assert (await alarm_of(handled) or {})["escalated"] is False
    assert escalations["filter"]["escalated_only"] is True
    await api.delete(f"/v1/webhooks/{everything['id']}")


# URLs the session's API (no IOC_WEBHOOK_ALLOWED_NETWORKS) refuses, with the kind it names.
REFUSED_BY_DEFAULT = [
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://localhost/hook", "loopback"),
    ("http://127.1/hook", "loopback"),
    ("http://2130706433/hook", "loopback"),
    ("http://0x7f.0.0.1/hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://0.0.0.0:8000/hook", "unspecified"),
    ("http://10.0.0.8/hook", "private"),
    ("http://192.168.1.20/hook", "private"),
    ("http://172.20.0.3/hook", "private"),
    ("http://100.64.0.1/hook", "carrier-grade NAT"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://100.100.100.200/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://168.63.129.16/machine?comp=goalstate", "cloud metadata"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://[::ffff:a9fe:a9fe]/hook", "cloud metadata"),
    ("http://[2002:c0a8:101::1]/hook", "private (embedded in IPv6)"),
    ("http://[64:ff9b::a00:1]/hook", "private (embedded in IPv6)"),
    ("http://[fe80::1%25lo]/hook", "link-local"),
    ("http://[fd12:3456::1]/hook", "private"),
    ("http://224.0.0.251/hook", "multicast"),
]


async def test_addresses_that_are_not_globally_routable_are_refused_at_registration(
    admin: httpx.AsyncClient, system: System
) -> None:
    """The session's API runs with the default: only globally routable addresses."""
    for url, kind in REFUSED_BY_DEFAULT:
        response = await admin.post("/v1/webhooks", json={"url": url})
        assert response.status_code == 400, (url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        detail = response.json()["detail"]
        assert detail.startswith("webhook URL refused") and kind in detail, (url, detail)
    for url, reason in (("ftp://example.org/x", "http"), ("https://nonexistent.invalid/x", "resolve")):
        response = await admin.post("/v1/webhooks", json={"url": url})
        assert response.status_code == 400 and reason in response.json()["detail"], response.text
    # A name is refused without saying what it resolves to (internal DNS stays internal).
    named = (await admin.post("/v1/webhooks", json={"url": "http://localhost/hook"})).json()["detail"]
    assert "127.0.0.1" not in named
    # A public address is taken (no delivery reaches it: its filter names no city of ours).
    public = await admin.post(
        "/v1/webhooks", json={"url": "https://203.113.131.1/hook", "filter": {"cities": ["nowhere"]}}
    )
    assert public.status_code == 201, public.text
    patched = await admin.patch(f"/v1/webhooks/{public.json()['id']}", json={"url": "http://10.1.1.1/"})
    assert patched.status_code == 400 and "private" in patched.json()["detail"]
    assert (await admin.delete(f"/v1/webhooks/{public.json()['id']}")).status_code == 204


async def test_listed_networks_are_open_and_metadata_addresses_never(
    hooks: OwnSystem, api: httpx.AsyncClient
) -> None:
    accepted = [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://[::ffff:127.0.0.1]:9/hook",
        "http://100.64.1.1/hook",
        "http://169.254.169.1/hook",
    ]
    for url in accepted:
        response = await api.post("/v1/webhooks", json={"url": url, "filter": {"cities": ["nowhere"]}})
        assert response.status_code == 201, (url, response.text)
        await api.delete(f"/v1/webhooks/{response.json()['id']}")
    refused = [
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://100.100.100.200/latest/meta-data/", "cloud metadata"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata"),
        ("http://[64:ff9b::a9fe:a9fe]/", "cloud metadata"),
        ("http://[2002:a9fe:a9fe::1]/", "cloud metadata"),
        ("http://[fd00:ec2::254]/", "cloud metadata"),
        ("http://10.0.0.1/", "private"),
        ("http://[::1]:9/", "loopback"),
        ("http://[2002:c0a8:101::1]/", "private (embedded in IPv6)"),
        ("http://0.0.0.0:9/", "unspecified"),
    ]
    for url, kind in refused:
        response = await api.post("/v1/webhooks", json={"url": url})
        assert response.status_code == 400, (url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert kind in response.json()["detail"], (url, response.text)


async def test_a_target_that_turns_forbidden_is_refused_at_every_connection_and_retried(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    """The stored URL's host now points at the metadata service (as a name would after a DNS
    change): every attempt is refused before connecting and retried under the contract's
    backoff, until the URL is fixed and the same delivery goes out."""
    hook = await register_hook(api, receiver.url("turned"), cities=[CITY], types=["alarm.raised"])
    connection = await asyncpg.connect(hooks.database_url)
    try:
        await connection.execute(
            "UPDATE webhook_endpoints SET url = $2 WHERE id = $1",
            hook["id"],
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        )
    finally:
        await connection.close()
    device_id = await flood_station(api)
    publish_level(device_id, 4.9)

    async def refused_twice() -> dict[str, Any] | None:
        items = await deliveries(api, hook["id"], state="pending")
        return items[0] if items and len(items[0]["attempts"]) >= 2 else None

    pending = await wait_until(refused_twice, timeout=30, what="two refused attempts", interval=0.2)
    for attempt in pending["attempts"]:
        assert attempt["status_code"] is None and attempt["response"] is None
        assert attempt["error"] == (
            "169.254.169.254 is a cloud metadata address, which webhooks may not reach"
        )
    assert pending["next_attempt_at"] is not None and receiver.of("turned") == []

    fixed = await api.patch(f"/v1/webhooks/{hook['id']}", json={"url": receiver.url("turned")})
    assert fixed.status_code == 200, fixed.text
    delivered = await wait_for_delivery_state(api, hook["id"], "delivered")
    assert delivered["id"] == pending["id"] and delivered["attempts"][-1]["status_code"] == 200
    [request] = receiver.of("turned")
    assert request.headers["webhook-id"] == pending["message_id"]


async def test_admins_limited_to_a_scope_do_not_see_what_endpoints_answer(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.plan("answers", Reply(500, body=b"internal: pg password hunter2"))
    hook = await register_hook(api, receiver.url("answers"), cities=[CITY], types=["alarm.raised"])
    made = await api.post("/v1/api-keys", json={"role": "admin", "cities": [CITY], "name": "city admin"})
    assert made.status_code == 201, made.text
    device_id = await flood_station(api)
    publish_level(device_id, 4.9)
    delivered = await wait_for_delivery_state(api, hook["id"], "delivered")
    assert [a["response"] for a in delivered["attempts"]] == ["internal: pg password hunter2", "ok"]

    async with httpx.AsyncClient(
        base_url=hooks.api_url, headers={"Authorization": f"Bearer {made.json()['key']}"}, timeout=10
    ) as city_admin:
        listed = (await city_admin.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["items"]
        one = (await city_admin.get(f"/v1/webhooks/{hook['id']}/deliveries/{delivered['id']}")).json()
    for seen in (listed[0], one):
        assert [a["status_code"] for a in seen["attempts"]] == [500, 200]
        assert all(a["response"] is None for a in seen["attempts"])
        assert "hunter2" not in json.dumps(seen)


async def test_private_address_is_refused_again_at_send_time(receiver: Receiver) -> None:
    """A URL stored while it pointed elsewhere (DNS changes) is not followed to a private address."""
    settings = load_settings(webhook_timeout_s=2)
    job = DeliveryJob(
        id=1,
        endpoint_id="wh_0000000000000000",
        url=receiver.url("never"),
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        message_id="msg_1",
        event_type="alarm.raised",
        body="{}",
        attempts=0,
        window_started_at=datetime.now(UTC),
    )
    async with webhook_client(settings) as client:
        result = await send_once(client, job, timeout_s=2)
    assert result.status_code is None and "loopback address" in (result.error or "")
    assert receiver.of("never") == []
    allowed = load_settings(webhook_allowed_networks=ALLOWED_NETWORKS)
    async with webhook_client(allowed) as client:
        result = await send_once(client, job, timeout_s=2)
    assert result.status_code == 200


async def test_redirects_are_not_followed(receiver: Receiver) -> None:
    receiver.plan("moved", Reply(307, {"Location": "http://169.254.169.254/"}))
    job = DeliveryJob(
        id=1,
        endpoint_id="wh_0000000000000000",
        url=receiver.url("moved"),
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        message_id="msg_2",
        event_type="alarm.raised",
        body="{}",
        attempts=0,
        window_started_at=datetime.now(UTC),
    )
    async with webhook_client(load_settings(webhook_allowed_networks=ALLOWED_NETWORKS)) as client:
        result = await send_once(client, job, timeout_s=2)
    assert result.status_code == 307 and "not followed" in (result.error or "")
    assert "169.254.169.254" in (result.response or "") and "169.254" not in (result.error or "")
    assert result.outcome == "retry"


async def test_latency_from_danger_level_to_webhook(
    hooks: OwnSystem, api: httpx.AsyncClient, receiver: Receiver, figures: Figures
) -> None:
    """Reading published (broker-acknowledged) to the agency's receiver, 20 times."""
    await register_hook(
        api, receiver.url("latency"), cities=[CITY], types=["alarm.raised"], min_severity="critical"
    )
    latencies = []
    for _ in range(20):
        device_id = await flood_station(api)
        sent = publish_level(device_id, 4.9)
        await receiver.wait_for("latency", len(latencies) + 1)
        latencies.append(receiver.of("latency")[-1].at - sent)
    figures.lines.append(
        "reading past the danger level -> webhook received, 20 tries:"
        f" median {statistics.median(latencies) * 1000:.0f} ms, worst {max(latencies) * 1000:.0f} ms"
    )
    assert len(latencies) == 20
