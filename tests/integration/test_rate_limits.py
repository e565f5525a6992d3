"""Rate limits against a real `ioc api` process with low limits of its own, on the session's
database: a burst past a key's limit answers 429 problem+json with `Retry-After` and the
`RateLimit-*` headers and recovers once the client waits as told; requests without a key are
limited per client address (the connection's peer), made-up keys gain nothing, keys do not share
buckets, an event stream costs one request when it opens, and `/metrics` counts the refusals.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, SESSION_CITY, System, free_port
from tests.integration.harness import ComponentProcess, wait_until

VIEWER = {"rate": 2, "burst": 6}
# Slow enough that the few milliseconds a burst takes never refill a token.
ANONYMOUS = {"rate": 0.5, "burst": 5}


@pytest.fixture(scope="module")
async def limited_api(system: System, log_dir: Path) -> AsyncIterator[str]:
    env = {
        **system.env,
        "IOC_API_PORT": str(free_port()),
        "IOC_API_RATE_LIMIT_VIEWER": json.dumps(VIEWER),
        "IOC_API_RATE_LIMIT_OPERATOR": json.dumps(VIEWER),
        "IOC_API_RATE_LIMIT_ADMIN": json.dumps({"rate": 50, "burst": 200}),
        "IOC_API_RATE_LIMIT_ANONYMOUS": json.dumps(ANONYMOUS),
    }
    api = ComponentProcess("api", env, log_dir, name="api-rate-limits")
    api.start()
    try:
        await api.wait_for_log("API listening")
        yield f"http://127.0.0.1:{env['IOC_API_PORT']}"
    finally:
        api.stop()


async def new_key(url: str, role: str = "viewer") -> str:
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as admin:
        answer = await admin.post("/v1/api-keys", json={"role": role, "cities": [SESSION_CITY]})
        assert answer.status_code == 201, answer.text
        key: str = answer.json()["key"]
        return key


def client_at(url: str, address: str, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """A client whose connections come from `address`, one of loopback's many: the API takes the
    connection's peer as the client address (X-Forwarded-For is not believed)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=url, transport=transport, headers=headers, timeout=10)


async def test_a_burst_past_a_keys_limit_is_refused_and_recovers_after_retry_after(limited_api: str) -> None:
    key = await new_key(limited_api)
    async with httpx.AsyncClient(base_url=limited_api, headers={"X-API-Key": key}, timeout=10) as client:
        burst = await asyncio.gather(*(client.get(f"/v1/state?city={SESSION_CITY}") for _ in range(10)))
        statuses = sorted(answer.status_code for answer in burst)
        # Two tokens a second: at most one more may have come in while the burst was served.
        assert statuses.count(200) in (6, 7) and set(statuses) == {200, 429}, statuses

        passed = next(a for a in burst if a.status_code == 200)
        assert passed.headers["RateLimit-Policy"] == '"viewer";q=6;w=3'
        assert passed.headers["RateLimit"].startswith('"viewer";a=')

        refused = next(a for a in burst if a.status_code == 429)
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.headers["Retry-After"] == "1"
        assert refused.headers["RateLimit-Policy"] == '"viewer";q=6;w=3'
        assert refused.headers["RateLimit"] == '"viewer";a=0;w=1'
        problem = refused.json()
        assert problem["status"] == 429 and problem["title"] == "Too Many Requests"
        assert problem["violated-policies"] == ["viewer"]

        # Another key has a bucket of its own.
        other = await new_key(limited_api)
        assert (await client.get("/health", headers={"X-API-Key": other})).status_code == 200

        # Waiting what Retry-After says is enough: that wait is the behaviour under test.
        await asyncio.sleep(int(refused.headers["Retry-After"]))
        again = await client.get(f"/v1/state?city={SESSION_CITY}")
        assert again.status_code == 200, again.text


async def test_requests_without_a_key_are_limited_per_client_address(limited_api: str) -> None:
    async with client_at(limited_api, "127.0.0.2") as client:
        statuses = [(await client.get("/health")).status_code for _ in range(8)]
        assert statuses[:5] == [200] * 5 and 429 in statuses[5:], statuses
        refused = await client.get("/v1/public/cap")
        assert refused.status_code == 429
        assert refused.headers["RateLimit-Policy"] == '"anonymous";q=5;w=10'
        assert refused.headers["Retry-After"] in ("1", "2")
        # Made-up keys gain nothing (an IPv6 /64 counting as one address is a unit test's).
        made_up = {"X-API-Key": "made-up-key-0123456789"}
        assert (await client.get("/v1/state", headers=made_up)).status_code == 429
        # A forged X-Forwarded-For does not pick another bucket.
        forged = {"X-Forwarded-For": "192.0.2.99"}
        assert (await client.get("/health", headers=forged)).status_code == 429

    # Another client is not held back by this one.
    async with client_at(limited_api, "127.0.0.3") as elsewhere:
        answer = await elsewhere.get("/health")
        assert answer.status_code == 200
        assert answer.headers["RateLimit"] == '"anonymous";a=4;w=2'

    async with client_at(limited_api, "127.0.0.4", headers={"X-API-Key": ADMIN_KEY}) as admin:
        metrics = await admin.get("/metrics")
        assert metrics.status_code == 200
        assert 'ioc_api_rate_limited_total{policy="anonymous"}' in metrics.text


async def stream_open(url: str) -> bool | None:
    """Whether the API's live stream follows Kafka yet (it answers 503 until then)."""
    async with (
        httpx.AsyncClient(base_url=url, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as admin,
        admin.stream("GET", f"/v1/stream?city={SESSION_CITY}") as stream,
    ):
        return True if stream.status_code == 200 else None


async def test_an_event_stream_costs_one_request_when_it_opens(limited_api: str) -> None:
    await wait_until(lambda: stream_open(limited_api), timeout=60, what="the live stream", interval=0.2)
    key = await new_key(limited_api)
    headers = {"X-API-Key": key}
    async with (
        httpx.AsyncClient(base_url=limited_api, headers=headers, timeout=10) as client,
        client.stream("GET", f"/v1/stream?city={SESSION_CITY}") as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["RateLimit"].startswith('"viewer";a=5;')
        # The open stream's first frame, then other requests: the stream counts no further.
        await anext(stream.aiter_lines())
        answer = await client.get(f"/v1/state?city={SESSION_CITY}")
        assert answer.status_code == 200
        assert answer.headers["RateLimit"].startswith('"viewer";a=')
        available = int(answer.headers["RateLimit"].split(";a=")[1].split(";")[0])
        assert available in (4, 5)
