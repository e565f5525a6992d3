"""The webhook delivery worker: sends due deliveries to agencies, signed, and records every attempt.

Deliveries are made in the database with the events that cause them (see
`ioc_core.storage.webhooks`); this worker claims the due ones under a lease, a few per endpoint
at a time across all workers, sends them and records the outcome: delivered (2xx), tried again
later (anything else, with backoff and jitter, or the endpoint's `Retry-After` on 429 and 503),
failed (the retry window ended) or, on 410 Gone, the endpoint disabled.

A new delivery wakes workers at once through LISTEN/NOTIFY; due retries are found by polling.
The HTTP client resolves each host itself and connects only to addresses webhooks may reach, so
a name that passed the check at registration cannot later be pointed at an internal service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpcore
import httpx

from ioc_core.component import Component
from ioc_core.errors import ServiceUnavailableError
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.storage.webhooks import DeliveryJob
from ioc_core.supervision import Supervisor, is_retriable
from ioc_core.webhooks import (
    RESPONSE_KEEP_MAX,
    RESPONSE_READ_MAX,
    AttemptResult,
    WebhookError,
    allowed_addresses,
    next_attempt,
    retry_after,
    signed_headers,
)

log = logging.getLogger(__name__)

# A claimed delivery whose worker vanished is claimed again this long after its time limit.
_LEASE_MARGIN_S = 30.0
_EXPIRE_EVERY_S = 60.0


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses that `allowed_addresses` lets through; TLS still checks the
    certificate against the URL's host name."""

    def __init__(self, *, allow_private: bool) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await allowed_addresses(host, port, allow_private=self._allow_private)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure or httpcore.ConnectError(f"{host} has no address")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are not sent to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the address guard in place of its network backend, and no proxy
    or certificate settings taken from the environment."""

    def __init__(self, *, allow_private: bool, max_connections: int = 100) -> None:
        super().__init__(trust_env=False)
        # httpx offers no public way to choose the network backend; the pool it built is replaced.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=20,
            keepalive_expiry=30.0,
            network_backend=_GuardedBackend(allow_private=allow_private),
        )


def webhook_client(settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=GuardedTransport(allow_private=settings.webhook_allow_private),
        timeout=httpx.Timeout(settings.webhook_timeout_s),
        follow_redirects=False,
        trust_env=False,
    )


async def send_once(client: httpx.AsyncClient, job: DeliveryJob, *, timeout_s: float) -> AttemptResult:
    """One signed POST of `job`; never raises for what the endpoint or the network does."""
    body = job.body.encode()
    headers = signed_headers(job.secret, job.message_id, body)
    started = time.monotonic()

    def elapsed() -> float:
        return round((time.monotonic() - started) * 1000, 1)

    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", job.url, content=body, headers=headers) as response:
                received = bytearray()
                async for chunk in response.aiter_raw():
                    received += chunk
                    if len(received) >= RESPONSE_READ_MAX:
                        break
                text = bytes(received[:RESPONSE_KEEP_MAX]).decode("utf-8", errors="replace")
                error = None
                if 300 <= response.status_code < 400:
                    location = response.headers.get("location", "")[:200]
                    error = f"redirects are not followed (Location: {location})"
                elif not 200 <= response.status_code < 300:
                    error = f"HTTP {response.status_code}"
                return AttemptResult(
                    status_code=response.status_code,
                    latency_ms=elapsed(),
                    error=error,
                    response=text or None,
                    retry_after_s=retry_after(response.headers.get("retry-after"), now=datetime.now(UTC)),
                )
    except TimeoutError:
        return AttemptResult(None, elapsed(), f"no answer within {timeout_s:g} s")
    except httpx.TimeoutException as exc:
        return AttemptResult(None, elapsed(), f"timed out: {type(exc).__name__}")
    except WebhookError as exc:
        return AttemptResult(None, elapsed(), str(exc))
    except httpx.HTTPError as exc:
        return AttemptResult(None, elapsed(), f"{type(exc).__name__}: {exc}"[:500])


class WebhookDispatcher(Component):
    """One delivery worker; several may run against one database. Use with `async with`."""

    def __init__(self, settings: Settings, *, max_in_flight: int = 64) -> None:
        self._settings = settings
        self._database = Database(
            settings.database_url.get_secret_value(),
            min_size=1,
            max_size=4,
            timeout_s=settings.database_timeout_s,
        )
        self._store = self._database.webhooks
        self._owner = f"worker-{secrets.token_hex(6)}"
        self._max_in_flight = max_in_flight
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._client: httpx.AsyncClient | None = None
        self._supervisor = Supervisor("webhook worker")
        self._database_outage = self._supervisor.outage("claiming deliveries")
        self.delivered = 0
        self.failed = 0
        self.retried = 0

    async def start(self) -> None:
        await self._database.start()
        self._client = webhook_client(self._settings)
        await self._listen()
        self._supervisor.spawn("dispatch", self._run, restart=False)
        log.info("webhook worker %s started", self._owner)

    async def stop(self) -> None:
        # Requests in flight are abandoned; their leases expire and they are sent again.
        await self._supervisor.stop()
        self._in_flight.clear()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self._database.stop()

    async def wait(self) -> None:
        """Until the worker fails for good (raises `ComponentFailed`)."""
        await self._supervisor.wait()

    def readiness(self) -> dict[str, str]:
        return self._supervisor.failing() or {"webhooks": "ok"}

    async def _listen(self) -> None:
        """(Re)open the notification connection; without it the worker still polls."""
        if self._listener is not None and not self._listener.is_closed():
            return
        listening = self._supervisor.outage(
            "listening for new deliveries (polling meanwhile)", blocking=False
        )
        try:
            self._listener = await self._store.listen(self._wake.set)
        except ServiceUnavailableError as exc:
            self._listener = None
            listening.failed(exc)
            return
        listening.recovered()

    async def _run(self) -> None:
        last_expiry = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._settings.webhook_poll_s)
            self._wake.clear()
            try:
                await self._listen()
                await self._claim_and_send()
                if time.monotonic() - last_expiry > _EXPIRE_EVERY_S:
                    expired = await self._store.expire(window_s=self._settings.webhook_retry_window_s)
                    if expired:
                        log.warning("%d webhook deliveries failed: their retry window ended", expired)
                    await self._store.forget(older_than_days=self._settings.webhook_log_days)
                    last_expiry = time.monotonic()
            except Exception as exc:
                if not is_retriable(exc):
                    raise
                # Tried again at the next poll or notification, and logged once per outage.
                self._database_outage.failed(exc)
                continue
            self._database_outage.recovered()

    async def _claim_and_send(self) -> None:
        free = self._max_in_flight - len(self._in_flight)
        if free <= 0:
            return
        jobs = await self._store.claim(
            owner=self._owner,
            per_endpoint=self._settings.webhook_concurrency,
            limit=free,
            lease_s=self._settings.webhook_timeout_s + _LEASE_MARGIN_S,
        )
        for job in jobs:
            task = self._supervisor.spawn(
                f"delivery {job.id}", functools.partial(self._deliver, job), restart=False
            )
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        if len(jobs) == free:
            self._wake.set()

    async def _deliver(self, job: DeliveryJob) -> None:
        assert self._client is not None
        attempted_at = datetime.now(UTC)
        result = await send_once(self._client, job, timeout_s=self._settings.webhook_timeout_s)
        attempts = job.attempts + 1
        window_ends = job.window_started_at + timedelta(seconds=self._settings.webhook_retry_window_s)
        retry_at: datetime | None = None
        disable: str | None = None
        failure: str | None = None
        if result.outcome == "delivered":
            state = "delivered"
        elif result.outcome == "gone":
            state, disable = "failed", "the endpoint answered 410 Gone"
            failure = disable
        else:
            retry_at = next_attempt(
                result,
                attempts=attempts,
                now=datetime.now(UTC),
                window_ends=window_ends,
                initial_s=self._settings.webhook_backoff_initial_s,
                maximum_s=self._settings.webhook_backoff_max_s,
            )
            state = "pending" if retry_at is not None else "failed"
            if retry_at is None:
                failure = f"retry window ended after {attempts} attempts; last: {result.error}"
        # Unrecorded (the worker stopped first), the delivery stays leased; when the lease ends
        # it is sent again.
        await self._record(
            job,
            attempted_at=attempted_at,
            result=result,
            state=state,
            retry_at=retry_at,
            failure=failure,
            disable=disable,
        )
        if state == "delivered":
            self.delivered += 1
        elif state == "failed":
            self.failed += 1
            log.warning("webhook %s to %s failed: %s", job.message_id, job.endpoint_id, failure)
        else:
            self.retried += 1
            log.info(
                "webhook %s to %s: %s; trying again at %s",
                job.message_id,
                job.endpoint_id,
                result.error,
                retry_at.isoformat() if retry_at else "-",
            )
        self._wake.set()

    async def _record(
        self,
        job: DeliveryJob,
        *,
        attempted_at: datetime,
        result: AttemptResult,
        state: str,
        retry_at: datetime | None,
        failure: str | None,
        disable: str | None,
    ) -> None:
        """Store the attempt, waiting out a database outage: until it is stored the lease keeps
        others off, and if the lease runs out first the delivery is sent again (at least once)."""
        await self._supervisor.retry(
            "recording attempts",
            functools.partial(
                self._store.finish_attempt,
                job,
                attempted_at=attempted_at,
                status_code=result.status_code,
                latency_ms=result.latency_ms,
                error=result.error,
                response=result.response,
                state=state,
                next_attempt_at=retry_at,
                failure_reason=failure,
                disable_endpoint=disable,
            ),
        )
