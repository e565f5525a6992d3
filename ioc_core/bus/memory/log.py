"""The log of one `memory://NAME`: its topics of partitions, appending records (a send waits
while retention has no room, and withheld sends are let in oldest first), retention as far as
the groups' holds allow, and durability: with a directory, records written to segments and
fsynced in groups before their sends resolve and readers see them, and read back on start. The
groups' bookkeeping is `ConsumerGroups`'s, the on-disk format `segments`'."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import os
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from aiokafka.errors import ProducerClosed, UnknownTopicOrPartitionError
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition

from ioc_core.bus.memory import segments
from ioc_core.bus.memory.groups import ConsumerGroups

if TYPE_CHECKING:
    from ioc_core.bus.memory.clients import MemoryConsumer

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 6
# Records kept per partition, like a retention limit: older ones are dropped once every group
# holding the partition back has committed them.
DEFAULT_RETAINED = 500_000
# A partition's records on disk are split into segments of this many, so retention can delete
# whole files.
SEGMENT_RECORDS = 50_000


@dataclass
class _Withheld:
    """A send waiting for room in its partition."""

    future: asyncio.Future[RecordMetadata]
    key: bytes | None
    value: bytes | None


@dataclass(eq=False)
class _Partition:
    topic: str
    index: int
    records: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    # Offset of records[0]: records before it were dropped by retention.
    start: int = 0
    # Records before this offset are on disk (all of them without a directory); readers see
    # only those.
    durable: int = 0
    # On disk: the directory of its segments and the one being written.
    directory: Path | None = None
    segment: BinaryIO | None = None
    segment_base: int = 0
    # Sends waiting for retention to make room, oldest first.
    withheld: collections.deque[_Withheld] = field(default_factory=collections.deque)
    # Whether the withholding was logged, so it is logged once until sends flow again.
    withholding: bool = False

    @property
    def end(self) -> int:
        return self.start + len(self.records)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.index)


class MemoryLog:
    """The topics, partitions and groups of one `memory://NAME`."""

    def __init__(
        self,
        *,
        partitions: int = DEFAULT_PARTITIONS,
        retained: int = DEFAULT_RETAINED,
        directory: Path | None = None,
    ) -> None:
        self.default_partitions = partitions
        self.retained = retained
        self.directory = directory
        self._topics: dict[str, list[_Partition]] = {}
        self._waiters: set[asyncio.Future[None]] = set()
        self._groups = ConsumerGroups(
            directory / "groups" if directory is not None else None,
            partition_count=self.partition_count,
            wake=self._wake,
        )
        # Sends waiting for the next fsync, and the task doing it.
        self._unsynced: list[tuple[asyncio.Future[RecordMetadata], RecordMetadata]] = []
        self._dirty: dict[int, _Partition] = {}
        # Directories that gained a segment: the file's name is durable only once they are fsynced.
        self._new_entries: set[Path] = set()
        self._syncing: asyncio.Task[None] | None = None
        # Partitions with withheld sends, and the timer for the earliest hold that runs out.
        self._blocked: dict[int, _Partition] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False
        if directory is not None:
            self._load(directory)

    # -- topics ---------------------------------------------------------------------------

    def topics(self) -> list[str]:
        return sorted(self._topics)

    def create(self, topic: str, partitions: int | None = None) -> bool:
        if topic in self._topics:
            return False
        count = partitions or self.default_partitions
        self._topics[topic] = [_Partition(topic, index) for index in range(count)]
        if self.directory is not None:
            for partition in self._topics[topic]:
                partition.directory = self.directory / "topics" / topic / str(partition.index)
                partition.directory.mkdir(parents=True, exist_ok=True)
        self._groups.rebalance(topic)
        return True

    def delete(self, topic: str) -> None:
        for partition in self._topics.pop(topic, []):
            self._blocked.pop(id(partition), None)
            self._dirty.pop(id(partition), None)
            for entry in partition.withheld:
                if not entry.future.done():
                    entry.future.set_exception(UnknownTopicOrPartitionError(f"topic {topic} was deleted"))
            partition.withheld.clear()
            if partition.segment is not None:
                partition.segment.close()
                partition.segment = None
            if partition.directory is not None:
                for path in partition.directory.glob("*.log"):
                    path.unlink()
        self._groups.forget_topic(topic)

    def partitions(self, topic: str) -> list[_Partition]:
        if topic not in self._topics:
            self.create(topic)
        return self._topics[topic]

    def partition_count(self, topic: str) -> int | None:
        found = self._topics.get(topic)
        return len(found) if found is not None else None

    def _partition(self, tp: TopicPartition) -> _Partition | None:
        found = self._topics.get(tp.topic)
        return found[tp.partition] if found is not None and 0 <= tp.partition < len(found) else None

    # -- records --------------------------------------------------------------------------

    def route(self, topic: str, key: bytes | None, partition: int | None) -> _Partition:
        partitions = self.partitions(topic)
        if partition is not None:
            return partitions[partition]
        # A stable hash of the key, so a key's records keep their order; keyless ones spread.
        return partitions[zlib.crc32(key) % len(partitions) if key is not None else _round_robin(partitions)]

    async def append_when_room(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        *,
        pending: set[asyncio.Future[RecordMetadata]] | None = None,
    ) -> RecordMetadata:
        """Append once retention has room for the record without dropping one a group still
        needs; until then the send waits behind the earlier withheld sends of its partition. The
        wait is added to `pending`, so its producer can end it when it stops."""
        if self._closed:
            raise ProducerClosed("the in-process log bus is closed")
        target = self.route(topic, key, partition)
        if not target.withheld and self._has_room(target):
            return self._append(target, key, value)
        entry = _Withheld(asyncio.get_running_loop().create_future(), key, value)
        target.withheld.append(entry)
        self._blocked[id(target)] = target
        if pending is not None:
            pending.add(entry.future)
        try:
            self._admit()
            return await entry.future
        finally:
            if pending is not None:
                pending.discard(entry.future)
            future = entry.future
            if not future.done() or future.cancelled() or future.exception() is not None:
                # Cancelled or ended by a stop: it leaves the queue without being appended.
                with contextlib.suppress(ValueError):
                    target.withheld.remove(entry)

    def _append(self, target: _Partition, key: bytes | None, value: bytes | None) -> RecordMetadata:
        if self._closed:
            raise ProducerClosed("the in-process log bus is closed")
        timestamp = int(time.time() * 1000)
        record = ConsumerRecord(
            topic=target.topic,
            partition=target.index,
            offset=target.end,
            timestamp=timestamp,
            timestamp_type=0,
            key=key,
            value=value,
            checksum=None,
            serialized_key_size=len(key) if key is not None else -1,
            serialized_value_size=len(value) if value is not None else -1,
            headers=(),
        )
        if target.directory is not None:
            # Written first: a record that fails to be written is not in the log.
            self._write(target, record)
            target.records.append(record)
            self._start_sync()
        else:
            target.records.append(record)
            target.durable = target.end
            self._wake()
        return RecordMetadata(
            target.topic, target.index, target.tp, record.offset, timestamp, 0, target.start
        )

    # -- retention ------------------------------------------------------------------------

    @property
    def _capacity(self) -> int:
        # Trimmed a tenth at a time: dropping one record per append would move the whole list.
        return self.retained + max(self.retained // 10, 1)

    def _has_room(self, target: _Partition) -> bool:
        if len(target.records) < self._capacity:
            return True
        self._trim(target)
        return len(target.records) < self._capacity

    def _trim(self, target: _Partition) -> None:
        """Drop the oldest records beyond the retention, but none that is not yet durable or that
        a group still needs."""
        excess = len(target.records) - self.retained
        if excess <= 0:
            return
        needed = self._groups.hold(target.tp, target.start).offset
        limit = target.durable if needed is None else min(needed, target.durable)
        dropped = min(excess, limit - target.start)
        if dropped > 0:
            del target.records[:dropped]
            target.start += dropped

    def _admit(self) -> None:
        """Let withheld sends in, oldest first in each partition, as far as there is room now;
        called whenever room may have been made (a commit, a member leaving, an fsync, a hold
        running out)."""
        soonest: float | None = None
        for target in list(self._blocked.values()):
            while target.withheld:
                entry = target.withheld[0]
                if entry.future.done():
                    target.withheld.popleft()
                    continue
                if not self._has_room(target):
                    break
                target.withheld.popleft()
                try:
                    metadata = self._append(target, entry.key, entry.value)
                except Exception as exc:  # the waiting send's failure, not the admitter's
                    entry.future.set_exception(exc)
                    continue
                entry.future.set_result(metadata)
            if not target.withheld:
                del self._blocked[id(target)]
                if target.withholding:
                    target.withholding = False
                    log.info("in-process log bus: sends to %s/%d flow again", target.topic, target.index)
                continue
            hold = self._groups.hold(target.tp, target.start)
            if not target.withholding:
                target.withholding = True
                log.warning(
                    "in-process log bus: sends to %s/%d wait: it holds %d records and group %s has"
                    " not committed past offset %s, so retention cannot make room",
                    target.topic,
                    target.index,
                    len(target.records),
                    hold.group,
                    hold.offset,
                )
            if hold.expires is not None:
                soonest = hold.expires if soonest is None else min(soonest, hold.expires)
        self._schedule_expiry(soonest)

    def _schedule_expiry(self, when: float | None) -> None:
        """Look again when the earliest hold of a group without members runs out (no waiting
        send would be admitted otherwise: nothing else happens when a group is gone)."""
        if when is None:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + max(when - time.time(), 0.0)
        if self._expiry is not None and not self._expiry.cancelled() and self._expiry.when() <= due:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = loop.call_at(due, self._on_expiry)

    def _on_expiry(self) -> None:
        self._expiry = None
        self._admit()

    # -- disk -----------------------------------------------------------------------------

    def _write(self, partition: _Partition, record: ConsumerRecord[bytes, bytes]) -> None:
        assert partition.directory is not None
        if partition.segment is None or record.offset - partition.segment_base >= SEGMENT_RECORDS:
            if partition.segment is not None:
                partition.segment.flush()
                os.fsync(partition.segment.fileno())
                partition.segment.close()
            partition.segment_base = record.offset
            partition.segment = (partition.directory / f"{record.offset:020d}.log").open("ab")
            if os.fstat(partition.segment.fileno()).st_size == 0:
                partition.segment.write(segments.SEGMENT_HEADER)
                self._new_entries.add(partition.directory)
            segments.drop_segments_before(partition.directory, partition.start)
        partition.segment.write(segments.encode(record))
        self._dirty[id(partition)] = partition

    def durable(self, metadata: RecordMetadata) -> asyncio.Future[RecordMetadata]:
        """A future that resolves once the record is on disk (at once without a directory)."""
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        partition = self._partition(metadata.topic_partition)
        if self.directory is None or partition is None or metadata.offset < partition.durable:
            future.set_result(metadata)
            return future
        self._unsynced.append((future, metadata))
        self._start_sync()
        return future

    def _start_sync(self) -> None:
        if self._syncing is None or self._syncing.done():
            self._syncing = asyncio.create_task(self._sync(), name="logbus-fsync")

    async def _sync(self) -> None:
        """Flush and fsync what was written, resolving the sends waiting for it; records written
        while one fsync runs share the next (group commit). Every record written is synced, also
        one whose send was cancelled after it was appended: readers see it only then."""
        while self._unsynced or self._dirty:
            waiting, self._unsynced = self._unsynced, []
            dirty, self._dirty = self._dirty, {}
            directories, self._new_entries = self._new_entries, set()
            # The ends as written now: records appended during the fsync wait for the next one.
            ends = [(p, p.end, p.segment) for p in dirty.values() if p.segment is not None]
            for _, _, handle in ends:
                assert handle is not None
                handle.flush()
            # Duplicated: a segment closed meanwhile (rolled over, or the log closed) must not
            # leave the thread with a descriptor that names another file or none.
            descriptors = [os.dup(handle.fileno()) for _, _, handle in ends if handle is not None]
            try:
                await asyncio.to_thread(segments.fsync_all, descriptors, directories, close=True)
            except OSError as exc:
                # Synced again with the next send; until then their records stay unseen.
                self._dirty.update(dirty)
                self._new_entries |= directories
                for future, _ in waiting:
                    if not future.done():
                        future.set_exception(exc)
                if not self._unsynced:
                    return  # tried again with the next send, not in a loop against a failing disk
                continue
            for partition, end, _ in ends:
                partition.durable = max(partition.durable, end)
            for future, metadata in waiting:
                if not future.done():
                    future.set_result(metadata)
            self._wake()
            if self._blocked:
                self._admit()

    def _load(self, directory: Path) -> None:
        """Read the segments and commits a previous run left; then apply the retention, as far
        as the groups let it."""
        topics = directory / "topics"
        loaded = 0
        for topic_dir in sorted(p for p in topics.glob("*") if p.is_dir()):
            indexes = sorted(int(p.name) for p in topic_dir.glob("*") if p.is_dir() and p.name.isdigit())
            if not indexes or indexes != list(range(len(indexes))):
                continue
            partitions = []
            for index in indexes:
                folder = topic_dir / str(index)
                records = segments.read_segments(folder, topic_dir.name, index)
                loaded += len(records)
                start = records[0].offset if records else segments.next_offset_of_empty(folder)
                partitions.append(
                    _Partition(
                        topic_dir.name,
                        index,
                        records=records,
                        start=start,
                        durable=start + len(records),
                        directory=folder,
                    )
                )
            self._topics[topic_dir.name] = partitions
        self._groups.load(self._end_of)
        for partitions in self._topics.values():
            for partition in partitions:
                self._trim(partition)
        if loaded:
            log.info("in-process log bus: %d records read back from %s", loaded, directory)

    def _end_of(self, tp: TopicPartition) -> int:
        # A partition that is not on disk any more starts afresh at offset 0 when it is made.
        partition = self._partition(tp)
        return partition.end if partition is not None else 0

    def close(self) -> None:
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for target in self._blocked.values():
            for entry in target.withheld:
                if not entry.future.done():
                    entry.future.set_exception(ProducerClosed("the in-process log bus is closed"))
            target.withheld.clear()
        self._blocked.clear()
        for partitions in self._topics.values():
            for partition in partitions:
                if partition.segment is not None:
                    partition.segment.flush()
                    os.fsync(partition.segment.fileno())
                    partition.segment.close()
                    partition.segment = None
                partition.durable = partition.end
        if self.directory is not None:
            segments.fsync_all([], self._new_entries)
        # Everything written is on disk now: the sends waiting for the fsync are done.
        waiting, self._unsynced = self._unsynced, []
        for future, metadata in waiting:
            if not future.done():
                future.set_result(metadata)

    def read(self, tp: TopicPartition, offset: int, limit: int) -> list[ConsumerRecord[bytes, bytes]]:
        partition = self.partitions(tp.topic)[tp.partition]
        first = max(offset, partition.start) - partition.start
        last = min(first + limit, partition.durable - partition.start)
        records: list[ConsumerRecord[bytes, bytes]] = partition.records[first:last]
        return records

    def offset_for_time(self, tp: TopicPartition, timestamp_ms: int) -> tuple[int, int] | None:
        """The offset and time of the first record readers see that is no older than
        `timestamp_ms`, or None when there is none (Kafka's ListOffsets by time)."""
        partition = self.partitions(tp.topic)[tp.partition]
        visible = partition.records[: max(partition.durable - partition.start, 0)]
        # Append times only go back if the clock does; a step back costs this search precision only.
        index = bisect.bisect_left(visible, timestamp_ms, key=lambda record: record.timestamp)
        if index == len(visible):
            return None
        return visible[index].offset, visible[index].timestamp

    def bounds(self, tp: TopicPartition) -> tuple[int, int]:
        """The oldest offset kept and the end readers see (past the last durable record)."""
        partition = self.partitions(tp.topic)[tp.partition]
        return partition.start, max(partition.durable, partition.start)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_for_records(self, timeout_s: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    # -- groups ---------------------------------------------------------------------------

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        return self._groups.committed(group, tp)

    async def commit(self, group: str, offsets: dict[TopicPartition, int]) -> None:
        """Store the offsets (on disk first, when there is a directory), then let retention use
        them. An offset is never stored past the durable end, so after a crash it cannot point
        beyond what is read back."""
        stored: dict[TopicPartition, int] = {}
        for tp, offset in offsets.items():
            partition = self._partition(tp)
            if partition is not None and offset > partition.durable:
                log.warning(
                    "in-process log bus: group %s commits %s/%d at %d, past its durable end %d;"
                    " storing the end",
                    group,
                    tp.topic,
                    tp.partition,
                    offset,
                    partition.durable,
                )
                offset = partition.durable
            stored[tp] = offset
        await self._groups.store(group, stored)
        if self._blocked:
            self._admit()

    def join(self, group: str, consumer: MemoryConsumer, topics: Iterable[str]) -> None:
        self._groups.join(group, consumer, topics)

    def leave(self, group: str, consumer: MemoryConsumer) -> None:
        if self._groups.leave(group, consumer) and self._blocked:
            # Without members the group holds back only what it committed, for a while.
            self._admit()


def _round_robin(partitions: list[_Partition]) -> int:
    # The shortest partition: keyless records spread evenly.
    return min(range(len(partitions)), key=lambda i: partitions[i].end)
