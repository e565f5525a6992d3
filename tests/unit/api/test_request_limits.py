"""The request limits' pure parts and the middleware over a stand-in app: what is refused before
the app sees the body, how in-flight requests are counted, the time bounds of query parameters,
and the problem+json the HTTP server itself answers with."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import h11
import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from api.auth import KeyCache
from api.limits import RequestLimits, carries_body, declared_length, head_bytes
from api.params import EARLIEST_TIME, LATEST_TIME, within_time_bounds
from api.problems import install as install_problems
from ioc_core import http as http_server
from ioc_core.http import ClientTimeoutH11Protocol, ProblemH11Protocol, _LingeringTransport
from ioc_core.settings import Settings

KEY = "unit-admin-key-0123456789"


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "admin_api_key": KEY,
        "api_max_body_bytes": 2048,
        "api_max_header_bytes": 4096,
        "api_max_in_flight": 2,
        "api_client_timeout_s": 0.3,
        **overrides,
    }
    return Settings(**values)


class _NoStoredKeys:
    """The database as key lookup sees it, holding no keys but the admin's (a setting)."""

    class api_keys:  # the store's attribute name
        @staticmethod
        async def by_hash(digest: bytes) -> None:
            return None


class _App:
    """A stand-in app behind the limits: it records what reached it and can hold requests."""

    def __init__(self, settings: Settings) -> None:
        self.app = FastAPI()
        self.app.state.settings = settings
        self.app.state.key_cache = KeyCache(5)
        self.app.state.database = _NoStoredKeys()
        install_problems(self.app)
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.two_held = asyncio.Event()

        @self.app.post("/v1/echo")
        async def echo(request: Request) -> dict[str, int]:
            self.calls.append("echo")
            return {"bytes": len(await request.body())}

        @self.app.get("/v1/slow")
        async def slow() -> dict[str, bool]:
            self.calls.append("slow")
            if self.calls.count("slow") == 2:
                self.two_held.set()
            await self.release.wait()
            return {"done": True}

        self.app.add_middleware(RequestLimits, settings=settings)


@pytest.fixture
async def limited() -> AsyncIterator[tuple[_App, httpx.AsyncClient]]:
    stand_in = _App(_settings())
    transport = httpx.ASGITransport(app=stand_in.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield stand_in, client


def _is_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


async def test_a_declared_body_over_the_limit_never_reaches_the_app(
    limited: tuple[_App, httpx.AsyncClient],
) -> None:
    stand_in, client = limited
    for headers in ({}, {"X-API-Key": KEY}):
        response = await client.post("/v1/echo", content=b"x" * 4096, headers=headers)
        assert "2048" in _is_problem(response, 413)["detail"]
        assert response.headers["connection"] == "close"
    assert stand_in.calls == []


async def test_a_body_needs_a_valid_key_before_it_is_read(limited: tuple[_App, httpx.AsyncClient]) -> None:
    stand_in, client = limited
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        response = await client.post("/v1/echo", content=b"{", headers=headers)
        _is_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    assert stand_in.calls == []
    ok = await client.post("/v1/echo", content=b"{}", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json() == {"bytes": 2}


async def test_a_streamed_body_is_cut_off_at_the_limit(limited: tuple[_App, httpx.AsyncClient]) -> None:
    _, client = limited

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 512

    response = await client.post("/v1/echo", content=chunks(), headers={"X-API-Key": KEY})
    assert "2048" in _is_problem(response, 413)["detail"]


async def test_requests_past_the_in_flight_limit_answer_503_with_retry_after(
    limited: tuple[_App, httpx.AsyncClient],
) -> None:
    stand_in, client = limited
    held = [asyncio.create_task(client.get("/v1/slow")) for _ in range(2)]
    await asyncio.wait_for(stand_in.two_held.wait(), 5)
    refused = await client.get("/v1/slow")
    _is_problem(refused, 503)
    assert refused.headers["retry-after"] == "1"
    # Liveness is not counted.
    assert (await client.get("/health")).status_code == 404  # reached the app: no such route here
    stand_in.release.set()
    assert [(await task).status_code for task in held] == [200, 200]
    assert (await client.get("/v1/slow")).status_code == 200


async def test_a_body_that_does_not_arrive_in_time_is_a_408() -> None:
    stand_in = _App(_settings())
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # a client that sent the head and stalls
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = _scope("POST", "/v1/echo", [(b"x-api-key", KEY.encode()), (b"content-length", b"10")])
    await asyncio.wait_for(stand_in.app(scope, receive, send), 5)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]], query: bytes = b"") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


async def test_a_head_over_the_limit_is_a_431() -> None:
    stand_in = _App(_settings())
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = _scope("GET", "/v1/slow", [(b"x-junk", b"a" * 5000)])
    call: Receive = receive
    reply: Send = send
    await stand_in.app(scope, call, reply)
    assert sent[0]["status"] == 431 and stand_in.calls == []


