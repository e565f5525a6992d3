"""Dead letters: messages the system could not use, kept with the reason for operators to read,
with their payload byte for byte so that they can be replayed once, and pruned after a retention.

Replay is a unit of work: the letters are claimed (`claim_for_replay` locks their rows), sent
back into the pipeline by the caller, then marked replayed in the same transaction. A second
replay of the same letters, even a concurrent one, waits for the first and then finds them
replayed (PostgreSQL checks `replayed_at IS NULL` again on the row it waited for)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from ioc_core.errors import NotFoundError, ValidationError
from ioc_core.storage.pool import Connection, Pool, Transaction
from ioc_core.telemetry import StoredDeadLetter

log = logging.getLogger(__name__)

_INSERT_DEAD_LETTERS_SQL = """
INSERT INTO dead_letters (source, received_at, topic, reason, detail, payload, payload_size, raw, device_id,
                          mqtt)
SELECT u.source, u.received_at, u.topic, u.reason, u.detail, u.payload, u.payload_size, u.raw, u.device_id,
       u.mqtt::jsonb
FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], $7::integer[],
            $8::bytea[], $9::text[], $10::text[])
     AS u (source, received_at, topic, reason, detail, payload, payload_size, raw, device_id, mqtt)
ON CONFLICT (source) DO NOTHING
"""

_COLUMNS = (
    "id, received_at, topic, reason, detail, payload, payload_size, device_id, replayed_at,"
    " replay_attempted_at, replay_reason, replay_detail,"
    " raw IS NOT NULL AND octet_length(raw) = payload_size AS replayable"
)

# What a replay needs of a letter. Only letters whose whole payload is kept are taken: one cut at
# the limit (`payload_too_large`) would be refused again, and one without its bytes cannot be
# sent as it was.
_REPLAY_COLUMNS = "id, topic, reason, received_at, raw, mqtt"
_REPLAYABLE = "replayed_at IS NULL AND raw IS NOT NULL AND octet_length(raw) = payload_size"

_FILTERS = (
    " AND ($1::text IS NULL OR device_id = $1) AND ($2::text IS NULL OR reason = $2)"
    " AND ($3::text IS NULL OR topic = $3) AND ($4::timestamptz IS NULL OR received_at >= $4)"
    " AND ($5::timestamptz IS NULL OR received_at < $5)"
)

# Rows one retention statement deletes: each statement stays short, whatever has piled up.
_PRUNE_BATCH = 10_000


class DeadLetterRow(BaseModel):
    id: int
    received_at: datetime
    topic: str
    reason: str
    detail: str
    payload: str
    payload_size: int
    device_id: str | None = None
    replayed_at: datetime | None = None
    replay_attempted_at: datetime | None = None
    replay_reason: str | None = None
    replay_detail: str | None = None
    replayable: bool = False


class DeadLetterDetail(DeadLetterRow):
    """One letter with its payload's bytes (None: not known exactly) and delivery flags."""

    raw: bytes | None = None
    mqtt: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which letters: each field None matches every letter; `received_from` is inclusive,
    `received_to` exclusive."""

    device_id: str | None = None
    reason: str | None = None
    topic: str | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None

    def args(self) -> tuple[Any, ...]:
        return (self.device_id, self.reason, self.topic, self.received_from, self.received_to)


@dataclass(frozen=True, slots=True)
class ReplayCandidate:
    """A letter claimed for a replay: its message as the gateway received it."""

    id: int
    topic: str
    reason: str
    received_at: datetime
    raw: bytes
    mqtt: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ReplayRefusal:
    """A claimed letter that validation refused again, with why."""

    id: int
    reason: str
    detail: str


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
        [d.raw for d in letters],
        [d.device_id for d in letters],
        [json.dumps(d.mqtt) if d.mqtt is not None else None for d in letters],
    )


def _candidate(row: Any) -> ReplayCandidate:
    return ReplayCandidate(
        id=row["id"],
        topic=row["topic"],
        reason=row["reason"],
        received_at=row["received_at"],
        raw=bytes(row["raw"]),
        mqtt=row["mqtt"],
    )


class DeadLetterStore:
    """Reading, replaying and pruning the dead letters, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def page(
        self,
        *,
        limit: int,
        before_id: int | None = None,
        reason: str | None = None,
        device_id: str | None = None,
        topic: str | None = None,
        replayed: bool | None = None,
    ) -> list[DeadLetterRow]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM dead_letters"
            " WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR reason = $2)"
            " AND ($3::text IS NULL OR device_id = $3) AND ($4::text IS NULL OR topic = $4)"
            " AND ($5::boolean IS NULL OR (replayed_at IS NOT NULL) = $5)"
            " ORDER BY id DESC LIMIT $6",
            before_id,
            reason,
            device_id,
            topic,
            replayed,
            limit,
        )
        return [DeadLetterRow(**dict(r)) for r in rows]

    async def get(self, letter_id: int) -> DeadLetterDetail:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS}, raw, mqtt FROM dead_letters WHERE id = $1", letter_id
        )
        if row is None:
            raise NotFoundError(f"dead letter {letter_id} not found")
        return DeadLetterDetail(**{**dict(row), "raw": None if row["raw"] is None else bytes(row["raw"])})

    async def counts(self) -> dict[str, int]:
        rows = await self._pool.fetch("SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason")
        return {r["reason"]: r["n"] for r in rows}

    async def claim_one_for_replay(self, letter_id: int, *, within: Transaction) -> list[ReplayCandidate]:
        """Lock one letter for a replay in the caller's transaction: itself when it can be replayed,
        nothing when it was replayed already (or its payload is not kept whole); `NotFoundError`
        when there is no such letter."""
        row = await within.connection.fetchrow(
            f"SELECT {_REPLAY_COLUMNS}, {_REPLAYABLE} AS open FROM dead_letters WHERE id = $1 FOR UPDATE",
            letter_id,
        )
        if row is None:
            raise NotFoundError(f"dead letter {letter_id} not found")
        return [_candidate(row)] if row["open"] else []

    async def claim_for_replay(
        self, selection: DeadLetterFilter, *, after_id: int | None, limit: int, within: Transaction
    ) -> list[ReplayCandidate]:
        """Lock, in the caller's transaction, up to `limit` letters of `selection` not replayed yet,
        oldest first (a device's readings go back in the order they came), after `after_id`. Two
        claims of the same letters wait for each other: the second finds the first's replayed
        (and so may return fewer than `limit` letters although more remain)."""
        if limit < 1:
            raise ValidationError(f"a replay takes at least one letter, not {limit}")
        rows = await within.connection.fetch(
            f"SELECT {_REPLAY_COLUMNS} FROM dead_letters WHERE {_REPLAYABLE}{_FILTERS}"
            " AND ($6::bigint IS NULL OR id > $6) ORDER BY id LIMIT $7 FOR UPDATE",
            *selection.args(),
            after_id,
            limit,
        )
        return [_candidate(row) for row in rows]

    async def finish_replay(
        self, replayed: Sequence[int], refused: Sequence[ReplayRefusal], *, within: Transaction
    ) -> None:
        """Mark claimed letters replayed (never again), and note why the others were refused; in
        the caller's transaction, which commits once what they became is on the bus."""
        connection = within.connection
        if replayed:
            await connection.execute(
                "UPDATE dead_letters SET replayed_at = now(), replay_attempted_at = now(),"
                " replay_reason = NULL, replay_detail = NULL WHERE id = ANY($1::bigint[])",
                list(replayed),
            )
        if refused:
            await connection.execute(
                "UPDATE dead_letters d SET replay_attempted_at = now(), replay_reason = u.reason,"
                " replay_detail = u.detail"
                " FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u (id, reason, detail)"
                " WHERE d.id = u.id",
                [r.id for r in refused],
                [r.reason[:64] for r in refused],
                [r.detail[:1000] for r in refused],
            )

    async def prune(self, older_than: timedelta) -> int:
        """Delete the letters received longer than `older_than` ago, in short statements; how
        many went. Safe beside another process doing the same."""
        if older_than <= timedelta(0):
            raise ValidationError(f"dead-letter retention must be positive, not {older_than}")
        removed = 0
        while True:
            async with self._pool.guard():
                status = await self._pool.pool.execute(
                    "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                    " WHERE received_at < now() - $1::interval LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    older_than,
                    _PRUNE_BATCH,
                )
            deleted = int(status.split()[-1])
            removed += deleted
            if deleted < _PRUNE_BATCH:
                break
        if removed:
            log.info("removed %d dead letters received more than %s ago", removed, older_than)
        return removed
