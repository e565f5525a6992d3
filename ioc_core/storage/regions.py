"""Regions: named groups of cities (the Red River delta's growth triangle, say), for regional
summaries and region-scoped keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ioc_core.errors import NotFoundError
from ioc_core.storage.pool import Pool, Transaction

_COLUMNS = "id, name_vi, name_en, cities, created_at, updated_at"


@dataclass(frozen=True, slots=True)
class Region:
    id: str
    name_vi: str
    name_en: str | None
    cities: list[str]
    created_at: datetime
    updated_at: datetime


def _region_of(row: asyncpg.Record) -> Region:
    return Region(**{name: row[name] for name in _COLUMNS.split(", ")})


class RegionStore:
    """Every query about regions, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def put(
        self,
        region_id: str,
        *,
        name_vi: str,
        name_en: str | None,
        cities: Sequence[str],
        within: Transaction | None = None,
    ) -> tuple[Region, bool]:
        """Store a region, replacing one of the same id; says whether it is new."""
        async with self._pool.joined(within) as transaction:
            row = await transaction.connection.fetchrow(
                "INSERT INTO regions AS r (id, name_vi, name_en, cities) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (id) DO UPDATE SET name_vi = excluded.name_vi, name_en = excluded.name_en,"
                " cities = excluded.cities, updated_at = now()"
                f" RETURNING {_COLUMNS}, (xmax = 0) AS created",
                region_id,
                name_vi,
                name_en,
                sorted(set(cities)),
            )
        assert row is not None
        return _region_of(row), row["created"]

    async def get(self, region_id: str) -> Region:
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM regions WHERE id = $1", region_id)
        if row is None:
            raise NotFoundError(f"region {region_id!r} not found")
        return _region_of(row)

    async def all(self) -> list[Region]:
        return [
            _region_of(row) for row in await self._pool.fetch(f"SELECT {_COLUMNS} FROM regions ORDER BY id")
        ]

    async def delete(self, region_id: str, *, within: Transaction | None = None) -> Region:
        """Remove a region; keys scoped to it alone see nothing from then on."""
        async with self._pool.joined(within) as transaction:
            row = await transaction.connection.fetchrow(
                f"DELETE FROM regions WHERE id = $1 RETURNING {_COLUMNS}", region_id
            )
        if row is None:
            raise NotFoundError(f"region {region_id!r} not found")
        return _region_of(row)

    async def missing(self, region_ids: Sequence[str]) -> list[str]:
        """Which of `region_ids` are not regions."""
        rows = await self._pool.fetch("SELECT id FROM regions WHERE id = ANY($1::text[])", list(region_ids))
        known = {row["id"] for row in rows}
        return [r for r in region_ids if r not in known]

    async def cities_of(self, region_ids: Sequence[str]) -> list[str]:
        """The cities of the regions named, together."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT c FROM regions r, unnest(r.cities) AS c WHERE r.id = ANY($1::text[]) ORDER BY c",
            list(region_ids),
        )
        return [row["c"] for row in rows]
