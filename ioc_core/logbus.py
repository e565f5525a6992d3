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

A log opened with a directory (`open_log`, as `ioc up` does under its data directory) is also
written to disk: each partition as segment files of length-prefixed records, each group's
committed offsets as a small JSON file. A send resolves only once its record is fsynced, so what
the gateway acknowledged to a device survives a killed process, and the next start reads the
segments back and resumes every group from its commits. Without a directory, records live in
memory only.
"""

from __future__ import annotations

import asyncio
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

from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition

log = logging.getLogger(__name__)

SCHEME = "memory://"
DEFAULT_PARTITIONS = 6
# Records kept per partition, like a retention limit: older ones are dropped.
DEFAULT_RETAINED = 500_000
# A partition's records on disk are split into segments of this many, so retention can delete
# whole files.
SEGMENT_RECORDS = 50_000
# offset, timestamp (ms), key length, value length (-1: none)
_RECORD_HEADER = struct.Struct(">qqii")


def is_memory(bootstrap: str) -> bool:
    return bootstrap.startswith(SCHEME)


@dataclass
class _Partition:
    records: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    # Offset of records[0]: records before it were dropped by retention.
    start: int = 0
    # On disk: the directory of its segments and the one being written.
    directory: Path | None = None
    segment: BinaryIO | None = None
    segment_base: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.records)


@dataclass
class _Member:
    consumer: MemoryConsumer
    topics: frozenset[str]


@dataclass
class _Group:
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    members: list[_Member] = field(default_factory=list)


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
        self._dirty: set[int] = set()
        self._syncing: asyncio.Task[None] | None = None
        if directory is not None:
            self._load(directory)

    # -- topics ---------------------------------------------------------------------------

    def topics(self) -> list[str]:
        return sorted(self._topics)

    def create(self, topic: str, partitions: int | None = None) -> bool:
        if topic in self._topics:
            return False
        count = partitions or self.default_partitions
        self._topics[topic] = [_Partition() for _ in range(count)]
        if self.directory is not None:
            for index, partition in enumerate(self._topics[topic]):
                partition.directory = self.directory / "topics" / topic / str(index)
                partition.directory.mkdir(parents=True, exist_ok=True)
        self._rebalance_subscribers(topic)
        return True

    def delete(self, topic: str) -> None:
        for partition in self._topics.pop(topic, []):
            if partition.segment is not None:
                partition.segment.close()
            if partition.directory is not None:
                for path in partition.directory.glob("*.log"):
                    path.unlink()

    def partitions(self, topic: str) -> list[_Partition]:
        if topic not in self._topics:
            self.create(topic)
        return self._topics[topic]

    def partition_count(self, topic: str) -> int | None:
        found = self._topics.get(topic)
        return len(found) if found is not None else None

    # -- records --------------------------------------------------------------------------

    def append(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None
    ) -> RecordMetadata:
        partitions = self.partitions(topic)
        if partition is None:
            # A stable hash of the key, so a key's records keep their order; keyless ones spread.
            index = zlib.crc32(key) % len(partitions) if key is not None else _round_robin(partitions)
        else:
            index = partition
        log = partitions[index]
        timestamp = int(time.time() * 1000)
        record = ConsumerRecord(
            topic=topic,
            partition=index,
            offset=log.end,
            timestamp=timestamp,
            timestamp_type=0,
            key=key,
            value=value,
            checksum=None,
            serialized_key_size=len(key) if key is not None else -1,
            serialized_value_size=len(value) if value is not None else -1,
            headers=(),
        )
        log.records.append(record)
        if log.directory is not None:
            self._write(log, record)
        # Trimmed a tenth at a time: dropping one record per append would move the whole list.
        if len(log.records) > self.retained + max(self.retained // 10, 1):
            dropped = len(log.records) - self.retained
            del log.records[:dropped]
            log.start += dropped
        self._wake()
        tp = TopicPartition(topic, index)
        return RecordMetadata(topic, index, tp, record.offset, timestamp, 0, log.start)

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
            _drop_segments_before(partition.directory, partition.start)
        key, value = record.key, record.value
        partition.segment.write(
            _RECORD_HEADER.pack(
                record.offset,
                record.timestamp,
                len(key) if key is not None else -1,
                len(value) if value is not None else -1,
            )
            + (key or b"")
            + (value or b"")
        )
        self._dirty.add(id(partition))

    def durable(self, metadata: RecordMetadata) -> asyncio.Future[RecordMetadata]:
        """A future that resolves once the record is on disk (at once without a directory)."""
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        if self.directory is None:
            future.set_result(metadata)
            return future
        self._unsynced.append((future, metadata))
        if self._syncing is None or self._syncing.done():
            self._syncing = asyncio.create_task(self._sync(), name="logbus-fsync")
        return future

    async def _sync(self) -> None:
        """Flush and fsync what was written, resolving the sends waiting for it; sends made while
        one fsync runs share the next (group commit)."""
        while self._unsynced:
            waiting, self._unsynced = self._unsynced, []
            files = [
                p.segment
                for partitions in self._topics.values()
                for p in partitions
                if p.segment is not None and id(p) in self._dirty
            ]
            self._dirty.clear()
            for handle in files:
                handle.flush()
            try:
                await asyncio.to_thread(_fsync_all, [handle.fileno() for handle in files])
            except OSError as exc:
                for future, _ in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for future, metadata in waiting:
                if not future.done():
                    future.set_result(metadata)

    def _load(self, directory: Path) -> None:
        """Read the segments and commits a previous run left, up to the retention."""
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
                if len(records) > self.retained:
                    records = records[-self.retained :]
                start = records[0].offset if records else _next_offset_of_empty(folder)
                partitions.append(_Partition(records=records, start=start, directory=folder))
            self._topics[topic_dir.name] = partitions
        for path in sorted((directory / "groups").glob("*.json")):
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable committed offsets %s: %s", path, exc)
                continue
            group = self._groups.setdefault(stored["group"], _Group())
            for entry in stored["offsets"]:
                group.committed[TopicPartition(entry["topic"], entry["partition"])] = entry["offset"]
        if loaded:
            log.info("in-process log bus: %d records read back from %s", loaded, directory)

    def _save_commits(self, group: str) -> None:
        if self.directory is None:
            return
        folder = self.directory / "groups"
        folder.mkdir(parents=True, exist_ok=True)
        committed = self._groups[group].committed
        body = json.dumps(
            {
                "group": group,
                "offsets": [
                    {"topic": tp.topic, "partition": tp.partition, "offset": offset}
                    for tp, offset in sorted(committed.items())
                ],
            }
        )
        name = zlib.crc32(group.encode())
        temporary = folder / f"{name:08x}.json.tmp"
        with temporary.open("w") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(folder / f"{name:08x}.json")

    def close(self) -> None:
        for partitions in self._topics.values():
            for partition in partitions:
                if partition.segment is not None:
                    partition.segment.flush()
                    os.fsync(partition.segment.fileno())
                    partition.segment.close()
                    partition.segment = None

    def read(self, tp: TopicPartition, offset: int, limit: int) -> list[ConsumerRecord[bytes, bytes]]:
        log = self.partitions(tp.topic)[tp.partition]
        first = max(offset, log.start) - log.start
        records: list[ConsumerRecord[bytes, bytes]] = log.records[first : first + limit]
        return records

    def bounds(self, tp: TopicPartition) -> tuple[int, int]:
        log = self.partitions(tp.topic)[tp.partition]
        return log.start, log.end

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

    def commit(self, group: str, offsets: dict[TopicPartition, int]) -> None:
        self._groups.setdefault(group, _Group()).committed.update(offsets)
        self._save_commits(group)

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


def _fsync_all(descriptors: list[int]) -> None:
    for descriptor in descriptors:
        os.fsync(descriptor)


def _read_segments(directory: Path, topic: str, partition: int) -> list[ConsumerRecord[bytes, bytes]]:
    """Every whole record of a partition's segments; a torn record at the end (a crash while
    writing it, before its send was acknowledged) is cut off."""
    records: list[ConsumerRecord[bytes, bytes]] = []
    for path in sorted(directory.glob("*.log")):
        data = path.read_bytes()
        position = 0
        while position + _RECORD_HEADER.size <= len(data):
            offset, timestamp, key_size, value_size = _RECORD_HEADER.unpack_from(data, position)
            body = position + _RECORD_HEADER.size
            finish = body + max(key_size, 0) + max(value_size, 0)
            if finish > len(data) or (records and offset != records[-1].offset + 1):
                break
            key = data[body : body + key_size] if key_size >= 0 else None
            value = data[body + max(key_size, 0) : finish] if value_size >= 0 else None
            records.append(
                ConsumerRecord(
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    timestamp=timestamp,
                    timestamp_type=0,
                    key=key,
                    value=value,
                    checksum=None,
                    serialized_key_size=key_size,
                    serialized_value_size=value_size,
                    headers=(),
                )
            )
            position = finish
        if position < len(data):
            log.warning("in-process log bus: cutting a torn record off %s at byte %d", path, position)
            with path.open("r+b") as handle:
                handle.truncate(position)
    return records


def _next_offset_of_empty(directory: Path) -> int:
    """An empty partition starts where its newest (empty) segment's name says."""
    names = sorted(directory.glob("*.log"))
    return int(names[-1].stem) if names else 0


def _drop_segments_before(directory: Path, start: int) -> None:
    """Delete segments whose records all lie before `start` (the newest is never deleted)."""
    segments = sorted(directory.glob("*.log"))
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
    found = _LOGS.pop(bootstrap.removeprefix(SCHEME) or "default", None)
    if found is not None:
        found.close()


class MemoryProducer:
    """`AIOKafkaProducer`'s `start`, `stop`, `send` and `send_and_wait`; the future a send returns
    resolves once the record is durable (on disk for a log with a directory)."""

    def __init__(self, *, bootstrap_servers: str, **_: Any) -> None:
        self._log = log_for(bootstrap_servers)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None
    ) -> asyncio.Future[RecordMetadata]:
        return self._log.durable(self._log.append(topic, key, value, partition))

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
        self._log.commit(
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
            self._positions[tp] = committed if committed is not None else self._reset_position(tp)
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
