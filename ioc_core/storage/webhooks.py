"""Webhook endpoints, their deliveries and every attempt.

A delivery row is made for each matching endpoint in the transaction that records the event
(`route_deliveries`, called with the outbox insert), so an event that committed cannot miss its
webhooks and one that rolled back sends none. Workers claim due deliveries with a lease: a worker
that dies mid-request leaves a lease that expires, and the delivery is tried again (at least
once); a delivery recorded as delivered is never claimed again.

Signing secrets are stored sealed with IOC_SECRETS_KEY (see `webhook_secrets`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ioc_core.errors import NotFoundError, StorageError
from ioc_core.rules import severity_rank
from ioc_core.sealing import SecretSealer
from ioc_core.storage.connections import CONNECTION_ERRORS, TRANSIENT_ERRORS, unavailable
from ioc_core.storage.maintenance import in_window_sql
from ioc_core.storage.pool import Connection, Transaction, text_list
from ioc_core.storage.webhook_secrets import SealingReport, StoredSecrets
from ioc_core.webhooks import SECRET_PREFIX, RoutedEvent, WebhookFilter

# Workers LISTEN here; a transaction that makes deliveries notifies at its commit.
NOTIFY_CHANNEL = "ioc_webhook_deliveries"

_IN_WINDOW = in_window_sql(
    device="u.status_device",
    city="u.city",
    domain="u.domain",
    areas="string_to_array(u.areas, ',')",
    at="u.at",
)
_ROUTE_SQL = f"""
WITH ev AS (
    SELECT u.* FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::integer[], $6::boolean[],
                           $7::text[], $8::boolean[], $9::text[], $10::text[], $11::timestamptz[])
        AS u (message_id, type, city, domain, severity_rank, escalated, body, opt_in, areas,
              status_device, at)
    -- A device's status change inside a maintenance window goes to no endpoint.
    WHERE u.status_device IS NULL OR NOT {_IN_WINDOW}
), made AS (
    INSERT INTO webhook_deliveries (endpoint_id, message_id, event_type, body)
    SELECT e.id, ev.message_id, ev.type, ev.body
    FROM ev JOIN webhook_endpoints e ON e.disabled_at IS NULL
        AND (e.cities IS NULL OR ev.city = ANY(e.cities))
        AND (e.domains IS NULL OR ev.domain = ANY(e.domains))
        AND (e.areas IS NULL OR string_to_array(ev.areas, ',') && e.areas)
        AND (ev.type = ANY(e.types) OR (e.types IS NULL AND NOT ev.opt_in))
        AND (NOT e.escalated_only OR ev.escalated)
        AND (e.min_severity_rank IS NULL
             OR (ev.severity_rank IS NULL AND e.types IS NOT NULL)
             OR ev.severity_rank >= e.min_severity_rank)
    ON CONFLICT (endpoint_id, message_id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM made
"""

_ENDPOINT_COLUMNS = """
    e.id, e.url, e.description, e.cities, e.domains, e.types, e.min_severity, e.escalated_only,
    e.created_by, e.created_at, e.disabled_at, e.disabled_reason, e.areas
"""

_DELIVERY_COLUMNS = """
    d.id, d.endpoint_id, d.message_id, d.event_type, d.state, d.created_at, d.window_started_at,
    d.next_attempt_at, d.attempts, d.last_status, d.last_error, d.delivered_at, d.failed_at,
    d.failure_reason,
    coalesce((SELECT json_agg(json_build_object(
                  'attempted_at', t.attempted_at, 'status_code', t.status_code,
                  'latency_ms', t.latency_ms, 'error', t.error, 'response', t.response,
                  'next_attempt_at', t.next_attempt_at) ORDER BY t.id)
              FROM webhook_attempts t WHERE t.delivery_id = d.id), '[]') AS attempt_log
"""

# Per endpoint, no more in flight (across every worker) than `per_endpoint`. Only one worker
# claims for an endpoint at a time (the advisory lock), so two cannot both fill its last slot.
_CLAIM_SQL = """
WITH endpoint AS (
    SELECT e.id, $1::integer - (
               SELECT count(*) FROM webhook_deliveries b
               WHERE b.endpoint_id = e.id AND b.state = 'pending' AND b.lease_until > now()
           ) AS free
    FROM webhook_endpoints e
    WHERE e.disabled_at IS NULL
      AND EXISTS (SELECT 1 FROM webhook_deliveries p
                  WHERE p.endpoint_id = e.id AND p.state = 'pending' AND p.next_attempt_at <= now())
      AND pg_try_advisory_xact_lock(hashtextextended('ioc-webhook:' || e.id, 0))
), picked AS (
    SELECT c.id
    FROM endpoint
    CROSS JOIN LATERAL (
        SELECT d.id FROM webhook_deliveries d
        WHERE d.endpoint_id = endpoint.id AND d.state = 'pending' AND d.next_attempt_at <= now()
          AND (d.lease_until IS NULL OR d.lease_until < now())
        ORDER BY d.next_attempt_at, d.id
        LIMIT greatest(endpoint.free, 0)
        FOR UPDATE SKIP LOCKED
    ) c
    LIMIT $2
)
UPDATE webhook_deliveries d
SET lease_owner = $3, lease_until = now() + make_interval(secs => $4)
FROM picked, webhook_endpoints e
WHERE d.id = picked.id AND e.id = d.endpoint_id
RETURNING d.id, d.endpoint_id, e.url, e.secret, d.message_id, d.event_type, d.body, d.attempts,
          d.window_started_at
"""

_FINISH_SQL = """
UPDATE webhook_deliveries SET
    attempts = attempts + 1,
    state = $2,
    next_attempt_at = coalesce($3, next_attempt_at),
    last_status = $4,
    last_error = $5,
    delivered_at = CASE WHEN $2 = 'delivered' THEN now() END,
    failed_at = CASE WHEN $2 = 'failed' THEN now() END,
    failure_reason = $6,
    lease_owner = NULL,
    lease_until = NULL
WHERE id = $1 AND state = 'pending'
"""

_INSERT_ATTEMPT_SQL = """
INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, latency_ms, error, response,
                              next_attempt_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""


@dataclass(frozen=True, slots=True)
class EndpointRow:
    id: str
    url: str
    description: str | None
    cities: list[str] | None
    domains: list[str] | None
    types: list[str] | None
    min_severity: str | None
    escalated_only: bool
    created_by: str | None
    created_at: datetime
    disabled_at: datetime | None
    disabled_reason: str | None
    areas: list[str] | None = None

    @property
    def filter(self) -> WebhookFilter:
        return WebhookFilter.model_validate(
            {
                "cities": self.cities,
                "domains": self.domains,
                "types": self.types,
                "min_severity": self.min_severity,
                "escalated_only": self.escalated_only,
                "areas": self.areas,
            }
        )


@dataclass(frozen=True, slots=True)
class AttemptRow:
    attempted_at: datetime
    status_code: int | None
    latency_ms: float
    error: str | None
    response: str | None
    next_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    endpoint_id: str
    message_id: str
    event_type: str
    state: str
    created_at: datetime
    window_started_at: datetime
    next_attempt_at: datetime
    attempts: int
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None
    failed_at: datetime | None
    failure_reason: str | None
    attempt_log: list[AttemptRow]


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """A claimed delivery: what to send where, and how many attempts came before. `secret` is
    None when no configured key opens the endpoint's stored secret."""

    id: int
    endpoint_id: str
    url: str
    secret: str | None
    message_id: str
    event_type: str
    body: str
    attempts: int
    window_started_at: datetime


async def route_deliveries(connection: Any, events: Sequence[RoutedEvent]) -> int:
    """Make the deliveries of `events` to every endpoint whose filter matches; part of the
    caller's transaction. Returns how many were made."""
    if not events:
        return 0
    made: int = await connection.fetchval(
        _ROUTE_SQL,
        [e.message_id for e in events],
        [e.type for e in events],
        [e.city for e in events],
        [e.domain for e in events],
        [e.severity_rank for e in events],
        [e.escalated for e in events],
        [e.body for e in events],
        [e.opt_in for e in events],
        # Area ids hold no comma (see ioc_core.areas), so a joined list is one text per event.
        [",".join(e.areas) for e in events],
        [e.status_device for e in events],
        [e.at for e in events],
    )
    if made:
        await connection.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return made


def _endpoint(row: asyncpg.Record) -> EndpointRow:
    return EndpointRow(**dict(row))


def _delivery(row: asyncpg.Record) -> DeliveryRow:
    values = dict(row)
    log = values.pop("attempt_log")
    if isinstance(log, str):
        log = json.loads(log)
    attempts = [
        AttemptRow(
            attempted_at=datetime.fromisoformat(a["attempted_at"]),
            status_code=a["status_code"],
            latency_ms=a["latency_ms"],
            error=a["error"],
            response=a["response"],
            next_attempt_at=datetime.fromisoformat(a["next_attempt_at"]) if a["next_attempt_at"] else None,
        )
        for a in log
    ]
    return DeliveryRow(**values, attempt_log=attempts)


class WebhookStore:
    """Every query about webhooks, over a started `Database`'s pool. Without a `sealer` the store
    can route and log deliveries but not make endpoints nor open sealed secrets."""

    def __init__(
        self, pool: Callable[[], asyncpg.Pool], url: str, sealer: SecretSealer | None = None
    ) -> None:
        self._pool = pool
        self._url = url
        self._secrets = StoredSecrets(sealer)

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except CONNECTION_ERRORS as exc:
            raise unavailable(self._url, exc) from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"a webhook query failed: {exc}", retriable=isinstance(exc, TRANSIENT_ERRORS)
            ) from exc

    @contextlib.asynccontextmanager
    async def _connection(self, within: Transaction | None) -> AsyncIterator[Connection]:
        """The connection of `within`, the caller's open transaction (see `Pool.joined`), or a
        pooled one of this store's own."""
        if within is not None:
            yield within.connection
            return
        async with self._guard(), self._pool().acquire() as connection:
            yield connection

    # -- endpoints --------------------------------------------------------------------------

    async def create_endpoint(
        self,
        *,
        endpoint_id: str,
        url: str,
        description: str | None,
        secret: str,
        webhook_filter: WebhookFilter,
        created_by: str | None,
        within: Transaction | None = None,
    ) -> EndpointRow:
        f = webhook_filter
        async with self._connection(within) as connection:
            row = await connection.fetchrow(
                "INSERT INTO webhook_endpoints AS e (id, url, description, secret, cities, domains, types,"
                " min_severity, min_severity_rank, escalated_only, created_by, areas)"
                f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING {_ENDPOINT_COLUMNS}",
                endpoint_id,
                url,
                description,
                self._secrets.seal(secret),
                f.cities,
                f.domains,
                f.types,
                f.min_severity,
                severity_rank(f.min_severity) if f.min_severity else None,
                f.escalated_only,
                created_by,
                f.areas,
            )
        assert row is not None
        return _endpoint(row)

    async def list_endpoints(
        self, cities: Sequence[str] | None, domains: Sequence[str] | None, *, after: str | None, limit: int
    ) -> list[EndpointRow]:
        """Endpoints whose filter lies within `cities` and `domains` (None = no limit), by id."""
        async with self._guard():
            rows = await self._pool().fetch(
                f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints e"
                " WHERE ($1::text[] IS NULL OR e.cities <@ $1) AND ($2::text[] IS NULL OR e.domains <@ $2)"
                " AND ($3::text IS NULL OR e.id > $3) ORDER BY e.id LIMIT $4",
                text_list(cities),
                text_list(domains),
                after,
                limit,
            )
        return [_endpoint(r) for r in rows]

    async def get_endpoint(self, endpoint_id: str) -> EndpointRow:
        async with self._guard():
            row = await self._pool().fetchrow(
                f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints e WHERE e.id = $1", endpoint_id
            )
        if row is None:
            raise NotFoundError(f"webhook {endpoint_id!r} not found")
        return _endpoint(row)

    async def update_endpoint(
        self,
        endpoint_id: str,
        *,
        url: str | None,
        description: str | None,
        webhook_filter: WebhookFilter | None,
        enabled: bool | None,
        within: Transaction | None = None,
    ) -> EndpointRow:
        """Change what is given; `enabled=True` clears a disablement (by a 410, say)."""
        f = webhook_filter
        async with self._connection(within) as connection:
            row = await connection.fetchrow(
                "UPDATE webhook_endpoints AS e SET"
                " url = coalesce($2, e.url),"
                " description = coalesce($3, e.description),"
                " cities = CASE WHEN $4::boolean THEN $5 ELSE e.cities END,"
                " domains = CASE WHEN $4 THEN $6 ELSE e.domains END,"
                " types = CASE WHEN $4 THEN $7 ELSE e.types END,"
                " min_severity = CASE WHEN $4 THEN $8 ELSE e.min_severity END,"
                " min_severity_rank = CASE WHEN $4 THEN $9 ELSE e.min_severity_rank END,"
                " escalated_only = CASE WHEN $4 THEN $10 ELSE e.escalated_only END,"
                " areas = CASE WHEN $4 THEN $12 ELSE e.areas END,"
                " disabled_at = CASE WHEN $11::boolean IS NULL THEN e.disabled_at"
                "                    WHEN $11 THEN NULL ELSE coalesce(e.disabled_at, now()) END,"
                " disabled_reason = CASE WHEN $11 IS NULL THEN e.disabled_reason"
                "                        WHEN $11 THEN NULL"
                "                        ELSE coalesce(e.disabled_reason, 'disabled by an admin')"
                "                   END"
                f" WHERE e.id = $1 RETURNING {_ENDPOINT_COLUMNS}",
                endpoint_id,
                url,
                description,
                f is not None,
                f.cities if f else None,
                f.domains if f else None,
                f.types if f else None,
                f.min_severity if f else None,
                severity_rank(f.min_severity) if f and f.min_severity else None,
                f.escalated_only if f else False,
                enabled,
                f.areas if f else None,
            )
        if row is None:
            raise NotFoundError(f"webhook {endpoint_id!r} not found")
        return _endpoint(row)

    async def delete_endpoint(self, endpoint_id: str, *, within: Transaction | None = None) -> None:
        async with self._connection(within) as connection:
            status = await connection.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)
        if status.endswith(" 0"):
            raise NotFoundError(f"webhook {endpoint_id!r} not found")

    # -- delivery log -----------------------------------------------------------------------

    async def list_deliveries(
        self, endpoint_id: str, *, states: Sequence[str] | None, before: int | None, limit: int
    ) -> list[DeliveryRow]:
        """Newest first."""
        async with self._guard():
            rows = await self._pool().fetch(
                f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d"
                " WHERE d.endpoint_id = $1 AND ($2::text[] IS NULL OR d.state = ANY($2))"
                " AND ($3::bigint IS NULL OR d.id < $3) ORDER BY d.id DESC LIMIT $4",
                endpoint_id,
                text_list(states),
                before,
                limit,
            )
        return [_delivery(r) for r in rows]

    async def get_delivery(
        self, endpoint_id: str, delivery_id: int, *, within: Transaction | None = None
    ) -> DeliveryRow:
        async with self._connection(within) as connection:
            row = await connection.fetchrow(
                f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d"
                " WHERE d.endpoint_id = $1 AND d.id = $2",
                endpoint_id,
                delivery_id,
            )
        if row is None:
            raise NotFoundError(f"delivery {delivery_id} of webhook {endpoint_id!r} not found")
        return _delivery(row)

    async def retry_delivery(
        self, endpoint_id: str, delivery_id: int, *, within: Transaction | None = None
    ) -> DeliveryRow:
        """Send a failed (or still pending) delivery again now, with a fresh retry window."""
        async with self._connection(within) as connection, connection.transaction():
            status = await connection.execute(
                "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = now(),"
                " window_started_at = now(), failed_at = NULL, failure_reason = NULL"
                " WHERE endpoint_id = $1 AND id = $2 AND state <> 'delivered'",
                endpoint_id,
                delivery_id,
            )
            if status.endswith(" 1"):
                await connection.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        return await self.get_delivery(endpoint_id, delivery_id, within=within)

    async def delivery_counts(self) -> dict[str, int]:
        async with self._guard():
            rows = await self._pool().fetch(
                "SELECT state, count(*) AS n FROM webhook_deliveries GROUP BY state"
            )
        return {r["state"]: r["n"] for r in rows}

    # -- the worker's side ------------------------------------------------------------------

    async def claim(self, *, owner: str, per_endpoint: int, limit: int, lease_s: float) -> list[DeliveryJob]:
        async with self._guard(), self._pool().acquire() as connection, connection.transaction():
            rows = await connection.fetch(_CLAIM_SQL, per_endpoint, limit, owner, lease_s)
        return [DeliveryJob(**{**dict(r), "secret": self._secrets.open(r["secret"])}) for r in rows]

    async def finish_attempt(
        self,
        job: DeliveryJob,
        *,
        attempted_at: datetime,
        status_code: int | None,
        latency_ms: float,
        error: str | None,
        response: str | None,
        state: str,
        next_attempt_at: datetime | None,
        failure_reason: str | None,
        disable_endpoint: str | None = None,
    ) -> None:
        """Log an attempt and move the delivery on, in one transaction. `disable_endpoint` (a
        reason) also disables the endpoint and fails its other pending deliveries."""
        async with self._guard(), self._pool().acquire() as connection, connection.transaction():
            await connection.execute(
                _INSERT_ATTEMPT_SQL,
                job.id,
                attempted_at,
                status_code,
                latency_ms,
                error,
                response,
                next_attempt_at if state == "pending" else None,
            )
            await connection.execute(
                _FINISH_SQL, job.id, state, next_attempt_at, status_code, error, failure_reason
            )
            if disable_endpoint is not None:
                await connection.execute(
                    "UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = $2"
                    " WHERE id = $1 AND disabled_at IS NULL",
                    job.endpoint_id,
                    disable_endpoint,
                )
                await connection.execute(
                    "UPDATE webhook_deliveries SET state = 'failed', failed_at = now(), failure_reason = $2,"
                    " lease_owner = NULL, lease_until = NULL"
                    " WHERE endpoint_id = $1 AND state = 'pending'",
                    job.endpoint_id,
                    f"endpoint disabled: {disable_endpoint}",
                )

    async def expire(self, *, window_s: float) -> int:
        """Fail pending deliveries whose retry window has ended without a lease on them (their
        endpoint was disabled while they waited, say)."""
        async with self._guard():
            status = await self._pool().execute(
                "UPDATE webhook_deliveries SET state = 'failed', failed_at = now(),"
                " failure_reason = 'retry window ended'"
                " WHERE state = 'pending' AND window_started_at < now() - make_interval(secs => $1)"
                " AND (lease_until IS NULL OR lease_until < now())",
                window_s,
            )
        return int(status.rsplit(" ", 1)[-1])

    async def forget(self, *, older_than_days: float) -> int:
        """Remove finished deliveries (and their attempts) older than the log keeps."""
        async with self._guard():
            status = await self._pool().execute(
                "DELETE FROM webhook_deliveries WHERE state <> 'pending'"
                " AND created_at < now() - make_interval(days => 1) * $1",
                older_than_days,
            )
        return int(status.rsplit(" ", 1)[-1])

    # -- secrets at rest --------------------------------------------------------------------

    async def check_secrets(self) -> None:
        """Refuse, naming the endpoints, when a stored secret opens with no configured key."""
        async with self._guard():
            rows = await self._pool().fetch("SELECT id, secret FROM webhook_endpoints ORDER BY id")
        self._secrets.refuse_unreadable([(r["id"], r["secret"]) for r in rows])

    async def plain_secrets(self) -> int:
        """How many endpoints still have their secret in plain text (from an earlier version)."""
        async with self._guard():
            count: int = await self._pool().fetchval(
                "SELECT count(*) FROM webhook_endpoints WHERE starts_with(secret, $1)", SECRET_PREFIX
            )
        return count

    async def seal_stored_secrets(self) -> SealingReport:
        """Seal plain secrets and re-seal old keys' with the current key, all or nothing."""
        async with self._guard(), self._pool().acquire() as connection, connection.transaction():
            return await self._secrets.seal_all(connection)

    async def listen(self, callback: Callable[[], None]) -> asyncpg.Connection:
        """A connection that calls `callback` whenever deliveries are made; close it to stop."""
        async with self._guard():
            connection = await asyncpg.connect(self._url, timeout=10)
            await connection.add_listener(NOTIFY_CHANNEL, lambda *_: callback())
        return connection
