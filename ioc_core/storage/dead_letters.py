"""Dead letters: messages the system could not use, kept with the reason for operators to read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel

from ioc_core.storage.pool import Connection, Pool
from ioc_core.telemetry import StoredDeadLetter

_INSERT_DEAD_LETTERS_SQL = """
INSERT INTO dead_letters (source, received_at, topic, reason, detail, payload, payload_size)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::integer[])
ON CONFLICT (source) DO NOTHING
"""


class DeadLetterRow(BaseModel):
    id: int
    received_at: datetime
    topic: str
    reason: str
    detail: str
    payload: str
    payload_size: int


async def insert_dead_letters(connection: Connection, letters: Sequence[StoredDeadLetter]) -> None:
    """Store dead letters in the caller's transaction; one already stored (same source) is skipped."""
    if not letters:
        return
    await connection.execute(
        _INSERT_DEAD_LETTERS_SQL,
        [d.source for d in letters],
        [d.received_at for d in letters],
        [d.topic for d in letters],
        [d.reason for d in letters],
        [d.detail for d in letters],
        [d.payload.replace("\x00", "\ufffd") for d in letters],
        [d.payload_size for d in letters],
    )


class DeadLetterStore:
    """Reading the dead letters, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def page(
        self, *, limit: int, before_id: int | None = None, reason: str | None = None
    ) -> list[DeadLetterRow]:
        rows = await self._pool.fetch(
            "SELECT id, received_at, topic, reason, detail, payload, payload_size FROM dead_letters"
            " WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR reason = $2)"
            " ORDER BY id DESC LIMIT $3",
            before_id,
            reason,
            limit,
        )
        return [DeadLetterRow(**dict(r)) for r in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._pool.fetch("SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason")
        return {r["reason"]: r["n"] for r in rows}
