"""The webhook delivery worker: sends due deliveries to agencies, signed, and records every attempt.

Deliveries are made in the database with the events that cause them (see
`ioc_core.storage.webhooks`); this worker claims the due ones under a lease, a few per endpoint
at a time across all workers, sends them (`delivery.sending`) and records the outcome: delivered
(2xx), tried again later (anything else, with backoff and jitter, or the endpoint's `Retry-After`
on 429 and 503), failed (the retry window ended) or, on 410 Gone, the endpoint disabled.

A new delivery wakes workers at once through LISTEN/NOTIFY; due retries are found by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from delivery.sending import send_once, webhook_client
from ioc_core.component import Component
from ioc_core.errors import ServiceUnavailableError
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.storage.webhooks import DeliveryJob
from ioc_core.supervision import Supervisor, is_retriable
from ioc_core.webhooks import AttemptResult, next_attempt

log = logging.getLogger(__name__)

# A claimed delivery whose worker vanished is claimed again this long after its time limit.
_LEASE_MARGIN_S = 30.0
_EXPIRE_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an attempt makes of its delivery: `delivered`, `pending` (tried again at `retry_at`)
    or `failed` (with the reason; `disable` also disables the endpoint)."""

    state: str
    retry_at: datetime | None = None
    failure: str | None = None
    disable: str | None = None


def judge(result: AttemptResult, job: DeliveryJob, settings: Settings, *, now: datetime) -> Verdict:
    if result.outcome == "delivered":
        return Verdict("delivered")
    if result.outcome == "gone":
        reason = "the endpoint answered 410 Gone"
        return Verdict("failed", failure=reason, disable=reason)
    attempts = job.attempts + 1
    retry_at = next_attempt(
        result,
        attempts=attempts,
        now=now,
        window_ends=job.window_started_at + timedelta(seconds=settings.webhook_retry_window_s),
        initial_s=settings.webhook_backoff_initial_s,
        maximum_s=settings.webhook_backoff_max_s,
    )
    if retry_at is None:
        return Verdict(
            "failed", failure=f"retry window ended after {attempts} attempts; last: {result.error}"
        )
    return Verdict("pending", retry_at=retry_at)


class WebhookDispatcher(Component):
    """One delivery worker; several may run against one database. Use with `async with`.

    The database and the HTTP client are made from `settings` unless given; a given database is
    started and stopped here all the same."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_in_flight: int = 64,
        database: Database | None = None,
        client_factory: Callable[[Settings], httpx.AsyncClient] = webhook_client,
    ) -> None:
        self._settings = settings
        self._database = database or Database(
            settings.database_url.get_secret_value(),
            min_size=1,
            max_size=4,
            timeout_s=settings.database_timeout_s,
            sealer=settings.sealer(),
        )
        self._client_factory = client_factory
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
        try:
            # Secrets that no configured key opens mean a key is missing from this component's
            # settings: refuse to start, naming the endpoints, rather than fail every delivery.
            await self._store.check_secrets()
        except BaseException:
            await self._database.stop()
            raise
        self._client = self._client_factory(self._settings)
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
        verdict = judge(result, job, self._settings, now=datetime.now(UTC))
        # Unrecorded (the worker stopped first), the delivery stays leased; when the lease ends
        # it is sent again.
        await self._record(job, attempted_at=attempted_at, result=result, verdict=verdict)
        if verdict.state == "delivered":
            self.delivered += 1
        elif verdict.state == "failed":
            self.failed += 1
            log.warning("webhook %s to %s failed: %s", job.message_id, job.endpoint_id, verdict.failure)
        else:
            self.retried += 1
            log.info(
                "webhook %s to %s: %s; trying again at %s",
                job.message_id,
                job.endpoint_id,
                result.error,
                verdict.retry_at.isoformat() if verdict.retry_at else "-",
            )
        self._wake.set()

    async def _record(
        self, job: DeliveryJob, *, attempted_at: datetime, result: AttemptResult, verdict: Verdict
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
                state=verdict.state,
                next_attempt_at=verdict.retry_at,
                failure_reason=verdict.failure,
                disable_endpoint=verdict.disable,
            ),
        )
