"""The small HTTP surface of the gateway and the processor: `/health`, `/ready` and `/metrics`
(Prometheus text).

`/health` and `/ready` need no key and say nothing about where the dependencies are: readiness
names what is failing and the kind of error, never a host, port or database name. `/metrics`
needs a key with the `metrics` role or the admin key (`ioc_core.access`), like the API's.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ioc_core.access import MetricsKeys, Verdict, presented_key
from ioc_core.errors import ServiceUnavailableError
from ioc_core.metrics import CONTENT_TYPE, Metric, render

PROBLEM_MEDIA_TYPE = "application/problem+json"
_RETRY_AFTER_S = 5


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem, as the API answers its errors."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def health_app(
    readiness: Callable[[], dict[str, str]], metrics: Callable[[], list[Metric]], keys: MetricsKeys
) -> Starlette:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        checks = readiness()
        ok = all(value == "ok" for value in checks.values())
        body = {"status": "ok" if ok else "unavailable", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_page(request: Request) -> Response:
        key = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if key is None:
            return problem(401, "an API key is required", {"WWW-Authenticate": "Bearer"})
        try:
            verdict = await keys.verdict(key)
        except ServiceUnavailableError:
            return problem(
                503,
                "the key cannot be checked while the database is unavailable; the admin key can",
                {"Retry-After": str(_RETRY_AFTER_S)},
            )
        if verdict is Verdict.UNKNOWN:
            return problem(401, "the API key is not valid", {"WWW-Authenticate": "Bearer"})
        if verdict is Verdict.FORBIDDEN:
            return problem(403, "this needs the metrics role (or an admin key without a scope limit)")
        return Response(render(metrics()), media_type=CONTENT_TYPE)

    return Starlette(
        routes=[Route("/health", health), Route("/ready", ready), Route("/metrics", metrics_page)]
    )