def test_head_bytes_counts_the_request_as_sent() -> None:
    scope = _scope("GET", "/v1/state", [(b"host", b"api"), (b"x-api-key", b"k")], query=b"city=ha-noi")
    sent = b"GET /v1/state?city=ha-noi HTTP/1.1\r\nhost: api\r\nx-api-key: k\r\n\r\n"
    assert head_bytes(scope) == len(sent)


def test_declared_length_and_body() -> None:
    assert declared_length(Headers({"content-length": "12"})) == 12
    assert declared_length(Headers({})) is None
    assert carries_body(Headers({"transfer-encoding": "chunked"}))
    assert not carries_body(Headers({"content-length": "0"}))


@pytest.mark.parametrize(
    ("value", "inside"),
    [
        (datetime(1, 1, 1, tzinfo=UTC), False),
        (datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1))), False),
        (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))), False),
        (datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), False),
        (datetime(1970, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), False),
        (EARLIEST_TIME, True),
        (datetime(2026, 11, 21, 8, tzinfo=timezone(timedelta(hours=7))), True),
        (datetime(2200, 12, 31, 23, 59, 59, tzinfo=UTC), True),
        (LATEST_TIME, False),
        (datetime(2200, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-2))), False),
        (datetime(2026, 1, 1), True),
    ],
)
def test_times_lie_in_1970_to_2200_in_utc(value: datetime, inside: bool) -> None:
    assert within_time_bounds(value) is inside


def test_settings_keep_room_for_streams_and_in_flight_requests() -> None:
    with pytest.raises(ValueError, match="IOC_API_MAX_CONNECTIONS"):
        Settings(api_max_in_flight=100, api_max_streams=100, api_max_connections=150)
    assert Settings(api_statement_timeout_s=60, database_timeout_s=3).api_timeout_s == 3


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"GET / HTTP/1.1\r\nX-Junk: " + b"a" * 9000, 431),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GARBAGE " + b"a" * 9000 + b"\r\n\r\n", 400),
    ],
)
def test_the_http_server_answers_what_it_cannot_parse_in_problem_json(sent: bytes, status: int) -> None:
    protocol = ProblemH11Protocol.__new__(ProblemH11Protocol)
    protocol.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=8192)
    protocol.config = type("Config", (), {"h11_max_incomplete_event_size": 8192})()  # type: ignore[assignment]
    transport = _Transport()
    protocol.transport = transport  # type: ignore[assignment]
    protocol.conn.receive_data(sent)
    try:
        protocol.conn.next_event()
    except h11.RemoteProtocolError:
        protocol.send_400_response("Invalid HTTP request received.")  # as uvicorn calls it
    else:
        raise AssertionError("h11 took it")
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(body)["status"] == status and transport.closed


class _FakeSocketTransport:
    """The part of an asyncio transport the protocol's limits use, recording what is done."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.buffered = 0
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _client_timeout_protocol(timeout_s: float) -> tuple[Any, _FakeSocketTransport]:
    protocol_class = type("Limited", (ClientTimeoutH11Protocol,), {"client_timeout_s": timeout_s})
    protocol = protocol_class.__new__(protocol_class)
    protocol.conn = h11.Connection(h11.SERVER)
    protocol.loop = asyncio.get_running_loop()
    transport = _FakeSocketTransport()
    protocol._lingering = _LingeringTransport(transport, protocol)  # type: ignore[arg-type]
    protocol.transport = protocol._lingering
    protocol._head_deadline = protocol._read_deadline = None
    return protocol, transport


async def test_a_close_while_the_client_still_sends_lingers_then_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_server, "LINGER_S", 0.05)
    protocol, transport = _client_timeout_protocol(15)
    protocol.conn.receive_data(b"POST /v1/devices HTTP/1.1\r\nHost: api\r\nContent-Length: 100\r\n\r\n{")
    assert isinstance(protocol.conn.next_event(), h11.Request)
    protocol._lingering.close()
    assert transport.calls == ["write_eof", "resume_reading"] and protocol.transport.is_closing()
    protocol.data_received(b"x" * 4096)  # dropped, not parsed
    await asyncio.sleep(0.2)
    assert transport.calls[-1] == "close"


async def test_a_close_after_a_whole_request_is_immediate() -> None:
    protocol, transport = _client_timeout_protocol(15)
    protocol.conn.receive_data(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
    assert isinstance(protocol.conn.next_event(), h11.Request)
    assert protocol.conn.next_event() == h11.EndOfMessage()
    protocol._lingering.close()
    assert transport.calls == ["close"]


async def test_a_client_that_sends_no_head_or_stops_reading_is_cut_off() -> None:
    protocol, transport = _client_timeout_protocol(0.05)
    protocol._await_head()
    await asyncio.sleep(0.2)
    assert transport.calls == ["close"]
    protocol, transport = _client_timeout_protocol(0.05)
    protocol.flow = type(
        "Flow", (), {"pause_writing": lambda self: None, "resume_writing": lambda self: None}
    )()
    protocol.pause_writing()
    protocol.resume_writing()  # it read on in time
    await asyncio.sleep(0.2)
    assert transport.calls == []
    protocol.pause_writing()
    await asyncio.sleep(0.2)
    assert transport.calls == ["abort"]
