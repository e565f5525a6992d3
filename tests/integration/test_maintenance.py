"""Maintenance windows end to end: the API plans them, the processor records alarms inside them as
suppressed (no webhook, no escalation, not on the screens' figures) and raises no offline alarm for
a planned outage's silence, and what outlives a window raises normally when it ends. Webhooks go
to a real HTTP receiver on loopback.

The module runs a system of its own: its silence limit, escalation limit and end-of-window check
are short, and its city-wide windows must not touch any other test's devices.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ioc_core.http import HttpServer
from tests.integration.conftest import ADMIN_KEY
from tests.integration.harness import Publisher, unique, wait_until
from tests.integration.systems import OwnSystem, own_system
from tests.integration.test_webhooks import Received, Receiver

CITY = unique("maint")[:32]
# A city of its own for the test that reads the city's summary, so nothing else counts in it.
SUMMARY_CITY = unique("maint-sum")[:32]
SILENCE_S = 3
ESCALATE_AFTER_S = 3


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    hub = Receiver()
    async with HttpServer(hub.app, host="127.0.0.1", port=hub.port, name="test receiver"):
        yield hub


@pytest.fixture(scope="module")
async def maintained(log_dir: Path) -> AsyncIterator[OwnSystem]:
    async with own_system(
        log_dir,
        "maint",
        [CITY, SUMMARY_CITY],
        IOC_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        IOC_WEBHOOK_BACKOFF_INITIAL_S="0.3",
        IOC_WEBHOOK_BACKOFF_MAX_S="2",
        IOC_OFFLINE_AFTER_S=json.dumps({"waste": SILENCE_S}),
        IOC_ESCALATE_AFTER_S=json.dumps({"flood": ESCALATE_AFTER_S}),
        IOC_MAINTENANCE_CHECK_S="0.5",
    ) as system:
        yield system


@pytest.fixture
async def api(maintained: OwnSystem) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=maintained.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ) as client:
        yield client


# -- helpers ----------------------------------------------------------------------------------


def at(seconds: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def register(
    api: httpx.AsyncClient, domain: str, *, city: str = CITY, lat: float = 20.84, lon: float = 106.69
) -> str:
    device_id = unique(f"mw-{domain}")
    response = await api.post(
        "/v1/devices",
        json={"id": device_id, "city": city, "domain": domain, "location": {"lat": lat, "lon": lon}},
    )
    assert response.status_code == 201, response.text
    return device_id


async def put_area(api: httpx.AsyncClient, lat: float, lon: float, *, city: str = CITY) -> str:
    """A small square feeder zone around (lat, lon)."""
    area_id = unique("feeder")
    d = 0.005
    ring = [
        [lon - d, lat - d],
        [lon + d, lat - d],
        [lon + d, lat + d],
        [lon - d, lat + d],
        [lon - d, lat - d],
    ]
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "name_vi": "Vùng xuất tuyến",
            "name_en": "Feeder zone",
            "kind": "feeder_zone",
            "city": city,
        },
    }
    response = await api.put(f"/v1/areas/{area_id}", json=feature)
    assert response.status_code == 201, response.text
    return area_id


def publish_metrics(
    device_id: str, domain: str, metrics: dict[str, float], *, city: str = CITY, ts: datetime | None = None
) -> None:
    topic = f"ioc/v1/{city}/{domain}/{device_id}/telemetry"
    payload = json.dumps({"ts": (ts or datetime.now(UTC)).isoformat(), **metrics}).encode()
    with Publisher() as publisher:
        publisher.publish_all([(topic, payload)])


async def plan(api: httpx.AsyncClient, **window: Any) -> dict[str, Any]:
    response = await api.post("/v1/maintenance-windows", json={"reason": "bảo trì định kỳ", **window})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def hook(api: httpx.AsyncClient, url: str, **webhook_filter: Any) -> str:
    response = await api.post("/v1/webhooks", json={"url": url, "filter": webhook_filter})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def alarms_of(api: httpx.AsyncClient, device_id: str) -> list[dict[str, Any]]:
    response = await api.get("/v1/alarms", params={"device_id": device_id})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def one_alarm(api: httpx.AsyncClient, device_id: str, *, timeout: float = 30) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        items = await alarms_of(api, device_id)
        return items[0] if items else None

    return await wait_until(found, timeout=timeout, what=f"an alarm of {device_id}", interval=0.2)


async def delivery_count(api: httpx.AsyncClient, webhook_id: str) -> int:
    response = await api.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 500})
    assert response.status_code == 200, response.text
    return len(response.json()["items"])


def about(requests: list[Received], device_id: str) -> list[tuple[str, bool | None]]:
    """The (type, suppressed) of the webhooks received about one device."""
    return [
        (r.json["type"], r.json["data"].get("suppressed"))
        for r in requests
        if r.json["data"].get("device_id") == device_id
    ]


# -- the API ----------------------------------------------------------------------------------


async def test_windows_are_validated_with_clear_client_errors(api: httpx.AsyncClient) -> None:
    device_id = await register(api, "flood")
    good = {"device_id": device_id, "start": at(3600), "end": at(7200), "reason": "thay cảm biến"}
    bad_bodies = [
        {**good, "rrule": "FREQ=DAILY"},  # unbounded
        {**good, "rrule": "FREQ=DAILY;COUNT=5000"},  # too many occurrences
        {**good, "rrule": "FREQ=MINUTELY;COUNT=3"},  # absurd frequency
        {**good, "rrule": "FREQ=FORTNIGHTLY;COUNT=3"},  # not RFC 5545
        {**good, "rrule": "FREQ=DAILY;COUNT=2\nEXDATE:20270101T000000Z"},  # more than a rule
        {**good, "rrule": "FREQ=DAILY;INTERVAL=7;BYDAY=MO;BYMONTH=2;BYMONTHDAY=30;COUNT=2"},  # never
        {**good, "end": good["start"]},  # end not after start
        {**good, "end": at(1800)},  # end before start
        {**good, "start": "2026-12-01T08:00:00"},  # no offset
        {**good, "city": CITY},  # two targets
        {"start": good["start"], "end": good["end"], "reason": "x"},  # no target
        {"domain": "flood", "start": good["start"], "end": good["end"], "reason": "x"},  # domain, no city
        {"city": "Hà Nội", "start": good["start"], "end": good["end"], "reason": "x"},  # not a slug
        {**good, "device_id": "no-such-device-" + unique("x")},  # nothing to maintain
        {**good, "reason": ""},
    ]
    for body in bad_bodies:
        started = time.monotonic()
        response = await api.post("/v1/maintenance-windows", json=body)
        assert response.status_code == 422, (body, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), response.text
        assert time.monotonic() - started < 5, body
    assert (await api.get("/v1/maintenance-windows/mw_0000000000000000")).status_code == 404
    assert (await api.get("/v1/maintenance-windows/not-an-id")).status_code == 422


async def test_windows_are_made_read_changed_removed_and_audited(
    maintained: OwnSystem, api: httpx.AsyncClient
) -> None:
    device_id = await register(api, "flood")
    created = await plan(
        api, device_id=device_id, start=at(3600), end=at(7200), rrule="FREQ=WEEKLY;COUNT=4", reason="thay pin"
    )
    window_id = created["id"]
    assert created["target"] == "device" and created["city"] == CITY and created["domain"] == "flood"
    assert created["occurrences"] == 4 and created["active"] is False and created["owner"] == "admin"
    assert created["rrule"] == "FREQ=WEEKLY;COUNT=4"

    assert (await api.get(f"/v1/maintenance-windows/{window_id}")).json() == created
    listed = (await api.get("/v1/maintenance-windows", params={"city": CITY})).json()
    assert window_id in [w["id"] for w in listed["items"]]

    changed = await api.patch(
        f"/v1/maintenance-windows/{window_id}", json={"rrule": None, "reason": "thay pin và cáp"}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["occurrences"] == 1 and changed.json()["reason"] == "thay pin và cáp"
    refused = await api.patch(f"/v1/maintenance-windows/{window_id}", json={"end": created["start"]})
    assert refused.status_code == 422, refused.text

    city_wide = await plan(api, city=CITY, start=at(86_400), end=at(90_000))
    assert city_wide["target"] == "city" and city_wide["domain"] is None
    domain_wide = await plan(api, city=CITY, domain="grid", start=at(86_400), end=at(90_000))
    assert domain_wide["target"] == "domain" and domain_wide["domain"] == "grid"

    # A viewer reads but cannot plan; a key of another city sees nothing of these.
    keys = {}
    for role, cities in (("viewer", None), ("operator", ["elsewhere"])):
        made = await api.post("/v1/api-keys", json={"role": role, "cities": cities, "name": f"mw-{role}"})
        assert made.status_code == 201, made.text
        keys[role] = made.json()["key"]
    async with httpx.AsyncClient(
        base_url=maintained.api_url, headers={"X-API-Key": keys["viewer"]}, timeout=10
    ) as viewer:
        assert (await viewer.get(f"/v1/maintenance-windows/{window_id}")).status_code == 200
        forbidden = await viewer.post(
            "/v1/maintenance-windows", json={"city": CITY, "start": at(60), "end": at(120), "reason": "x"}
        )
        assert forbidden.status_code == 403, forbidden.text
    async with httpx.AsyncClient(
        base_url=maintained.api_url, headers={"X-API-Key": keys["operator"]}, timeout=10
    ) as outsider:
        assert (await outsider.get(f"/v1/maintenance-windows/{window_id}")).status_code == 404
        assert (await outsider.delete(f"/v1/maintenance-windows/{window_id}")).status_code == 404
        beyond = await outsider.post(
            "/v1/maintenance-windows", json={"city": CITY, "start": at(60), "end": at(120), "reason": "x"}
        )
        assert beyond.status_code == 403, beyond.text
        hidden = await outsider.post(
            "/v1/maintenance-windows",
            json={"device_id": device_id, "start": at(60), "end": at(120), "reason": "x"},
        )
        assert hidden.status_code == 422, hidden.text
        assert [w["id"] for w in (await outsider.get("/v1/maintenance-windows")).json()["items"]] == []

    for window in (window_id, city_wide["id"], domain_wide["id"]):
        assert (await api.delete(f"/v1/maintenance-windows/{window}")).status_code == 204
    assert (await api.get(f"/v1/maintenance-windows/{window_id}")).status_code == 404
    assert (await api.delete(f"/v1/maintenance-windows/{window_id}")).status_code == 404

    audit = await api.get("/v1/audit", params={"object_type": "maintenance_window", "limit": 100})
    assert audit.status_code == 200, audit.text
    actions = {(e["action"], e["outcome"]) for e in audit.json()["items"] if e["object"]["id"] == window_id}
    assert {
        ("maintenance_window.create", "done"),
        ("maintenance_window.update", "done"),
        ("maintenance_window.delete", "done"),
    } <= actions
    refusals = [e for e in audit.json()["items"] if e["outcome"] == "refused"]
    assert refusals, "the outsider's attempts are recorded"


# -- the processor ----------------------------------------------------------------------------


async def test_alarm_inside_a_window_is_suppressed_unsent_unescalated_and_not_counted(
    api: httpx.AsyncClient, receiver: Receiver
) -> None:
    webhook_id = await hook(api, receiver.url("suppressed"), cities=[SUMMARY_CITY])
    quiet = await register(api, "flood", city=SUMMARY_CITY)
    loud = await register(api, "flood", city=SUMMARY_CITY)
    await plan(api, device_id=quiet, start=at(-60), end=at(3600))
    publish_metrics(quiet, "flood", {"currentLevel": 4.9}, city=SUMMARY_CITY)
    publish_metrics(loud, "flood", {"currentLevel": 4.9}, city=SUMMARY_CITY)

    quiet_alarm = await one_alarm(api, quiet)
    loud_alarm = await one_alarm(api, loud)
    assert quiet_alarm["suppressed"] is True and quiet_alarm["severity"] == "critical"
    assert loud_alarm["suppressed"] is False
    # The loud one is raised to agencies, then escalated: by then the quiet one has had every chance.
    await wait_until(
        lambda: _escalated(api, loud), timeout=ESCALATE_AFTER_S + 20, what="the escalation", interval=0.3
    )
    await wait_until(
        lambda: _has(receiver, "suppressed", loud, ("alarm.updated", False)), timeout=20, what="webhooks"
    )
    assert about(receiver.of("suppressed"), quiet) == []
    assert (await alarms_of(api, quiet))[0]["escalated"] is False
    assert await delivery_count(api, webhook_id) == len(receiver.of("suppressed"))

    summary = (await api.get("/v1/summary", params={"city": SUMMARY_CITY})).json()
    assert summary["domains"]["flood"]["alarms"]["critical"] == 1
    layer = (await api.get("/v1/layers/flood", params={"city": SUMMARY_CITY})).json()
    severity = {f["id"]: f["properties"]["alarm_severity"] for f in layer["features"]}
    assert severity == {quiet: None, loud: "critical"}
    listed = (await api.get("/v1/alarms", params={"city": SUMMARY_CITY, "state": "active"})).json()["items"]
    assert {a["device_id"]: a["suppressed"] for a in listed} == {quiet: True, loud: False}


async def _escalated(api: httpx.AsyncClient, device_id: str) -> bool | None:
    items = await alarms_of(api, device_id)
    return True if items and items[0]["escalated"] else None


async def _has(receiver: Receiver, name: str, device_id: str, entry: tuple[str, bool | None]) -> bool | None:
    return True if entry in about(receiver.of(name), device_id) else None


async def test_a_condition_that_outlives_its_window_raises_normally_when_it_ends(
    api: httpx.AsyncClient, receiver: Receiver
) -> None:
    await hook(api, receiver.url("outlived"), cities=[CITY], domains=["flood"])
    device_id = await register(api, "flood")
    window = await plan(api, device_id=device_id, start=at(-60), end=at(6))
    publish_metrics(device_id, "flood", {"currentLevel": 4.9})
    alarm = await one_alarm(api, device_id)
    assert alarm["suppressed"] is True

    async def released() -> dict[str, Any] | None:
        items = await alarms_of(api, device_id)
        return items[0] if items and not items[0]["suppressed"] else None

    after = await wait_until(
        released, timeout=30, what="the alarm released at the window's end", interval=0.3
    )
    assert after["id"] == alarm["id"] and after["state"] == "active"
    assert datetime.fromisoformat(window["end"]) <= datetime.now(UTC)
    await wait_until(
        lambda: _has(receiver, "outlived", device_id, ("alarm.raised", False)), timeout=20, what="the webhook"
    )
    assert about(receiver.of("outlived"), device_id) == [("alarm.raised", False)]


async def test_silence_inside_a_window_is_no_offline_alarm_until_it_outlives_the_window(
    api: httpx.AsyncClient, receiver: Receiver
) -> None:
    await hook(api, receiver.url("silence"), cities=[CITY], domains=["waste"])
    device_id = await register(api, "waste")
    window_s = SILENCE_S + 8
    await plan(api, device_id=device_id, start=at(-60), end=at(window_s))
    publish_metrics(device_id, "waste", {"fillingLevel": 0.3})

    async def status(expected: str) -> bool | None:
        device = (await api.get(f"/v1/devices/{device_id}")).json()
        return True if device["status"] == expected else None

    await wait_until(lambda: status("online"), timeout=20, what="the device online")
    # Silent: the sweep marks it offline inside the window, and the screens show it so.
    await wait_until(
        lambda: status("offline"), timeout=SILENCE_S + 20, what="the device offline", interval=0.3
    )
    assert await alarms_of(api, device_id) == []

    alarm = await one_alarm(api, device_id, timeout=window_s + 30)
    assert alarm["rule"] == "offline" and alarm["suppressed"] is False and alarm["state"] == "active"
    await wait_until(
        lambda: _has(receiver, "silence", device_id, ("alarm.raised", False)), timeout=20, what="the webhook"
    )
    # The status changes inside the window went to nobody: online and offline both came inside it.
    assert about(receiver.of("silence"), device_id) == [("alarm.raised", False)]


async def test_removing_a_window_raises_what_it_held_back(api: httpx.AsyncClient, receiver: Receiver) -> None:
    await hook(api, receiver.url("removed"), cities=[CITY], domains=["waste"])
    silent = await register(api, "waste")
    full = await register(api, "waste")
    windows = [await plan(api, device_id=d, start=at(-60), end=at(3600)) for d in (silent, full)]
    publish_metrics(silent, "waste", {"fillingLevel": 0.3})
    publish_metrics(full, "waste", {"fillingLevel": 0.99})
    assert (await one_alarm(api, full))["suppressed"] is True

    async def offline() -> bool | None:
        device = (await api.get(f"/v1/devices/{silent}")).json()
        return True if device["status"] == "offline" else None

    await wait_until(offline, timeout=SILENCE_S + 20, what="the device offline", interval=0.3)
    assert await alarms_of(api, silent) == []
    for window in windows:
        assert (await api.delete(f"/v1/maintenance-windows/{window['id']}")).status_code == 204

    offline_alarm = await one_alarm(api, silent)
    assert offline_alarm["rule"] == "offline" and offline_alarm["suppressed"] is False
    for device_id in (silent, full):
        await wait_until(
            lambda: _has(receiver, "removed", device_id, ("alarm.raised", False)),  # noqa: B023
            timeout=20,
            what=f"the webhook of {device_id}",
        )
    assert (await alarms_of(api, full))[0]["suppressed"] is False
    listed = (await api.get("/v1/maintenance-windows", params={"city": CITY})).json()["items"]
    assert not {w["id"] for w in windows} & {w["id"] for w in listed}


async def test_a_recurring_window_applies_to_its_occurrences_only(api: httpx.AsyncClient) -> None:
    lat, lon = 20.9, 106.6
    area_id = await put_area(api, lat, lon)
    inside = await register(api, "flood", lat=lat, lon=lon)
    between = await register(api, "flood", lat=lat, lon=lon)
    elsewhere = await register(api, "flood", lat=lat + 0.1, lon=lon)
    now = datetime.now(UTC)
    # Hour-long occurrences a day apart: yesterday's and today's, under way now.
    start = now - timedelta(days=1, minutes=30)
    window = await plan(
        api,
        area=area_id,
        start=start.isoformat(),
        end=(start + timedelta(hours=1)).isoformat(),
        rrule="FREQ=DAILY;COUNT=2",
    )
    assert window["occurrences"] == 2 and window["active"] is True
    publish_metrics(inside, "flood", {"currentLevel": 4.9}, ts=now)
    publish_metrics(between, "flood", {"currentLevel": 4.9}, ts=now - timedelta(hours=12))
    publish_metrics(elsewhere, "flood", {"currentLevel": 4.9}, ts=now)
    assert (await one_alarm(api, inside))["suppressed"] is True
    assert (await one_alarm(api, between))["suppressed"] is False
    assert (await one_alarm(api, elsewhere))["suppressed"] is False


async def test_outage_webhooks_with_and_without_a_window(
    api: httpx.AsyncClient, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    """A feeder's devices all drop off (their last will, `offline`): the agency hears of each
    device's status and offline alarm, unless the outage was planned."""
    feeders = 12
    counts: dict[str, int] = {}
    for planned in (False, True):
        lat, lon = (20.7, 106.5) if planned else (20.6, 106.5)
        area_id = await put_area(api, lat, lon)
        devices = [await register(api, "grid", lat=lat, lon=lon) for _ in range(feeders)]
        with Publisher() as publisher:
            publisher.publish_all(
                [
                    (
                        f"ioc/v1/{CITY}/grid/{d}/telemetry",
                        json.dumps({"voltage": 230.0, "frequency": 50.0}).encode(),
                    )
                    for d in devices
                ]
            )
        await _all_status(api, devices, "online")
        name = "planned" if planned else "unplanned"
        webhook_id = await hook(api, receiver.url(name), areas=[area_id])
        if planned:
            await plan(api, area=area_id, start=at(-60), end=at(3600), reason="cắt điện theo kế hoạch")
        with Publisher() as publisher:
            publisher.publish_all([(f"ioc/v1/{CITY}/grid/{d}/status", b"offline") for d in devices])
        await _all_status(api, devices, "offline")
        if not planned:
            await _wait_for_deliveries(api, webhook_id, 2 * feeders)
        counts[name] = await delivery_count(api, webhook_id)
        if planned:
            for device_id in devices:
                assert await alarms_of(api, device_id) == []
    assert counts["unplanned"] == 2 * feeders, counts  # each device: device.offline and its alarm
    assert counts["planned"] == 0, counts
    with capsys.disabled():
        print(
            f"\noutage of {feeders} devices of a feeder: {counts['unplanned']} webhook deliveries without a"
            f" maintenance window, {counts['planned']} with one"
        )


async def _all_status(api: httpx.AsyncClient, devices: list[str], expected: str) -> None:
    async def reached() -> bool | None:
        for device_id in devices:
            if (await api.get(f"/v1/devices/{device_id}")).json()["status"] != expected:
                return None
        return True

    await wait_until(reached, timeout=30, what=f"every device {expected}", interval=0.3)


async def _wait_for_deliveries(api: httpx.AsyncClient, webhook_id: str, n: int) -> None:
    async def enough() -> bool | None:
        return True if await delivery_count(api, webhook_id) >= n else None

    await wait_until(enough, timeout=30, what=f"{n} deliveries", interval=0.3)
