"""Who may read a component's /metrics (`ioc_core.access.MetricsKeys`), and the gateway's and
processor's HTTP surface (`ioc_core.health`): /metrics refused without the role, /ready that
names what fails but never where it is."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import httpx
import pytest
from pydantic import SecretStr

from ioc_core.access import MetricsKeys, Verdict, hash_key, presented_key
from ioc_core.errors import ServiceUnavailableError
from ioc_core.health import health_app
from ioc_core.metrics import Metric
from ioc_core.storage.views import ApiKeyRow

ADMIN = SecretStr("the-admin-key-0123456789")


def row(role: str, *, cities: list[str] | None = None, domains: list[str] | None = None) -> ApiKeyRow:
    return ApiKeyRow(
        id="key_0123456789abcdef",
        name=None,
        role=role,
        cities=cities,
        domains=domains,
        created_by="admin",
        created_at=datetime.now(UTC),
        revoked_at=None,
    )


class FakeKeyTable:
    """The api_keys store's lookup by digest, which can be taken away like a database."""

    def __init__(self, **keys: ApiKeyRow) -> None:
        self.rows = {hash_key(key): value for key, value in keys.items()}
        self.down = False
        self.lookups = 0

    async def by_hash(self, digest: bytes) -> ApiKeyRow | None:
        self.lookups += 1
        if self.down:
            raise ServiceUnavailableError("database at db.internal:5432/ioc is unreachable")
        return self.rows.get(digest)


def table() -> FakeKeyTable:
    return FakeKeyTable(
        scraper=row("metrics"),
        boss=row("admin"),
        city_boss=row("admin", cities=["ha-noi"]),
        domain_boss=row("admin", domains=["flood"]),
        screen=row("viewer"),
        desk=row("operator"),
    )


@pytest.mark.parametrize(
    ("key", "verdict"),
    [
        ("scraper", Verdict.ALLOWED),
        ("boss", Verdict.ALLOWED),
        ("the-admin-key-0123456789", Verdict.ALLOWED),
        ("city_boss", Verdict.FORBIDDEN),
        ("domain_boss", Verdict.FORBIDDEN),
        ("screen", Verdict.FORBIDDEN),
        ("desk", Verdict.FORBIDDEN),
        ("guess", Verdict.UNKNOWN),
        ("the-admin-key-012345678", Verdict.UNKNOWN),
        ("x" * 201, Verdict.UNKNOWN),
    ],
)
async def test_metrics_need_the_metrics_role_or_an_unscoped_admin(key: str, verdict: Verdict) -> None:
    keys = MetricsKeys(ADMIN, table().by_hash, cache_s=60)
    assert await keys.verdict(key) is verdict


async def test_the_admin_key_needs_no_database_and_others_keep_their_last_answer_in_an_outage() -> None:
    keys_table = table()
    keys = MetricsKeys(ADMIN, keys_table.by_hash, cache_s=0)
    assert await keys.verdict("scraper") is Verdict.ALLOWED
    assert await keys.verdict("screen") is Verdict.FORBIDDEN
    keys_table.down = True
    assert await keys.verdict(ADMIN.get_secret_value()) is Verdict.ALLOWED
    assert await keys.verdict("scraper") is Verdict.ALLOWED
    assert await keys.verdict("screen") is Verdict.FORBIDDEN
    with pytest.raises(ServiceUnavailableError):
        await keys.verdict("never-seen")
    keys_table.down = False
    del keys_table.rows[hash_key("scraper")]  # revoked
    assert await keys.verdict("scraper") is Verdict.UNKNOWN


async def test_answers_are_cached_for_the_revocation_delay() -> None:
    keys_table = table()
    keys = MetricsKeys(None, keys_table.by_hash, cache_s=60)
    for _ in range(5):
        assert await keys.verdict("scraper") is Verdict.ALLOWED
    assert keys_table.lookups == 1


@pytest.mark.parametrize(
    ("authorization", "header", "key"),
    [
        ("Bearer abc", None, "abc"),
        ("bearer  abc ", None, "abc"),
        ("Basic abc", None, None),
        ("Bearer ", "xyz", "xyz"),
        (None, "xyz", "xyz"),
        (None, None, None),
        ("Bearer abc", "xyz", "abc"),
    ],
)
def test_a_key_comes_as_a_bearer_token_or_an_x_api_key(
    authorization: str | None, header: str | None, key: str | None
) -> None:
    assert presented_key(authorization, header) == key


def _app(
    keys: MetricsKeys, readiness: Callable[[], dict[str, str]] = lambda: {"kafka": "ok"}
) -> Callable[..., Awaitable[httpx.Response]]:
    app = health_app(readiness, lambda: [Metric("ioc_test_total", "counter", "a test").add(3)], keys)

    async def get(path: str, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://health"
        ) as client:
            return await client.get(path, headers=headers)

    return get


async def test_health_server_metrics_answer_problems_without_the_role() -> None:
    keys_table = table()
    get = _app(MetricsKeys(ADMIN, keys_table.by_hash, cache_s=0))
    for key, status in ((None, 401), ("guess", 401), ("screen", 403), ("city_boss", 403)):
        response = await get("/metrics", key)
        assert response.status_code == status, key
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == status and "ioc_test_total" not in response.text
    assert (await get("/metrics")).headers["www-authenticate"] == "Bearer"
    for key in ("scraper", "boss", ADMIN.get_secret_value()):
        response = await get("/metrics", key)
        assert response.status_code == 200 and "ioc_test_total 3" in response.text
    keys_table.down = True
    unavailable = await get("/metrics", "never-seen")
    assert unavailable.status_code == 503 and unavailable.headers["retry-after"]
    assert "db.internal" not in unavailable.text
    assert (await get("/metrics", ADMIN.get_secret_value())).status_code == 200


async def test_health_and_ready_need_no_key() -> None:
    get = _app(
        MetricsKeys(None, None, cache_s=0),
        readiness=lambda: {"kafka": "failing: KafkaConnectionError", "mqtt": "ok"},
    )
    assert (await get("/health")).json() == {"status": "ok"}
    ready = await get("/ready")
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "unavailable",
        "checks": {"kafka": "failing: KafkaConnectionError", "mqtt": "ok"},
    }
    # Without a database to ask, only the admin key reads metrics; here there is none.
    assert (await get("/metrics", "anything")).status_code == 401
