"""Copies of messages already stored, told apart from new readings before they are written.

Only readings stamped with their receive time are judged here (the others are de-duplicated by
their (device, ts) row); see `first_copies`. The de-duplication windows it remembers are
forgotten by `forget_expired`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from ioc_core.storage.pool import Connection
from ioc_core.telemetry import Reading

# The (device, seq, digest) keys of this batch that are new, or last seen longer ago than the
# window ($5 s): their readings are stored. An entry remembered before digests were (digest 0)
# stands for any values until it expires.
_REMEMBER_SEQS_SQL = """
INSERT INTO reading_seqs AS r (device_id, seq, digest, ts)
SELECT u.device_id, u.seq, u.digest, u.ts
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[]) AS u (device_id, seq, digest, ts)
WHERE NOT EXISTS (
    SELECT 1 FROM reading_seqs l
    WHERE l.device_id = u.device_id AND l.seq = u.seq AND l.digest = 0
      AND l.ts >= u.ts - make_interval(secs => $5)
)
ON CONFLICT (device_id, seq, digest) DO UPDATE SET ts = excluded.ts
    WHERE r.ts < excluded.ts - make_interval(secs => $5)
RETURNING device_id, seq, digest
"""

# First deliveries (no DUP flag) are always stored and remembered, so that a copy can be known.
_REMEMBER_DELIVERIES_SQL = """
INSERT INTO reading_deliveries AS r (device_id, packet_id, digest, received_at)
SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::timestamptz[])
ON CONFLICT (device_id, packet_id, digest) DO UPDATE
    SET received_at = GREATEST(r.received_at, excluded.received_at)
"""

# Redelivered copies (DUP flag): stored only when no delivery with the same packet id and values
# was received within the window ($5 s); those returned are stored.
_REDELIVERIES_SQL = """
INSERT INTO reading_deliveries AS r (device_id, packet_id, digest, received_at)
SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::timestamptz[])
ON CONFLICT (device_id, packet_id, digest) DO UPDATE SET received_at = excluded.received_at
    WHERE r.received_at < excluded.received_at - make_interval(secs => $5)
RETURNING device_id, packet_id, digest
"""

_Key = tuple[str, int, int]


@dataclass
class _Judged:
    """What the batch itself tells of its readings, before the database is asked."""

    keep: list[bool]
    # (device, seq, digest) -> the first reading of the batch with it.
    by_seq: dict[_Key, int] = field(default_factory=dict)
    # (device, packet id, digest) -> latest receive time of its first deliveries in the batch.
    first_deliveries: dict[_Key, datetime] = field(default_factory=dict)
    # (device, packet id, digest) -> the redelivered copy standing for those of the batch.
    redeliveries: dict[_Key, int] = field(default_factory=dict)


def _judge_batch(readings: Sequence[Reading]) -> _Judged:
    """Copies within the batch: of readings with one (device, seq, values) the first stands for
    the others; of flagged copies of one (device, packet id, values) the first stands for the
    others, and none is kept beside a first delivery in the batch."""
    judged = _Judged(keep=[True] * len(readings))
    by_delivery: dict[_Key, list[int]] = {}
    for index, reading in enumerate(readings):
        if reading.device_time:
            continue
        if reading.seq is not None:
            key = (reading.device_id, reading.seq, reading.content_digest())
            if key in judged.by_seq:
                judged.keep[index] = False
            else:
                judged.by_seq[key] = index
        elif reading.packet_id is not None:
            key = (reading.device_id, reading.packet_id, reading.content_digest())
            by_delivery.setdefault(key, []).append(index)
    for key, indices in by_delivery.items():
        originals = [i for i in indices if not readings[i].redelivered]
        if originals:
            # A flagged copy beside a first delivery with its packet id and values is its copy.
            judged.first_deliveries[key] = max(readings[i].received_at for i in originals)
            for index in indices:
                judged.keep[index] = not readings[index].redelivered
        else:
            judged.redeliveries[key] = indices[0]
            for index in indices[1:]:
                judged.keep[index] = False
    return judged


async def first_copies(connection: Connection, readings: Sequence[Reading], window_s: float) -> list[bool]:
    """Which readings to store, leaving out copies of messages already stored. Only readings
    stamped with their receive time are judged here (the others are de-duplicated by their
    (device, ts) row):

    - with a `seq`: the same device, `seq` and values within the window is a copy (a broker's
      redelivery, a device's own retransmission, a replayed bus record); a device that restarted
      its `seq` sends other values and is stored. The first of a batch stands for its copies.
    - without a `seq`, delivered at QoS 1 or 2: a message the broker flags as redelivered (DUP)
      with the packet id and values of a delivery received within the window is a copy. Messages
      without the flag are always stored, so a device that reports the same values every few
      minutes keeps every report.
    """
    judged = _judge_batch(readings)
    keep = judged.keep
    if judged.by_seq:
        ts = [readings[i].ts for i in judged.by_seq.values()]
        accepted = await _accepted(connection, _REMEMBER_SEQS_SQL, judged.by_seq, ts, window_s)
        for key, index in judged.by_seq.items():
            keep[index] = key in accepted
    if judged.first_deliveries:
        first = judged.first_deliveries
        await connection.execute(
            _REMEMBER_DELIVERIES_SQL,
            [k[0] for k in first],
            [k[1] for k in first],
            [k[2] for k in first],
            list(first.values()),
        )
    if judged.redeliveries:
        copies = judged.redeliveries
        received = [readings[i].received_at for i in copies.values()]
        accepted = await _accepted(connection, _REDELIVERIES_SQL, copies, received, window_s)
        for key, index in copies.items():
            keep[index] = key in accepted
    return keep


async def _accepted(
    connection: Connection, sql: str, keys: dict[_Key, int], times: list[datetime], window_s: float
) -> set[_Key]:
    """Remember `keys` (with their times) through `sql`; the keys it returns are to be stored."""
    rows = await connection.fetch(
        sql, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], times, window_s
    )
    return {(row[0], row[1], row[2]) for row in rows}


async def forget_expired(connection: Connection | asyncpg.Pool, window_s: float) -> None:
    """Forget the remembered sequence numbers and deliveries older than the window."""
    await connection.execute(
        "DELETE FROM reading_seqs WHERE ts < now() - make_interval(secs => $1)", window_s
    )
    await connection.execute(
        "DELETE FROM reading_deliveries WHERE received_at < now() - make_interval(secs => $1)",
        window_s,
    )
