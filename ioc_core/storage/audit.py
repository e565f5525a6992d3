"""The audit log: recording an entry (in the caller's transaction, with its `audit.recorded` event
through the outbox), reading it back page by page within a scope, and forgetting old entries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ioc_core.audit import AuditEntry, AuditRecord, audit_event, new_event_id
from ioc_core.storage.outbox import insert_events
from ioc_core.storage.pool import Pool, Transaction, text_list

_COLUMNS = """
    id, at, event_id::text AS event_id, actor_key_id, actor_name, client_address, action,
    object_type, object_id, outcome, cities, domains, detail
"""

_INSERT_SQL = f"""
INSERT INTO audit_log (event_id, actor_key_id, actor_name, client_address, action, object_type,
                       object_id, outcome, cities, domains, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
RETURNING {_COLUMNS}
"""

# $1/$2 the reader's cities/domains (NULL: every one): an entry is in a limited reader's scope when
# its object's scope lies within the reader's, as for API keys and webhooks. Then the filters,
# each NULL for "any"; $5 asks for the settings' admin key, whose entries have no key id.
_PAGE_SQL = f"""
SELECT {_COLUMNS} FROM audit_log
WHERE ($1::text[] IS NULL OR cities <@ $1) AND ($2::text[] IS NULL OR domains <@ $2)
  AND ($3::text[] IS NULL OR action = ANY($3))
  AND ($4::text IS NULL OR actor_key_id = $4) AND (NOT $5::boolean OR actor_key_id IS NULL)
  AND ($6::text IS NULL OR object_type = $6)
  AND ($7::text IS NULL OR object_id = $7)
  AND ($8::text IS NULL OR outcome = $8)
  AND ($9::timestamptz IS NULL OR at >= $9)
  AND ($10::timestamptz IS NULL OR at < $10)
  AND ($11::bigint IS NULL OR id < $11)
ORDER BY id DESC
LIMIT $12
"""


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """What an audit list asks for; every field None means "any"."""

    actions: Sequence[str] | None = None
    actor_key_id: str | None = None
    # The settings' admin key, which has no key id.
    settings_key: bool = False
    object_type: str | None = None
    object_id: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _entry(row: asyncpg.Record) -> AuditEntry:
    return AuditEntry(**dict(row))


class AuditStore:
    """Every query about the audit log, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def record(self, record: AuditRecord, *, within: Transaction | None = None) -> AuditEntry:
        """Store an entry and its event: in `within`, the transaction of the change it records, so
        that both commit or neither does; without one (a refusal, a change outside the database),
        in a transaction of its own."""
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            row = await connection.fetchrow(
                _INSERT_SQL,
                new_event_id(),
                record.actor.key_id,
                record.actor.name,
                record.actor.address,
                record.action,
                record.object_type,
                record.object_id,
                record.outcome,
                text_list(record.cities),
                text_list(record.domains),
                record.detail,
            )
            assert row is not None
            entry = _entry(row)
            await insert_events(connection, [audit_event(entry)])
        return entry

    async def page(
        self,
        query: AuditQuery,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        *,
        before: int | None,
        limit: int,
    ) -> list[AuditEntry]:
        """Entries matching `query` within the reader's `cities` and `domains`, newest first."""
        rows = await self._pool.fetch(
            _PAGE_SQL,
            text_list(cities),
            text_list(domains),
            text_list(query.actions),
            query.actor_key_id,
            query.settings_key,
            query.object_type,
            query.object_id,
            query.outcome,
            query.since,
            query.until,
            before,
            limit,
        )
        return [_entry(r) for r in rows]

    async def forget(self, *, older_than_days: float) -> int:
        """Remove entries older than the log keeps; returns how many."""
        async with self._pool.guard():
            status = await self._pool.pool.execute(
                "DELETE FROM audit_log WHERE at < now() - make_interval(days => 1) * $1", older_than_days
            )
        return int(status.rsplit(" ", 1)[-1])
