"""Hostile clients against a real `ioc api` process with tight limits, on the session's database:
oversized bodies and heads, clients too slow to send their request, more requests than the
process works on at once, statements past their timeout, series that would read too much and
times outside 1970-2200. Every refusal is problem+json, and none is a 500. The times measured
are listed under "measured figures" at the end of the run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ioc_core.domains import DOMAINS
from tests.conftest import Figures
from tests.integration.conftest import ADMIN_KEY, System, free_port
from tests.integration.harness import ComponentProcess, unique, wait_until

PROBLEM = "application/problem+json"
MAX_HEAD = 8192
IN_FLIGHT = 3
CLIENT_TIMEOUT_S = 2.0
STATEMENT_TIMEOUT_S = 0.5
MAX_SERIES_ROWS = 1000
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class LimitedApi:
    url: str
    port: int
    process: ComponentProcess


@pytest.fixture(scope="module")
async def limited(system: System, log_dir: Path) -> AsyncIterator[LimitedApi]:
    port = free_port()
    env = {
        **system.env,
        "IOC_API_PORT": str(port),
        "IOC_API_MAX_HEADER_BYTES": str(MAX_HEAD),
        "IOC_API_MAX_IN_FLIGHT": str(IN_FLIGHT),
        "IOC_API_CLIENT_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
        "IOC_API_STATEMENT_TIMEOUT_S": str(STATEMENT_TIMEOUT_S),
        "IOC_API_MAX_SERIES_ROWS": str(MAX_SERIES_ROWS),
    }
    api = ComponentProcess("api", env, log_dir, name="api-limited")
    api.start()
    try:
        await api.wait_for_log("API listening")
        yield LimitedApi(f"http://127.0.0.1:{port}", port, api)
    finally:
        api.stop()


@pytest.fixture
async def client(limited: LimitedApi) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=limited.url, timeout=10) as http:
        yield http


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM, response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and "Traceback" not in response.text
    return body


# -- Raw connections, for what HTTP libraries will not send ---------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def problem(self, status: int) -> dict[str, Any]:
        assert self.status == status, (self.status, self.body)
        assert self.headers["content-type"] == PROBLEM
        parsed: dict[str, Any] = json.loads(self.body)
        assert parsed["status"] == status
        return parsed


def _read_answer(sock: socket.socket, started: float) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed without an answer: {data!r}")
        data += chunk
    seconds = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body, seconds)


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def send_raw(port: int, parts: list[bytes], *, pause_s: float = 0.0, body_bytes: int = 0) -> Answer:
    """Send `parts` (pausing between them), then up to `body_bytes` more in the background while
    the answer is read: the time is from the first byte sent to the answer's head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered before the end
            for part in parts:
                sock.sendall(part)
                time.sleep(pause_s)
        with _pumping(sock, body_bytes, framed=b"chunked" in parts[0]):
            return _read_answer(sock, started)


@contextlib.contextmanager
def _pumping(sock: socket.socket, body_bytes: int, framed: bool) -> Iterator[None]:
    """Keep sending a body of about `body_bytes` while the block runs, as an uploading client
    does; `framed` in chunks of the chunked transfer coding."""
    done = threading.Event()

    def pump() -> None:
        chunk, sent = chunked(b"x" * 65536) if framed else b"x" * 65536, 0
        with contextlib.suppress(OSError):
            while sent < body_bytes and not done.is_set():
                sent += sock.send(chunk)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        thread.join(10)


