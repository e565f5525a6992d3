"""The in-process log bus keeps the Kafka semantics the components rely on: per-key order,
commit-after-write groups that split partitions, and group-less readers that seek."""

from __future__ import annotations

import asyncio
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
    assert [int(r.value) for r in batch[tp]] == [3, 4, 5, 6, 7]
    assert [r.offset for r in batch[tp]] == [3, 4, 5, 6, 7]


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
