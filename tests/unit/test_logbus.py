"""The in-process log bus keeps the Kafka semantics the components rely on: per-key order,
commit-after-write groups that split partitions, and group-less readers that seek."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from ioc_core import logbus
from ioc_core.bus import BusConsumer, BusProducer, ensure_topics, new_admin


@pytest.fixture
def bootstrap(request: pytest.FixtureRequest) -> Any:
    name = f"memory://test-{request.node.name}"
    yield name
    logbus.forget(name)


async def test_a_keys_records_stay_in_order_on_one_partition(bootstrap: str) -> None:
    await ensure_topics(bootstrap, ["t"], partitions=4)
    async with BusProducer(bootstrap) as producer:
        for n in range(50):
            for key in ("a", "b", "c"):
                await producer.send_and_wait("t", f"{key}{n}".encode(), key=key)
    reader = logbus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", p) for p in range(4)])
    batch = await reader.getmany(timeout_ms=100, max_records=10_000)
    by_key: dict[bytes, list[tuple[int, bytes]]] = {}
    for records in batch.values():
        for record in records:
            assert record.key is not None and record.value is not None
            by_key.setdefault(record.key, []).append((record.partition, record.value))
    for key, seen in by_key.items():
        assert len({partition for partition, _ in seen}) == 1
        assert [value for _, value in seen] == [f"{key.decode()}{n}".encode() for n in range(50)]


async def test_group_resumes_from_the_last_commit_not_from_what_it_read(bootstrap: str) -> None:
    await ensure_topics(bootstrap, ["t"], partitions=2)
    async with BusProducer(bootstrap) as producer:
        for n in range(10):
            await producer.send_and_wait("t", str(n).encode(), key=str(n))
    first = BusConsumer(bootstrap, ["t"], group_id="g")
    async with first:
        assert len(await first.getmany(timeout_ms=100)) == 10
        # Read but not committed (the rows were not stored): a restart reads them again.
    second = BusConsumer(bootstrap, ["t"], group_id="g")
    async with second:
        again = await second.getmany(timeout_ms=100)
        assert sorted(int(r.value) for r in again) == list(range(10))
        await second.commit()
        assert await second.uncommitted() == 0
    third = BusConsumer(bootstrap, ["t"], group_id="g")
    async with third:
        assert await third.getmany(timeout_ms=50) == []
        async with BusProducer(bootstrap) as producer:
            await producer.send_and_wait("t", b"new", key="x")
        assert await third.uncommitted() == 1
        assert [r.value for r in await third.getmany(timeout_ms=100)] == [b"new"]


class _Recorder(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.events: list[tuple[str, set[TopicPartition]]] = []

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.events.append(("revoked", revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.events.append(("assigned", assigned))


async def test_members_split_partitions_and_take_over_when_one_leaves(bootstrap: str) -> None:
    await ensure_topics(bootstrap, ["t"], partitions=6)
    one_listener, two_listener = _Recorder(), _Recorder()
    one = BusConsumer(bootstrap, ["t"], group_id="g", listener=one_listener)
    two = BusConsumer(bootstrap, ["t"], group_id="g", listener=two_listener)
    await one.start()
    await two.start()
    await one.getmany(timeout_ms=10)
    await two.getmany(timeout_ms=10)
    share_one = one_listener.events[-1][1]
    share_two = two_listener.events[-1][1]
    assert len(share_one) == len(share_two) == 3 and not share_one & share_two
    assert ("revoked", {TopicPartition("t", p) for p in range(6)}) in one_listener.events
    async with BusProducer(bootstrap) as producer:
        for n in range(60):
            await producer.send_and_wait("t", str(n).encode(), key=str(n))
    got_one = await one.getmany(timeout_ms=50)
    await one.commit()
    await two.stop()
    rest = await one.getmany(timeout_ms=50)
    assert one_listener.events[-1] == ("assigned", {TopicPartition("t", p) for p in range(6)})
    assert sorted(int(r.value) for r in [*got_one, *rest]) == list(range(60))
    await one.stop()


async def test_a_waiting_reader_wakes_when_a_record_arrives(bootstrap: str) -> None:
    await ensure_topics(bootstrap, ["t"], partitions=1)
    reader = logbus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="latest")
    tp = TopicPartition("t", 0)
    reader.assign([tp])
    await reader.seek_to_end(tp)

    async def produce_later() -> None:
        await asyncio.sleep(0.05)
        async with BusProducer(bootstrap) as producer:
            await producer.send_and_wait("t", b"x", key="k")

    task = asyncio.create_task(produce_later())
    loop = asyncio.get_running_loop()
    started = loop.time()
    batch = await reader.getmany(timeout_ms=5_000)
    assert loop.time() - started < 1 and [r.value for r in batch[tp]] == [b"x"]
    await task
    reader.seek(tp, 0)
    assert await reader.position(tp) == 0
    assert (await reader.end_offsets([tp]))[tp] == 1


async def test_retention_drops_the_oldest_and_readers_skip_ahead(bootstrap: str) -> None:
    log = logbus.log_for(bootstrap)
    log.retained = 5
    log.create("t", 1)
    async with BusProducer(bootstrap) as producer:
        for n in range(8):
            await producer.send_and_wait("t", str(n).encode(), key="k")
    reader = logbus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    tp = TopicPartition("t", 0)
    reader.assign([tp])
    reader.seek(tp, 0)
    batch = await reader.getmany(timeout_ms=10)
    # Trimmed back to 5 once past 5 + a tenth (at least one) of them.
    assert [r.offset for r in batch[tp]] == [2, 3, 4, 5, 6, 7]


async def test_admin_describes_creates_and_deletes(bootstrap: str) -> None:
    admin = new_admin(bootstrap)
    await admin.start()
    await ensure_topics(bootstrap, ["a", "b"], partitions=3)
    await ensure_topics(bootstrap, ["a"], partitions=3)
    assert await admin.list_topics() == ["a", "b"]
    [described] = await admin.describe_topics(["a"])
    assert [p["partition"] for p in described["partitions"]] == [0, 1, 2]
    await admin.delete_topics(["a"])
    assert await admin.list_topics() == ["b"]
    await admin.close()


# -- kept on disk -------------------------------------------------------------------------------


async def test_records_and_commits_outlive_the_process(tmp_path: Path) -> None:
    bootstrap = "memory://disk-a"
    logbus.open_log(bootstrap, tmp_path)
    await ensure_topics(bootstrap, ["t"], partitions=2)
    async with BusProducer(bootstrap) as producer:
        for n in range(20):
            await producer.send_and_wait("t", str(n).encode(), key=str(n))
    consumer = BusConsumer(bootstrap, ["t"], group_id="g")
    async with consumer:
        assert len(await consumer.getmany(timeout_ms=50)) == 20
        await consumer.commit()
    async with BusProducer(bootstrap) as producer:
        for n in range(20, 25):
            await producer.send_and_wait("t", str(n).encode(), key=str(n))
    logbus.forget(bootstrap)

    logbus.open_log(bootstrap, tmp_path)
    again = BusConsumer(bootstrap, ["t"], group_id="g")
    async with again:
        assert sorted(int(r.value) for r in await again.getmany(timeout_ms=50)) == list(range(20, 25))
    reader = logbus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", 0), TopicPartition("t", 1)])
    everything = await reader.getmany(timeout_ms=50, max_records=1000)
    assert sorted(int(r.value) for records in everything.values() for r in records) == list(range(25))
    producer = logbus.MemoryProducer(bootstrap_servers=bootstrap)
    metadata = await producer.send_and_wait("t", b"next", key=b"0")
    before = [r for records in everything.values() for r in records if r.partition == metadata.partition]
    assert metadata.offset == len(before)
    logbus.forget(bootstrap)


async def test_a_torn_last_record_is_cut_off(tmp_path: Path) -> None:
    bootstrap = "memory://disk-b"
    logbus.open_log(bootstrap, tmp_path)
    await ensure_topics(bootstrap, ["t"], partitions=1)
    async with BusProducer(bootstrap) as producer:
        for n in range(3):
            await producer.send_and_wait("t", str(n).encode(), key="k")
    logbus.forget(bootstrap)
    [segment] = (tmp_path / "topics" / "t" / "0").glob("*.log")
    with segment.open("ab") as handle:
        handle.write(b"\x00\x00\x00")  # a crash in the middle of the next record
    logbus.open_log(bootstrap, tmp_path)
    metadata = await logbus.MemoryProducer(bootstrap_servers=bootstrap).send_and_wait("t", b"3", key=b"k")
    assert metadata.offset == 3
    logbus.forget(bootstrap)
    logbus.open_log(bootstrap, tmp_path)
    reader = logbus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", 0)])
    batch = await reader.getmany(timeout_ms=10)
    assert [r.value for r in batch[TopicPartition("t", 0)]] == [b"0", b"1", b"2", b"3"]
    logbus.forget(bootstrap)


async def test_retention_deletes_whole_old_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logbus, "SEGMENT_RECORDS", 10)
    bootstrap = "memory://disk-c"
    logbus.open_log(bootstrap, tmp_path, retained=25)
    await ensure_topics(bootstrap, ["t"], partitions=1)
    async with BusProducer(bootstrap) as producer:
        for n in range(100):
            await producer.send_and_wait("t", str(n).encode(), key="k")
    segments = sorted(p.stem for p in (tmp_path / "topics" / "t" / "0").glob("*.log"))
    assert len(segments) <= 4 and int(segments[-1]) == 90
    logbus.forget(bootstrap)
    logbus.open_log(bootstrap, tmp_path, retained=25)
    reader = logbus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", 0)])
    batch = (await reader.getmany(timeout_ms=10, max_records=1000))[TopicPartition("t", 0)]
    assert [r.offset for r in batch] == list(range(75, 100))
    logbus.forget(bootstrap)


_PRODUCE_THEN_DIE = """
import asyncio, os, signal, sys
from pathlib import Path
from ioc_core import logbus
from ioc_core.bus import BusProducer, ensure_topics

async def main() -> None:
    bootstrap = "memory://killed"
    logbus.open_log(bootstrap, Path(sys.argv[1]))
    await ensure_topics(bootstrap, ["t"], partitions=3)
    async with BusProducer(bootstrap) as producer:
        futures = [await producer.send("t", str(n).encode(), key=str(n)) for n in range(500)]
        await asyncio.gather(*futures)
        print("acknowledged", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_acknowledged_sends_survive_a_killed_process(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PRODUCE_THEN_DIE, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    output, _ = await process.communicate()
    assert output.strip() == b"acknowledged" and process.returncode == -signal.SIGKILL
    bootstrap = "memory://killed"
    logbus.open_log(bootstrap, tmp_path)
    reader = logbus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", p) for p in range(3)])
    batch = await reader.getmany(timeout_ms=10, max_records=10_000)
    assert sorted(int(r.value) for records in batch.values() for r in records) == list(range(500))
    logbus.forget(bootstrap)
