"""The operations page at `/`: one HTML document, plain JavaScript and CSS from `api/static/`,
Leaflet vendored under `api/static/vendor/leaflet/` and uPlot (a device's charts) under
`api/static/vendor/uplot/`. No build step, and no request leaves the API's own origin unless map
tiles are configured (`IOC_MAP_TILES_URL`). The API docs at `/docs` are
Swagger UI vendored the same way (`api/static/vendor/swagger-ui/`), under the same kind of policy,
so they show on a network without internet too.

The page reads the API key from the URL fragment (`/#key=...`, which browsers never send), keeps it
in sessionStorage and sends it as `X-API-Key` on every call, the event stream included (read with
fetch(), since EventSource cannot send headers).
"""

from __future__ import annotations

import hashlib
import json
import re
from html import escape as html_escape
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from ioc_core.domains import DOMAINS
from ioc_core.errors import ConfigurationError
from ioc_core.rules import LIMIT_KEYS, MetricRules
from ioc_core.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
# Every city the system serves is in Vietnam: readings are shown in its time, whatever the clock
# of the screen's computer says.
TIME_ZONE = "Asia/Ho_Chi_Minh"
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")

_PAGE = """<!doctype html>
<html lang="vi">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Trung tâm điều hành / Operations center</title>
<link rel="icon" href="/static/favicon.svg?v=@VERSION@" type="image/svg+xml">
<link rel="stylesheet" href="/static/vendor/leaflet/leaflet.css?v=@VERSION@">
<link rel="stylesheet" href="/static/vendor/uplot/uPlot.min.css?v=@VERSION@">
<link rel="stylesheet" href="/static/app.css?v=@VERSION@">
<script type="application/json" id="ioc-config">@CONFIG@</script>
<script src="/static/vendor/leaflet/leaflet.js?v=@VERSION@" defer></script>
<script src="/static/vendor/uplot/uPlot.iife.min.js?v=@VERSION@" defer></script>
<script src="/static/app.js?v=@VERSION@" defer></script>
</head>
<body>
<header class="top">
  <h1 data-i18n="title">Trung tâm điều hành</h1>
  <div class="controls">
    <span id="city-picker" class="controls" hidden>
      <label for="city" data-i18n="city">Thành phố</label>
      <select id="city" data-testid="city-select" disabled></select>
    </span>
    <span id="connection" class="connection" data-testid="connection" data-state="idle"
      role="status"></span>
    <button type="button" id="language" data-testid="language-toggle" class="button"
      lang="en">English</button>
    <button type="button" id="forget-key" class="button subtle" data-i18n="forget_key"
      hidden>Đổi khoá</button>
  </div>
</header>
<div id="notice" class="notice" role="alert" data-testid="notice" hidden></div>
<main id="board" class="board" hidden>
  <section class="summary" aria-labelledby="summary-heading">
    <h2 id="summary-heading" class="visually-hidden" data-i18n="summary">Tổng quan theo lĩnh vực</h2>
    <div id="tiles" class="tiles" data-testid="summary-tiles"></div>
  </section>
  <section class="map-panel" aria-labelledby="map-heading">
    <div class="map-bar">
      <h2 id="map-heading" data-i18n="map">Bản đồ thiết bị</h2>
      <div id="layer-toggles" class="layer-toggles" role="group" data-i18n-label="layers"
        aria-label="Lớp bản đồ"></div>
      <div id="area-toggles" class="layer-toggles area-toggles" role="group"
        data-i18n-label="area_layers" aria-label="Lớp khu vực" hidden></div>
    </div>
    <div class="map-wrap">
      <div id="map" class="map" data-testid="map"></div>
      <aside id="device-panel" class="device-panel" data-testid="device-panel"
        aria-labelledby="device-panel-title" hidden></aside>
    </div>
    <ul id="legend" class="legend" data-i18n-label="legend" aria-label="Chú giải"></ul>
  </section>
  <section class="alarms" aria-labelledby="alarms-heading">
    <h2 id="alarms-heading" data-testid="alarms-heading">
      <span data-i18n="alarms">Cảnh báo đang mở</span> <span id="alarm-count" class="count"></span>
    </h2>
    <div class="alarm-filter">
      <label for="alarm-area" data-i18n="area_filter">Khu vực</label>
      <select id="alarm-area" data-testid="alarm-area-filter" disabled>
        <option value="" data-i18n="all_areas">Tất cả khu vực</option>
      </select>
    </div>
    <ol id="alarm-list" class="alarm-list" data-testid="alarm-list" aria-live="polite"
      aria-relevant="additions"></ol>
    <p id="alarms-empty" class="empty" data-i18n="no_alarms" hidden>Không có cảnh báo nào đang mở.</p>
    <p id="alarms-more" class="empty" data-i18n="more_alarms"
      hidden>Còn những cảnh báo khác không hiển thị.</p>
  </section>
</main>
<form id="key-form" class="key-form" data-testid="key-form" hidden>
  <h2 data-i18n="key_title">Nhập khoá API</h2>
  <p data-i18n="key_help">Trang này cần một khoá API để đọc dữ liệu. Khoá chỉ được giữ trong thẻ
    trình duyệt này.</p>
  <label for="key-input" data-i18n="key_label">Khoá API</label>
  <input id="key-input" name="key" type="password" autocomplete="off" required spellcheck="false"
    aria-describedby="key-error">
  <p id="key-error" class="error" role="alert" hidden></p>
  <button type="submit" class="button primary" data-i18n="key_submit">Mở</button>
</form>
</body>
</html>
"""

