"""The API docs at `/docs` in headless Chromium (Debian's `chromium`, installed by `make services`)
with every request to a host other than the API's refused, as on a network without internet: the
operations are listed, and one runs from the page with a key, under the docs' Content-Security-
Policy and nothing refused by it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Response,
    Route,
    expect,
)

from tests.integration.conftest import ADMIN_KEY, System

TIMEOUT_MS = 30_000


def operation(page: Page, method: str, path: str) -> Locator:
    return page.locator(f".opblock.opblock-{method}").filter(
        has=page.locator(f'.opblock-summary-path[data-path="{path}"]')
    )


async def test_the_docs_work_with_every_other_origin_blocked(system: System, browser: Browser) -> None:
    api_host = urlsplit(system.api_url).hostname
    blocked: list[str] = []
    failed_assets: list[str] = []
    console_errors: list[str] = []
    page_errors: list[str] = []

    async def only_the_api(route: Route) -> None:
        if urlsplit(route.request.url).hostname == api_host:
            await route.continue_()
        else:
            blocked.append(route.request.url)
            await route.abort("internetdisconnected")

    def on_response(response: Response) -> None:
        if response.status >= 400 and "/v1/" not in response.url:
            failed_assets.append(f"{response.status} {response.url}")

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            console_errors.append(message.text)

    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        # Routes see http(s) requests only; data: URLs never leave the page.
        await context.route("**/*", only_the_api)
        page = await context.new_page()
        page.on("response", on_response)
        page.on("console", on_console)
        page.on("pageerror", lambda error: page_errors.append(str(error)))

        response = await page.goto(f"{system.api_url}/docs")
        assert response is not None and response.status == 200
        csp = response.headers.get("content-security-policy", "")
        assert "default-src 'none'" in csp and "script-src 'self'" in csp, csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp

        devices = operation(page, "get", "/v1/devices")
        await expect(devices).to_have_count(1, timeout=TIMEOUT_MS)
        await expect(devices).to_be_visible()
        await expect(operation(page, "post", "/v1/devices")).to_be_visible()
        await expect(page.locator(".info .title")).to_contain_text("IOC streaming backend")

        # Authorized with a key, the operation runs from the page against the API itself.
        await page.locator(".auth-wrapper .authorize").click()
        key_scheme = page.locator(".modal-ux .auth-container").filter(has_text="X-API-Key")
        await key_scheme.locator("input").fill(ADMIN_KEY)
        await key_scheme.locator("button.authorize").click()
        await key_scheme.locator(".btn-done").click()
        await devices.locator(".opblock-summary").first.click()
        await devices.get_by_role("button", name="Try it out").click()
        await devices.get_by_role("button", name="Execute").click()
        status = devices.locator(".live-responses-table .response .response-col_status").first
        await expect(status).to_have_text("200", timeout=TIMEOUT_MS)
    finally:
        await context.close()

    assert blocked == [], f"the docs asked hosts other than the API: {blocked}"
    assert failed_assets == [], failed_assets
    assert page_errors == [], page_errors
    refused = [text for text in console_errors if "Content Security Policy" in text]
    assert refused == [], refused
