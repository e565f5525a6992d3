"""Incidents and agencies against the real services: alarms of one place group into one incident
(another place, another incident), an incident opened by hand, the state machine, the timeline,
the checklist from a city's own procedure, an assignment signed and delivered to the agency's
endpoint, and its escalation when nobody acknowledges it.

The module runs a system of its own: webhook targets on loopback must be allowed, and the
grouping job runs every half second."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ioc_core.http import HttpServer
from tests.integration.conftest import ADMIN_KEY, free_port
from tests.integration.harness import Publisher, unique, wait_until
from tests.integration.systems import OwnSystem, own_system

CITY = unique("incidents")[:32]


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """An agency's endpoint on loopback: answers 200 and records every request."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Received] = []
        self.app = Starlette(routes=[Route("/{name}", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Received(request.path_params["name"], headers, await request.body()))
        return Response("ok")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    async def wait_for(self, name: str, event_type: str) -> Received:
        async def found() -> Received | None:
            return next((r for r in self.requests if r.path == name and r.json["type"] == event_type), None)

        return await wait_until(found, timeout=30, what=f"{event_type} at /{name}")


def verify(secret: str, received: Received) -> None:
    """The Standard Webhooks v1 signature of the request, checked by hand."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{received.headers['webhook-id']}.{received.headers['webhook-timestamp']}.".encode()
    digest = hmac.new(key, signed + received.body, hashlib.sha256).digest()
    assert received.headers["webhook-signature"] == "v1," + base64.b64encode(digest).decode()


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    hub = Receiver()
    async with HttpServer(hub.app, host="127.0.0.1", port=hub.port, name="agency receiver"):
        yield hub


@pytest.fixture(scope="module")
async def incidents_system(log_dir: Path) -> AsyncIterator[OwnSystem]:
    async with own_system(
        log_dir,
        "incidents",
        [CITY],
        IOC_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        IOC_INCIDENT_CHECK_S="0.5",
        IOC_WEBHOOK_BACKOFF_INITIAL_S="0.3",
    ) as system:
        yield system


@pytest.fixture
async def api(incidents_system: OwnSystem) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=incidents_system.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ) as client:
        yield client


def _box(min_lon: float, min_lat: float, max_lon: float, max_lat: float) -> list[list[float]]:
    return [
        [min_lon, min_lat],
        [max_lon, min_lat],
        [max_lon, max_lat],
        [min_lon, max_lat],
        [min_lon, min_lat],
    ]


async def ward(api: httpx.AsyncClient, box: tuple[float, float, float, float]) -> str:
    area_id = unique("ward")
    feature = {
        "type": "Feature",
        "id": area_id,
        "geometry": {"type": "Polygon", "coordinates": [_box(*box)]},
        "properties": {
            "name_vi": f"Phường {area_id}",
            "name_en": f"Ward {area_id}",
            "kind": "ward",
            "city": CITY,
        },
    }
    answer = await api.put(f"/v1/areas/{area_id}", json=feature)
    assert answer.status_code == 201, answer.text
    return area_id


async def water_device(
    api: httpx.AsyncClient, lon: float, lat: float, *, thresholds: dict[str, Any] | None = None
) -> str:
    device_id = unique("pipe")
    body = {
        "id": device_id,
        "city": CITY,
        "domain": "water",
        "location": {"lat": lat, "lon": lon},
        "thresholds": thresholds or {"pressure": {"warn_above": 5.0, "crit_above": 8.0}},
    }
    answer = await api.post("/v1/devices", json=body)
    assert answer.status_code == 201, answer.text
    return device_id


def send_pressure(device_id: str, *values: float, step_s: float = 10, minutes_ago: float = 10) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=minutes_ago)
    topic = f"ioc/v1/{CITY}/water/{device_id}/telemetry"
    messages = [
        (
            topic,
            json.dumps({"ts": (start + timedelta(seconds=step_s * i)).isoformat(), "pressure": v}).encode(),
        )
        for i, v in enumerate(values)
    ]
    with Publisher() as publisher:
        publisher.publish_all(messages)


async def incidents_of(api: httpx.AsyncClient, **filters: str) -> list[dict[str, Any]]:
    answer = await api.get("/v1/incidents", params={"city": CITY, "limit": 1000, **filters})
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


async def incident_of_area(api: httpx.AsyncClient, area: str, alarms: int) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        matching = [i for i in await incidents_of(api) if i["area"] == area and i["alarm_count"] >= alarms]
        return matching[0] if matching else None

    return await wait_until(found, timeout=45, what=f"an incident of {area} with {alarms} alarms")


async def alarm_of(api: httpx.AsyncClient, device_id: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        answer = await api.get("/v1/alarms", params={"device_id": device_id})
        items = answer.json()["items"]
        return items[0] if items else None

    return await wait_until(found, timeout=45, what=f"an alarm of {device_id}")


async def test_alarms_of_one_place_group_into_one_incident(api: httpx.AsyncClient) -> None:
    ward_a = await ward(api, (106.60, 20.80, 106.62, 20.82))
    ward_b = await ward(api, (106.62, 20.80, 106.64, 20.82))
    in_a = [await water_device(api, 106.605, 20.805), await water_device(api, 106.615, 20.815)]
    in_b = await water_device(api, 106.63, 20.81)
    for device_id in [*in_a, in_b]:
        send_pressure(device_id, 3.0, 6.0, 6.2)

    first = await incident_of_area(api, ward_a, 2)
    second = await incident_of_area(api, ward_b, 1)
    assert first["id"] != second["id"]
    assert first["kind"] == "water" and first["automatic"] is True and first["severity"] == "medium"
    assert first["title"]["en"] == f"Water supply incident — Ward {ward_a}"
    assert len([i for i in await incidents_of(api) if i["area"] == ward_a]) == 1

    # An alarm growing worse raises its incident's severity.
    send_pressure(in_a[0], 9.0, 9.5, minutes_ago=1)

    async def critical() -> dict[str, Any] | None:
        answer = await api.get(f"/v1/incidents/{first['id']}")
        body: dict[str, Any] = answer.json()
        return body if body["severity"] == "critical" else None

    detail = await wait_until(critical, timeout=30, what="the incident rising to critical")
    assert sorted(a["device_id"] for a in detail["alarms"]) == sorted(in_a)
    actions = [entry["action"] for entry in detail["timeline"]]
    assert actions[:3] == ["opened", "alarm_joined", "alarm_joined"] and "severity_raised" in actions
    assert detail["checklist"][0]["id"] == "locate-fault"

    # The list answers If-None-Match with 304 while nothing changes.
    listed = await api.get("/v1/incidents", params={"city": CITY, "area": ward_b})
    again = await api.get(
        "/v1/incidents",
        params={"city": CITY, "area": ward_b},
        headers={"If-None-Match": listed.headers["etag"]},
    )
    assert again.status_code == 304


async def test_manual_incident_state_machine_and_checklist(api: httpx.AsyncClient) -> None:
    procedure = {
        "escalate_after_s": 900,
        "checklist": [
            {"id": "call-crew", "vi": "Gọi đội sửa chữa", "en": "Call the repair crew"},
            {"id": "tell-customers", "vi": "Báo khách hàng", "en": "Tell the customers"},
        ],
    }
    put = await api.put("/v1/procedures", params={"city": CITY, "kind": "water"}, json=procedure)
    assert put.status_code == 200, put.text
    assert put.json()["source"] == "city"
    other_city = await api.get("/v1/procedures", params={"city": "da-nang", "kind": "water"})
    assert other_city.json()["source"] == "default"
    try:
        # A stuck sensor opens no incident by itself: an operator makes one of its alarm.
        device_id = await water_device(api, 105.0, 10.0, thresholds={"pressure": {"flatline_s": 120}})
        send_pressure(device_id, *([3.0] * 8), step_s=30)
        alarm = await alarm_of(api, device_id)
        assert alarm["rule"] == "flatline.pressure"
        created = await api.post(
            "/v1/incidents",
            json={"alarm_ids": [alarm["id"]], "title": {"vi": "Vỡ ống", "en": "Burst main"}},
        )
        assert created.status_code == 201, created.text
        incident = created.json()
        assert incident["automatic"] is False and incident["title"]["en"] == "Burst main"
        assert incident["kind"] == "water" and incident["area"] is None and incident["severity"] == "low"
        assert incident["alarms"][0]["id"] == alarm["id"]
        assert [i["id"] for i in incident["checklist"]] == ["call-crew", "tell-customers"]
        path = f"/v1/incidents/{incident['id']}"

        again = await api.post("/v1/incidents", json={"alarm_ids": [alarm["id"]]})
        assert again.status_code == 409, again.text
        assert (await api.post("/v1/incidents", json={"alarm_ids": [2**62]})).status_code == 404
        assert (await api.post("/v1/incidents", json={"alarm_ids": []})).status_code in (400, 422)

        assert (await api.patch(path, json={"state": "closed"})).status_code == 409
        assert (await api.patch(path, json={"state": "sleeping"})).status_code in (400, 422)
        moved = await api.patch(path, json={"state": "acknowledged", "note": "đã nhận"})
        assert moved.status_code == 200 and moved.json()["state"] == "acknowledged"
        assert (await api.patch(path, json={"state": "open"})).status_code == 409
        ticked = await api.post(f"{path}/checklist/call-crew", json={"note": "đội 3"})
        assert ticked.status_code == 200, ticked.text
        step = ticked.json()["checklist"][0]
        assert step["done"] is True and step["done_by"] == "admin"
        assert (await api.post(f"{path}/checklist/no-such-step")).status_code == 404
        for state in ("in_progress", "resolved", "closed"):
            answer = await api.patch(path, json={"state": state})
            assert answer.status_code == 200, answer.text
        assert (await api.patch(path, json={"state": "in_progress"})).status_code == 409
        assert (await api.post(f"{path}/checklist/tell-customers")).status_code == 409

        timeline = (await api.get(path)).json()["timeline"]
        assert [e["action"] for e in timeline if e["actor"] == "admin"][-5:] == [
            "acknowledged",
            "checked",
            "in_progress",
            "resolved",
            "closed",
        ]
        noted = next(e for e in timeline if e["action"] == "acknowledged")
        assert noted["note"] == "đã nhận"
        audit = await api.get(
            "/v1/audit", params={"object_type": "incident", "object_id": str(incident["id"])}
        )
        assert audit.status_code == 200, audit.text
        assert {e["action"] for e in audit.json()["items"]} >= {"incident.update", "incident.check"}
        assert (await api.get("/v1/incidents/999999999")).status_code == 404
    finally:
        await api.delete("/v1/procedures", params={"city": CITY, "kind": "water"})


async def test_assignment_is_signed_to_the_agency_and_escalates(
    api: httpx.AsyncClient, receiver: Receiver
) -> None:
    name = unique("agency")
    endpoints = {}
    for path in (name, f"{name}-duty"):
        # An agency endpoint whose own filter asks for no incident events: what incidents it gets
        # is what is sent to the agency.
        made = await api.post(
            "/v1/webhooks",
            json={"url": receiver.url(path), "filter": {"cities": [CITY], "types": ["alarm.resolved"]}},
        )
        assert made.status_code == 201, made.text
        endpoints[path] = made.json()
    agency_id = unique("cap-nuoc")
    created = await api.post(
        "/v1/agencies",
        json={
            "id": agency_id,
            "name_vi": "Công ty Cấp nước",
            "name_en": "Water supply company",
            "domains": ["water"],
            "cities": [CITY],
            "webhook_ids": [endpoints[name]["id"]],
            "escalation_webhook_id": endpoints[f"{name}-duty"]["id"],
            "escalation_contact": "Trực ban 0225 000 000",
        },
    )
    assert created.status_code == 201, created.text
    assert (await api.post("/v1/agencies", json={"id": agency_id, "name_vi": "x"})).status_code == 409
    missing = await api.post(
        "/v1/agencies", json={"id": unique("ag"), "name_vi": "x", "webhook_ids": ["wh_0000000000000000"]}
    )
    assert missing.status_code == 400
    patched = await api.patch(f"/v1/agencies/{agency_id}", json={"escalation_contact": "0225 111 111"})
    assert patched.status_code == 200 and patched.json()["escalation_contact"] == "0225 111 111"
    assert any(a["id"] == agency_id for a in (await api.get("/v1/agencies")).json()["items"])

    put = await api.put(
        "/v1/procedures",
        params={"city": CITY, "kind": "water"},
        json={"escalate_after_s": 2, "checklist": [{"id": "go", "vi": "Đi", "en": "Go"}]},
    )
    assert put.status_code == 200, put.text
    try:
        area = await ward(api, (106.70, 20.70, 106.72, 20.72))
        device_id = await water_device(api, 106.71, 20.71)
        send_pressure(device_id, 3.0, 6.5)
        incident = await incident_of_area(api, area, 1)
        path = f"/v1/incidents/{incident['id']}"
        assert (await api.patch(path, json={"agency_id": "no-such-agency"})).status_code == 400
        started = time.monotonic()
        assigned = await api.patch(path, json={"agency_id": agency_id, "note": "giao Cấp nước"})
        assert assigned.status_code == 200, assigned.text
        assert assigned.json()["agency_id"] == agency_id and assigned.json()["escalate_after_s"] == 2

        told = await receiver.wait_for(name, "incident.assigned")
        verify(endpoints[name]["secret"], told)
        assert told.json["data"]["id"] == incident["id"] and told.json["data"]["agency_id"] == agency_id

        escalation = await receiver.wait_for(f"{name}-duty", "incident.escalated")
        assert time.monotonic() - started >= 2
        verify(endpoints[f"{name}-duty"]["secret"], escalation)
        assert escalation.json["data"]["escalation_contact"] == "0225 111 111"
        detail = (await api.get(path)).json()
        assert detail["escalated_at"] is not None
        assert [e["action"] for e in detail["timeline"]][-2:] == ["assigned", "escalated"]
        # Escalated once only (a delivery may be repeated, under its one `webhook-id`).
        duty = {
            r.headers["webhook-id"]
            for r in receiver.requests
            if r.path == f"{name}-duty" and r.json["type"].startswith("incident.")
        }
        assert duty == {escalation.headers["webhook-id"]}, [r.json for r in receiver.requests]

        assert (await api.delete(f"/v1/agencies/{agency_id}")).status_code == 204
        assert (await api.get(path)).json()["agency_id"] is None
        assert (await api.get(f"/v1/agencies/{agency_id}")).status_code == 404
    finally:
        await api.delete("/v1/procedures", params={"city": CITY, "kind": "water"})


async def test_incident_routes_refuse_what_a_stranger_controls(
    incidents_system: OwnSystem, api: httpx.AsyncClient
) -> None:
    async with httpx.AsyncClient(base_url=incidents_system.api_url, timeout=10) as anonymous:
        assert (await anonymous.get("/v1/incidents")).status_code == 401
    assert (await api.get("/v1/incidents", params={"state": "nope"})).status_code == 400
    assert (await api.get("/v1/incidents", params={"cursor": "garbage"})).status_code == 400
    assert (await api.get("/v1/procedures", params={"city": CITY, "kind": "nope"})).status_code in (400, 422)
    bad_step = {"checklist": [{"id": "a", "vi": "x", "en": "x"}, {"id": "a", "vi": "y", "en": "y"}]}
    answer = await api.put("/v1/procedures", params={"city": CITY, "kind": "flood"}, json=bad_step)
    assert answer.status_code in (400, 422)
    assert (await api.patch("/v1/incidents/1", json={"bogus": 1})).status_code in (400, 422)
    assert (await api.post("/v1/agencies", json={"id": "Bad Id", "name_vi": "x"})).status_code in (400, 422)
