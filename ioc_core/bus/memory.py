"""An in-process log bus standing in for Kafka when the system runs in one process (`ioc up`
without `IOC_KAFKA_BOOTSTRAP`): `memory://NAME` as the bootstrap address.

It keeps what the components rely on from Kafka:
- topics of partitions, each an append-only log with offsets; a key always lands on the same
  partition, so one device's records (and one alarm's events) stay in order;
- consumer groups whose members split the partitions (with the rebalance listener called as
  aiokafka calls it) and whose committed offsets say where a member that takes over a partition
  starts: offsets are committed only when the consumer says so, after its rows are durable;
- group-less consumers that assign partitions and seek, for the live event stream's exact resume.

The classes copy the parts of aiokafka's consumer, producer and admin client that the bus module
and the event hub use, so both run unchanged on either.

Retention never drops a record that a group still needs. A partition keeps about its newest
`retained` records; once it is full and its oldest records are not yet committed by every group
that holds it back, a send to it waits (as an MQTT broker withholds a PUBACK) until commits make
room, and sends waiting for one partition go in in the order they came. What holds a partition
back:
- a group with members holds the partitions of the topics they subscribe to, from its committed
  offset (from the partition's start before its first commit there);
- a group without members holds the partitions it has commits for, until `GROUP_HOLD_S` after
  its last commit, as Kafka keeps an empty group's offsets for `offsets.retention.minutes`: a
  group that is gone for good (a renamed `IOC_PROCESSOR_GROUP_ID`) holds producers back until
  then at most, never for ever. Its commits stay; should it come back after retention dropped
  records it had not committed, it resumes at the oldest record kept, with a warning.
Group-less readers (assign and seek, for the live stream) hold nothing back: a reader behind
the retention skips to the oldest record kept. A waiting send ends with `ProducerClosed` when
its producer stops or the log closes, and can be cancelled.

A log opened with a directory (`open_log`, as `ioc up` does under its data directory) is also
written to disk: each partition as segment files of checksummed, length-prefixed records, each
group's committed offsets as a small JSON file replaced atomically. A send resolves only once its
record is fsynced, and readers see a record only from then on (as Kafka's consumers see records
up to the high watermark), so a group cannot commit a record a crash can take back. The next start
reads the segments back, ending each partition's log at the first torn or damaged record, and
resumes every group from its commits, never past the end that was read back. Without a
directory, records live in memory only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import ProducerClosed, UnknownTopicOrPartitionError
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition

from ioc_core.errors import IocError

log = logging.getLogger(__name__)

SCHEME = "memory://"
DEFAULT_PARTITIONS = 6
# Records kept per partition, like a retention limit: older ones are dropped once every group
# holding the partition back has committed them.
DEFAULT_RETAINED = 500_000
# A partition's records on disk are split into segments of this many, so retention can delete
# whole files.
SEGMENT_RECORDS = 50_000
# How long a group without members still holds retention back after its last commit: Kafka's
# default `offsets.retention.minutes` (7 days), for which it keeps an empty group's offsets.
GROUP_HOLD_S = 7 * 24 * 3600.0

# Segment format. Version 1 (the first release of this bus, no header) stored each record as
# `_FIELDS` + key + value. Version 2 starts each segment with `_SEGMENT_HEADER` (magic and version
# byte) and stores each record as a big-endian CRC32 (zlib's, of everything after it) + `_FIELDS`
# + key + value, so a damaged record is told apart from a good one. Version 1 only ever existed
# in development data directories, but those can hold records the processor has not stored yet,
# so a version 1 segment is converted in place on start rather than refused. A version 1
# segment cannot be mistaken for a version 2 one: it starts with its first record's offset,
# whose first byte would be 0x49 ("I") only for offsets beyond 5e18.
_SEGMENT_MAGIC = b"IOCBUS\x00"
_FORMAT_VERSION = 2
_SEGMENT_HEADER = _SEGMENT_MAGIC + bytes([_FORMAT_VERSION])
# offset, timestamp (ms), key length, value length (-1: none)
_FIELDS = struct.Struct(">qqii")
_CHECKSUM = struct.Struct(">I")


def is_memory(bootstrap: str) -> bool:
    return bootstrap.startswith(SCHEME)


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


@dataclass
class _Member:
    consumer: MemoryConsumer
    topics: frozenset[str]


@dataclass
class _Group:
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    # Wall-clock time of the last commit (it outlives the process, so not a monotonic clock).
    committed_at: float = 0.0
    members: list[_Member] = field(default_factory=list)
    # Commits of one group are written one at a time, so the newest file is the newest commit.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class _Hold:
    """What holds a partition's retention back: the lowest offset still needed and by which
    group, and the earliest time a group without members stops holding it."""

    offset: int | None
    group: str | None
    expires: float | None


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
        self._groups: dict[str, _Group] = {}
        self._waiters: set[asyncio.Future[None]] = set()
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
        self._rebalance_subscribers(topic)
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
        # A topic made again under the name starts at offset 0: commits of the old one would skip
        # its records.
        for name, group in self._groups.items():
            kept = {tp: offset for tp, offset in group.committed.items() if tp.topic != topic}
            if len(kept) != len(group.committed):
                group.committed = kept
                if self.directory is not None:
                    _write_commits(self.directory / "groups", name, kept, group.committed_at)

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
        needed = self._hold(target).offset
        limit = target.durable if needed is None else min(needed, target.durable)
        dropped = min(excess, limit - target.start)
        if dropped > 0:
            del target.records[:dropped]
            target.start += dropped

    def _hold(self, target: _Partition) -> _Hold:
        tp = target.tp
        now = time.time()
        offset: int | None = None
        holder: str | None = None
        expires: float | None = None
        for name, group in self._groups.items():
            if group.members:
                if not any(target.topic in member.topics for member in group.members):
                    continue
                needed = group.committed.get(tp, target.start)
            else:
                committed = group.committed.get(tp)
                until = group.committed_at + GROUP_HOLD_S
                if committed is None or until <= now:
                    continue
                needed = committed
                expires = until if expires is None else min(expires, until)
            if offset is None or needed < offset:
                offset, holder = needed, name
        return _Hold(offset, holder, expires)

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
            hold = self._hold(target)
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
                partition.segment.write(_SEGMENT_HEADER)
                self._new_entries.add(partition.directory)
            _drop_segments_before(partition.directory, partition.start)
        partition.segment.write(_encode(record))
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
                await asyncio.to_thread(_fsync_all, descriptors, directories, close=True)
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
                records = _read_segments(folder, topic_dir.name, index)
                loaded += len(records)
                start = records[0].offset if records else _next_offset_of_empty(folder)
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
        for path in sorted((directory / "groups").glob("*.json")):
            self._load_commits(path)
        for partitions in self._topics.values():
            for partition in partitions:
                self._trim(partition)
        if loaded:
            log.info("in-process log bus: %d records read back from %s", loaded, directory)

    def _load_commits(self, path: Path) -> None:
        try:
            stored = json.loads(path.read_text())
            name = stored["group"]
            offsets = {
                TopicPartition(entry["topic"], entry["partition"]): int(entry["offset"])
                for entry in stored["offsets"]
            }
            committed_at = float(stored.get("committed_at", path.stat().st_mtime))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable committed offsets %s: %s", path, exc)
            return
        clamped = False
        for tp, offset in offsets.items():
            # A partition that is not on disk any more starts afresh at offset 0 when it is made.
            partition = self._partition(tp)
            end = partition.end if partition is not None else 0
            if offset > end:
                # The records past the end were cut off as torn or damaged: new records will take
                # their offsets, and the group must read those.
                log.warning(
                    "in-process log bus: group %s had committed %s/%d up to offset %d, past its end"
                    " %d after the log was read back; it resumes at the end",
                    name,
                    tp.topic,
                    tp.partition,
                    offset,
                    end,
                )
                offsets[tp] = end
                clamped = True
        group = self._groups.setdefault(name, _Group())
        group.committed.update(offsets)
        group.committed_at = max(group.committed_at, committed_at)
        if clamped:
            assert self.directory is not None
            _write_commits(self.directory / "groups", name, group.committed, group.committed_at)

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
            _fsync_all([], self._new_entries)
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
        return self._groups.setdefault(group, _Group()).committed.get(tp)

    async def commit(self, group: str, offsets: dict[TopicPartition, int]) -> None:
        """Store the offsets (on disk first, when there is a directory), then let retention use
        them. An offset is never stored past the durable end, so after a crash it cannot point
        beyond what is read back."""
        entry = self._groups.setdefault(group, _Group())
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
        async with entry.lock:
            committed = {**entry.committed, **stored}
            committed_at = time.time()
            if self.directory is not None:
                await asyncio.to_thread(
                    _write_commits, self.directory / "groups", group, committed, committed_at
                )
            entry.committed.update(stored)
            entry.committed_at = committed_at
        if self._blocked:
            self._admit()

    def join(self, group: str, consumer: MemoryConsumer, topics: Iterable[str]) -> None:
        members = self._groups.setdefault(group, _Group()).members
        members.append(_Member(consumer, frozenset(topics)))
        self._assign(group)

    def leave(self, group: str, consumer: MemoryConsumer) -> None:
        entry = self._groups.get(group)
        if entry is None:
            return
        entry.members = [m for m in entry.members if m.consumer is not consumer]
        self._assign(group)
        if self._blocked:
            # Without members the group holds back only what it committed, for a while.
            self._admit()

    def _rebalance_subscribers(self, topic: str) -> None:
        for name, entry in self._groups.items():
            if any(topic in m.topics for m in entry.members):
                self._assign(name)

    def _assign(self, group: str) -> None:
        """Deal the subscribed partitions out to the members in turn; each member takes its new
        share at its next poll, after its listener has heard of the change."""
        members = self._groups[group].members
        shares: dict[int, set[TopicPartition]] = {id(m.consumer): set() for m in members}
        topics = sorted({t for m in members for t in m.topics if t in self._topics})
        turn = 0
        for topic in topics:
            for index in range(len(self._topics[topic])):
                tp = TopicPartition(topic, index)
                takers = [m for m in members if topic in m.topics]
                if not takers:
                    continue
                shares[id(takers[turn % len(takers)].consumer)].add(tp)
                turn += 1
        for member in members:
            member.consumer.pending_assignment = shares[id(member.consumer)]
        self._wake()


def _fsync_all(descriptors: list[int], directories: Iterable[Path], *, close: bool = False) -> None:
    try:
        for descriptor in descriptors:
            os.fsync(descriptor)
    finally:
        if close:
            for descriptor in descriptors:
                os.close(descriptor)
    for directory in directories:
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the names in a directory (a new, renamed or deleted file) durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace(path: Path, content: bytes) -> None:
    """Write a file anew so that a crash leaves the old content or the new, never a mix: a
    temporary file fsynced, renamed over it, and the directory fsynced."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    _fsync_directory(path.parent)


