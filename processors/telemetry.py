"""The telemetry writer: consumes `ioc.telemetry.*` in batches and stores them.

Offsets are committed only after the batch's rows are durable. A processor killed between the
write and the commit replays the batch; the readings' primary key absorbs the duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Self

from aiokafka.errors import CommitFailedError, KafkaError

from ioc_core.bus import (
    DEADLETTER_TOPIC,
    BusConsumer,
    BusProducer,
    DeadLetter,
    all_topics,
    ensure_topics,
    telemetry_topics,
)
from ioc_core.errors import IocError, RejectedMessage
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.telemetry import Reading, utcnow

log = logging.getLogger(__name__)

_RETRY_BACKOFF_MAX_S = 10.0


class TelemetryProcessor:
    """One member of the processor consumer group. Use with `async with`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._database = Database(settings.database_url.get_secret_value(), min_size=1, max_size=4)
        self._consumer = BusConsumer(
            settings.kafka_bootstrap,
            telemetry_topics(),
            group_id=settings.processor_group_id,
            max_records=settings.processor_batch_max,
        )
        self._producer = BusProducer(settings.kafka_bootstrap, client_id="ioc-processor")
        self._task: asyncio.Task[None] | None = None
        self.rows_written = 0
        self.batches_written = 0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        await self._database.start()
        try:
            await ensure_topics(
                self._settings.kafka_bootstrap, all_topics(), partitions=self._settings.topic_partitions
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
        self._task = asyncio.create_task(self._run(), name="telemetry-processor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._consumer.stop()
        await self._producer.stop()
        await self._database.stop()

    async def wait(self) -> None:
        """Until the processing loop ends by failing (its error is raised here); cancelling this
        wait does not stop the loop."""
        if self._task is not None:
            await asyncio.wait([self._task])
            if not self._task.cancelled() and self._task.exception() is not None:
                raise self._task.exception()  # type: ignore[misc]

    async def _run(self) -> None:
        while True:
            records = await self._consumer.getmany(timeout_ms=1_000)
            if not records:
                continue
            readings: list[Reading] = []
            for record in records:
                try:
                    readings.append(Reading.from_bytes(record.value))
                except RejectedMessage as rejection:
                    letter = DeadLetter(
                        reason=rejection.reason,
                        detail=rejection.detail,
                        topic=f"{record.topic}/{record.partition}@{record.offset}",
                        received_at=utcnow(),
                        payload=record.value,
                    )
                    await self._producer.send_and_wait(DEADLETTER_TOPIC, letter.to_bytes())
            await self._write(readings)
            try:
                await self._consumer.commit()
            except CommitFailedError as exc:
                # The group rebalanced under us; whoever owns the partitions now replays the batch,
                # which is already stored, and the primary key drops the copies.
                log.warning("offset commit lost to a rebalance; the batch will be replayed: %s", exc)
            self.rows_written += len(readings)
            self.batches_written += 1

    async def _write(self, readings: list[Reading]) -> None:
        delay = 0.5
        while True:
            try:
                await self._database.write_readings(readings)
                return
            except (IocError, KafkaError) as exc:
                if isinstance(exc, IocError) and not exc.retriable:
                    raise
                log.warning("writing %d readings failed, retrying in %.1fs: %s", len(readings), delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_BACKOFF_MAX_S)
