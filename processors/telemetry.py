"""The telemetry processor: consumes `ioc.telemetry.*` and `ioc.deadletter` in batches, stores
them, runs the detectors and keeps alarms; and schedules the jobs that judge device silence,
escalate alarms, relay recorded events to `ioc.events` and send the devices' latest state.

This module is the batch runner: poll, decode, write one batch in one transaction
(`processors.batches`), then commit the offsets; it also handles rebalances and reports readiness,
metrics and lag. A processor killed between the write and the commit replays the batch, and the
database absorbs the copies: readings by their primary key (or remembered `seq`), dead letters by
their bus position, status by its time, and detectors skip readings no newer than the state they
stored, so alarms are not counted twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from ioc_core.bus import BusConsumer, BusProducer, BusRecord, ensure_topics
from ioc_core.component import Component
from ioc_core.metrics import Metric
from ioc_core.settings import Settings
from ioc_core.storage import Database, TelemetryBatch
from ioc_core.supervision import DEFAULT_POLICY, RetryPolicy, Supervisor
from processors.batches import WRITING_A_BATCH, BatchOutcome, BatchWriter, decode_batch
from processors.jobs import (
    DeadLetterRetention,
    Escalation,
    Housekeeping,
    IncidentWork,
    LagRefresh,
    MaintenanceEnded,
    Retention,
    ScheduledJob,
    SilenceSweep,
)
from processors.outbox import OutboxRelay
from processors.phases import PhaseClock
from processors.state_events import StateEvents

log = logging.getLogger(__name__)

FAULT_EXIT_CODE = 70
_FINAL_STATE_FLUSH_S = 5.0

# Makes the group member, given the listener that must hear of its rebalances.
ConsumerFactory = Callable[[ConsumerRebalanceListener], BusConsumer]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: TelemetryProcessor) -> None:
        self._processor = processor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._processor.partitions_changing()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._processor.partitions_changing()
        log.info("processor owns %d partitions", len(assigned))


def _database_of(settings: Settings) -> Database:
    return Database(
        settings.database_url.get_secret_value(),
        min_size=1,
        max_size=4,
        seq_window_s=settings.seq_window_s,
        timeout_s=settings.database_timeout_s,
    )


def _consumer_factory(settings: Settings) -> ConsumerFactory:
    topics = settings.topics

    def consumer(listener: ConsumerRebalanceListener) -> BusConsumer:
        return BusConsumer(
            settings.kafka_bootstrap,
            [*topics.telemetry_topics(), topics.deadletter],
            group_id=settings.processor_group_id,
            max_records=settings.processor_batch_max,
            listener=listener,
        )

    return consumer


class TelemetryProcessor(Component):
    """One member of the processor consumer group. Use with `async with`.

    The database and bus clients are made from `settings` unless given; the given ones are
    started and stopped here all the same."""

    def __init__(
        self,
        settings: Settings,
        *,
        database: Database | None = None,
        producer: BusProducer | None = None,
        consumer: ConsumerFactory | None = None,
        retry_policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self._settings = settings
        self._topics = settings.topics
        self._database = database or _database_of(settings)
        self._consumer = (consumer or _consumer_factory(settings))(_Rebalance(self))
        self._producer = producer or BusProducer.of_settings(settings, client_id="ioc-processor")
        self._supervisor = Supervisor("processor", policy=retry_policy)
        # Held while a batch is written and committed; a rebalance waits for it, so the
        # partitions' next owner starts after our last commit.
        self._batch_lock = asyncio.Lock()
        self._clock = PhaseClock()
        self._writer = BatchWriter(
            self._database,
            self._supervisor,
            clock=self._clock,
            rules_refresh_s=settings.rules_refresh_s,
            state_cache_bytes=settings.processor_state_cache_mb * 2**20,
            state_write_s=settings.processor_state_write_s,
        )
        self._relay = OutboxRelay(
            self._database,
            self._producer,
            self._supervisor,
            topic=self._topics.events,
            period_s=settings.outbox_poll_s,
        )
        self._state_events = StateEvents(
            self._producer, topic=self._topics.events, period_s=settings.state_event_interval_s
        )
        self._lag = LagRefresh(self._consumer)
        self.rows_written = 0
        self.duplicates_dropped = 0
        self.batches_written = 0
        self.findings = 0

    @property
    def events_relayed(self) -> int:
        return self._relay.relayed

    @property
    def state_events_sent(self) -> int:
        return self._state_events.sent

    def scheduled_jobs(self) -> list[ScheduledJob]:
        """The periodic jobs, in the order they are started."""
        settings = self._settings
        return [
            SilenceSweep(
                self._database,
                self._consumer,
                settings,
                on_transitions=self._state_events.note_status,
                on_events=self._relay.wake,
            ),
            Escalation(self._database, settings, on_events=self._relay.wake),
            MaintenanceEnded(self._database, settings, on_events=self._relay.wake),
            IncidentWork(self._database, settings, on_events=self._relay.wake),
            self._state_events,
            Housekeeping(self._database, settings),
            Retention(self._database, settings),
            DeadLetterRetention(self._database, settings),
            self._lag,
        ]

    async def start(self) -> None:
        await self._database.start()
        try:
            await ensure_topics(
                self._settings.kafka_bootstrap,
                self._topics.all(),
                partitions=self._settings.topic_partitions,
                replication_factor=self._settings.kafka_replication_factor,
                min_insync_replicas=self._settings.kafka_min_insync_replicas,
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
        self._supervisor.spawn("consume", self._consume)
        self._supervisor.spawn(self._relay.name, self._relay.run)
        for job in self.scheduled_jobs():
            self._supervisor.every(job.name, job.period_s, job.run_once)

    def readiness(self) -> dict[str, str]:
        """Each part's state; all "ok" means the processor is making progress."""
        failing = self._supervisor.failing()
        checks = {"consume": failing.pop("consume", "ok")}
        checks["database"] = failing.pop(WRITING_A_BATCH, "ok")
        checks.update(failing)
        return checks

    def metrics(self) -> list[Metric]:
        lag = Metric(
            "ioc_processor_lag", "gauge", "records on the bus not yet stored and committed, by partition"
        )
        for (topic, partition), behind in sorted(self._lag.lag.items()):
            lag.add(behind, topic=topic, partition=str(partition))
        failing = self._supervisor.failing()
        cache = self._writer.state_cache
        return [
            lag,
            Metric("ioc_processor_rows_written_total", "counter", "readings stored").add(self.rows_written),
            Metric("ioc_processor_duplicates_total", "counter", "repeated readings dropped").add(
                self.duplicates_dropped
            ),
            Metric("ioc_processor_batches_total", "counter", "batches stored and committed").add(
                self.batches_written
            ),
            Metric("ioc_processor_findings_total", "counter", "detector findings").add(self.findings),
            Metric("ioc_processor_events_relayed_total", "counter", "outbox events sent to Kafka").add(
                self.events_relayed
            ),
            Metric("ioc_processor_ready", "gauge", "1 while every part makes progress").add(int(not failing)),
            Metric(
                "ioc_processor_state_cache_bytes",
                "gauge",
                "detector state held in memory (at most IOC_PROCESSOR_STATE_CACHE_MB)",
            ).add(cache.bytes),
            Metric("ioc_processor_state_cache_devices", "gauge", "devices whose detector state is held").add(
                len(cache)
            ),
            Metric(
                "ioc_processor_state_unwritten_devices",
                "gauge",
                "held detector states not yet written to the database (at most IOC_PROCESSOR_STATE_WRITE_S)",
            ).add(cache.unwritten),
            Metric(
                "ioc_processor_state_reads_total",
                "counter",
                "devices' detector states read, by where from: memory, or the database (not held)",
            )
            .add(cache.hits, source="memory")
            .add(cache.misses, source="database"),
            self._clock.metric(),
        ]

    async def stop(self) -> None:
        await self._supervisor.stop()
        # Before leaving the group: the partitions' next owner reads the states we hold.
        async with self._batch_lock:
            await self._writer.forget_detector_states()
        await self._consumer.stop()
        # The last changes would otherwise reach the screens only with the devices' next readings.
        try:
            await asyncio.wait_for(self._state_events.run_once(), _FINAL_STATE_FLUSH_S)
        except TimeoutError:
            log.warning("the last state.changed events were not sent before stopping")
        await self._producer.stop()
        await self._database.stop()

    async def drain(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, until every record on our partitions is stored and committed:
        with the gateway stopped, nothing is left on a bus that does not outlive the process."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                left = await self._consumer.uncommitted()
            except KafkaError as exc:
                log.warning("cannot tell what is left to process: %s", exc)
                return
            if left == 0:
                return
            await asyncio.sleep(0.1)
        log.warning("stopping with records not yet processed; they are read again on the next start")

    async def wait(self) -> None:
        """Until a processing loop fails for good (raises `ComponentFailed`); cancelling this
        wait does not stop the loops."""
        await self._supervisor.wait()

    async def _consume(self) -> None:
        poll = functools.partial(self._consumer.getmany, timeout_ms=1_000)
        while True:
            self._clock.start()
            records = await self._supervisor.retry("polling Kafka", poll)
            self._clock.lap("poll")
            if records:
                await self.process(records)
            else:
                # Quiet partitions: the held states a batch would have written by now.
                async with self._batch_lock:
                    await self._supervisor.retry(WRITING_A_BATCH, self._writer.write_unwritten_states)

    async def process(self, records: list[BusRecord]) -> None:
        """One polled batch: stored in one transaction, then its offsets committed."""
        batch = decode_batch(records, deadletter_topic=self._topics.deadletter)
        self._clock.lap("decode")
        async with self._batch_lock:
            # While the database is away this waits with backoff: nothing is committed, and the
            # consumer's prefetch bounds what is held; the lag shows in /metrics.
            outcome = await self._supervisor.retry(
                WRITING_A_BATCH, functools.partial(self._writer.write, batch)
            )
            self._note_written(batch, outcome)
            self._maybe_inject_crash()
            self._clock.start()
            try:
                await self._consumer.commit()
                self._clock.lap("offset_commit")
            except KafkaError as exc:
                # A rebalance or a Kafka outage: the batch is stored, so the worst outcome is
                # that it is read again (by us or the partitions' next owner) and the database
                # drops the copies. The next successful commit covers it.
                log.warning("offset commit failed; the batch may be replayed: %s", exc)

    def _note_written(self, batch: TelemetryBatch, outcome: BatchOutcome) -> None:
        self._state_events.remember(batch, outcome.kept, outcome.transitions, outcome.profiles)
        self.rows_written += outcome.stored
        self.duplicates_dropped += outcome.duplicates
        self.batches_written += 1
        self.findings += outcome.findings
        if outcome.events_recorded:
            self._relay.wake()

    def _maybe_inject_crash(self) -> None:
        limit = self._settings.fault_exit_after_batches
        if limit and self.batches_written >= limit:
            log.critical("fault injection: exiting after batch %d is written, before its commit", limit)
            logging.shutdown()
            os._exit(FAULT_EXIT_CODE)

    async def partitions_changing(self) -> None:
        """Called on a rebalance: let the batch in hand finish, write the detector states not yet
        written, and forget the held ones."""
        async with self._batch_lock:
            await self._writer.forget_detector_states()
            self._consumer.forget_commits()