def _write_commits(
    folder: Path, group: str, committed: dict[TopicPartition, int], committed_at: float
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps(
        {
            "group": group,
            "committed_at": committed_at,
            "offsets": [
                {"topic": tp.topic, "partition": tp.partition, "offset": offset}
                for tp, offset in sorted(committed.items())
            ],
        }
    )
    _replace(folder / f"{zlib.crc32(group.encode()):08x}.json", body.encode())


def _encode(record: ConsumerRecord[bytes, bytes]) -> bytes:
    key, value = record.key, record.value
    rest = (
        _FIELDS.pack(
            record.offset,
            record.timestamp,
            len(key) if key is not None else -1,
            len(value) if value is not None else -1,
        )
        + (key or b"")
        + (value or b"")
    )
    return _CHECKSUM.pack(zlib.crc32(rest)) + rest


def _segments(directory: Path) -> list[Path]:
    """A partition's segment files, oldest first (each is named by its first record's offset)."""
    return sorted((p for p in directory.glob("*.log") if p.stem.isdigit()), key=lambda p: int(p.stem))


def _version_of(path: Path, data: bytes) -> int | None:
    """The segment's format version; None for a segment whose header was torn while it was made
    (it holds no record)."""
    if len(data) >= len(_SEGMENT_HEADER) and data.startswith(_SEGMENT_MAGIC):
        version = data[len(_SEGMENT_MAGIC)]
        if version != _FORMAT_VERSION:
            raise IocError(
                f"{path} is an in-process log bus segment of format {version}, which this version"
                f" cannot read (it reads {_FORMAT_VERSION}); run the version that wrote it, or move"
                f" {path.parent.parent.parent.parent} aside to start with an empty bus"
            )
        return version
    if _SEGMENT_HEADER.startswith(data):
        return None
    return 1


def _scan(
    data: bytes, version: int, topic: str, partition: int, expected: int
) -> tuple[list[ConsumerRecord[bytes, bytes]], int, str | None]:
    """The whole, intact records of one segment from offset `expected` on; the byte position
    where they end, and what is wrong with the record there if the data goes on."""
    view = memoryview(data)
    checked = version == _FORMAT_VERSION
    position = len(_SEGMENT_HEADER) if checked else 0
    prefix = _CHECKSUM.size if checked else 0
    records: list[ConsumerRecord[bytes, bytes]] = []
    while position < len(data):
        fields = position + prefix
        if fields + _FIELDS.size > len(data):
            return records, position, "is incomplete (torn)"
        offset, timestamp, key_size, value_size = _FIELDS.unpack_from(data, fields)
        if key_size < -1 or value_size < -1:
            return records, position, "has a damaged header"
        body = fields + _FIELDS.size
        finish = body + max(key_size, 0) + max(value_size, 0)
        if finish > len(data):
            return records, position, "is incomplete (torn)"
        if checked and zlib.crc32(view[fields:finish]) != _CHECKSUM.unpack_from(data, position)[0]:
            return records, position, "fails its checksum"
        if offset != expected:
            return records, position, f"has offset {offset} where {expected} was due"
        records.append(
            ConsumerRecord(
                topic=topic,
                partition=partition,
                offset=offset,
                timestamp=timestamp,
                timestamp_type=0,
                key=data[body : body + key_size] if key_size >= 0 else None,
                value=data[body + max(key_size, 0) : finish] if value_size >= 0 else None,
                checksum=None,
                serialized_key_size=key_size,
                serialized_value_size=value_size,
                headers=(),
            )
        )
        expected += 1
        position = finish
    return records, position, None


def _read_segments(directory: Path, topic: str, partition: int) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of a partition's segments up to the first one that is torn (a crash while
    writing it, before its send was acknowledged) or damaged (its checksum does not match): the
    readable log ends there, and the rest is cut off, as Kafka recovers a log. Segments of the
    first format are converted to the current one."""
    records: list[ConsumerRecord[bytes, bytes]] = []
    segments = _segments(directory)
    converted = 0
    for number, path in enumerate(segments):
        data = path.read_bytes()
        version = _version_of(path, data)
        if version is None:
            _replace(path, _SEGMENT_HEADER)
            continue
        expected = records[-1].offset + 1 if records else int(path.stem)
        found, end, problem = _scan(data, version, topic, partition, expected)
        records.extend(found)
        if version != _FORMAT_VERSION:
            _replace(path, _SEGMENT_HEADER + b"".join(_encode(record) for record in found))
            converted += 1
        elif problem is not None:
            with path.open("r+b") as handle:
                handle.truncate(end)
                handle.flush()
                os.fsync(handle.fileno())
        if problem is None:
            continue
        later = segments[number + 1 :]
        log.warning(
            "in-process log bus: the record at byte %d of %s %s; the log of %s/%d ends at offset %d"
            " (%d bytes there and %d later segments cut off)",
            end,
            path,
            problem,
            topic,
            partition,
            expected + len(found),
            len(data) - end,
            len(later),
        )
        for dropped in later:
            dropped.unlink()
        _fsync_directory(directory)
        break
    if converted:
        log.info(
            "in-process log bus: converted %d segments of %s/%d to format %d",
            converted,
            topic,
            partition,
            _FORMAT_VERSION,
        )
    remaining = _segments(directory)
    if remaining:
        # A process killed before its last fsync may have left records only in the page cache;
        # from here on they count as durable.
        _fsync_file(remaining[-1])
    return records


def _next_offset_of_empty(directory: Path) -> int:
    """An empty partition starts where its newest (empty) segment's name says."""
    names = _segments(directory)
    return int(names[-1].stem) if names else 0


