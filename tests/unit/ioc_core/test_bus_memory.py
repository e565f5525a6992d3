"""The in-process log bus keeps the Kafka semantics the components rely on: per-key order,
commit-after-write groups that split partitions, and group-less readers that seek; retention
never drops what a group has not committed (a send waits instead), and what is read back from
disk ends at the first torn or damaged record, with commits never past that end."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import ProducerClosed
from aiokafka.structs import RecordMetadata, TopicPartition

from ioc_core.bus import BusConsumer, BusProducer, ensure_topics, new_admin
from ioc_core.bus import memory as memory_bus
from ioc_core.bus.memory import groups as memory_groups
from ioc_core.bus.memory import log as memory_log
from ioc_core.bus.memory import segments as memory_segments


@pytest.fixture
def bootstrap(request: pytest.FixtureRequest) -> Any:
    name = f"memory://test-{request.node.name}"
    yield name
    memory_bus.forget(name)


async def test_a_keys_records_stay_in_order_on_one_partition(bootstrap: str) -> None:
    await ensure_topics(bootstrap, ["t"], partitions=4)
    async with BusProducer(bootstrap) as producer:
        for n in range(50):
            for key in ("a", "b", "c"):
                await producer.send_and_wait("t", f"{key}{n}".encode(), key=key)
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", p) for p in range(4)])
    batch = await reader.getmany(timeout_ms=100, max_records=10_000)
    by_key: dict[bytes, list[tuple[int, bytes]]] = {}
    for records in batch.values():
        for record in records:
            assert record.key is not None and record.value is not None
            by_key.setdefault(record.key, []).append((record.partition, record.value))
    for found, seen in by_key.items():
        assert len({partition for partition, _ in seen}) == 1
        assert [value for _, value in seen] == [f"{found.decode()}{n}".encode() for n in range(50)]


async def test_offsets_for_times_finds_the_first_record_not_older(bootstrap: str) -> None:
    await ensure_topics(bootstrap, ["t"], partitions=1)
    async with BusProducer(bootstrap) as producer:
        for n in range(5):
            await producer.send_and_wait("t", str(n).encode(), key="k")
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    tp = TopicPartition("t", 0)
    reader.assign([tp])
    records = (await reader.getmany(timeout_ms=100))[tp]
    for record in records:
        found = (await reader.offsets_for_times({tp: record.timestamp}))[tp]
        assert found is not None and found.offset <= record.offset and found.timestamp == record.timestamp
    assert (await reader.offsets_for_times({tp: 0}))[tp] == (0, records[0].timestamp)
    assert (await reader.offsets_for_times({tp: records[-1].timestamp + 1}))[tp] is None


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
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="latest")
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
    log = memory_bus.log_for(bootstrap)
    log.retained = 5
    log.create("t", 1)
    async with BusProducer(bootstrap) as producer:
        for n in range(8):
            await producer.send_and_wait("t", str(n).encode(), key="k")
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
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
    memory_bus.open_log(bootstrap, tmp_path)
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
    memory_bus.forget(bootstrap)

    memory_bus.open_log(bootstrap, tmp_path)
    again = BusConsumer(bootstrap, ["t"], group_id="g")
    async with again:
        assert sorted(int(r.value) for r in await again.getmany(timeout_ms=50)) == list(range(20, 25))
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", 0), TopicPartition("t", 1)])
    everything = await reader.getmany(timeout_ms=50, max_records=1000)
    assert sorted(int(r.value) for records in everything.values() for r in records) == list(range(25))
    metadata = await memory_bus.MemoryProducer(bootstrap_servers=bootstrap).send_and_wait(
        "t", b"next", key=b"0"
    )
    before = [r for records in everything.values() for r in records if r.partition == metadata.partition]
    assert metadata.offset == len(before)
    memory_bus.forget(bootstrap)


async def test_a_torn_last_record_is_cut_off(tmp_path: Path) -> None:
    bootstrap = "memory://disk-b"
    memory_bus.open_log(bootstrap, tmp_path)
    await ensure_topics(bootstrap, ["t"], partitions=1)
    async with BusProducer(bootstrap) as producer:
        for n in range(3):
            await producer.send_and_wait("t", str(n).encode(), key="k")
    memory_bus.forget(bootstrap)
    [segment] = (tmp_path / "topics" / "t" / "0").glob("*.log")
    with segment.open("ab") as handle:
        handle.write(b"\x00\x00\x00")  # a crash in the middle of the next record
    memory_bus.open_log(bootstrap, tmp_path)
    metadata = await memory_bus.MemoryProducer(bootstrap_servers=bootstrap).send_and_wait("t", b"3", key=b"k")
    assert metadata.offset == 3
    memory_bus.forget(bootstrap)
    memory_bus.open_log(bootstrap, tmp_path)
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", 0)])
    batch = await reader.getmany(timeout_ms=10)
    assert [r.value for r in batch[TopicPartition("t", 0)]] == [b"0", b"1", b"2", b"3"]
    memory_bus.forget(bootstrap)


async def test_retention_deletes_whole_old_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_log, "SEGMENT_RECORDS", 10)
    bootstrap = "memory://disk-c"
    memory_bus.open_log(bootstrap, tmp_path, retained=25)
    await ensure_topics(bootstrap, ["t"], partitions=1)
    async with BusProducer(bootstrap) as producer:
        for n in range(100):
            await producer.send_and_wait("t", str(n).encode(), key="k")
    segments = sorted(p.stem for p in (tmp_path / "topics" / "t" / "0").glob("*.log"))
    assert len(segments) <= 4 and int(segments[-1]) == 90
    memory_bus.forget(bootstrap)
    memory_bus.open_log(bootstrap, tmp_path, retained=25)
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", 0)])
    batch = (await reader.getmany(timeout_ms=10, max_records=1000))[TopicPartition("t", 0)]
    assert [r.offset for r in batch] == list(range(75, 100))
    memory_bus.forget(bootstrap)


_PRODUCE_THEN_DIE = """
import asyncio, os, signal, sys
from pathlib import Path
from ioc_core.bus import memory as memory_bus
from ioc_core.bus import BusProducer, ensure_topics