# FastAPI's own /docs page loads Swagger UI from a public CDN and starts it with an inline script.
_DOCS = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>@TITLE@ - API docs</title>
<link rel="icon" href="/static/favicon.svg?v=@VERSION@" type="image/svg+xml">
<link rel="stylesheet" href="/static/vendor/swagger-ui/swagger-ui.css?v=@VERSION@">
<script src="/static/vendor/swagger-ui/swagger-ui-bundle.js?v=@VERSION@" defer></script>
<script src="/static/docs.js?v=@VERSION@" defer></script>
</head>
<body>
<div id="swagger-ui" data-openapi-url="@OPENAPI_URL@"></div>
</body>
</html>
"""


def tiles_source(url: str) -> str | None:
    """The CSP source that lets the page load tiles from `url`, None when the page's own origin
    serves them; `{s}` and the like in the host become a wildcard label."""
    parts = urlsplit(url)
    if not parts.scheme and not parts.netloc:
        if not parts.path.startswith("/"):
            raise ConfigurationError(
                f"IOC_MAP_TILES_URL must be an http(s) URL or a path from the site's root, not {url!r}"
            )
        return None
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"IOC_MAP_TILES_URL has an invalid port: {url!r}") from exc
    host = parts.hostname or ""
    labels = host.split(".")
    if labels and "{" in labels[0]:
        labels[0] = "*"
    host = ".".join(labels)
    if parts.scheme not in ("http", "https") or not _HOST.match(host):
        raise ConfigurationError(
            "IOC_MAP_TILES_URL must be an http(s) URL template such as"
            f" https://tiles.example.vn/{{z}}/{{x}}/{{y}}.png (placeholders only in the first label"
            f" of the host), not {url!r}"
        )
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def content_security_policy(settings: Settings) -> str:
    images = ["'self'", "data:"]
    if settings.map_tiles_url:
        source = tiles_source(settings.map_tiles_url)
        if source is not None:
            images.append(source)
    return _policy(images)


def docs_content_security_policy() -> str:
    """The operations page's policy without map tiles: Swagger UI's own images are data: URLs."""
    return _policy(["'self'", "data:"])


def _policy(images: list[str]) -> str:
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src {' '.join(images)}",
            "connect-src 'self'",
            "font-src 'self'",
            "manifest-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def page_config(settings: Settings) -> dict[str, Any]:
    """What the page needs to know that the API does not tell it: tiles, and the domains' titles,
    metric labels, units, precision and default limits (one source of truth, `ioc_core.domains`;
    a device's `thresholds` override the limits key by key, a null switching one off)."""
    tiles = (
        {"url": settings.map_tiles_url, "attribution": settings.map_tiles_attribution}
        if settings.map_tiles_url
        else None
    )
    return {
        "tiles": tiles,
        "time_zone": TIME_ZONE,
        "domains": [
            {
                "name": domain.name,
                "title": {"en": domain.title_en, "vi": domain.title_vi},
                "metrics": [
                    {
                        "name": metric.name,
                        "label": {"en": metric.label_en, "vi": metric.label_vi},
                        "unit": {"en": metric.unit, "vi": metric.unit_vi or metric.unit},
                        "decimals": metric.decimals,
                        "limits": _limits(domain.default_rules.get(metric.name)),
                    }
                    for metric in domain.metrics
                ],
            }
            for domain in DOMAINS.values()
        ],
    }


def _limits(rules: MetricRules | None) -> dict[str, float]:
    """A metric's default warn and crit limits, as a device's `thresholds` name them."""
    if rules is None:
        return {}
    return {key: value for key in LIMIT_KEYS if (value := getattr(rules, key)) is not None}


def script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no `<`, `>` or `&` can end it or open a comment."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text


def _assets_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(STATIC_DIR).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def render_page(settings: Settings) -> str:
    return _PAGE.replace("@VERSION@", _assets_version()).replace(
        "@CONFIG@", script_json(page_config(settings))
    )


def render_docs(title: str, openapi_url: str) -> str:
    return (
        _DOCS.replace("@VERSION@", _assets_version())
        .replace("@TITLE@", html_escape(title))
        .replace("@OPENAPI_URL@", html_escape(openapi_url))
    )


def _headers(policy: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": policy,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }


def add_page_routes(app: FastAPI, settings: Settings) -> None:
    """Serve the operations page at `/`, the API docs at `/docs` (when the app has an OpenAPI
    document; the app is built with FastAPI's own docs pages off) and their files under `/static/`."""
    html = render_page(settings)
    headers = _headers(content_security_policy(settings))

    @app.get("/", include_in_schema=False)
    async def operations_page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    if app.openapi_url:
        docs_html = render_docs(app.title, app.openapi_url)
        docs_headers = _headers(docs_content_security_policy())

        @app.get("/docs", include_in_schema=False)
        async def api_docs() -> HTMLResponse:
            return HTMLResponse(docs_html, headers=docs_headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
