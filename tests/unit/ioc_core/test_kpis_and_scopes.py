"""Headline figures (pure), key scopes, and the API's small parsers."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from fastapi import HTTPException

from api.auth import Principal
from api.pagination import decode_int_cursor, decode_text_cursor, encode_cursor
from api.params import parse_bbox
from api.view_cache import ViewCache, etag_matches
from ioc_core.domains import DOMAINS
from ioc_core.kpis import DeviceSnapshot, past_limit
from ioc_core.rules import rules_for


def snapshot(domain: str, device_id: str, status: str = "online", thresholds=None, **metrics: float):  # type: ignore[no-untyped-def]
    return DeviceSnapshot(
        device_id=device_id,
        status=status,
        metrics=metrics,
        rules=rules_for(DOMAINS[domain], thresholds or {}),
    )


def figures(domain: str, devices: list[DeviceSnapshot]) -> dict[str, object]:
    return {k.name: k.compute(devices).value for k in DOMAINS[domain].kpis}


def test_every_domain_has_labelled_figures_that_survive_no_devices() -> None:
    for domain in DOMAINS.values():
        assert domain.kpis, f"{domain.name} has no headline figures"
        for kpi in domain.kpis:
            assert kpi.label_en and kpi.label_vi
            assert kpi.compute([]).value in (None, 0.0)


def test_flood_counts_stations_past_their_own_levels() -> None:
    stations = [
        snapshot("flood", "a", currentLevel=1.0),
        snapshot("flood", "b", currentLevel=3.2),
        snapshot("flood", "c", currentLevel=5.0),
        # Its own danger level is higher than the domain's.
        snapshot("flood", "d", thresholds={"currentLevel": {"crit_above": 8.0}}, currentLevel=6.0),
        # Offline: its last level is history.
        snapshot("flood", "e", status="offline", currentLevel=9.0),
    ]
    assert figures("flood", stations) == {"above_alert": 3.0, "above_danger": 1.0, "highest_level": 6.0}
    assert DOMAINS["flood"].kpis[2].compute(stations).device_id == "d"


def test_a_limit_switched_off_does_not_count() -> None:
    device = snapshot(
        "grid", "g", thresholds={"voltage": {"warn_above": None, "crit_above": None}}, voltage=260.0
    )
    assert not past_limit("voltage", "warn_above", "crit_above")(device)
    assert past_limit("voltage", "warn_below")(snapshot("grid", "h", voltage=200.0))


def test_traffic_waste_water_figures() -> None:
    traffic = [
        snapshot("traffic", "t1", averageVehicleSpeed=40.0, occupancy=0.2),
        snapshot("traffic", "t2", averageVehicleSpeed=12.0, occupancy=0.2),
        snapshot("traffic", "t3", averageVehicleSpeed=30.0, occupancy=0.75),
    ]
    assert figures("traffic", traffic) == {"average_speed": 27.3, "congested_sensors": 2.0}
    bins = [snapshot("waste", f"w{i}", fillingLevel=level) for i, level in enumerate((0.1, 0.8, 0.95))]
    assert figures("waste", bins)["bins_full"] == 2.0
    leak = DeviceSnapshot("p1", "online", {"pressure": 1.2}, {}, open_alarms=[("rate.pressure", "pressure")])
    quiet = DeviceSnapshot("p2", "online", {"pressure": 3.0}, {}, open_alarms=[("offline", None)])
    assert figures("water", [leak, quiet]) == {"lowest_pressure": 1.2, "suspected_leaks": 1.0}


def test_principal_scopes() -> None:
    hai_phong = Principal("desk", "operator", cities=frozenset({"hai-phong"}))
    assert hai_phong.allows("hai-phong", "flood") and not hai_phong.allows("ha-noi", "flood")
    assert hai_phong.city_filter(None) == ["hai-phong"]
    assert hai_phong.city_filter("ha-noi") == []
    assert hai_phong.domain_filter(None) is None
    admin = Principal("admin", "admin")
    assert admin.covers(None, None) and admin.covers(["ha-noi"], None)
    assert not hai_phong.covers(None, None)
    assert hai_phong.covers(["hai-phong"], ["flood"]) and not hai_phong.covers(["ha-noi"], None)
    flood_only = Principal("f", "admin", domains=frozenset({"flood"}))
    assert not flood_only.covers(["ha-noi"], None) and flood_only.covers(None, ["flood"])
    assert hai_phong.scope_key != admin.scope_key


def test_cursors_bboxes_and_etags() -> None:
    assert decode_int_cursor(encode_cursor(42)) == 42
    assert decode_text_cursor(encode_cursor("dev-1:x")) == "dev-1:x"
    for bad in ("%%%", encode_cursor("text")):
        with pytest.raises(HTTPException):
            decode_int_cursor(bad)
    with pytest.raises(HTTPException):
        decode_text_cursor(encode_cursor(7))
    assert parse_bbox("105.7,20.9,106,21.1") == (105.7, 20.9, 106.0, 21.1)
    for bad in ("1,2,3", "a,b,c,d", "10,10,5,5", "nan,1,2,3", "-200,0,0,1"):
        with pytest.raises(HTTPException):
            parse_bbox(bad)
    assert (
        etag_matches('W/"abc"', 'W/"abc"')
        and etag_matches('"abc", W/"x"', 'W/"abc"')
        and etag_matches("*", 'W/"a"')
    )
    assert not etag_matches('W/"abd"', 'W/"abc"') and not etag_matches(None, 'W/"abc"')


async def test_view_cache_compresses_large_bodies_and_keeps_the_newest() -> None:
    cache = ViewCache(entries=2)

    async def body(content: bytes) -> bytes:
        return content

    small = await cache.get_or_render("a", lambda: body(b"{}"))
    big = await cache.get_or_render("b", lambda: body(b"x" * 5000))
    huge = await cache.get_or_render("c", lambda: body(b"y" * 400_000))
    assert small.gzipped is None and big.gzipped is not None and len(big.gzipped) < 100
    assert huge.gzipped is not None and gzip.decompress(huge.gzipped) == huge.plain
    assert cache.get("a") is None and cache.get("c") is huge


async def test_concurrent_requests_for_one_version_render_it_once() -> None:
    cache = ViewCache()
    calls = 0

    async def render() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return b"x" * 2000

    bodies = await asyncio.gather(*(cache.get_or_render("v1", render) for _ in range(20)))
    assert calls == 1 and all(b is bodies[0] for b in bodies)

    async def failing() -> bytes:
        raise RuntimeError("database gone")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            await cache.get_or_render("v2", failing)