def _drop_segments_before(directory: Path, start: int) -> None:
    """Delete segments whose records all lie before `start` (the newest is never deleted)."""
    segments = _segments(directory)
    for current, following in itertools.pairwise(segments):
        if int(following.stem) <= start:
            current.unlink()


def _round_robin(partitions: list[_Partition]) -> int:
    # The shortest partition: keyless records spread evenly.
    return min(range(len(partitions)), key=lambda i: partitions[i].end)


_LOGS: dict[str, MemoryLog] = {}


def log_for(bootstrap: str) -> MemoryLog:
    """The process's log of that name, made on first use."""
    name = bootstrap.removeprefix(SCHEME) or "default"
    if name not in _LOGS:
        _LOGS[name] = MemoryLog()
    return _LOGS[name]


def open_log(bootstrap: str, directory: Path, *, retained: int = DEFAULT_RETAINED) -> MemoryLog:
    """Register the log of that name as one kept in `directory` (read back if it exists)."""
    name = bootstrap.removeprefix(SCHEME) or "default"
    directory.mkdir(parents=True, exist_ok=True)
    _LOGS[name] = MemoryLog(directory=directory, retained=retained)
    return _LOGS[name]


def forget(bootstrap: str) -> None:
    """Close the log of that name (its waiting sends end with `ProducerClosed`) and drop it."""
    found = _LOGS.pop(bootstrap.removeprefix(SCHEME) or "default", None)
    if found is not None:
        found.close()


