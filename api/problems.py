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
from ioc_core.storage import is_statement_timeout
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
    extensions: dict[str, Any] | None = None,
) -> JSONResponse:
    """`extensions` are members of the problem type beyond RFC 9457's own (RFC 9457 §3.2)."""
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, errors=errors)
    return JSONResponse(
        {**body.model_dump(exclude_none=True), **(extensions or {})},
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


class ProblemError(Exception):
    """An error answer with extension members, raised from a route (HTTPException has none)."""

    def __init__(self, status: int, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extensions = status, detail, extensions


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

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.status, exc.detail, extensions=exc.extensions)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return problem_response(422, "the request is not valid", errors=errors)

    @app.exception_handler(IocError)
    async def _ioc(request: Request, exc: IocError) -> JSONResponse:
        if is_statement_timeout(exc):
            return _too_slow(request)
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
        passing = outage_response(request, exc)
        if passing is not None:
            return passing
        log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return problem_response(500, "internal error")


def outage_response(request: Request, exc: BaseException) -> JSONResponse | None:
    """The 503 for an error that passes, None for any other."""
    if is_statement_timeout(exc):
        return _too_slow(request)
    if is_retriable(exc):
        # A dependency between states (a pooled connection broken by a database restart, a
        # timeout): the client's next try will likely succeed.
        log.warning("request %s %s met an outage: %s", request.method, request.url.path, describe(exc))
        return unavailable_response("a service this request needs is unavailable; try again shortly")
    return None


def _too_slow(request: Request) -> JSONResponse:
    """A statement cancelled by the API's statement timeout: the request asked for more work than
    one request may cost, or the database is overloaded. Either way 503, like an outage: retrying
    later may succeed, asking for less will."""
    timeout_s = request.app.state.settings.api_timeout_s
    log.warning(
        "request %s %s ran past the statement timeout (%g s)", request.method, request.url.path, timeout_s
    )
    return unavailable_response(
        f"the database work of this request took longer than the {timeout_s:g} s the API allows;"
        " ask for less, or try again shortly"
    )


# How long a client should wait before trying again while a dependency is down: long enough not
# to hammer a recovering database, short enough for a wall screen to come back promptly.
RETRY_AFTER_S = 5


def unavailable_response(detail: str) -> JSONResponse:
    return problem_response(503, detail, headers={"Retry-After": str(RETRY_AFTER_S)})
