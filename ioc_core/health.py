"""The gateway's own small HTTP surface: `/health`, `/ready` and `/metrics` (Prometheus text)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ioc_core.metrics import CONTENT_TYPE, Metric, render


def health_app(readiness: Callable[[], dict[str, str]], metrics: Callable[[], list[Metric]]) -> Starlette:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        checks = readiness()
        ok = all(value == "ok" for value in checks.values())
        body = {"status": "ok" if ok else "unavailable", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_page(request: Request) -> Response:
        return Response(render(metrics()), media_type=CONTENT_TYPE)

    return Starlette(
        routes=[Route("/health", health), Route("/ready", ready), Route("/metrics", metrics_page)]
    )
