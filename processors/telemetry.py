"""The telemetry processor: consumes `ioc.telemetry.*` and `ioc.deadletter` in batches, stores
them, runs the detectors and keeps alarms; judges device silence; relays recorded events to
`ioc.events`.

Each batch is one database transaction: readings, latest state, status changes, detector state,
alarms and their events. Offsets are committed only after it. A processor killed between the
write and the commit replays the batch, and the database absorbs the copies: readings by their
primary key (or remembered `seq`), dead letters by their bus position, status by its time, and
detectors skip readings no newer than the state they stored, so alarms are not counted twice.

After each batch the devices' new latest state waits in memory and goes out every
`IOC_STATE_EVENT_INTERVAL_S` as `state.changed` events (latest wins), for the live screens.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from ioc_core.alarms import Finding
from ioc_core.bus import BusConsumer, BusProducer, ensure_topics
from ioc_core.component import Component
from ioc_core.errors import RejectedMessage
from ioc_core.events import ChangedDevice, state_changed_event
from ioc_core.metrics import Metric
from ioc_core.settings import Settings
from ioc_core.storage import BatchTransaction, Database, DeviceProfileRow, StatusTransition, TelemetryBatch
from ioc_core.supervision import Supervisor
from ioc_core.telemetry import Reading, StoredDeadLetter, decode_record
from processors.detection import (
    DeviceDetection,
    DeviceDetectorState,
    DeviceProfile,
    DistrictFloodCorrelator,
    StationSignal,
    offline_finding,
)

log = logging.getLogger(__name__)

FAULT_EXIT_CODE = 70
_LAG_CHECK_S = 2.0
# A partition counts as caught up (its devices' silence is real, not our lag) within this many records.
_CAUGHT_UP_LAG = 100
# Devices per `state.changed` event, so that one event stays far below Kafka's message size limit.
_STATE_ITEMS_MAX = 500
_FINAL_STATE_FLUSH_S = 5.0


@dataclass(frozen=True, slots=True)
class _PendingState:
    device_id: str
    city: str
    domain: str
    status: str
    ts: datetime
    metrics: dict[str, float]

    def snapshot(self) -> ChangedDevice:
        return {
            "device_id": self.device_id,
            "status": self.status,
            "ts": self.ts.isoformat(),
            "metrics": self.metrics,
        }


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: TelemetryProcessor) -> None:
        self._processor = processor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._processor.partitions_changing()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._processor.partitions_changing()
        log.info("processor owns %d partitions", len(assigned))


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
            timeout_s=settings.database_timeout_s,
        )
        self._consumer = BusConsumer(
            settings.kafka_bootstrap,
            [*self._topics.telemetry_topics(), self._topics.deadletter],
            group_id=settings.processor_group_id,
            max_records=settings.processor_batch_max,
            listener=_Rebalance(self),
        )
        self._producer = BusProducer(settings.kafka_bootstrap, client_id="ioc-processor")
        self._supervisor = Supervisor("processor")
        # Records read and not yet stored and committed, per partition, as of the last poll.
        self._lag: dict[tuple[str, int], int] = {}
        self._events_pending = asyncio.Event()
        # Held while a batch is written and committed; a rebalance waits for it, so the
        # partitions' next owner starts after our last commit.
        self._batch_lock = asyncio.Lock()
        self._detection = DeviceDetection()
        self._correlator = DistrictFloodCorrelator()
        # Detector state as last committed, per device; the database has the same. Dropped when
        # the partition assignment changes, since another processor may have moved it on.
        self._detector_states: dict[str, dict[str, object]] = {}
        self._profiles: dict[str, DeviceProfile] = {}
        self._profiles_loaded_at = 0.0
        # Latest state of the devices changed since the last `state.changed` flush, and the newest
        # reading time seen per device, so that a late reading never moves a screen backwards.
        self._pending_states: dict[str, _PendingState] = {}
        self._newest_state_ts: dict[str, datetime] = {}
        self.rows_written = 0
        self.duplicates_dropped = 0
        self.batches_written = 0
        self.events_relayed = 0
        self.state_events_sent = 0
        self.findings = 0

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
        supervisor = self._supervisor
        supervisor.spawn("consume", self._consume)
        supervisor.every("silence", self._settings.silence_check_s, self._sweep_silent)
        supervisor.every("escalation", self._settings.silence_check_s, self._escalate)
        supervisor.spawn("relay", self._relay_events)
        supervisor.every("state events", self._settings.state_event_interval_s, self._flush_states)
        supervisor.every("housekeeping", 60, self._database.housekeeping)
        supervisor.every("retention", self._settings.retention_check_s, self._apply_retention)
        supervisor.every("lag", _LAG_CHECK_S, self._refresh_lag)

    def readiness(self) -> dict[str, str]:
        """Each part's state; all "ok" means the processor is making progress."""
        failing = self._supervisor.failing()
        checks = {"consume": failing.pop("consume", "ok")}
        checks["database"] = failing.pop("writing a batch", "ok")
        checks.update(failing)
        return checks

    def metrics(self) -> list[Metric]:
        lag = Metric(
            "ioc_processor_lag", "gauge", "records on the bus not yet stored and committed, by partition"
        )
        for (topic, partition), behind in sorted(self._lag.items()):
            lag.add(behind, topic=topic, partition=str(partition))
        failing = self._supervisor.failing()
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
        ]

    async def stop(self) -> None:
        await self._supervisor.stop()
        await self._consumer.stop()
        # The last changes would otherwise reach the screens only with the devices' next readings.
        try:
            await asyncio.wait_for(self._flush_states(), _FINAL_STATE_FLUSH_S)
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
            records = await self._supervisor.retry("polling Kafka", poll)
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
            async with self._batch_lock:
                # While the database is away this waits with backoff: nothing is committed, and the
                # consumer's prefetch bounds what is held; the lag shows in /metrics.
                await self._supervisor.retry("writing a batch", functools.partial(self._write, batch))
                self._maybe_inject_crash()
                try:
                    await self._consumer.commit()
                except KafkaError as exc:
                    # A rebalance or a Kafka outage: the batch is stored, so the worst outcome is
                    # that it is read again (by us or the partitions' next owner) and the database
                    # drops the copies. The next successful commit covers it.
                    log.warning("offset commit failed; the batch may be replayed: %s", exc)

    def _maybe_inject_crash(self) -> None:
        limit = self._settings.fault_exit_after_batches
        if limit and self.batches_written >= limit:
            log.critical("fault injection: exiting after batch %d is written, before its commit", limit)
            logging.shutdown()
            os._exit(FAULT_EXIT_CODE)

    async def partitions_changing(self) -> None:
        """Called on a rebalance: let the batch in hand finish, then forget cached detector state."""
        async with self._batch_lock:
            self._detector_states.clear()
            self._consumer.forget_commits()

    async def _write(self, batch: TelemetryBatch) -> None:
        device_ids = {record.device_id for record, _ in batch.records}
        profiles = await self._device_profiles(device_ids)
        async with self._database.transaction() as transaction:
            result = await transaction.write(batch)
            by_device: dict[str, list[Reading]] = {}
            for reading in result.kept:
                by_device.setdefault(reading.device_id, []).append(reading)
            states = await self._working_states(transaction, [d for d in by_device if d in profiles])
            findings: list[Finding] = []
            signals: dict[str, dict[str, object] | None] = {}
            districts: dict[tuple[str, str], datetime] = {}
            for device_id, state in states.items():
                profile = profiles[device_id]
                readings = by_device[device_id]
                findings.extend(self._detection.evaluate(profile, readings, state))
                if profile.domain == "flood":
                    signal = self._correlator.station_signal(profile, state)
                    signals[device_id] = signal.to_json() if signal is not None else None
                    if profile.district:
                        newest = max(r.ts for r in readings)
                        key = (profile.city, profile.district)
                        districts[key] = max(newest, districts.get(key, newest))
            new_states = {device_id: state.to_json() for device_id, state in states.items()}
            await transaction.save_detector_states(new_states, signals)
            for (city, district), newest in sorted(districts.items()):
                stored, active = await transaction.district_flood_signals(city, district)
                finding = self._correlator.evaluate(
                    city=city,
                    district=district,
                    signals=_readable_signals(stored),
                    active=active,
                    now=newest,
                )
                if finding is not None:
                    findings.append(finding)
            findings.extend(_offline_findings(result.transitions))
            alarm_events = await transaction.apply_findings(findings)
        self._detector_states.update(new_states)
        self._remember_states(batch, result.kept, result.transitions, profiles)
        self.rows_written += result.stored
        self.duplicates_dropped += result.duplicates
        self.batches_written += 1
        self.findings += len(findings)
        if result.events or alarm_events:
            self._events_pending.set()

    async def _working_states(
        self, transaction: BatchTransaction, device_ids: list[str]
    ) -> dict[str, DeviceDetectorState]:
        """Fresh copies of the devices' committed detector state, loading what is not cached."""
        missing = [d for d in device_ids if d not in self._detector_states]
        loaded = await transaction.detector_states(missing) if missing else {}
        return {
            device_id: DeviceDetectorState.from_json(
                self._detector_states.get(device_id) or loaded.get(device_id) or {}
            )
            for device_id in device_ids
        }

    async def _device_profiles(self, device_ids: set[str]) -> dict[str, DeviceProfile]:
        """What detection needs to know of each device; re-read now and then so that changed
        thresholds take effect. Devices no longer registered are left out."""
        if time.monotonic() - self._profiles_loaded_at > self._settings.registry_refresh_s:
            self._profiles.clear()
            self._profiles_loaded_at = time.monotonic()
        missing = [d for d in device_ids if d not in self._profiles]
        if missing:
            rows = await self._supervisor.retry(
                "writing a batch", functools.partial(self._database.devices.profiles, missing)
            )
            self._profiles.update((row.id, _profile_of(row)) for row in rows)
        return {d: self._profiles[d] for d in device_ids if d in self._profiles}

    async def _refresh_lag(self) -> None:
        self._lag = await self._consumer.lag()

    async def _sweep_silent(self) -> None:
        caught_up = await self._consumer.caught_up(max_lag=_CAUGHT_UP_LAG)
        owned = [
            (domain, partition)
            for topic, partition in caught_up
            if (domain := self._topics.domain_of(topic)) is not None
        ]
        if not owned:
            return
        async with self._database.transaction() as transaction:
            transitions = await transaction.sweep_silent(owned, self._settings.offline_after())
            await transaction.apply_findings(_offline_findings(transitions))
        self._note_status(transitions)
        if transitions:
            log.info("%d devices went silent", len(transitions))
            self._events_pending.set()

    async def _escalate(self) -> None:
        async with self._database.transaction() as transaction:
            events = await transaction.escalate_alarms(self._settings.escalate_after())
        if events:
            log.warning("%d alarms escalated: nobody acknowledged them in time", len(events))
            self._events_pending.set()

    async def _apply_retention(self) -> None:
        removed = await self._database.readings.apply_retention(timedelta(days=self._settings.retention_days))
        if removed:
            log.info(
                "retention removed %d chunks or rows older than %d days",
                removed,
                self._settings.retention_days,
            )

    async def _relay_events(self) -> None:
        """Publish recorded events to Kafka, then mark them published (at least once, in order)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._events_pending.wait(), timeout=self._settings.outbox_poll_s)
            self._events_pending.clear()
            await self._supervisor.retry("relaying events", self._relay_pending)

    async def _relay_pending(self) -> None:
        while await self._relay_once(500) == 500:
            pass

    async def _relay_once(self, limit: int) -> int:
        async with self._database.outbox.unpublished(limit) as claim:
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

    def _remember_states(
        self,
        batch: TelemetryBatch,
        kept: list[Reading],
        transitions: list[StatusTransition],
        profiles: dict[str, DeviceProfile],
    ) -> None:
        """Note the committed batch's changes for the next `state.changed` flush (latest wins).
        Metrics merge into what is pending, as they do in the stored latest state."""
        # A device's status after the batch: its last record decides, as in storage.
        statuses: dict[str, str] = {}
        for record, _ in batch.records:
            statuses[record.device_id] = "online" if isinstance(record, Reading) else record.status
        statuses.update((t.device_id, t.status) for t in transitions)
        for reading in sorted(kept, key=lambda r: r.ts):
            profile = profiles.get(reading.device_id)
            if profile is None:
                continue  # no longer registered: it has no latest state either
            newest = self._newest_state_ts.get(reading.device_id)
            if newest is not None and reading.ts < newest:
                continue  # a late reading is stored but never moves "latest" backwards
            pending = self._pending_states.get(reading.device_id)
            self._pending_states[reading.device_id] = _PendingState(
                device_id=reading.device_id,
                city=profile.city,
                domain=profile.domain,
                status=statuses.get(reading.device_id, "online"),
                ts=reading.ts,
                metrics={**pending.metrics, **reading.metrics} if pending else dict(reading.metrics),
            )
            self._newest_state_ts[reading.device_id] = reading.ts
        self._note_status(transitions)

    def _note_status(self, transitions: Iterable[StatusTransition]) -> None:
        for transition in transitions:
            pending = self._pending_states.get(transition.device_id)
            if pending is not None:
                self._pending_states[transition.device_id] = replace(pending, status=transition.status)

    async def _flush_states(self) -> None:
        """Send the pending latest states as `state.changed` events, per city and domain.

        Straight to Kafka, not through the outbox: they are snapshots, and a lost one is superseded
        by the next. A failed send puts its devices back into the pending set (unless newer state
        is pending by then), so a device that falls silent still gets its last state out.
        """
        if not self._pending_states:
            return
        pending, self._pending_states = self._pending_states, {}
        places: dict[tuple[str, str], list[_PendingState]] = {}
        for state in pending.values():
            places.setdefault((state.city, state.domain), []).append(state)
        now = datetime.now(tz=UTC)
        chunks = [
            states[start : start + _STATE_ITEMS_MAX]
            for _, states in sorted(places.items())
            for start in range(0, len(states), _STATE_ITEMS_MAX)
        ]
        try:
            results = await asyncio.gather(
                *(self._send_states(chunk, now) for chunk in chunks), return_exceptions=True
            )
        except BaseException:
            # Stopped while sending: what was sent may go again, which a snapshot allows.
            self._restore_states(pending.values())
            raise
        failures = [(chunk, r) for chunk, r in zip(chunks, results, strict=True) if r is not None]
        for chunk, error in failures:
            if not isinstance(error, KafkaError):
                raise error
            self._restore_states(chunk)
        if failures:
            log.warning(
                "sending %d of %d state.changed events failed, retrying with the next: %s",
                len(failures),
                len(chunks),
                failures[0][1],
            )
        self.state_events_sent += len(chunks) - len(failures)

    def _restore_states(self, states: Iterable[_PendingState]) -> None:
        for state in states:
            newer = self._pending_states.get(state.device_id)
            self._pending_states[state.device_id] = (
                replace(newer, metrics={**state.metrics, **newer.metrics}) if newer else state
            )

    async def _send_states(self, states: list[_PendingState], at: datetime) -> None:
        event = state_changed_event(
            city=states[0].city, domain=states[0].domain, items=[s.snapshot() for s in states], at=at
        )
        await self._producer.send_and_wait(self._topics.events, event.to_bytes(), key=event.key)


def _profile_of(row: DeviceProfileRow) -> DeviceProfile:
    return DeviceProfile.of(
        id=row.id,
        city=row.city,
        domain=row.domain,
        name=row.name,
        district=row.district,
        thresholds=row.thresholds,
    )


def _offline_findings(transitions: list[StatusTransition]) -> list[Finding]:
    """A device going offline raises its `offline` alarm; coming back resolves it."""
    return [
        offline_finding(
            DeviceProfile.of(
                id=t.device_id, city=t.city, domain=t.domain, name=t.name, district=t.district, thresholds={}
            ),
            at=t.at,
            active=t.status == "offline",
        )
        for t in transitions
    ]


def _readable_signals(stored: list[dict[str, object]]) -> list[StationSignal]:
    """Stored station signals; one that cannot be read (written by another version) is left out
    rather than stopping the district's correlation."""
    signals = []
    for item in stored:
        try:
            signals.append(StationSignal.from_json(item))
        except ValueError as exc:
            log.warning("ignoring an unreadable flood station signal %r: %s", item, exc)
    return signals
