"""Limits every request meets before the app reads a byte of its body: requests in flight, the
size of its head, the declared body size, and a valid key for any request that carries a body;
then a deadline for the body to arrive. A hostile client is refused here cheaply, with the same
problem+json answers as everywhere else, instead of being read, parsed and then refused.

A pure ASGI middleware, not a `BaseHTTPMiddleware`: it must see the request before the body is
received and must not buffer streamed responses (the event stream, exports)."""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import RESOLVED_PRINCIPAL, Principal, presented_key, principal_for_key
from api.problems import outage_response, problem_response
from ioc_core.settings import Settings

# A refused request costs nothing to repeat, and in-flight work ends within a statement timeout:
# a client may come back at once.
OVERLOAD_RETRY_AFTER_S = 1
# Paths outside the in-flight count: event streams last for hours and have their own limit
# (IOC_API_MAX_STREAMS); liveness must answer however busy the process is.
_UNCOUNTED_PATHS = ("/v1/stream", "/health")
# Where a body needs a valid key before it is read (everything keyed; /v1/public takes no body).
_KEYED_PREFIX, _PUBLIC_PREFIX = "/v1/", "/v1/public/"


def declared_length(headers: Headers) -> int | None:
    """The body size a request declares: its Content-Length, None when the body is streamed
    (chunked) or absent. The HTTP server has already refused a malformed Content-Length."""
    value = headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


def head_bytes(scope: Scope) -> int:
    """The size of a request's head as sent: request line and header lines, CRLFs included."""
    line = len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"]) + 12
    if scope["query_string"]:
        line += 1  # the "?"
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"]) + 2


def carries_body(headers: Headers) -> bool:
    return (declared_length(headers) or 0) > 0 or "transfer-encoding" in headers


class RequestLimits:
    """Counts requests in flight and refuses past `api_max_in_flight` (503 with Retry-After),
    refuses a head over `api_max_header_bytes` (431), a declared body over `api_max_body_bytes`
    (413), a body without a valid key (401), and, as it arrives, a streamed body over the size
    limit (413) or one that takes longer than `api_client_timeout_s` (408)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self._max_in_flight = settings.api_max_in_flight
        self._max_body = settings.api_max_body_bytes
        self._body_timeout_s = settings.api_client_timeout_s
        self._max_head = settings.api_max_header_bytes
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(_UNCOUNTED_PATHS):
            await self._checked(scope, receive, send)
            return
        if self.in_flight >= self._max_in_flight:
            response = problem_response(
                503,
                f"this API process is already working on {self._max_in_flight} requests; try again shortly",
                headers={"Retry-After": str(OVERLOAD_RETRY_AFTER_S)},
            )
            await _refuse(response, scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self._checked(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        refusal = await self._refusal(scope, headers)
        if refusal is not None:
            await _refuse(refusal, scope, receive, send)
            return
        if not carries_body(headers):
            await self.app(scope, receive, send)
            return
        await self.app(scope, _body_limited(receive, self._max_body, self._body_timeout_s), send)

    async def _refusal(self, scope: Scope, headers: Headers) -> Response | None:
        """The answer to a request refused before its body is read, or None to go on."""
        if head_bytes(scope) > self._max_head:
            # The HTTP server refuses a head that outgrows its buffer while it arrives; one that
            # arrived whole in a single read is measured here.
            return problem_response(431, f"the request line and headers exceed {self._max_head} bytes")
        length = declared_length(headers)
        if length is not None and length > self._max_body:
            return problem_response(
                413, f"the request body is {length} bytes; this API takes at most {self._max_body}"
            )
        path: str = scope["path"]
        if not carries_body(headers) or not path.startswith(_KEYED_PREFIX) or path.startswith(_PUBLIC_PREFIX):
            return None
        key = presented_key(scope["headers"])
        if key is None:
            return _unauthorized("an API key is required")
        if RESOLVED_PRINCIPAL in scope:  # the rate limiter looked it up already
            principal: Principal | None = scope[RESOLVED_PRINCIPAL]
        else:
            request = Request(scope)
            try:
                principal = await principal_for_key(request.app.state, key)
            except Exception as exc:
                passing = outage_response(request, exc)
                if passing is None:
                    raise
                return passing
            scope[RESOLVED_PRINCIPAL] = principal
        return _unauthorized("the API key is not valid") if principal is None else None


async def _refuse(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a request without reading its body. A body on its way is not waited for: the
    connection closes after the answer, rather than the server reading on (and throwing away)
    whatever the client still sends, which may be gigabytes, or endless when chunked."""
    if carries_body(Headers(scope=scope)):
        response.headers.update(_CLOSE)
    await response(scope, receive, send)


def _unauthorized(detail: str) -> Response:
    return problem_response(401, detail, headers={"WWW-Authenticate": "Bearer"})


# After a refused body the connection closes: the rest of the body is not worth reading.
_CLOSE = {"Connection": "close"}


def _body_limited(receive: Receive, max_bytes: int, timeout_s: float) -> Receive:
    """`receive` that refuses a body past `max_bytes` as it arrives (413: a streamed body declares
    no size) and gives the whole body `timeout_s` to arrive (408: a client trickling a body must
    not hold a request slot for ever). Once the body is in, it waits as long as asked: an event
    stream waits on it for the client to disconnect.

    The errors are raised into the app, which answers them as problem+json (FastAPI passes an
    HTTPException from reading the body on as it is). Starlette's own limit (`max_body_size`) is
    not used: it answers in plain text, and for a route that never reads the body only after the
    route has run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    received = 0
    body_done = False

    async def receive_within_limits() -> Message:
        nonlocal body_done, received
        if body_done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise HTTPException(
                408,
                f"the request body did not arrive within {timeout_s:g} s",
                headers=_CLOSE,
            ) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            body_done = True
        received += len(message.get("body", b""))
        if received > max_bytes:
            body_done = True
            raise HTTPException(
                413, f"the request body exceeds the {max_bytes} bytes this API takes", headers=_CLOSE
            )
        return message

    return receive_within_limits
