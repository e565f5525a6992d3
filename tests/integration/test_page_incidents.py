"""The operations page's incidents panel in headless Chromium against the session's system: two
alarms of one ward become one incident, listed with its severity, place, state and agency; a
click shows its alarms, checklist and timeline, and ticking a step is stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Browser, expect

from tests.integration.conftest import ADMIN_KEY, SESSION_CITY, System
from tests.integration.harness import Publisher, unique, wait_until

CITY = SESSION_CITY
TIMEOUT_MS = 30_000


async def test_incidents_panel_lists_and_opens_an_incident(
    system: System, admin: httpx.AsyncClient, browser: Browser
) -> None:
    # A ward of this test's own, away from the other tests' devices but in the same corner of the
    # map: the other page test fits the session city's map to all of its areas and devices.
    ward = unique("page-ward")
    ring = [[106.10, 20.70], [106.12, 20.70], [106.12, 20.72], [106.10, 20.72], [106.10, 20.70]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"name_vi": "Phường Thử", "name_en": "Test ward", "kind": "ward", "city": CITY},
    }
    assert (await admin.put(f"/v1/areas/{ward}", json=feature)).status_code == 201
    devices: list[str] = []
    try:
        for lon in (106.105, 106.115):
            device_id = unique("page-pipe")
            body = {
                "id": device_id,
                "city": CITY,
                "domain": "water",
                "location": {"lat": 20.71, "lon": lon},
                "thresholds": {"pressure": {"warn_above": 5.0, "crit_above": 8.0}},
            }
            assert (await admin.post("/v1/devices", json=body)).status_code == 201
            devices.append(device_id)
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)
        with Publisher() as publisher:
            publisher.publish_all(
                [
                    (
                        f"ioc/v1/{CITY}/water/{device_id}/telemetry",
                        json.dumps(
                            {"ts": (start + timedelta(seconds=10 * i)).isoformat(), "pressure": v}
                        ).encode(),
                    )
                    for device_id, values in zip(devices, ([3.0, 6.0], [3.0, 9.0]), strict=True)
                    for i, v in enumerate(values)
                ]
            )

        async def grouped() -> dict[str, Any] | None:
            answer = await admin.get("/v1/incidents", params={"city": CITY, "area": ward})
            items = [i for i in answer.json()["items"] if i["alarm_count"] == 2]
            return items[0] if items else None

        incident = await wait_until(grouped, timeout=45, what=f"one incident of both alarms\n{system.logs()}")
        assert incident["severity"] == "critical"

        context = await browser.new_context(viewport={"width": 1600, "height": 1000})
        try:
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(f"{system.api_url}/#key={ADMIN_KEY}")
            select = page.get_by_test_id("city-select")
            await expect(select.locator(f'option[value="{CITY}"]')).to_have_count(1, timeout=TIMEOUT_MS)
            await select.select_option(CITY)

            panel = page.get_by_test_id("incidents-panel")
            await expect(panel).to_contain_text("Sự cố đang xử lý")
            row = panel.locator(f'[data-testid="incident"][data-incident-id="{incident["id"]}"]')
            await expect(row).to_have_count(1, timeout=TIMEOUT_MS)
            await expect(row).to_have_attribute("data-severity", "critical")
            await expect(row).to_have_attribute("data-state", "open")
            await expect(row).to_contain_text("Phường Thử")
            await expect(row).to_contain_text("Chưa giao đơn vị")

            await row.click()
            detail = page.get_by_test_id("incident-detail")
            await expect(detail.get_by_test_id("incident-alarms").locator("li")).to_have_count(
                2, timeout=TIMEOUT_MS
            )
            for device_id in devices:
                await expect(detail.get_by_test_id("incident-alarms")).to_contain_text(device_id)
            checklist = detail.get_by_test_id("incident-checklist")
            await expect(checklist).to_contain_text("Xác định vị trí rò rỉ hoặc sự cố")
            await expect(detail.get_by_test_id("incident-timeline")).to_contain_text("opened")

            # Ticking a step is stored, and the timeline says who did it.
            await checklist.locator('input[data-step="locate-fault"]').click()
            await expect(detail.get_by_test_id("incident-timeline")).to_contain_text(
                "checked", timeout=TIMEOUT_MS
            )
            stored = (await admin.get(f"/v1/incidents/{incident['id']}")).json()
            assert stored["checklist"][0]["done"] is True and stored["checklist"][0]["done_by"] == "admin"

            # English on a click.
            await page.get_by_test_id("language-toggle").click()
            await expect(panel).to_contain_text("Open incidents")
            await expect(checklist).to_contain_text("Locate the leak or fault")
            await expect(row).to_contain_text("Test ward")
            await page.get_by_test_id("language-toggle").click()
            await page.screenshot(
                path=str(Path(system.processes["api"].log_path).parent / "incidents-panel.png")
            )
            assert errors == [], errors
        finally:
            await context.close()
    finally:
        # The session city is other tests' too: the other page test fits its map to all of it.
        for device_id in devices:
            assert (await admin.delete(f"/v1/devices/{device_id}")).status_code == 204
        assert (await admin.delete(f"/v1/areas/{ward}")).status_code == 204
