"""Clients of the in-process log bus shaped like aiokafka's: `MemoryProducer`, `MemoryConsumer`
and `MemoryAdmin` copy the parts of `AIOKafkaProducer`, `AIOKafkaConsumer` and
`AIOKafkaAdminClient` that the bus module and the event hub use, so both run unchanged on either
bus. Each works on the log its bootstrap address names."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import ProducerClosed
from aiokafka.structs import ConsumerRecord, OffsetAndTimestamp, RecordMetadata, TopicPartition

from ioc_core.bus.memory.registry import log_for

log = logging.getLogger(__name__)


class MemoryProducer:
    """`AIOKafkaProducer`'s `start`, `stop`, `send` and `send_and_wait`. `send` waits while
    retention has no room for the record (see the package's docstring), as aiokafka's waits for
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

    async def offsets_for_times(
        self, timestamps: dict[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        found = {tp: self._log.offset_for_time(tp, ms) for tp, ms in timestamps.items()}
        return {tp: OffsetAndTimestamp(*at) if at else None for tp, at in found.items()}

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
