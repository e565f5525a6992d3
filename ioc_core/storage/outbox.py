"""The transactional outbox: events recorded in the transaction that caused them (with their
webhook deliveries), claimed by the relay that publishes them to the bus, forgotten once relayed."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from ioc_core.events import Event
from ioc_core.storage.pool import Connection, Pool
from ioc_core.storage.webhooks import route_deliveries
from ioc_core.webhooks import routed

_INSERT_OUTBOX_SQL = """
INSERT INTO outbox (event_id, topic, key, payload)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]::jsonb[])
ON CONFLICT (event_id) DO NOTHING
"""


async def insert_events(connection: Connection, events: Sequence[Event]) -> None:
    """Record events for the relay to Kafka, and their webhook deliveries, in the caller's
    transaction."""
    if not events:
        return
    await connection.execute(
        _INSERT_OUTBOX_SQL,
        [e.id for e in events],
        ["events" for _ in events],
        [e.key for e in events],
        [json.dumps(e.to_cloudevent(), ensure_ascii=False) for e in events],
    )
    await route_deliveries(connection, routed(events))


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    id: int
    topic: str
    key: str | None
    payload: str


class OutboxClaim:
    def __init__(self, connection: Connection, events: list[OutboxEvent]) -> None:
        self._connection = connection
        self.events = events

    async def mark_published(self) -> None:
        await self._connection.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", [e.id for e in self.events]
        )


class OutboxStore:
    """The relay's side of the outbox, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def unpublished(self, limit: int) -> AsyncIterator[OutboxClaim]:
        """Claim up to `limit` unpublished events (other relays skip them) until the block ends;
        the block publishes them and calls `claim.mark_published()`."""
        async with self._pool.guard(), self._pool.pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "SELECT id, topic, key, payload::text AS payload FROM outbox"
                " WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                limit,
            )
            yield OutboxClaim(
                connection, [OutboxEvent(r["id"], r["topic"], r["key"], r["payload"]) for r in rows]
            )

    async def forget_published(self, *, keep_s: float) -> None:
        """Forget the events relayed more than `keep_s` seconds ago."""
        async with self._pool.guard():
            await self._pool.pool.execute(
                "DELETE FROM outbox WHERE published_at < now() - make_interval(secs => $1)", keep_s
            )
