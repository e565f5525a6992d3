"""The telemetry processor: consumes `ioc.telemetry.*` and `ioc.deadletter` in batches and stores
them; judges device silence; relays recorded events to `ioc.events`.

Offsets are committed only after the batch's rows are durable. A processor killed between the
write and the commit replays the batch, and the database absorbs the copies: readings by their
primary key (or remembered `seq`), dead letters by their bus position, status by its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaError

from ioc_core.bus import BusConsumer, BusProducer, ensure_topics
from ioc_core.component import Component
from ioc_core.errors import IocError, RejectedMessage
from ioc_core.settings import Settings
from ioc_core.storage import Database, TelemetryBatch
from ioc_core.telemetry import StoredDeadLetter, decode_record

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRY_BACKOFF_MAX_S = 10.0
# A partition counts as caught up (its devices' silence is real, not our lag) within this many records.
_CAUGHT_UP_LAG = 100


class TelemetryProcessor(Component):
    """One member of the processor consumer group. Use with `async with`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topics = settings.topics
        self._database = Database(
            settings.database_url.get_secret_value(),
            min_size=1,
            max_size=4,
            seq_window_s=settings.seq_window_s,
        )
        self._consumer = BusConsumer(
            settings.kafka_bootstrap,
            [*self._topics.telemetry_topics(), self._topics.deadletter],
            group_id=settings.processor_group_id,
            max_records=settings.processor_batch_max,
        )
        self._producer = BusProducer(settings.kafka_bootstrap, client_id="ioc-processor")
        self._tasks: list[asyncio.Task[None]] = []
        self._events_pending = asyncio.Event()
        self.rows_written = 0
        self.duplicates_dropped = 0
        self.batches_written = 0
        self.events_relayed = 0

    async def start(self) -> None:
        await self._database.start()
        try:
            await ensure_topics(
                self._settings.kafka_bootstrap, self._topics.all(), partitions=self._settings.topic_partitions
            )
            await self._producer.start()
            await self._consumer.start()
        except BaseException:
            await self._producer.stop()
            await self._database.stop()
            raise
        log.info(
            "processor joined group %s on storage tier %s",
            self._settings.processor_group_id,
            self._database.tier,
        )
        self._tasks = [
            asyncio.create_task(self._consume(), name="processor-consume"),
            asyncio.create_task(
                self._every(self._settings.silence_check_s, self._sweep_silent), name="processor-silence"
            ),
            asyncio.create_task(self._relay_events(), name="processor-relay"),
            asyncio.create_task(self._every(60, self._database.housekeeping), name="processor-housekeeping"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._consumer.stop()
        await self._producer.stop()
        await self._database.stop()

    async def wait(self) -> None:
        """Until a processing loop ends by failing (its error is raised here); cancelling this
        wait does not stop the loops."""
        if not self._tasks:
            return
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _consume(self) -> None:
        while True:
            try:
                records = await self._consumer.getmany(timeout_ms=1_000)
            except KafkaError as exc:
                log.warning("polling Kafka failed, polling again: %s", exc)
                await asyncio.sleep(1)
                continue
            if not records:
                continue
            batch = TelemetryBatch()
            for record in records:
                source = f"{record.topic}/{record.partition}@{record.offset}"
                if record.topic == self._topics.deadletter:
                    batch.dead_letters.append(StoredDeadLetter.from_bytes(record.value, source=source))
                    continue
                try:
                    batch.records.append((decode_record(record.value), record.partition))
                except RejectedMessage as rejection:
                    batch.dead_letters.append(
                        StoredDeadLetter.of_rejection(rejection, record.value, source=source)
                    )
            result = await self._retrying(
                "writing a batch", functools.partial(self._database.write_batch, batch)
            )
            try:
                await self._consumer.commit()
            except KafkaError as exc:
                # A rebalance or a Kafka outage: the batch is stored, so the worst outcome is that
                # it is read again (by us or the partitions' next owner) and the database drops the
                # copies. The next successful commit covers it.
                log.warning("offset commit failed; the batch may be replayed: %s", exc)
            self.rows_written += result.stored
            self.duplicates_dropped += result.duplicates
            self.batches_written += 1
            if result.events:
                self._events_pending.set()

    async def _sweep_silent(self) -> None:
        caught_up = await self._consumer.caught_up(max_lag=_CAUGHT_UP_LAG)
        owned = [
            (domain, partition)
            for topic, partition in caught_up
            if (domain := self._topics.domain_of(topic)) is not None
        ]
        events = await self._database.sweep_silent_devices(owned, self._settings.offline_after())
        if events:
            log.info("%d devices went silent", len(events))
            self._events_pending.set()

    async def _relay_events(self) -> None:
        """Publish recorded events to Kafka, then mark them published (at least once, in order)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._events_pending.wait(), timeout=self._settings.outbox_poll_s)
            self._events_pending.clear()
            try:
                while await self._relay_once(500) == 500:
                    pass
            except (IocError, KafkaError) as exc:
                log.warning("relaying events failed, retrying: %s", exc)
                await asyncio.sleep(1)

    async def _relay_once(self, limit: int) -> int:
        async with self._database.unpublished_events(limit) as claim:
            if not claim.events:
                return 0
            futures = [
                await self._producer.send(self._topics.events, event.payload.encode(), key=event.key)
                for event in claim.events
            ]
            await asyncio.gather(*futures)
            await claim.mark_published()
        self.events_relayed += len(claim.events)
        return len(claim.events)

    async def _every(self, seconds: float, action: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await action()
            except IocError as exc:
                log.warning("periodic %s failed, trying again in %.0fs: %s", action.__name__, seconds, exc)

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        delay = 0.5
        while True:
            try:
                return await operation()
            except IocError as exc:
                if not exc.retriable:
                    raise
                log.warning("%s failed, retrying in %.1fs: %s", what, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_BACKOFF_MAX_S)
