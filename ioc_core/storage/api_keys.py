"""API keys: creating, looking up (by digest, for authentication), listing and revoking them."""

from __future__ import annotations

from collections.abc import Sequence

from ioc_core.errors import NotFoundError
from ioc_core.storage import views
from ioc_core.storage.pool import Pool, Transaction, text_list


class ApiKeyStore:
    """Every query about API keys, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def create(
        self,
        *,
        key_id: str,
        name: str | None,
        role: str,
        cities: Sequence[str] | None,
        domains: Sequence[str] | None,
        key_hash: bytes,
        created_by: str,
        regions: Sequence[str] | None = None,
        areas: Sequence[str] | None = None,
        within: Transaction | None = None,
    ) -> views.ApiKeyRow:
        """Store a new key; in `within` when given (see `Pool.joined`)."""
        async with self._pool.joined(within) as transaction:
            row = await transaction.connection.fetchrow(
                "INSERT INTO api_keys (id, name, role, cities, domains, key_hash, created_by, regions, areas)"
                f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {views.API_KEY_COLUMNS}",
                key_id,
                name,
                role,
                text_list(cities),
                text_list(domains),
                key_hash,
                created_by,
                text_list(regions),
                text_list(areas),
            )
        assert row is not None
        return views.ApiKeyRow(**dict(row))

    async def by_hash(self, key_hash: bytes) -> views.ApiKeyRow | None:
        """The live (not revoked) key with this digest, its regions' cities among its `cities`."""
        row = await self._pool.fetchrow(
            f"SELECT {views.EFFECTIVE_KEY_COLUMNS} FROM api_keys k"
            " WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
            key_hash,
        )
        return views.ApiKeyRow(**dict(row)) if row is not None else None

    async def page(
        self, cities: Sequence[str] | None, domains: Sequence[str] | None, *, after: str | None, limit: int
    ) -> list[views.ApiKeyRow]:
        """Keys whose scope lies within `cities` and `domains` (None = no limit), in id order."""
        rows = await self._pool.fetch(
            f"SELECT {views.API_KEY_COLUMNS} FROM api_keys"
            " WHERE ($1::text[] IS NULL OR cities <@ $1) AND ($2::text[] IS NULL OR domains <@ $2)"
            " AND ($3::text IS NULL OR id > $3) ORDER BY id LIMIT $4",
            text_list(cities),
            text_list(domains),
            after,
            limit,
        )
        return [views.ApiKeyRow(**dict(r)) for r in rows]

    async def get(self, key_id: str) -> views.ApiKeyRow:
        row = await self._pool.fetchrow(f"SELECT {views.API_KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id)
        if row is None:
            raise NotFoundError(f"API key {key_id!r} not found")
        return views.ApiKeyRow(**dict(row))

    async def revoke(self, key_id: str, *, within: Transaction | None = None) -> views.ApiKeyRow:
        """Revoke a key (again: no change); it stops working within the API's key cache time."""
        async with self._pool.joined(within) as transaction:
            row = await transaction.connection.fetchrow(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1"
                f" RETURNING {views.API_KEY_COLUMNS}",
                key_id,
            )
        if row is None:
            raise NotFoundError(f"API key {key_id!r} not found")
        return views.ApiKeyRow(**dict(row))
