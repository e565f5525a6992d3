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
and the event hub use, so both run unchanged on either. Records live in memory: a process that
ends loses what its consumers had not yet processed, which is why `ioc up` stops the gateway
first and lets the processors catch up before it stops them.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition

SCHEME = "memory://"
DEFAULT_PARTITIONS = 6
# Records kept per partition, like a retention limit: older ones are dropped.
DEFAULT_RETAINED = 500_000


def is_memory(bootstrap: str) -> bool:
    return bootstrap.startswith(SCHEME)


@dataclass
class _Partition:
    records: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    # Offset of records[0]: records before it were dropped by retention.
    start: int = 0

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

    def __init__(self, *, partitions: int = DEFAULT_PARTITIONS, retained: int = DEFAULT_RETAINED) -> None:
        self.default_partitions = partitions
        self.retained = retained
        self._topics: dict[str, list[_Partition]] = {}
        self._groups: dict[str, _Group] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    # -- topics ---------------------------------------------------------------------------

    def topics(self) -> list[str]:
        return sorted(self._topics)

    def create(self, topic: str, partitions: int | None = None) -> bool:
        if topic in self._topics:
            return False
        self._topics[topic] = [_Partition() for _ in range(partitions or self.default_partitions)]
        self._rebalance_subscribers(topic)
        return True

    def delete(self, topic: str) -> None:
        self._topics.pop(topic, None)

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
        if len(log.records) > self.retained:
            dropped = len(log.records) - self.retained
            del log.records[:dropped]
            log.start += dropped
        self._wake()
        tp = TopicPartition(topic, index)
        return RecordMetadata(topic, index, tp, record.offset, timestamp, 0, log.start)

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


def forget(bootstrap: str) -> None:
    _LOGS.pop(bootstrap.removeprefix(SCHEME) or "default", None)


class MemoryProducer:
    """`AIOKafkaProducer`'s `start`, `stop`, `send` and `send_and_wait`; a send is durable (as
    far as the process is) as soon as it returns."""

    def __init__(self, *, bootstrap_servers: str, **_: Any) -> None:
        self._log = log_for(bootstrap_servers)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None
    ) -> asyncio.Future[RecordMetadata]:
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        future.set_result(self._log.append(topic, key, value, partition))
        return future

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
