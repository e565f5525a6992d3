"""Dead letters in the database: letters stored before payloads were kept whole are upgraded by the
migration (the device their topic names, and their payload where the text holds it exactly), and
letters past the retention are pruned, by the store and by a running processor's job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from ioc_core.storage import Database
from ioc_core.storage.dead_letters import insert_dead_letters
from ioc_core.telemetry import StoredDeadLetter
from tests.integration import harness
from tests.integration.conftest import POSTGRES_URL, migrate_to, scratch_database
from tests.integration.harness import ComponentProcess, delete_topics, unique, wait_until

_REPLAYABLE_VERSION = 14

_OLD_INSERT = (
    "INSERT INTO dead_letters (source, received_at, topic, reason, detail, payload, payload_size)"
    " VALUES ($1, now(), $2, $3, 'd', $4, $5)"
)


async def test_letters_stored_before_are_upgraded_by_the_migration() -> None:
    async with scratch_database(POSTGRES_URL) as url:
        connection = await asyncpg.connect(url)
        try:
            # The schema as the release before replayable dead letters left it.
            await migrate_to(connection, _REPLAYABLE_VERSION)
            topic = "ioc/v1/ha-noi/flood/hn-flood-old/telemetry"
            exact = '{"currentLevel": 1.5, "ghi_chú": "mưa"}'
            rows = [
                ("a", topic, "unknown_device", exact, len(exact.encode())),
                ("b", topic, "malformed_payload", '{"currentLevel": \ufffd}', 21),  # was not UTF-8
                ("c", topic, "payload_too_large", "x" * 4096, 70_000),  # cut
                ("d", "ioc/v1/ha-noi/rivers/hn-flood-old/telemetry", "bad_topic", "{}", 2),
                ("e", "ioc.telemetry.flood/0@7", "malformed_payload", "{}", 2),  # the processor's own
            ]
            for row in rows:
                await connection.execute(_OLD_INSERT, *row)
        finally:
            await connection.close()
        async with Database(url, max_size=2) as database:
            await database.migrate()
            listed = await database.dead_letters.page(limit=10)
            by_source = {
                r["source"]: r
                for r in await database.pool.fetch("SELECT source, device_id, raw FROM dead_letters")
            }
        assert len(listed) == 5 and all(row.replayed_at is None for row in listed)
        assert {s: r["device_id"] for s, r in by_source.items()} == {
            "a": "hn-flood-old",
            "b": "hn-flood-old",
            "c": "hn-flood-old",
            "d": "hn-flood-old",
            "e": None,
        }
        assert bytes(by_source["a"]["raw"]) == exact.encode()
        assert all(by_source[s]["raw"] is None for s in "bc")
        assert bytes(by_source["d"]["raw"]) == b"{}"


def letter(source: str, received_at: datetime) -> StoredDeadLetter:
    return StoredDeadLetter(
        source=source,
        reason="unknown_device",
        detail="d",
        topic=f"ioc/v1/ha-noi/flood/{source}/telemetry",
        received_at=received_at,
        payload="{}",
        payload_size=2,
        raw=b"{}",
        device_id=source,
        mqtt={"qos": 1, "retain": False, "dup": False, "packet_id": 3},
    )


async def test_the_store_prunes_letters_older_than_the_retention(fresh_database: Database) -> None:
    now = datetime.now(UTC)
    async with fresh_database.transaction() as transaction:
        await insert_dead_letters(
            transaction.connection,
            [letter("old", now - timedelta(days=15)), letter("recent", now - timedelta(days=13))],
        )
    assert await fresh_database.dead_letters.prune(timedelta(days=14)) == 1
    assert [row.device_id for row in await fresh_database.dead_letters.page(limit=10)] == ["recent"]
    assert await fresh_database.dead_letters.prune(timedelta(days=14)) == 0


async def test_a_running_processor_prunes_old_letters(log_dir: Path) -> None:
    run = unique("dlprune")
    async with scratch_database(POSTGRES_URL) as url, Database(url, max_size=2) as database:
        await database.migrate()
        now = datetime.now(UTC)
        async with database.transaction() as transaction:
            await insert_dead_letters(
                transaction.connection,
                [letter("stale", now - timedelta(days=3)), letter("fresh", now - timedelta(hours=1))],
            )
        env = harness.test_env(
            IOC_DATABASE_URL=url,
            IOC_TOPIC_PREFIX=f"{run}.",
            IOC_PROCESSOR_GROUP_ID=f"ioc-processor-{run}",
            IOC_DEAD_LETTER_RETENTION_DAYS="2",
            IOC_RETENTION_CHECK_S="0.5",
            IOC_WEBHOOK_WORKER="false",
        )
        processor = ComponentProcess("processor", env, log_dir, name=f"processor-{run}")
        processor.start()
        try:

            async def pruned() -> list[str | None] | None:
                rows = await database.dead_letters.page(limit=10)
                return [row.device_id for row in rows] if len(rows) == 1 else None

            remaining = await wait_until(pruned, timeout=60, what="the stale letter pruned by the processor")
            assert remaining == ["fresh"]
        finally:
            processor.stop()
            await delete_topics(f"{run}.")
