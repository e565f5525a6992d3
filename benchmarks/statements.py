"""Where a benchmark run's database time goes: pg_stat_statements counted afresh for the run's
database, then its costliest statements per 1,000 readings (time, WAL, full-page images) and the
readings insert path's share. Needs the server to load pg_stat_statements (the TimescaleDB of
`make services` does); without it the run simply has no database figures."""

from __future__ import annotations

from typing import Any

import asyncpg

_THIS_DATABASE = "(SELECT oid FROM pg_database WHERE datname = current_database())"


async def reset_statement_costs(url: str) -> bool:
    """Start counting the run's statements afresh (pg_stat_statements, when the server loads it)."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await connection.execute(f"SELECT pg_stat_statements_reset(0, {_THIS_DATABASE}, 0)")
    except asyncpg.PostgresError:
        return False
    finally:
        await connection.close()
    return True


async def statement_costs(url: str, readings: int, top: int = 8) -> dict[str, Any]:
    """The run database's statements since the reset: the costliest, each with its time and the
    WAL it wrote per 1,000 readings, and what share of all statement time the readings' insert
    path (staging COPY, the move into the hypertable, the copies check) took."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT query, calls, total_exec_time, wal_bytes, wal_fpi FROM pg_stat_statements"
            f" WHERE dbid = {_THIS_DATABASE} ORDER BY total_exec_time DESC"
        )
    finally:
        await connection.close()
    total_ms = sum(row["total_exec_time"] for row in rows) or 1e-9
    per_1000 = 1000 / max(readings, 1)

    def label(query: str) -> str:
        return " ".join(query.split())[:90]

    insert_path = sum(
        row["total_exec_time"]
        for row in rows
        if any(marker in row["query"] for marker in ("COPY", "INSERT INTO readings_", "reading_seqs"))
    )
    return {
        "ms_per_1000": round(total_ms * per_1000, 1),
        "wal_kib_per_1000": round(sum(float(r["wal_bytes"]) for r in rows) * per_1000 / 1024, 1),
        "full_page_images_per_1000": round(sum(r["wal_fpi"] for r in rows) * per_1000, 1),
        "readings_insert_share": round(insert_path / total_ms, 2),
        "top": [
            {
                "statement": label(row["query"]),
                "calls": row["calls"],
                "ms_per_1000": round(row["total_exec_time"] * per_1000, 2),
                "share": round(row["total_exec_time"] / total_ms, 3),
                "wal_kib_per_1000": round(float(row["wal_bytes"]) * per_1000 / 1024, 1),
                "fpi_per_1000": round(row["wal_fpi"] * per_1000, 1),
            }
            for row in rows[:top]
        ],
    }
