"""Agencies: the records incidents are assigned to (name, the domains, cities and areas they
answer for, the webhook endpoints told of their assignments and the one told of escalations)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from ioc_core.errors import ConflictError, NotFoundError, ValidationError
from ioc_core.incidents import Agency, AgencyFields, AgencyIn
from ioc_core.storage.pool import Connection, Pool, Transaction, text_list

_AGENCY_COLUMNS = """
    id, name_vi, name_en, domains, cities, areas, webhook_ids, escalation_webhook_id, escalation_contact,
    created_by, created_at, updated_at
"""

# The fields a change may set, in the order of the UPDATE's parameters.
_FIELDS = (
    "name_vi",
    "name_en",
    "domains",
    "cities",
    "areas",
    "webhook_ids",
    "escalation_webhook_id",
    "escalation_contact",
)


def _agency(row: asyncpg.Record) -> Agency:
    values = dict(row)
    values["webhook_ids"] = list(values["webhook_ids"] or [])
    return Agency(**values)


async def _check_endpoints(connection: Connection, fields: AgencyFields) -> None:
    """Every webhook endpoint the agency names exists."""
    named = set(fields.webhook_ids or [])
    if fields.escalation_webhook_id is not None:
        named.add(fields.escalation_webhook_id)
    if not named:
        return
    rows = await connection.fetch(
        "SELECT id FROM webhook_endpoints WHERE id = ANY($1::text[])", sorted(named)
    )
    missing = sorted(named - {r["id"] for r in rows})
    if missing:
        raise ValidationError(f"webhook endpoints {missing} not found (see /v1/webhooks)")


class AgencyStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def create(self, body: AgencyIn, *, actor: str, within: Transaction | None = None) -> Agency:
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            await _check_endpoints(connection, body)
            row = await connection.fetchrow(
                f"INSERT INTO agencies (id, {', '.join(_FIELDS)}, created_by)"
                " VALUES ($1, $2, $3, $4, $5, $6, coalesce($7::text[], '{}'), $8, $9, $10)"
                f" ON CONFLICT (id) DO NOTHING RETURNING {_AGENCY_COLUMNS}",
                body.id,
                *(getattr(body, f) for f in _FIELDS),
                actor,
            )
            if row is None:
                raise ConflictError(f"agency {body.id!r} already exists")
            return _agency(row)

    async def page(
        self, *, limit: int, after: str | None = None, domains: Sequence[str] | None = None
    ) -> list[Agency]:
        """Agencies by id; `domains`: those answering for one of them (or for every domain)."""
        rows = await self._pool.fetch(
            f"SELECT {_AGENCY_COLUMNS} FROM agencies WHERE ($1::text IS NULL OR id > $1)"
            " AND ($2::text[] IS NULL OR domains IS NULL OR domains && $2) ORDER BY id LIMIT $3",
            after,
            text_list(domains),
            limit,
        )
        return [_agency(r) for r in rows]

    async def get(self, agency_id: str) -> Agency:
        row = await self._pool.fetchrow(f"SELECT {_AGENCY_COLUMNS} FROM agencies WHERE id = $1", agency_id)
        if row is None:
            raise NotFoundError(f"agency {agency_id!r} not found")
        return _agency(row)

    async def update(
        self, agency_id: str, change: AgencyFields, *, within: Transaction | None = None
    ) -> Agency:
        """Set the fields `change` names (an explicit null clears an optional one)."""
        given = change.model_fields_set & set(_FIELDS)
        if "name_vi" in given and change.name_vi is None:
            raise ValidationError("name_vi cannot be cleared")
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            await _check_endpoints(connection, change)
            assignments = ", ".join(
                f"{f} = " + ("coalesce($%d::text[], '{}')" if f == "webhook_ids" else "$%d") % (i + 2)
                for i, f in enumerate(sorted(given))
            )
            row = await connection.fetchrow(
                f"UPDATE agencies SET {assignments + ', ' if assignments else ''}updated_at = now()"
                f" WHERE id = $1 RETURNING {_AGENCY_COLUMNS}",
                agency_id,
                *(getattr(change, f) for f in sorted(given)),
            )
            if row is None:
                raise NotFoundError(f"agency {agency_id!r} not found")
            return _agency(row)

    async def delete(self, agency_id: str, *, within: Transaction | None = None) -> None:
        """Remove the agency; its incidents are left unassigned."""
        async with self._pool.joined(within) as transaction:
            removed = await transaction.connection.fetchval(
                "DELETE FROM agencies WHERE id = $1 RETURNING id", agency_id
            )
            if removed is None:
                raise NotFoundError(f"agency {agency_id!r} not found")
