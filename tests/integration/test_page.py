"""The operations page in headless Chromium (Debian's `chromium`, installed by `make services`),
driven by Playwright against the session's real gateway, processor and API: a device appears on the
map once it publishes, an alarm appears in the list and is acknowledged by a click, the language
toggle switches the labels, and the page asks nothing of any host but the API's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Request, Response, async_playwright, expect

from tests.integration.conftest import ADMIN_KEY, SESSION_CITY, System
from tests.integration.harness import publish, unique

CITY = SESSION_CITY
TIMEOUT_MS = 30_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "Chromium is not installed (no `chromium` on PATH): run `make services`, which installs it"
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            await launched.close()


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
    api_host = urlsplit(system.api_url).hostname
    outside: list[str] = []
    failed_assets: list[str] = []
    console_errors: list[str] = []
    page_errors: list[str] = []

    def on_request(request: Request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme not in ("data", "blob", "about") and parts.hostname != api_host:
            outside.append(request.url)

    def on_response(response: Response) -> None:
        if "/static/" in response.url and response.status >= 400:
            failed_assets.append(f"{response.status} {response.url}")

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            console_errors.append(message.text)

    context = await browser.new_context(viewport={"width": 1600, "height": 900})
    try:
        page = await context.new_page()
        page.on("request", on_request)
        page.on("response", on_response)
        page.on("console", on_console)
        page.on("pageerror", lambda error: page_errors.append(str(error)))

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

    assert outside == [], f"the page asked hosts other than the API: {outside}"
    assert failed_assets == [], failed_assets
    assert page_errors == [], page_errors
    refused = [text for text in console_errors if "Content Security Policy" in text]
    assert refused == [], refused