class MemoryProducer:
    """`AIOKafkaProducer`'s `start`, `stop`, `send` and `send_and_wait`. `send` waits while
    retention has no room for the record (see the module's docstring), as aiokafka's waits for
    buffer space; the future it returns resolves once the record is durable (on disk for a log
    with a directory). `stop` ends the sends still waiting with `ProducerClosed`."""

    def __init__(self, *, bootstrap_servers: str, **_: Any) -> None:
        self._log = log_for(bootstrap_servers)
        self._stopped = False
        self._withheld: set[asyncio.Future[RecordMetadata]] = set()

    async def start(self) -> None:
        self._stopped = False

    async def stop(self) -> None:
        self._stopped = True
        for future in list(self._withheld):
            if not future.done():
                future.set_exception(ProducerClosed("the producer stopped while its send waited"))

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None
    ) -> asyncio.Future[RecordMetadata]:
        if self._stopped:
            raise ProducerClosed("the producer is stopped")
        metadata = await self._log.append_when_room(topic, key, value, partition, pending=self._withheld)
        return self._log.durable(metadata)

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None
    ) -> RecordMetadata:
        return await (await self.send(topic, value, key, partition))


class MemoryConsumer:
    """The part of `AIOKafkaConsumer` the system uses: a group member (`subscribe`) or a
    group-less reader (`assign`/`seek`)."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        group_id: str | None = None,
        auto_offset_reset: str = "latest",
        max_poll_records: int | None = None,
        **_: Any,
    ) -> None:
        self._log = log_for(bootstrap_servers)
        self._group = group_id
        self._reset = auto_offset_reset
        self._max_records = max_poll_records or 500
        self._topics: list[str] = []
        self._listener: ConsumerRebalanceListener | None = None
        self._assignment: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._started = False
        # Set by the log when the group's partitions are dealt again.
        self.pending_assignment: set[TopicPartition] | None = None

    def subscribe(self, topics: Sequence[str], listener: ConsumerRebalanceListener | None = None) -> None:
        self._topics = list(topics)
        self._listener = listener

    async def start(self) -> None:
        self._started = True
        if self._group is not None and self._topics:
            for topic in self._topics:
                self._log.partitions(topic)
            self._log.join(self._group, self, self._topics)
            await self._take_assignment()

    async def stop(self) -> None:
        if self._started and self._group is not None and self._topics:
            self._log.leave(self._group, self)
        self._started = False

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self._assignment = set(partitions)
        for tp in self._assignment:
            self._positions.setdefault(tp, self._reset_position(tp))

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = self._log.partition_count(topic)
        return set(range(count)) if count is not None else None

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        for tp in partitions or tuple(self._assignment):
            self._positions[tp] = self._log.bounds(tp)[1]

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for tp in partitions or tuple(self._assignment):
            self._positions[tp] = self._log.bounds(tp)[0]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._positions[tp] = offset

    async def position(self, tp: TopicPartition) -> int:
        return self._positions.get(tp, self._reset_position(tp))

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._log.bounds(tp)[1]

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._log.bounds(tp)[1] for tp in partitions}

    async def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._log.bounds(tp)[0] for tp in partitions}

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        if self._group is None:
            raise ValueError("a consumer without a group cannot commit")
        await self._log.commit(
            self._group,
            offsets if offsets is not None else {tp: self._positions[tp] for tp in self._assignment},
        )

    async def committed(self, tp: TopicPartition) -> int | None:
        return self._log.committed(self._group, tp) if self._group is not None else None

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        await self._take_assignment()
        batch = self._collect(partitions, max_records or self._max_records)
        if not batch and timeout_ms > 0:
            await self._log.wait_for_records(timeout_ms / 1000)
            await self._take_assignment()
            batch = self._collect(partitions, max_records or self._max_records)
        return batch

    def _collect(
        self, partitions: Sequence[TopicPartition], limit: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        for tp in sorted(partitions or self._assignment):
            if limit <= 0:
                break
            start, _ = self._log.bounds(tp)
            position = max(self._positions.get(tp, self._reset_position(tp)), start)
            records = self._log.read(tp, position, limit)
            if records:
                batch[tp] = records
                self._positions[tp] = records[-1].offset + 1
                limit -= len(records)
        return batch

    def _reset_position(self, tp: TopicPartition) -> int:
        start, end = self._log.bounds(tp)
        return start if self._reset == "earliest" else end

    async def _take_assignment(self) -> None:
        new = self.pending_assignment
        if new is None:
            return
        self.pending_assignment = None
        if self._listener is not None and self._assignment:
            await self._listener.on_partitions_revoked(set(self._assignment))
        self._assignment = set(new)
        self._positions = {}
        assert self._group is not None
        for tp in self._assignment:
            committed = self._log.committed(self._group, tp)
            if committed is None:
                self._positions[tp] = self._reset_position(tp)
                continue
            start, _ = self._log.bounds(tp)
            if committed < start:
                # Only a group that held nothing back (gone longer than GROUP_HOLD_S) gets here.
                log.warning(
                    "in-process log bus: group %s resumes %s/%d at %d: retention dropped records %d"
                    " to %d while the group was gone",
                    self._group,
                    tp.topic,
                    tp.partition,
                    start,
                    committed,
                    start - 1,
                )
            self._positions[tp] = committed
        if self._listener is not None:
            await self._listener.on_partitions_assigned(set(self._assignment))


@dataclass(frozen=True)
class _CreateTopicsResponse:
    topic_errors: Sequence[tuple[str, int, str | None]]


class MemoryAdmin:
    """The part of `AIOKafkaAdminClient` the system uses."""

    def __init__(self, *, bootstrap_servers: str, **_: Any) -> None:
        self._log = log_for(bootstrap_servers)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def list_topics(self) -> list[str]:
        return self._log.topics()

    async def create_topics(self, new_topics: Iterable[Any], **_: Any) -> _CreateTopicsResponse:
        errors: list[tuple[str, int, str | None]] = []
        for topic in new_topics:
            created = self._log.create(topic.name, topic.num_partitions)
            errors.append((topic.name, 0 if created else 36, None))
        return _CreateTopicsResponse(errors)

    async def delete_topics(self, topics: Iterable[str], **_: Any) -> None:
        for topic in topics:
            self._log.delete(topic)

    async def describe_topics(self, topics: Iterable[str]) -> list[dict[str, Any]]:
        described = []
        for topic in topics:
            count = self._log.partition_count(topic)
            if count is None:
                described.append({"topic": topic, "error_code": 3, "partitions": []})
            else:
                described.append(
                    {"topic": topic, "error_code": 0, "partitions": [{"partition": i} for i in range(count)]}
                )
        return described


# The driver interface (`ioc_core.bus.drivers.BusDriver`): clients shaped like aiokafka's.
def consumer(bootstrap: str, **options: Any) -> AIOKafkaConsumer:
    return MemoryConsumer(bootstrap_servers=bootstrap, **options)


def producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    return MemoryProducer(bootstrap_servers=bootstrap, **options)


def admin(bootstrap: str, **options: Any) -> AIOKafkaAdminClient:
    return MemoryAdmin(bootstrap_servers=bootstrap, **options)


async def replication(
    client: AIOKafkaAdminClient, replication_factor: int | None, min_insync_replicas: int | None
) -> tuple[int, int]:
    """One process holds one copy: there is nothing to replicate."""
    return 1, 1
