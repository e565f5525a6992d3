"""The operations page in headless Chromium (Debian's `chromium`, installed by `make services`),
driven by Playwright against the session's real gateway, processor and API: a device appears on the
map once it publishes, an alarm appears in the list and is acknowledged by a click, the language
toggle switches the labels; the city's areas are drawn under the devices and coloured by their
worst open alarm, an area's summary opens on a click, the alarm list narrows to an area, and a
device's panel charts its last day; and the page asks nothing of any host but the API's.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    Response,
    expect,
)
from playwright.async_api import Error as PlaywrightError

from ioc_core.domains import DOMAINS
from tests.integration.conftest import ADMIN_KEY, SESSION_CITY, System
from tests.integration.harness import publish, unique

CITY = SESSION_CITY
TIMEOUT_MS = 30_000
# The stylesheet's colours: a critical alarm, and an area without an open alarm.
CRITICAL_RGB = "rgb(255, 77, 87)"
NEUTRAL_AREA_RGB = "rgb(107, 134, 168)"


async def register(admin: httpx.AsyncClient, domain: str, lat: float, lon: float, **extra: Any) -> str:
    device_id = unique(f"page-{domain}")
    body = {"id": device_id, "city": CITY, "domain": domain, "location": {"lat": lat, "lon": lon}, **extra}
    response = await admin.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text
    return device_id


def send(domain: str, device_id: str, metrics: dict[str, float]) -> None:
    payload = {"ts": datetime.now(UTC).isoformat(), **metrics}
    publish(f"ioc/v1/{CITY}/{domain}/{device_id}/telemetry", json.dumps(payload).encode())


def marker(page: Page, device_id: str, **attributes: str) -> Any:
    selector = f'path[data-testid="device-marker"][data-device-id="{device_id}"]'
    selector += "".join(f'[data-{name}="{value}"]' for name, value in attributes.items())
    return page.locator(selector)


def area_path(page: Page, area_id: str) -> Locator:
    return page.locator(f'path[data-testid="area"][data-area-id="{area_id}"]')


def rectangle(west: float, south: float, east: float, north: float) -> dict[str, Any]:
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Polygon", "coordinates": [ring]}


async def put_area(admin: httpx.AsyncClient, kind: str, name_vi: str, geometry: dict[str, Any]) -> str:
    area_id = unique(f"page-{kind}")
    feature = {
        "type": "Feature",
        "geometry": geometry,
        "properties": {"name_vi": name_vi, "name_en": f"{name_vi} (en)", "kind": kind, "city": CITY},
    }
    response = await admin.put(f"/v1/areas/{area_id}", json=feature)
    assert response.status_code == 201, response.text
    return area_id


async def click_inside(path: Locator, x: float, y: float) -> None:
    """Click a shape at a point of its box (fractions of its width and height from the top left),
    away from the devices and other shapes at its centre."""
    box = await path.bounding_box()
    assert box is not None
    await path.click(position={"x": box["width"] * x, "y": box["height"] * y})


@dataclass
class Watch:
    """What a page asked of hosts other than the API's, assets that failed, errors it logged."""

    api_host: str | None
    outside: list[str] = field(default_factory=list)
    failed_assets: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    async def page(self, context: BrowserContext) -> Page:
        page = await context.new_page()
        page.on("request", self.on_request)
        page.on("response", self.on_response)
        page.on("console", self.on_console)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        return page

    def on_request(self, request: Request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme not in ("data", "blob", "about") and parts.hostname != self.api_host:
            self.outside.append(request.url)

    def on_response(self, response: Response) -> None:
        if "/static/" in response.url and response.status >= 400:
            self.failed_assets.append(f"{response.status} {response.url}")

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def check(self) -> None:
        assert self.outside == [], f"the page asked hosts other than the API: {self.outside}"
        assert self.failed_assets == [], self.failed_assets
        assert self.page_errors == [], self.page_errors
        refused = [text for text in self.console_errors if "Content Security Policy" in text]
        assert refused == [], refused


async def test_operations_page_shows_devices_and_acknowledges_alarms(
    system: System, admin: httpx.AsyncClient, browser: Browser
) -> None:
    # The city must have a device for the page to offer it.
    station = await register(
        admin,
        "flood",
        21.02,
        105.84,
        name="Trạm Tô Lịch",
        district="Cầu Giấy",
        thresholds={"currentLevel": {"warn_above": 3.0, "crit_above": 4.5}},
    )
    watch = Watch(urlsplit(system.api_url).hostname)
    context = await browser.new_context(viewport={"width": 1600, "height": 900})
    try:
        page = await watch.page(context)

        response = await page.goto(f"{system.api_url}/#key={ADMIN_KEY}")
        assert response is not None and response.status == 200
        csp = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp, csp
        # The key left the address bar at once, and lives in this tab's sessionStorage.
        assert "key=" not in page.url
        assert await page.evaluate("sessionStorage.getItem('ioc.apiKey')") == ADMIN_KEY
        await expect(page.get_by_test_id("key-form")).to_be_hidden()

        # Vietnamese by default.
        heading = page.get_by_test_id("alarms-heading")
        await expect(heading).to_contain_text("Cảnh báo đang mở")
        assert await page.evaluate("document.documentElement.lang") == "vi"

        select = page.get_by_test_id("city-select")
        await expect(select.locator(f'option[value="{CITY}"]')).to_have_count(1, timeout=TIMEOUT_MS)
        await select.select_option(CITY)
        await expect(marker(page, station)).to_have_count(1, timeout=TIMEOUT_MS)
        await expect(page.locator('[data-testid="summary-tile"][data-domain="flood"]')).to_be_visible()
        # Live over the event stream (read with fetch(), the key in a header).
        await expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "live")

        # A device registered now is on the map once it publishes, online.
        sensor = await register(admin, "traffic", 21.03, 105.85, name="Nút giao Kim Mã")
        send("traffic", sensor, {"intensity": 42, "occupancy": 0.3, "averageVehicleSpeed": 31.5})
        await expect(marker(page, sensor, status="online")).to_have_count(1, timeout=TIMEOUT_MS)

        # A reading above the station's danger level raises an alarm, shown in the list.
        send("flood", station, {"currentLevel": 5.2, "rainfall": 12.0})
        row = page.locator(f'[data-testid="alarm"][data-device-id="{station}"][data-state="active"]')
        await expect(row).to_have_count(1, timeout=TIMEOUT_MS)
        alarm_id = await row.get_attribute("data-alarm-id")
        assert alarm_id is not None
        await expect(row).to_have_attribute("data-severity", "critical")
        await expect(marker(page, station, severity="critical")).to_have_count(1, timeout=TIMEOUT_MS)

        # Acknowledged by a click, by this key's holder.
        await row.get_by_test_id("ack-button").click()
        acked = page.locator(f'[data-testid="alarm"][data-alarm-id="{alarm_id}"]')
        await expect(acked).to_have_attribute("data-state", "acknowledged", timeout=TIMEOUT_MS)
        await expect(acked.get_by_test_id("ack-button")).to_be_hidden()
        detail = await admin.get(f"/v1/alarms/{alarm_id}")
        assert detail.status_code == 200, detail.text
        alarm = detail.json()
        assert alarm["state"] == "acknowledged" and alarm["acknowledged_at"] is not None
        assert [(a["action"], a["actor"]) for a in alarm["audit"]] == [("acknowledged", "admin")]

        # The station's popup, reached from its alarm, names the metric in Vietnamese.
        await acked.locator('[data-action="locate"]').click()
        popup = page.locator(f'[data-testid="popup"][data-device-id="{station}"]')
        await expect(popup).to_contain_text("Mực nước")

        # English on a click, remembered across a reload (the key too: no form).
        await page.get_by_test_id("language-toggle").click()
        await expect(heading).to_contain_text("Open alarms")
        await expect(popup).to_contain_text("Water level")
        assert await page.evaluate("document.documentElement.lang") == "en"
        await page.reload()
        await expect(page.get_by_test_id("alarms-heading")).to_contain_text("Open alarms")
        await expect(page.get_by_test_id("key-form")).to_be_hidden()
        await expect(page.get_by_test_id("city-select")).to_have_value(CITY, timeout=TIMEOUT_MS)
        await expect(marker(page, sensor)).to_have_count(1, timeout=TIMEOUT_MS)
        await page.get_by_test_id("language-toggle").click()
        await expect(page.get_by_test_id("alarms-heading")).to_contain_text("Cảnh báo đang mở")

        # Without the stream the page polls, and shows the same.
        await page.route("**/v1/stream?*", lambda route: route.fulfill(status=503))
        await page.reload()
        await expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "polling")
        await expect(marker(page, sensor, status="online")).to_have_count(1, timeout=TIMEOUT_MS)
        await expect(page.locator(f'[data-testid="alarm"][data-alarm-id="{alarm_id}"]')).to_be_visible()
        late = await register(admin, "traffic", 21.04, 105.83)
        send("traffic", late, {"intensity": 12, "occupancy": 0.1, "averageVehicleSpeed": 45.0})
        await expect(marker(page, late, status="online")).to_have_count(1, timeout=TIMEOUT_MS)
        await page.unroute("**/v1/stream?*")

        # A bad key brings the key form back.
        await page.evaluate("sessionStorage.setItem('ioc.apiKey', 'not-a-key')")
        await page.reload()
        await expect(page.get_by_test_id("key-form")).to_be_visible(timeout=TIMEOUT_MS)
    finally:
        await context.close()

    watch.check()


