"""Detector state in the database: kept as the JSON text the processor writes (not jsonb, whose
parsing and pglz compression of every device's state on every batch was over half the database's
time at 100,000 devices), compressed with lz4 when a document passes 2 KB; states stored as jsonb
by the release before are read back unchanged after the migration."""

from __future__ import annotations

import json

import asyncpg
import orjson

from ioc_core.storage import Database
from tests.integration.conftest import POSTGRES_URL, migrate_to, scratch_database

_TEXT_STATE_VERSION = 18

# A state as detection leaves it: a daily profile of 48 hours per metric is most of it.
_STATE = {
    "version": 2,
    "last_ts": "2026-12-07T10:00:00+00:00",
    "metrics": {
        name: {
            "last": 41.25,
            "last_at": 1796637600000,
            "baseline": [1000, 40.123456789012345, -0.01, 2.5, 0, 0.0, 1.5, 7.25],
            "daily": [[40.0 + hour / 7 for hour in range(48)], 1796000000000, 0.25, 2.0],
        }
        for name in ("intensity", "averageVehicleSpeed", "occupancy")
    },
}


async def test_states_stored_as_jsonb_are_read_back_after_the_migration_and_new_ones_kept_as_text() -> None:
    async with scratch_database(POSTGRES_URL) as url:
        connection = await asyncpg.connect(url)
        try:
            await migrate_to(connection, _TEXT_STATE_VERSION)
            for device_id in ("old-1", "new-1"):
                await connection.execute(
                    "INSERT INTO devices (id, city, domain, lat, lon)"
                    " VALUES ($1, 'ha-noi', 'traffic', 21.0, 105.8)",
                    device_id,
                )
            await connection.execute(
                "INSERT INTO detector_state (device_id, state) VALUES ('old-1', $1::jsonb)",
                json.dumps(_STATE),
            )
        finally:
            await connection.close()
        async with Database(url, max_size=2) as database:
            await database.migrate()
            async with database.transaction() as transaction:
                assert await transaction.detector_states(["old-1", "new-1"]) == {"old-1": _STATE}
                document = orjson.dumps(_STATE).decode()
                await transaction.save_detector_states({"new-1": document}, {})
            async with database.transaction() as transaction:
                states = await transaction.detector_states(["old-1", "new-1"])
            assert states == {"old-1": _STATE, "new-1": _STATE}
            column = await database.pool.fetchrow(
                "SELECT format_type(atttypid, atttypmod) AS type, attcompression::text AS compression"
                " FROM pg_attribute WHERE attrelid = 'detector_state'::regclass AND attname = 'state'"
            )
            assert (column["type"], column["compression"]) == ("text", "l")
            stored = await database.pool.fetchrow(
                "SELECT state, pg_column_compression(state) AS compression FROM detector_state"
                " WHERE device_id = 'new-1'"
            )
            # Byte for byte what the processor wrote, compressed with lz4 past 2 KB.
            assert stored["state"] == document and len(document) > 2048
            assert stored["compression"] == "lz4"
