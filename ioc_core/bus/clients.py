"""The producer and consumer every component uses, over whichever driver the bootstrap names."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaConnectionError
from aiokafka.partitioner import DefaultPartitioner, murmur2

from ioc_core.bus.drivers import new_consumer, new_producer
from ioc_core.component import Component
from ioc_core.errors import ServiceUnavailableError

if TYPE_CHECKING:
    from ioc_core.settings import Settings  # the settings import the bus

log = logging.getLogger(__name__)


class KeyedPartitioner:
    """aiokafka's default partitioner (the Java client's: murmur2 of the key modulo the partition
    count, so every client puts a device on the same partition) with each key's hash remembered.
    aiokafka's murmur2 is pure Python and was a tenth of the gateway's time per reading, for a
    handful of keys (devices) that recur all day."""

    def __init__(self, *, limit: int = 1_000_000) -> None:
        self._limit = limit
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._limit:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[hashed % len(all_partitions)]


class BusProducer(Component):
    """Idempotent producer (`acks=all`) that batches; `send` does not wait for the broker."""

    def __init__(
        self, bootstrap: str, *, linger_ms: int = 5, compression: str = "none", client_id: str = "ioc"
    ) -> None:
        self._bootstrap = bootstrap
        self._producer = new_producer(
            bootstrap,
            client_id=client_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=linger_ms,
            compression_type=None if compression == "none" else compression,
            max_batch_size=256 * 1024,
            request_timeout_ms=30_000,
            partitioner=KeyedPartitioner(),
        )

    @classmethod
    def of_settings(cls, settings: Settings, *, client_id: str) -> BusProducer:
        """The producer a component runs, with the settings' Kafka client options."""
        return cls(
            settings.kafka_bootstrap,
            linger_ms=settings.kafka_linger_ms,
            compression=settings.kafka_compression,
            client_id=client_id,
        )

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaConnectionError as exc:
            await self._producer.stop()
            raise ServiceUnavailableError(
                f"Kafka at {self._bootstrap} is unreachable: {exc}", public="Kafka is unavailable"
            ) from exc

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, topic: str, value: bytes, *, key: str | None = None) -> asyncio.Future[Any]:
        """Queue a record; the returned future resolves once Kafka has acknowledged it."""
        future: asyncio.Future[Any] = await self._producer.send(
            topic, value, key=key.encode() if key is not None else None
        )
        return future

    async def send_and_wait(self, topic: str, value: bytes, *, key: str | None = None) -> None:
        await (await self.send(topic, value, key=key))


@dataclass(frozen=True, slots=True)
class BusRecord:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes


class BusConsumer(Component):
    """A consumer-group member that commits only when told to, after its rows are durable."""

    def __init__(
        self,
        bootstrap: str,
        topics: Sequence[str],
        *,
        group_id: str,
        max_records: int = 5_000,
        listener: ConsumerRebalanceListener | None = None,
        fetch_max_wait_ms: int = 50,
    ) -> None:
        self._bootstrap = bootstrap
        self._max_records = max_records
        self._consumer = new_consumer(
            bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=max_records,
            # aiokafka fetches only the partitions it holds nothing of; a fetch out for the others
            # is held by the broker until data comes or this passes, and a partition drained in
            # the meantime waits for it. At the default 500 ms that was the latency tail.
            fetch_max_wait_ms=fetch_max_wait_ms,
        )
        self._consumer.subscribe(list(topics), listener=listener)
        # Next offset to read and next offset committed, per partition, as this member saw them;
        # the difference to the partition's end is its lag, known without asking the broker.
        self._read: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        try:
            await self._consumer.start()
        except KafkaConnectionError as exc:
            await self._consumer.stop()
            raise ServiceUnavailableError(
                f"Kafka at {self._bootstrap} is unreachable: {exc}", public="Kafka is unavailable"
            ) from exc

    async def stop(self) -> None:
        await self._consumer.stop()

    async def getmany(self, timeout_ms: int = 1_000) -> list[BusRecord]:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=self._max_records)
        for tp, messages in batches.items():
            if messages:
                self._read[tp] = messages[-1].offset + 1
        return [
            BusRecord(
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                key=message.key.decode(errors="replace") if message.key is not None else None,
                value=message.value if message.value is not None else b"",
            )
            for messages in batches.values()
            for message in messages
        ]

    async def commit(self) -> None:
        read = dict(self._read)
        await self._consumer.commit()
        self._committed.update(read)

    def forget_commits(self) -> None:
        """After a rebalance another member may have committed our new partitions further."""
        self._committed.clear()
        self._read.clear()

    async def lag(self) -> dict[tuple[str, int], int]:
        """Per assigned partition, records at its end not yet stored and committed by this member
        (asks the broker for the ends, so it stays true while the processing loop is stuck)."""
        assigned = list(self._consumer.assignment())
        if not assigned:
            return {}
        ends = await self._consumer.end_offsets(assigned)
        lag = {}
        for tp in assigned:
            committed = self._committed.get(tp)
            if committed is None:
                committed = await self._consumer.committed(tp) or 0
                self._committed[tp] = committed
            lag[(tp.topic, tp.partition)] = max(ends[tp] - committed, 0)
        return lag

    async def uncommitted(self) -> int:
        """Records on the assigned partitions not yet committed (stored and acknowledged)."""
        total = 0
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            committed = await self._consumer.committed(tp)
            total += max(highwater - (committed or 0), 0)
        return total

    async def caught_up(self, *, max_lag: int) -> list[tuple[str, int]]:
        """The assigned partitions whose unread backlog is at most `max_lag` records."""
        partitions = []
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except IllegalStateError:
                continue  # revoked while we looked
            if highwater - position <= max_lag:
                partitions.append((tp.topic, tp.partition))
        return partitions