async def main() -> None:
    bootstrap = "memory://killed"
    memory_bus.open_log(bootstrap, Path(sys.argv[1]))
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
    memory_bus.open_log(bootstrap, tmp_path)
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([TopicPartition("t", p) for p in range(3)])
    batch = await reader.getmany(timeout_ms=10, max_records=10_000)
    assert sorted(int(r.value) for records in batch.values() for r in records) == list(range(500))
    memory_bus.forget(bootstrap)


# -- retention waits for the groups ------------------------------------------------------------


@pytest.fixture(params=["in memory", "on disk"])
def kept_in(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    return tmp_path if request.param == "on disk" else None


def _log(bootstrap: str, directory: Path | None, *, retained: int) -> memory_bus.MemoryLog:
    if directory is None:
        log = memory_bus.log_for(bootstrap)
        log.retained = retained
        return log
    return memory_bus.open_log(bootstrap, directory, retained=retained)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Let the other tasks run until `predicate` holds: a yield to the loop each time, no timing."""
    for _ in range(1_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def _withheld(log: memory_bus.MemoryLog, topic: str = "t", partition: int = 0) -> int:
    return len(log.partitions(topic)[partition].withheld)


async def test_a_producer_outrunning_a_slow_group_waits_and_loses_nothing(
    bootstrap: str, kept_in: Path | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ioc_core.bus.memory")
    log = _log(bootstrap, kept_in, retained=10)  # room for 11 records (a tenth more)
    log.create("t", 1)
    consumer = BusConsumer(bootstrap, ["t"], group_id="slow", max_records=4)
    await consumer.start()
    producer = memory_bus.MemoryProducer(bootstrap_servers=bootstrap)
    for n in range(11):
        await producer.send_and_wait("t", b"%d" % n, key=b"k")
    # The group has not committed anything: the next send waits instead of dropping record 0.
    waiting = asyncio.create_task(producer.send_and_wait("t", b"11", key=b"k"))
    await _until(lambda: _withheld(log) == 1, "the send is withheld")
    first = await consumer.getmany(timeout_ms=1_000)
    assert [r.offset for r in first] == [0, 1, 2, 3]
    assert not waiting.done()  # read is not committed
    await consumer.commit()
    metadata = await asyncio.wait_for(waiting, 5)
    assert metadata.offset == 11 and "sends to t/0 wait" in caplog.text

    total = 200

    async def produce() -> None:
        durable = [await producer.send("t", b"%d" % n, key=b"k") for n in range(12, total)]
        await asyncio.gather(*durable)

    producing = asyncio.create_task(produce())
    seen = [*first]
    while len(seen) < total:
        batch = await consumer.getmany(timeout_ms=2_000)
        assert batch, f"stuck after {len(seen)} records"
        seen.extend(batch)
        await consumer.commit()
    await asyncio.wait_for(producing, 5)
    assert [r.offset for r in seen] == list(range(total))
    assert [r.value for r in seen] == [b"%d" % n for n in range(total)]
    assert await consumer.getmany(timeout_ms=10) == []
    await consumer.stop()


async def test_a_withheld_send_ends_when_cancelled_when_its_producer_stops_and_when_the_log_closes(
    bootstrap: str,
) -> None:
    log = _log(bootstrap, None, retained=2)  # room for 3
    log.create("t", 1)
    consumer = BusConsumer(bootstrap, ["t"], group_id="g")
    await consumer.start()
    producer = memory_bus.MemoryProducer(bootstrap_servers=bootstrap)
    await producer.start()
    for n in range(3):
        await producer.send_and_wait("t", b"%d" % n, key=b"k")
    cancelled = asyncio.create_task(producer.send_and_wait("t", b"cancelled", key=b"k"))
    stopped = asyncio.create_task(producer.send_and_wait("t", b"stopped", key=b"k"))
    await _until(lambda: _withheld(log) == 2, "both sends are withheld")
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await producer.stop()
    with pytest.raises(ProducerClosed):
        await stopped
    assert _withheld(log) == 0
    with pytest.raises(ProducerClosed):
        await producer.send("t", b"after stop", key=b"k")

    # Neither was appended: once the group commits, the next record takes offset 3.
    assert [r.value for r in await consumer.getmany(timeout_ms=100)] == [b"0", b"1", b"2"]
    await consumer.commit()
    other = memory_bus.MemoryProducer(bootstrap_servers=bootstrap)
    offsets = [(await other.send_and_wait("t", b"%d" % n, key=b"k")).offset for n in range(3, 6)]
    assert offsets == [3, 4, 5]
    closing = asyncio.create_task(other.send_and_wait("t", b"6", key=b"k"))
    await _until(lambda: _withheld(log) == 1, "the send is withheld")
    memory_bus.forget(bootstrap)  # as `ioc up` does last when it stops
    with pytest.raises(ProducerClosed):
        await closing
    await consumer.stop()


async def test_a_group_without_members_holds_retention_until_its_hold_runs_out(
    bootstrap: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(memory_groups, "GROUP_HOLD_S", 1.0)
    log = _log(bootstrap, None, retained=2)  # room for 3
    log.create("t", 1)
    async with BusConsumer(bootstrap, ["t"], group_id="gone") as gone:
        assert await gone.getmany(timeout_ms=10) == []
        await gone.commit()  # at offset 0
    producer = memory_bus.MemoryProducer(bootstrap_servers=bootstrap)
    for n in range(3):
        await producer.send_and_wait("t", b"%d" % n, key=b"k")
    loop = asyncio.get_running_loop()
    asked = loop.time()
    late = asyncio.create_task(producer.send_and_wait("t", b"3", key=b"k"))
    await _until(lambda: _withheld(log) == 1, "the send is withheld by the group's commit")
    # Nothing else happens: the hold running out lets it in.
    metadata = await asyncio.wait_for(late, 5)
    assert metadata.offset == 3 and loop.time() - asked > 0.5
    tp = TopicPartition("t", 0)
    assert log.bounds(tp) == (1, 4)
    async with BusConsumer(bootstrap, ["t"], group_id="gone") as back:
        assert [r.offset for r in await back.getmany(timeout_ms=100)] == [1, 2, 3]
    assert "group gone resumes t/0 at 1" in caplog.text


# -- what is read back from disk ---------------------------------------------------------------


def _values(batch: dict[TopicPartition, list[Any]], tp: TopicPartition) -> list[bytes]:
    return [record.value for record in batch.get(tp, [])]


async def test_readers_see_a_record_and_groups_commit_it_only_once_it_is_durable(tmp_path: Path) -> None:
    bootstrap = "memory://disk-durable"
    log = memory_bus.open_log(bootstrap, tmp_path)
    log.create("t", 1)
    tp = TopicPartition("t", 0)
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([tp])
    producer = memory_bus.MemoryProducer(bootstrap_servers=bootstrap)
    durable = await producer.send("t", b"0", key=b"k")
    # Appended, not yet fsynced: a crash could still take it back.
    assert log.bounds(tp) == (0, 0) and await reader.getmany() == {}
    await log.commit("g", {tp: 1})
    assert log.committed("g", tp) == 0
    metadata: RecordMetadata = await durable
    assert metadata.offset == 0 and log.bounds(tp) == (0, 1)
    assert _values(await reader.getmany(), tp) == [b"0"]
    memory_bus.forget(bootstrap)


async def test_a_damaged_record_ends_the_log_where_it_lies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(memory_log, "SEGMENT_RECORDS", 5)
    bootstrap = "memory://disk-damaged"
    memory_bus.open_log(bootstrap, tmp_path)
    await ensure_topics(bootstrap, ["t"], partitions=1)
    async with BusProducer(bootstrap) as producer:
        for n in range(12):
            await producer.send_and_wait("t", b"value-%02d" % n, key="k")
    memory_bus.forget(bootstrap)
    folder = tmp_path / "topics" / "t" / "0"
    segments = sorted(folder.glob("*.log"))
    assert [int(p.stem) for p in segments] == [0, 5, 10]
    data = bytearray(segments[1].read_bytes())
    position = data.index(b"value-07")
    data[position + 6] ^= 0x01  # one bit of the record's value, as a failing disk might
    segments[1].write_bytes(bytes(data))

    caplog.set_level(logging.WARNING, logger="ioc_core.bus.memory")
    log = memory_bus.open_log(bootstrap, tmp_path)
    tp = TopicPartition("t", 0)
    assert log.bounds(tp) == (0, 7)
    [warning] = [r for r in caplog.records if "checksum" in r.getMessage()]
    assert str(segments[1]) in warning.getMessage() and "ends at offset 7" in warning.getMessage()
    assert not segments[2].exists()  # the log ends at the damage: later segments are cut off
    metadata = await memory_bus.MemoryProducer(bootstrap_servers=bootstrap).send_and_wait(
        "t", b"new", key=b"k"
    )
    assert metadata.offset == 7
    memory_bus.forget(bootstrap)

    caplog.clear()
    memory_bus.open_log(bootstrap, tmp_path)
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    reader.assign([tp])
    values = _values(await reader.getmany(max_records=100), tp)
    assert values == [b"value-%02d" % n for n in range(7)] + [b"new"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    memory_bus.forget(bootstrap)


async def test_a_commit_past_the_end_after_a_cut_is_brought_back_to_the_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap = "memory://disk-clamped"
    memory_bus.open_log(bootstrap, tmp_path)
    await ensure_topics(bootstrap, ["t"], partitions=1)
    async with BusProducer(bootstrap) as producer:
        for n in range(10):
            await producer.send_and_wait("t", b"%d" % n, key="k")
    async with BusConsumer(bootstrap, ["t"], group_id="g") as consumer:
        assert len(await consumer.getmany(timeout_ms=100)) == 10
        await consumer.commit()
    memory_bus.forget(bootstrap)
    # The disk lost the last records (as a crash may, past what fsync promised): cut mid-record.
    [segment] = (tmp_path / "topics" / "t" / "0").glob("*.log")
    data = segment.read_bytes()
    segment.write_bytes(data[: data.index(b"\x00\x00\x00\x00\x00\x00\x00\x06") + 3])

    caplog.set_level(logging.WARNING, logger="ioc_core.bus.memory")
    log = memory_bus.open_log(bootstrap, tmp_path)
    tp = TopicPartition("t", 0)
    assert log.bounds(tp) == (0, 6) and log.committed("g", tp) == 6
    assert len([r for r in caplog.records if "past its end" in r.getMessage()]) == 1
    [stored] = [json.loads(p.read_text()) for p in (tmp_path / "groups").glob("*.json")]
    assert stored["offsets"] == [{"topic": "t", "partition": 0, "offset": 6}]
    assert not list((tmp_path / "groups").glob("*.tmp"))
    # The next record takes offset 6 again, and the group reads it instead of skipping it.
    await memory_bus.MemoryProducer(bootstrap_servers=bootstrap).send_and_wait("t", b"after", key=b"k")
    memory_bus.forget(bootstrap)

    caplog.clear()
    memory_bus.open_log(bootstrap, tmp_path)
    async with BusConsumer(bootstrap, ["t"], group_id="g") as consumer:
        assert [r.value for r in await consumer.getmany(timeout_ms=100)] == [b"after"]
    assert not [r for r in caplog.records if "past its end" in r.getMessage()]  # logged once
    memory_bus.forget(bootstrap)


async def test_segments_of_the_first_format_are_converted(tmp_path: Path) -> None:
    folder = tmp_path / "topics" / "t" / "0"
    folder.mkdir(parents=True)
    # Format 1: no segment header, no checksum; a torn record at the end.
    old = b"".join(
        memory_segments.FIELDS.pack(n, 1_700_000_000_000 + n, 1, 1) + b"k" + b"%d" % n for n in range(3)
    )
    (folder / f"{0:020d}.log").write_bytes(old + b"\x00\x00")
    bootstrap = "memory://disk-converted"
    memory_bus.open_log(bootstrap, tmp_path)
    segment = folder / f"{0:020d}.log"
    assert segment.read_bytes().startswith(memory_segments.SEGMENT_HEADER)
    metadata = await memory_bus.MemoryProducer(bootstrap_servers=bootstrap).send_and_wait("t", b"3", key=b"k")
    assert metadata.offset == 3
    memory_bus.forget(bootstrap)
    memory_bus.open_log(bootstrap, tmp_path)
    reader = memory_bus.MemoryConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    tp = TopicPartition("t", 0)
    reader.assign([tp])
    assert _values(await reader.getmany(max_records=100), tp) == [b"0", b"1", b"2", b"3"]
    memory_bus.forget(bootstrap)


def test_the_keyed_partitioner_places_keys_as_kafkas_default_does() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from ioc_core.bus.clients import KeyedPartitioner

    partitioner = KeyedPartitioner(limit=50)
    for count in (1, 3, 12):
        partitions = list(range(count))
        for n in range(200):
            key = f"hn-flood-{n:05d}".encode()
            assert partitioner(key, partitions, partitions) == DefaultPartitioner()(
                key, partitions, partitions
            )
    assert partitioner(None, [0, 1], [1]) == 1
