"""What the routes without a key let out: `/metrics` of the API and of the gateway need a key with
the metrics role (or an admin without a scope limit), and `/ready` and 503 answers say which
dependency is down but never its host, port or database name, even while it is down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.integration.conftest import ADMIN_KEY, System, free_port
from tests.integration.harness import ComponentProcess, delete_topics, unique, wait_until


async def make_key(admin: httpx.AsyncClient, **body: Any) -> str:
    response = await admin.post("/v1/api-keys", json=body)
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


async def status_of(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url, headers=headers)
    if response.status_code != 200:
        assert response.headers["content-type"] == "application/problem+json", response.text
        assert "ioc_" not in response.text
    return response.status_code


async def test_metrics_need_the_metrics_role_or_an_unscoped_admin(
    admin: httpx.AsyncClient, system: System
) -> None:
    scraper = await make_key(admin, role="metrics", name="Prometheus")
    viewer = await make_key(admin, role="viewer")
    operator = await make_key(admin, role="operator")
    city_admin = await make_key(admin, role="admin", cities=["ha-noi"])
    api_metrics = f"{system.api_url}/metrics"
    gateway_metrics = f"{system.processes['gateway'].health_url}/metrics"
    for url in (api_metrics, gateway_metrics):
        assert await status_of(url) == 401, url
        assert await status_of(url, "not-a-key") == 401, url
        for key in (viewer, operator, city_admin):
            assert await status_of(url, key) == 403, url
        for key in (scraper, ADMIN_KEY):
            assert await status_of(url, key) == 200, url
    async with httpx.AsyncClient(timeout=10) as client:
        page = await client.get(api_metrics, headers={"X-API-Key": scraper})
    assert page.status_code == 200 and "ioc_devices" in page.text

    # A metrics key reads metrics and nothing else; it has no scope, so only an unscoped admin
    # makes one.
    for path in ("/v1/state", "/v1/devices", "/v1/api-keys", "/v1/webhooks"):
        assert await status_of(f"{system.api_url}{path}", scraper) == 403, path
    scoped = await admin.post("/v1/api-keys", json={"role": "metrics", "cities": ["ha-noi"]})
    assert scoped.status_code == 400 and "system-wide" in scoped.json()["detail"]
    async with httpx.AsyncClient(
        base_url=system.api_url, headers={"Authorization": f"Bearer {city_admin}"}, timeout=10
    ) as limited:
        assert (await limited.post("/v1/api-keys", json={"role": "metrics"})).status_code == 403

    # Revoked, it stops working on the API at once and on the gateway within the key cache time.
    [listed] = [k for k in (await admin.get("/v1/api-keys")).json()["items"] if k["name"] == "Prometheus"]
    assert listed["role"] == "metrics"
    assert (await admin.delete(f"/v1/api-keys/{listed['id']}")).status_code == 204
    assert await status_of(api_metrics, scraper) == 401

    async def refused() -> bool | None:
        return True if await status_of(gateway_metrics, scraper) == 401 else None

    await wait_until(refused, timeout=15, what="the gateway refusing a revoked metrics key", interval=0.5)


class TcpProxy:
    """Forwards connections on a port of its own to `upstream`; `cut()` closes the port and every
    connection, as a database that goes away does."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        self._writers.discard(writer)


@contextlib.asynccontextmanager
async def behind_proxy(system: System, log_dir: Path) -> AsyncIterator[tuple[TcpProxy, dict[str, str]]]:
    """An API and a processor of their own, reaching the session's database through a proxy."""
    database = urlsplit(system.database_url)
    proxy = TcpProxy((database.hostname or "127.0.0.1", database.port or 5432))
    await proxy.start()
    run = unique("exposed")
    env = {
        **system.env,
        "IOC_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{proxy.port}{database.path}",
        "IOC_API_PORT": str(free_port()),
        "IOC_PROCESSOR_HEALTH_PORT": str(free_port()),
        "IOC_PROCESSOR_GROUP_ID": f"ioc-processor-{run}",
        "IOC_TOPIC_PREFIX": f"{run}.",
        "IOC_WEBHOOK_WORKER": "false",
        "IOC_DATABASE_TIMEOUT_S": "2",
    }
    processes = [
        ComponentProcess("api", env, log_dir, name=f"api-{run}"),
        ComponentProcess("processor", env, log_dir, name=f"processor-{run}"),
    ]
    for process in processes:
        process.start()
    try:
        await processes[0].wait_for_log("API listening")
        await processes[1].wait_for_log("processor health listening")
        yield proxy, env
    finally:
        for process in processes:
            process.stop()
        await proxy.cut()
        await delete_topics(env["IOC_TOPIC_PREFIX"])


def assert_says_nothing_of_where(text: str, env: dict[str, str]) -> None:
    database = urlsplit(env["IOC_DATABASE_URL"])
    for secret in ("127.0.0.1", str(database.port), database.path.lstrip("/"), "postgresql://", "5432"):
        assert secret not in text, f"{secret!r} in {text}"


async def test_ready_and_503_name_the_dependency_not_where_it_is(system: System, log_dir: Path) -> None:
    async with behind_proxy(system, log_dir) as (proxy, env):
        api = f"http://127.0.0.1:{env['IOC_API_PORT']}"
        processor = f"http://127.0.0.1:{env['IOC_PROCESSOR_HEALTH_PORT']}"
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"{api}/ready")).status_code == 200
            await proxy.cut()

            async def api_not_ready() -> httpx.Response | None:
                response = await client.get(f"{api}/ready")
                return response if response.status_code == 503 else None

            async def processor_not_ready() -> httpx.Response | None:
                response = await client.get(f"{processor}/ready")
                return response if response.status_code == 503 else None

            api_ready = await wait_until(api_not_ready, timeout=30, what="the API's /ready turning 503")
            assert api_ready.json()["checks"] == {
                "database": "ServiceUnavailableError: the database is unavailable"
            }
            assert_says_nothing_of_where(api_ready.text, env)

            answer = await client.get(f"{api}/v1/devices", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert answer.status_code == 503 and answer.headers["retry-after"]
            assert "unavailable" in answer.json()["detail"]
            assert_says_nothing_of_where(answer.text, env)

            processor_ready = await wait_until(
                processor_not_ready, timeout=30, what="the processor's /ready turning 503"
            )
            assert any(v != "ok" for v in processor_ready.json()["checks"].values())
            assert_says_nothing_of_where(processor_ready.text, env)
