"""The API docs at `/docs`: Swagger UI from the API's own files, under a strict Content-Security-
Policy, so they show on a network without internet. The browser side is in
tests/integration/test_docs_offline.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from api.app import create_app
from api.page import docs_content_security_policy
from ioc_core.settings import Settings

ADMIN_KEY = "unit-admin-key-0123456789"


class _Document(HTMLParser):
    """Every URL the document names, and its scripts and styles."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self.inline_scripts = 0
        self.styles = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.urls += [value for name, value in attrs if name in ("src", "href", "action") and value]
        if "style" in attributes or tag == "style":
            self.styles += 1
        if tag == "script":
            self.scripts.append(attributes)
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


def _client(**settings: Any) -> httpx.AsyncClient:
    app = create_app(Settings(admin_api_key=ADMIN_KEY, **settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with _client() as client:
        yield client


async def test_the_docs_name_no_outside_origin_and_run_no_inline_script(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    document = _Document()
    document.feed(html)

    assert "//" not in html, "the docs name a URL with a host"
    assert document.urls, html
    for url in document.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and parts.path.startswith("/"), url
    sources = [script.get("src") or "" for script in document.scripts]
    assert any("/static/vendor/swagger-ui/swagger-ui-bundle.js" in src for src in sources), sources
    assert document.inline_scripts == 0 and all(sources), html
    assert document.styles == 0, html
    assert 'data-openapi-url="/openapi.json"' in html

    # Every file the docs name is served, the starter script and the OpenAPI document too.
    for url in [*document.urls, "/openapi.json"]:
        asset = await client.get(url)
        assert asset.status_code == 200, url
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/devices" in schema["paths"]
    assert "/docs" not in schema["paths"]


async def test_the_docs_send_a_strict_content_security_policy(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    policy = response.headers["content-security-policy"]
    assert policy == docs_content_security_policy()
    directives = {
        name: sources
        for name, *sources in (directive.split() for directive in policy.split(";") if directive.strip())
    }
    assert directives["default-src"] == ["'none'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert directives["connect-src"] == ["'self'"]
    assert directives["img-src"] == ["'self'", "data:"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


async def test_map_tiles_do_not_widen_the_docs_policy() -> None:
    async with _client(map_tiles_url="https://{s}.tiles.example.vn/{z}/{x}/{y}.png") as client:
        page = await client.get("/")
        docs = await client.get("/docs")
    assert "tiles.example.vn" in page.headers["content-security-policy"]
    assert docs.headers["content-security-policy"] == docs_content_security_policy()


async def test_fastapi_s_cdn_pages_are_off(client: httpx.AsyncClient) -> None:
    # ReDoc is not vendored, and FastAPI's page for it would load it from a CDN.
    assert (await client.get("/redoc")).status_code == 404
    assert (await client.get("/docs/oauth2-redirect")).status_code == 404
