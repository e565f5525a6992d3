"""RFC 9457 problem details for every error the API returns; no stack trace ever leaves."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ioc_core.errors import ConflictError, IocError, NotFoundError, ServiceUnavailableError, ValidationError
from ioc_core.supervision import describe, is_retriable

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[dict[str, Any]] | None = None


# An error answer as routes document it in `responses`.
PROBLEM: dict[str, Any] = {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}}

# The headers of a 429 (any route may answer one: see `api.rate_limits`).
RATE_LIMIT_HEADERS: dict[str, Any] = {
    "Retry-After": {"description": "seconds to wait before the next request", "schema": {"type": "integer"}},
    "RateLimit-Policy": {
        "description": 'the limit that applies, e.g. `"viewer";q=100;w=5`'
        " (draft-ietf-httpapi-ratelimit-headers-12)",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'what is left of it, e.g. `"viewer";a=0;w=1`',
        "schema": {"type": "string"},
    },
}
TOO_MANY_REQUESTS: dict[str, Any] = {
    **PROBLEM,
    "description": "Too Many Requests",
    "headers": RATE_LIMIT_HEADERS,
}


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, errors=errors)
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


_STATUS_OF_ERROR: tuple[tuple[type[IocError], int], ...] = (
    (ValidationError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
    (ServiceUnavailableError, 503),
)


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return problem_response(422, "the request is not valid", errors=errors)

    @app.exception_handler(IocError)
    async def _ioc(request: Request, exc: IocError) -> JSONResponse:
        for error_type, status in _STATUS_OF_ERROR:
            if isinstance(exc, error_type):
                if status == 503:
                    # The message may say where the dependency is; the answer says which one.
                    assert isinstance(exc, ServiceUnavailableError)
                    return unavailable_response(exc.public)
                return problem_response(status, str(exc))
        if exc.retriable:
            log.warning("request %s %s met an outage: %s", request.method, request.url.path, describe(exc))
            return unavailable_response("a service this request needs is unavailable; try again shortly")
        log.error("request %s %s failed: %s", request.method, request.url.path, exc)
        return problem_response(500, "internal error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_retriable(exc):
            # A dependency between states (a pooled connection broken by a database restart, a
            # timeout): the client's next try will likely succeed.
            log.warning("request %s %s met an outage: %s", request.method, request.url.path, describe(exc))
            return unavailable_response("a service this request needs is unavailable; try again shortly")
        log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return problem_response(500, "internal error")


# How long a client should wait before trying again while a dependency is down: long enough not
# to hammer a recovering database, short enough for a wall screen to come back promptly.
RETRY_AFTER_S = 5


def unavailable_response(detail: str) -> JSONResponse:
    return problem_response(503, detail, headers={"Retry-After": str(RETRY_AFTER_S)})