def post_head(path: str, length: int | None, *, key: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: api", "Content-Type: application/json"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if key is not None:
        lines.append(f"X-API-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- Bodies ----------------------------------------------------------------------------------------


TEN_MB = 10 * 1024 * 1024


async def test_a_keyless_10_mb_post_is_refused_within_100_ms(limited: LimitedApi, figures: Figures) -> None:
    times = []
    for _ in range(5):
        answer = await asyncio.to_thread(
            send_raw, limited.port, [post_head("/v1/devices", TEN_MB)], body_bytes=TEN_MB
        )
        assert "1048576" in answer.problem(413)["detail"]
        assert answer.headers["connection"] == "close"
        times.append(answer.seconds)
    figures.lines.append(
        f"keyless 10 MB POST (Content-Length): 413 after {[round(t * 1000, 1) for t in times]} ms"
    )
    assert min(times) < 0.1, times
    # Streamed, so no size is declared: refused for want of a key before any of it is read.
    chunked = await asyncio.to_thread(
        send_raw, limited.port, [post_head("/v1/devices", None)], body_bytes=TEN_MB
    )
    chunked.problem(401)
    figures.lines.append(f"keyless 10 MB POST (chunked): 401 after {chunked.seconds * 1000:.1f} ms")
    assert chunked.seconds < 0.1


async def test_a_keyed_body_over_the_limit_is_413_however_it_is_sent(
    client: httpx.AsyncClient, figures: Figures
) -> None:
    started = time.monotonic()
    declared = await client.post("/v1/devices", content=b"{" + b" " * TEN_MB + b"}", headers=AUTH)
    problem(declared, 413)
    figures.lines.append(
        f"keyed 10 MB POST through httpx (upload included): 413 after {time.monotonic() - started:.3f} s"
    )

    async def streamed() -> AsyncIterator[bytes]:
        for _ in range(TEN_MB // 65536):
            yield b" " * 65536

    chunked = await client.post("/v1/devices", content=streamed(), headers=AUTH)
    assert "1048576" in problem(chunked, 413)["detail"]
    # A body within the limit still works, and the key is checked before it is parsed.
    assert (await client.post("/v1/devices", content=b"{", headers={"X-API-Key": "wrong"})).status_code == 401
    problem(await client.post("/v1/devices", content=b"{", headers=AUTH), 422)


# -- Heads -----------------------------------------------------------------------------------------


async def test_heads_over_the_limit_are_431_and_garbage_is_400(limited: LimitedApi) -> None:
    head = b"GET /v1/state HTTP/1.1\r\nHost: api\r\nX-Junk: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n"
    whole = await asyncio.to_thread(send_raw, limited.port, [head])
    assert str(MAX_HEAD) in whole.problem(431)["detail"]
    pieces = [head[i : i + 1000] for i in range(0, len(head), 1000)]
    dribbled = await asyncio.to_thread(send_raw, limited.port, pieces, pause_s=0.01)
    dribbled.problem(431)
    garbage = await asyncio.to_thread(send_raw, limited.port, [b"NOT HTTP AT ALL\r\n\r\n"])
    garbage.problem(400)
    # A long query string counts too.
    query = await asyncio.to_thread(
        send_raw, limited.port, [b"GET /v1/state?city=" + b"a" * MAX_HEAD + b" HTTP/1.1\r\nHost: api\r\n\r\n"]
    )
    query.problem(431)


# -- Slow clients ----------------------------------------------------------------------------------


def seconds_until_closed(port: int, sent: bytes) -> float:
    """Connect, send `sent` (maybe nothing), and wait for the server to close the connection."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        sock.settimeout(CLIENT_TIMEOUT_S * 5)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(4096):
                pass
        return time.monotonic() - started


async def test_clients_too_slow_to_send_their_request_are_cut_off(
    limited: LimitedApi, figures: Figures
) -> None:
    idle, half_head, slow_body = await asyncio.gather(
        asyncio.to_thread(seconds_until_closed, limited.port, b""),
        asyncio.to_thread(seconds_until_closed, limited.port, b"GET /v1/state HTTP/1.1\r\nHost: api\r\n"),
        asyncio.to_thread(send_raw, limited.port, [post_head("/v1/devices", 100, key=ADMIN_KEY) + b"{"]),
    )
    figures.lines.append(
        f"idle connection closed after {idle:.2f} s, half a head after {half_head:.2f} s;"
        f" a body that stalls: 408 after {slow_body.seconds:.2f} s"
    )
    for waited in (idle, half_head, slow_body.seconds):
        assert CLIENT_TIMEOUT_S - 0.2 < waited < CLIENT_TIMEOUT_S * 3
    assert "did not arrive" in slow_body.problem(408)["detail"]


def read_to_the_end(sock: socket.socket) -> int:
    sock.settimeout(CLIENT_TIMEOUT_S * 5)
    total = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            total += len(chunk)
    return total


async def test_a_client_that_stops_reading_its_answers_is_dropped(
    limited: LimitedApi, figures: Figures
) -> None:
    answer_bytes = len(
        (
            await asyncio.to_thread(
                send_raw, limited.port, [b"GET /openapi.json HTTP/1.1\r\nHost: api\r\n\r\n"]
            )
        ).body
    )
    asked = 80  # answers pipelined on one connection, far more than the socket buffers hold
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        started = time.monotonic()
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: api\r\n\r\n" * asked)
        await limited.process.wait_for_log(
            "dropped a client that stopped reading", timeout=CLIENT_TIMEOUT_S * 5
        )
        dropped_after = time.monotonic() - started
        taken = await asyncio.to_thread(read_to_the_end, sock)
    figures.lines.append(
        f"a client that stopped reading: dropped after {dropped_after:.2f} s,"
        f" having taken {taken} of {answer_bytes * asked} bytes asked for"
    )
    assert taken < answer_bytes * asked
    assert dropped_after >= CLIENT_TIMEOUT_S


async def test_requests_past_the_in_flight_limit_answer_503_with_retry_after(
    limited: LimitedApi, client: httpx.AsyncClient, figures: Figures
) -> None:
    # Clients that send a keyed head and stall on the body hold a request slot each.
    held = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(IN_FLIGHT)]
    try:
        for sock in held:
            sock.sendall(post_head("/v1/devices", 100, key=ADMIN_KEY))

        async def refused() -> httpx.Response | None:
            response = await client.get("/v1/state", headers=AUTH)
            return response if response.status_code == 503 else None

        response = await wait_until(refused, timeout=CLIENT_TIMEOUT_S, what="a 503 while the slots are held")
        started = time.monotonic()
        response = await client.get("/v1/devices", headers=AUTH)
        figures.lines.append(
            f"past the in-flight limit: 503 after {(time.monotonic() - started) * 1000:.1f} ms"
        )
        assert "3 requests" in problem(response, 503)["detail"]
        assert response.headers["retry-after"] == "1"
        assert (await client.get("/health")).status_code == 200  # liveness is not counted
    finally:
        for sock in held:
            sock.close()
    ok = await wait_until(lambda: _ok(client, "/v1/state"), timeout=CLIENT_TIMEOUT_S * 2, what="slots freed")
    assert ok.status_code == 200


async def _ok(client: httpx.AsyncClient, path: str) -> httpx.Response | None:
    response = await client.get(path, headers=AUTH)
    return response if response.status_code == 200 else None


# -- The database ----------------------------------------------------------------------------------


async def test_a_statement_past_the_timeout_answers_503(
    system: System, limited: LimitedApi, client: httpx.AsyncClient, figures: Figures
) -> None:
    connection = await asyncpg.connect(system.database_url)
    try:
        async with connection.transaction():
            # Every key lookup now waits on the lock: the API's statement timeout ends the wait.
            await connection.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            response = await client.get("/v1/state", headers={"X-API-Key": unique("unknown-key")})
            took = time.monotonic() - started
            body = problem(response, 503)
            assert response.headers["retry-after"] == "5" and "0.5 s" in body["detail"]
            # The same on a body-carrying request, whose key is checked before its body is read.
            posted = await client.post("/v1/devices", json={}, headers={"X-API-Key": unique("unknown-key")})
            assert "0.5 s" in problem(posted, 503)["detail"]
    finally:
        await connection.close()
    figures.lines.append(f"statement past its {STATEMENT_TIMEOUT_S} s timeout: 503 after {took:.2f} s")
    assert STATEMENT_TIMEOUT_S <= took < STATEMENT_TIMEOUT_S + 2
    assert "Traceback" not in limited.process.log_text()


# -- Series and times ------------------------------------------------------------------------------


async def register_with_readings(system: System, client: httpx.AsyncClient, times: list[datetime]) -> str:
    device_id = unique("limits-flood")
    body = {
        "id": device_id,
        "city": "limits-city",
        "domain": "flood",
        "location": {"lat": 21.0, "lon": 105.8},
    }
    assert (await client.post("/v1/devices", json=body, headers=AUTH)).status_code == 201
    flood = DOMAINS["flood"]
    metric = flood.metric("currentLevel")
    assert metric is not None
    connection = await asyncpg.connect(system.database_url)
    try:
        await connection.execute(
            f"INSERT INTO {flood.table} (ts, device_id, received_at, {metric.column})"
            " SELECT t, $2, t, 1.5 FROM unnest($1::timestamptz[]) AS t",
            times,
            device_id,
        )
    finally:
        await connection.close()
    return device_id


async def test_series_are_bounded_by_the_rows_they_read(system: System, client: httpx.AsyncClient) -> None:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    # A reading a minute for two days: 2880 rows, more than this API lets one series read.
    steady = await register_with_readings(system, client, [now - timedelta(minutes=m) for m in range(2880)])

    async def series(device_id: str, **params: str) -> httpx.Response:
        query = {"metric": "currentLevel", **params}
        return await client.get(f"/v1/devices/{device_id}/series", params=query, headers=AUTH)

    def iso(moment: datetime) -> str:
        return moment.isoformat()

    half_day = await series(
        steady, **{"from": iso(now - timedelta(hours=12)), "to": iso(now), "bucket": "1h"}
    )
    assert half_day.status_code == 200 and len(half_day.json()["items"]) == 12
    for params in (
        # Not whole minutes: read from the readings on every tier (whole hours would come from the
        # hourly rollup on community TimescaleDB, 48 rows).
        {"from": iso(now - timedelta(days=2)), "to": iso(now), "bucket": "3599s"},
        {"from": "1970-01-01T00:00:00Z", "to": iso(now), "bucket": "999999d"},
    ):
        detail = problem(await series(steady, **params), 400)["detail"]
        assert str(MAX_SERIES_ROWS) in detail and "shorter range" in detail, detail
    # A device with fewer readings in the range than the sample takes is counted exactly: asking
    # for ten years of it is fine.
    few = await register_with_readings(system, client, [now - timedelta(minutes=m) for m in range(1, 501)])
    decade = await series(few, **{"from": iso(now - timedelta(days=3650)), "to": iso(now), "bucket": "1d"})
    assert decade.status_code == 200, decade.text
    assert sum(1 for item in decade.json()["items"] if item["value"] is not None) >= 1


@pytest.mark.parametrize(
    "params",
    [
        {"to": "0001-01-01T00:00:00Z"},
        {"to": "9999-12-31T23:59:59-01:00"},
        {"to": "9999-12-31T23:59:59+14:00"},
        {"from": "0001-01-01T00:00:00+01:00"},
        {"from": "0001-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"from": "1969-12-31T23:59:59Z", "to": "1970-01-02T00:00:00Z"},
        {"from": "2026-01-01T00:00:00Z", "to": "2201-01-01T00:00:00Z"},
        {"to": "2200-12-31T23:00:00-02:00"},
        {"to": "-1"},
        {"to": "99999999999999"},
    ],
)
async def test_times_outside_1970_to_2200_are_400_never_500(
    system: System, client: httpx.AsyncClient, params: dict[str, str]
) -> None:
    device_id = "any-device"  # checked before the device is looked up
    response = await client.get(
        f"/v1/devices/{device_id}/series", params={"metric": "currentLevel", **params}, headers=AUTH
    )
    assert "1970" in problem(response, 400)["detail"]


async def test_times_at_the_edges_of_the_bounds_are_served(system: System, client: httpx.AsyncClient) -> None:
    device_id = await register_with_readings(system, client, [])
    for params in (
        {"from": "1970-01-01T00:00:00Z", "to": "1970-01-02T00:00:00Z", "bucket": "1h"},
        {"from": "2200-12-31T00:00:00Z", "to": "2200-12-31T23:59:59.999999Z", "bucket": "1h"},
        {"from": "1969-12-31T23:30:00-01:00", "to": "1970-01-01T02:00:00+01:00", "bucket": "1h"},
    ):
        response = await client.get(
            f"/v1/devices/{device_id}/series", params={"metric": "currentLevel", **params}, headers=AUTH
        )
        assert response.status_code == 200, (params, response.text)
        assert response.json()["items"] == []