async def test_operations_page_shows_areas_summaries_and_device_charts(
    system: System, admin: httpx.AsyncClient, browser: Browser, tmp_path: Path
) -> None:
    # Two wards side by side, a catchment across the first, and the province around them, away
    # from the other test's devices. A station in ward A (limits of its own, rainfall's critical
    # limit switched off), a traffic sensor in ward B.
    province = await put_area(admin, "province", "Tỉnh Thử", rectangle(105.85, 21.05, 106.03, 21.19))
    ward_a = await put_area(admin, "ward", "Phường Thử A", rectangle(105.90, 21.10, 105.94, 21.14))
    ward_b = await put_area(admin, "ward", "Phường Thử B", rectangle(105.94, 21.10, 105.98, 21.14))
    catchment = await put_area(admin, "catchment", "Lưu vực Thử", rectangle(105.91, 21.105, 105.95, 21.125))
    station = await register(
        admin,
        "flood",
        21.12,
        105.92,
        name="Trạm Thử",
        thresholds={"currentLevel": {"warn_above": 3.5, "crit_above": 4.5}, "rainfall": {"crit_above": None}},
    )
    sensor = await register(admin, "traffic", 21.12, 105.96, name="Nút giao Thử")
    flood_metrics = [metric.name for metric in DOMAINS["flood"].metrics]

    watch = Watch(urlsplit(system.api_url).hostname)
    polls: list[dict[str, str]] = []

    def on_request(request: Request) -> None:
        if "/v1/areas?" in request.url and "with=state" in request.url:
            polls.append(request.headers)

    screenshot = tmp_path / "page.png"
    # Tall enough that an area's summary opens without panning the other ward out of the map.
    # Tall enough that the map keeps its room above the incidents panel: the session city's other
    # tests' places spread the map, and a popup's pan must not carry the wards out of it.
    context = await browser.new_context(viewport={"width": 1600, "height": 1600})
    try:
        page = await watch.page(context)
        page.on("request", on_request)
        await page.goto(f"{system.api_url}/#key={ADMIN_KEY}")
        select = page.get_by_test_id("city-select")
        await expect(select.locator(f'option[value="{CITY}"]')).to_have_count(1, timeout=TIMEOUT_MS)
        await select.select_option(CITY)

        # Every area is drawn, under the devices: wards filled, the catchment dashed, the province
        # an outline; none has an open alarm yet.
        for area_id, kind in (
            (province, "province"),
            (ward_a, "ward"),
            (ward_b, "ward"),
            (catchment, "catchment"),
        ):
            await expect(area_path(page, area_id)).to_have_attribute("data-kind", kind, timeout=TIMEOUT_MS)
        await expect(area_path(page, ward_a)).to_have_attribute("data-severity", "none")
        assert await area_path(page, ward_b).evaluate("el => getComputedStyle(el).fill") == NEUTRAL_AREA_RGB
        dashes = await area_path(page, catchment).evaluate("el => getComputedStyle(el).strokeDasharray")
        assert dashes not in ("", "none"), dashes
        assert await area_path(page, province).evaluate("el => getComputedStyle(el).fill") == "none"
        assert await page.locator(".leaflet-areaFill-pane path, .leaflet-areaLine-pane path").count() >= 4
        await expect(page.get_by_test_id("area-toggle")).to_have_count(3)
        # Without tiles the areas give the map its shape: the map is fitted to them and the
        # city's devices together (the session's city holds other tests' devices too, so the
        # province lies within the map, however small beside them).
        await page.wait_for_function(
            """(id) => {
                const map = document.querySelector('[data-testid="map"]').getBoundingClientRect();
                const shape = document.querySelector(`path[data-area-id="${id}"]`).getBoundingClientRect();
                const inside = shape.left >= map.left - 1 && shape.right <= map.right + 1
                    && shape.top >= map.top - 1 && shape.bottom <= map.bottom + 1;
                return inside && shape.width > 2 && shape.height > 2;
            }""",
            arg=province,
            timeout=TIMEOUT_MS,
        )

        # An alarm in ward A colours it (and the catchment around the station) by its severity,
        # live; ward B stays neutral.
        send("traffic", sensor, {"intensity": 42, "occupancy": 0.3, "averageVehicleSpeed": 31.5})
        send("flood", station, {"currentLevel": 5.2, "rainfall": 12.0})
        await expect(area_path(page, ward_a)).to_have_attribute(
            "data-severity", "critical", timeout=TIMEOUT_MS
        )
        await expect(area_path(page, catchment)).to_have_attribute("data-severity", "critical")
        assert await area_path(page, ward_a).evaluate("el => getComputedStyle(el).fill") == CRITICAL_RGB
        assert await area_path(page, catchment).evaluate("el => getComputedStyle(el).stroke") == CRITICAL_RGB
        await expect(area_path(page, ward_b)).to_have_attribute("data-severity", "none")
        assert await area_path(page, ward_b).evaluate("el => getComputedStyle(el).fill") == NEUTRAL_AREA_RGB
        await expect(marker(page, sensor, status="online")).to_have_count(1, timeout=TIMEOUT_MS)
        # The areas' state is polled with the ETag of the last answer.
        assert len(polls) >= 2 and any("if-none-match" in headers for headers in polls[1:]), polls

        # A click on ward A (away from the catchment and the station) opens its summary.
        await click_inside(area_path(page, ward_a), 0.1, 0.9)
        summary = page.locator(f'[data-testid="area-summary"][data-area-id="{ward_a}"]')
        await expect(summary).to_be_visible()
        await expect(summary).to_contain_text("Phường Thử A")
        await expect(summary).to_contain_text("Phường/xã")
        await expect(summary.locator('[data-fact="total"]')).to_have_text("1")
        await expect(summary.locator('[data-fact="online"]')).to_have_text("1")
        await expect(summary.locator('[data-fact="alarms"]')).to_have_text("1 · Nguy hiểm")
        await expect(summary.locator('dl[data-domain="flood"] dd[data-figure]').first).to_be_visible()
        await expect(summary.locator(".also-here")).to_contain_text("Tỉnh Thử")
        # Ward B has the sensor, online, and no alarm.
        await page.locator(".area-popup", has=summary).locator(".leaflet-popup-close-button").click()
        await click_inside(area_path(page, ward_b), 0.85, 0.85)
        other = page.locator(f'[data-testid="area-summary"][data-area-id="{ward_b}"]')
        await expect(other.locator('[data-fact="total"]')).to_have_text("1")
        await expect(other.locator('[data-fact="alarms"]')).to_have_text("0")
        await expect(other.locator('dl[data-domain="traffic"]')).to_have_count(1)

        # The alarm list narrows to an area: none in ward B, the station's alone in ward A.
        station_row = page.locator(f'[data-testid="alarm"][data-device-id="{station}"]')
        await expect(station_row).to_have_count(1, timeout=TIMEOUT_MS)
        area_filter = page.get_by_test_id("alarm-area-filter")
        # The city's areas, ours among them (other tests may have stored some in the session city).
        for area_id in (province, ward_a, ward_b, catchment):
            await expect(area_filter.locator(f'option[value="{area_id}"]')).to_have_count(1)
        await area_filter.select_option(ward_b)
        await expect(page.get_by_test_id("alarm")).to_have_count(0, timeout=TIMEOUT_MS)
        await expect(page.locator("#alarms-empty")).to_be_visible()
        # Ward B's summary would cover ward A where the map fits many places (the session city's).
        await page.locator(".area-popup", has=other).locator(".leaflet-popup-close-button").click()
        await click_inside(area_path(page, ward_a), 0.1, 0.9)
        await summary.get_by_test_id("area-filter-alarms").click()
        await expect(area_filter).to_have_value(ward_a)
        await expect(station_row).to_have_count(1, timeout=TIMEOUT_MS)
        await expect(page.get_by_test_id("alarm")).to_have_count(1)
        await area_filter.select_option("")
        await expect(station_row).to_have_count(1, timeout=TIMEOUT_MS)

        # A click on the station opens its panel: status, its open alarm, and a chart of each
        # metric with its limits (the device's over the domain's) and the alarm's start marked.
        await page.locator(".area-popup", has=summary).locator(".leaflet-popup-close-button").click()
        # From its alarm: the map moves to it whatever the popups before moved the map to (in the
        # session city, whose other tests' places spread the map, they can move it off the station).
        await station_row.locator('[data-action="locate"]').click()
        await expect(marker(page, station)).to_be_visible()
        await marker(page, station).click()
        panel = page.locator(f'[data-testid="device-panel"][data-device-id="{station}"]')
        await expect(panel).to_be_visible()
        await expect(panel.locator('[data-fact="status"]')).to_have_text("Trực tuyến")
        await expect(panel.locator('[data-fact="areas"]')).to_contain_text("Phường Thử A")
        await expect(panel.get_by_test_id("panel-alarm")).to_have_count(1, timeout=TIMEOUT_MS)
        await expect(panel.get_by_test_id("panel-alarm")).to_have_attribute("data-severity", "critical")
        charts = panel.get_by_test_id("device-chart")
        await expect(charts).to_have_count(len(flood_metrics), timeout=TIMEOUT_MS)
        for metric in flood_metrics:
            chart = panel.locator(f'[data-testid="device-chart"][data-metric="{metric}"]')
            await expect(chart.locator(".uplot canvas")).to_have_count(1)
        level = panel.locator('[data-testid="device-chart"][data-metric="currentLevel"]')
        await expect(level).to_have_attribute("data-limits", "2")
        await expect(level).to_have_attribute("data-alarm-marks", "1")
        await expect(level).to_contain_text("3,5 m")
        await expect(level).not_to_contain_text("Không có số đo")
        rainfall = panel.locator('[data-testid="device-chart"][data-metric="rainfall"]')
        await expect(rainfall).to_have_attribute("data-limits", "1")
        battery = panel.locator('[data-testid="device-chart"][data-metric="batteryLevel"]')
        await expect(battery).to_have_attribute("data-limits", "1")
        await expect(level.locator("canvas")).to_be_visible()

        # In English, and closed with its button.
        await page.get_by_test_id("language-toggle").click()
        await expect(level).to_contain_text("Water level")
        await expect(panel.locator(".uplot canvas")).to_have_count(len(flood_metrics))
        await page.screenshot(path=screenshot)
        await panel.get_by_test_id("panel-close").click()
        await expect(page.get_by_test_id("device-panel")).to_be_hidden()
    finally:
        # Kept however the test ends: the page as the test left it.
        if context.pages and not screenshot.exists():
            with contextlib.suppress(PlaywrightError):
                await context.pages[0].screenshot(path=screenshot)
        print(f"screenshot of the operations page: {screenshot}")
        await context.close()

    watch.check()
