"""Rate limits: the token bucket on a hand-driven clock, the bounded table of buckets, client
addresses, and the middleware in the real app (no database: keys come from the key cache or a fake
store)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from api.auth import ROLES, KeyCache, Principal, Viewer, hash_key, presented_key
from api.rate_limits import Policy, RateLimiter, address_bucket, policies_of
from ioc_core.errors import ServiceUnavailableError
from ioc_core.settings import RateLimit, Settings
from ioc_core.storage.views import ApiKeyRow

ADMIN_KEY = "unit-admin-key-0123456789"
VIEWER_KEY, OTHER_VIEWER_KEY = "unit-viewer-key-aaaaaaaa", "unit-viewer-key-bbbbbbbb"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_bucket_refuses_and_says_when_to_come_back() -> None:
    clock = Clock()
    limiter = RateLimiter(100, clock=clock)
    policy = Policy("viewer", rate=20, burst=100)
    decisions = [limiter.take("k", policy) for _ in range(101)]
    assert all(d.allowed for d in decisions[:100])
    assert [d.available for d in decisions[:3]] == [99, 98, 97]
    refused = decisions[100]
    assert not refused.allowed
    assert (refused.available, refused.retry_after_s, refused.window_s) == (0, 1, 1)
    assert limiter.refused == {"viewer": 1}

    clock.now += 0.049  # not yet a whole token at 20/s
    assert not limiter.take("k", policy).allowed
    clock.now += 0.002
    assert limiter.take("k", policy).allowed
    assert not limiter.take("k", policy).allowed


def test_refused_requests_take_nothing_and_the_sustained_rate_is_the_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(100, clock=clock)
    policy = Policy("operator", rate=20, burst=100)
    allowed = 0
    # A client hammering at 1000 requests a second for 10 s.
    for _ in range(10_000):
        allowed += limiter.take("k", policy).allowed
        clock.now += 0.001
    assert 299 <= allowed <= 300
    # Quiet long enough, the bucket is full again, and no fuller.
    clock.now += 3600
    results = [limiter.take("k", policy).allowed for _ in range(101)]
    assert results.count(True) == 100


def test_retry_after_is_whole_seconds_and_never_early() -> None:
    clock = Clock()
    limiter = RateLimiter(10, clock=clock)
    slow = Policy("anonymous", rate=0.25, burst=2)
    assert limiter.take("a", slow).allowed and limiter.take("a", slow).allowed
    refused = limiter.take("a", slow)
    assert refused.retry_after_s == 4 and refused.window_s == 4
    clock.now += refused.retry_after_s
    assert limiter.take("a", slow).allowed


def test_only_the_first_refusal_of_a_run_is_news() -> None:
    limiter = RateLimiter(10, clock=Clock())
    policy = Policy("admin", rate=1, burst=1)
    assert limiter.take("k", policy).allowed
    assert [limiter.take("k", policy).newly_limited for _ in range(3)] == [True, False, False]


def test_headers_follow_the_draft() -> None:
    policy = Policy("viewer", rate=20, burst=100)
    assert policy.policy_header == b'"viewer";q=100;w=5'
    decision = RateLimiter(10, clock=Clock()).take("k", policy)
    assert policy.limit_header(decision) == b'"viewer";a=99;w=1'
    assert Policy("admin", rate=50, burst=200).policy_header == b'"admin";q=200;w=4'
    # A window is whole seconds, at least one.
    assert Policy("fast", rate=1000, burst=10).policy_header == b'"fast";q=10;w=1'
    with pytest.raises(ValueError):
        Policy('bad"name', rate=1, burst=1)
    with pytest.raises(ValueError):
        Policy("zero", rate=0, burst=1)


def test_idle_buckets_go_and_the_table_never_outgrows_its_cap() -> None:
    clock = Clock()
    limiter = RateLimiter(1000, clock=clock)
    policy = Policy("anonymous", rate=10, burst=100)
    for n in range(500):
        limiter.take(("address", f"10.0.{n // 256}.{n % 256}"), policy)
    assert len(limiter) == 500
    # Ten seconds later every one of them is full again: new clients sweep them away.
    clock.now += 10.1
    for n in range(20):
        limiter.take(("address", f"192.0.2.{n}"), policy)
    assert len(limiter) == 20
    assert limiter.evicted == 0

    # A flood of new addresses, faster than buckets refill: the cap holds.
    for n in range(50_000):
        limiter.take(("address", f"flood-{n}"), policy)
    assert len(limiter) == 1000
    assert limiter.evicted > 0


def test_a_busy_client_keeps_its_bucket_while_others_churn() -> None:
    clock = Clock()
    limiter = RateLimiter(100, clock=clock)
    policy = Policy("viewer", rate=1, burst=5)
    for _ in range(5):
        assert limiter.take("busy", policy).allowed
    for n in range(10_000):
        limiter.take(f"churn-{n}", policy)
        if n % 50 == 0:
            # Still empty: it was not dropped and handed a fresh, full bucket.
            assert not limiter.take("busy", policy).allowed


@pytest.mark.parametrize(
    ("host", "bucket"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("", ""),
        ("x" * 500, "x" * 100),
    ],
)
def test_client_addresses(host: str, bucket: str) -> None:
    assert address_bucket(host) == ("address", bucket)


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ([], None),
        ([(b"authorization", b"Bearer abc")], "abc"),
        ([(b"authorization", b"bEaReR abc")], "abc"),
        ([(b"authorization", b"Bearer abc"), (b"x-api-key", b"xyz")], "abc"),
        ([(b"authorization", b"Basic dXNlcjpwdw=="), (b"x-api-key", b"xyz")], "xyz"),
        ([(b"authorization", b"Bearer "), (b"x-api-key", b"xyz")], "xyz"),
        ([(b"x-api-key", b"")], None),
    ],
)
async def test_the_limiter_reads_the_key_as_authentication_does(
    headers: list[tuple[bytes, bytes]], key: str | None
) -> None:
    assert presented_key(headers) == key
    # The route, reading the same headers through FastAPI's security schemes, agrees.
    app = _app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answer = await client.get("/whoami", headers=[(k.decode(), v.decode()) for k, v in headers])
    if key is None:
        assert answer.json()["detail"] == "an API key is required"
    else:
        assert answer.json()["detail"] == "the API key is not valid"


class FakeApiKeys:
    """The key store: one viewer key, and a switch that makes the database unreachable."""

    def __init__(self) -> None:
        self.lookups = 0
        self.down = False

    async def by_hash(self, digest: bytes) -> ApiKeyRow | None:
        self.lookups += 1
        if self.down:
            raise ServiceUnavailableError("database unreachable")
        if digest != hash_key(VIEWER_KEY):
            return None
        now = datetime.now(UTC)
        return ApiKeyRow("key-1", "wall", "viewer", None, None, "admin", now, None)


class FakeDatabase:
    def __init__(self) -> None:
        self.api_keys = FakeApiKeys()


def _app(**limits: RateLimit) -> FastAPI:
    settings = Settings(admin_api_key=ADMIN_KEY, api_key_cache_s=0, **limits)
    app = create_app(settings)
    app.state.database = FakeDatabase()

    @app.get("/whoami")
    async def whoami(principal: Viewer) -> dict[str, str]:
        return {"name": principal.name}

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = _app(
        api_rate_limit_viewer=RateLimit(rate=1, burst=3),
        api_rate_limit_admin=RateLimit(rate=1, burst=5),
        api_rate_limit_anonymous=RateLimit(rate=1, burst=4),
    )
    transport = httpx.ASGITransport(app=app, client=("198.51.100.9", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


def _database(client: httpx.AsyncClient) -> FakeDatabase:
    transport: Any = client._transport
    database: FakeDatabase = transport.app.state.database
    return database


async def test_a_key_over_its_limit_gets_429_problem_json_with_the_headers(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Authorization": f"Bearer {VIEWER_KEY}"}
    answers = [await client.get("/whoami", headers=headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].headers["RateLimit-Policy"] == '"viewer";q=3;w=3'
    assert [a.headers["RateLimit"] for a in answers] == [f'"viewer";a={n};w={3 - n}' for n in (2, 1, 0)]

    refused = await client.get("/whoami", headers=headers)
    assert refused.status_code == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["RateLimit"] == '"viewer";a=0;w=1'
    body = refused.json()
    assert body["status"] == 429 and body["violated-policies"] == ["viewer"]
    assert body["type"].endswith("#quota-exceeded")

    # The settings' admin key and requests without a key have buckets of their own.
    admin = await client.get("/health", headers={"X-API-Key": ADMIN_KEY})
    assert admin.status_code == 200 and admin.headers["RateLimit"] == '"admin";a=4;w=1'
    anonymous = await client.get("/health")
    assert anonymous.status_code == 200 and anonymous.headers["RateLimit"] == '"anonymous";a=3;w=1'


async def test_made_up_keys_are_limited_by_address_and_stop_costing_queries(
    client: httpx.AsyncClient,
) -> None:
    database = _database(client)
    statuses = [
        (await client.get("/whoami", headers={"X-API-Key": f"made-up-{n:04d}-key"})).status_code
        for n in range(10)
    ]
    assert statuses == [401] * 4 + [429] * 6
    assert database.api_keys.lookups == 4
    # They count as requests without a key.
    assert (await client.get("/health")).status_code == 429


async def test_a_busy_address_does_not_keep_valid_keys_from_being_looked_up(
    client: httpx.AsyncClient,
) -> None:
    assert [(await client.get("/health")).status_code for _ in range(5)] == [200] * 4 + [429]
    answer = await client.get("/whoami", headers={"X-API-Key": VIEWER_KEY})
    assert answer.status_code == 200 and answer.headers["RateLimit"].startswith('"viewer";')


async def test_the_route_reuses_the_principal_the_limiter_looked_up(client: httpx.AsyncClient) -> None:
    database = _database(client)
    answer = await client.get("/whoami", headers={"X-API-Key": VIEWER_KEY})
    assert answer.json() == {"name": "wall"}
    # The key cache is off (IOC_API_KEY_CACHE_S=0): one query for the limiter and the route together.
    assert database.api_keys.lookups == 1


async def test_a_database_outage_during_the_lookup_is_the_routes_503(client: httpx.AsyncClient) -> None:
    _database(client).api_keys.down = True
    answer = await client.get("/whoami", headers={"X-API-Key": VIEWER_KEY})
    assert answer.status_code == 503
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.headers["Retry-After"] == "5"
    # Public routes do not need the key: they answer, counted against the address.
    health = await client.get("/health", headers={"X-API-Key": VIEWER_KEY})
    assert health.status_code == 200 and health.headers["RateLimit"].startswith('"anonymous";')
    # An outage is not taken for made-up keys: past the anonymous burst it is still the 503.
    answers = [await client.get("/whoami", headers={"X-API-Key": VIEWER_KEY}) for _ in range(8)]
    assert {a.status_code for a in answers[:2]} == {503}


async def test_a_cached_key_is_counted_without_a_query(client: httpx.AsyncClient) -> None:
    transport: Any = client._transport
    cache: KeyCache = transport.app.state.key_cache
    # A cache that trusts entries for a while, as in production.
    cache._ttl_s = 60
    cache.put(hash_key(OTHER_VIEWER_KEY), Principal(name="other", role="viewer", key_id="key-2"))
    for _ in range(3):
        answer = await client.get("/whoami", headers={"X-API-Key": OTHER_VIEWER_KEY})
        assert answer.status_code == 200
    assert _database(client).api_keys.lookups == 0
    assert (await client.get("/whoami", headers={"X-API-Key": OTHER_VIEWER_KEY})).status_code == 429


def test_settings_take_limits_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOC_API_RATE_LIMIT_VIEWER", json.dumps({"rate": 2.5, "burst": 10}))
    settings = Settings()
    assert settings.api_rate_limit_viewer == RateLimit(rate=2.5, burst=10)
    assert settings.api_rate_limit_admin == RateLimit(rate=50, burst=200)
    monkeypatch.setenv("IOC_API_RATE_LIMIT_ANONYMOUS", json.dumps({"rate": 0, "burst": 10}))
    with pytest.raises(ValueError):
        Settings()


def test_every_role_has_a_limit() -> None:
    assert set(policies_of(Settings())) == {*ROLES, "anonymous"}
