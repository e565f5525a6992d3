"""The processor over in-memory fakes: a batch goes through detection into one transaction before
its offsets are committed, a database outage delays the commit without losing the batch, a
redelivered batch changes nothing, and each scheduled job does its one thing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ioc_core.alarms import Finding
from ioc_core.bus import BusRecord
from ioc_core.settings import Settings
from ioc_core.storage import DeviceProfileRow, OutboxEvent, StatusTransition
from ioc_core.supervision import RetryPolicy
from ioc_core.telemetry import Reading
from processors.batches import decode_batch
from processors.detection import DeviceDetection, DeviceDetectorState, DeviceProfile
from processors.phases import PHASES, PhaseClock
from processors.telemetry import TelemetryProcessor
from tests.unit.processors.fakes import FakeConsumer, FakeDatabase, FakeProducer

START = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)
STATION = DeviceProfileRow(
    id="hn-flood-001",
    city="ha-noi",
    domain="flood",
    name="Trạm Phan Đình Phùng",
    district="Ba Đình",
    thresholds={"currentLevel": {"rise_above": None, "zscore": None}},
)
# The zone of the station: its registered district while it lies in no area.
ZONE = "district:ha-noi:Ba Đình"
FAST = RetryPolicy(initial_s=0.001, max_s=0.002, jitter_s=0.0)


@dataclass
class Rig:
    processor: TelemetryProcessor
    settings: Settings
    database: FakeDatabase
    consumer: FakeConsumer
    producer: FakeProducer
    journal: list[str]


def rig(*, zone_area: str | None = None, **settings: Any) -> Rig:
    journal: list[str] = []
    station = dataclasses.replace(STATION, zone_area=zone_area, zone_name_vi=zone_area and "Phường Ba Đình")
    database = FakeDatabase(journal, [station])
    producer = FakeProducer()
    consumers: list[FakeConsumer] = []

    def consumer(listener: Any) -> Any:
        consumers.append(FakeConsumer(journal, listener))
        return consumers[-1]

    config = Settings(kafka_bootstrap="memory://unit-processor", topic_prefix="unit.", **settings)
    processor = TelemetryProcessor(
        config, database=database, producer=producer, consumer=consumer, retry_policy=FAST
    )
    return Rig(processor, config, database, consumers[0], producer, journal)


def readings(*levels: float, first: int = 0) -> list[Reading]:
    return [
        Reading(
            device_id=STATION.id,
            city=STATION.city,
            domain=STATION.domain,
            ts=START + timedelta(seconds=10 * (first + index)),
            seq=first + index,
            metrics={"currentLevel": level},
            received_at=START,
        )
        for index, level in enumerate(levels)
    ]


def records(settings: Settings, batch: list[Reading]) -> list[BusRecord]:
    topic = settings.topics.telemetry("flood")
    return [
        BusRecord(topic=topic, partition=0, offset=r.seq or 0, key=r.device_id, value=r.to_bytes())
        for r in batch
    ]


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.001)


def summary(findings: list[Any]) -> list[tuple[str, bool, str | None]]:
    return [(f.rule, f.active, f.severity) for f in findings]


async def test_a_batch_is_stored_with_its_findings_before_its_offsets_are_committed() -> None:
    r = rig()
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 4.7)))
        await until(lambda: r.consumer.commits == 1)
    assert r.journal == ["stored 2", "offsets committed"]
    assert summary(r.database.findings) == [("threshold.currentLevel", True, "critical")]
    assert STATION.id in r.database.detector_states
    assert (r.processor.rows_written, r.processor.batches_written, r.processor.findings) == (2, 1, 1)


async def test_a_retriable_write_failure_is_retried_and_nothing_is_committed_meanwhile() -> None:
    r = rig()
    r.database.write_failures = 10**9
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 4.7)))
        await until(lambda: r.journal.count("write failed") >= 3)
        assert r.consumer.commits == 0
        assert r.processor.readiness()["database"].startswith("ServiceUnavailableError")
        r.database.write_failures = 0
        await until(lambda: r.consumer.commits == 1)
        assert r.processor.readiness() == {"consume": "ok", "database": "ok"}
    assert r.journal[-2:] == ["stored 2", "offsets committed"]
    assert set(r.journal[:-2]) == {"write failed"}
    assert len(r.database.findings) == 1


async def test_a_redelivered_batch_is_harmless() -> None:
    r = rig()
    batch = records(r.settings, readings(1.2, 4.7))
    async with r.processor:
        await r.consumer.polls.put(batch)
        await r.consumer.polls.put(batch)
        await until(lambda: r.consumer.commits == 2)
    assert r.journal == ["stored 2", "offsets committed", "stored 0", "offsets committed"]
    assert len(r.database.findings) == 1
    assert (r.processor.rows_written, r.processor.duplicates_dropped) == (2, 2)


async def test_a_zone_is_judged_only_when_a_station_rises_or_its_alarm_is_open() -> None:
    r = rig()
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.0, 1.0, 1.0)))
        await until(lambda: r.consumer.commits == 1)
        assert r.database.zone_signal_reads == []  # calm water, no open alarm: nothing to judge

        await r.consumer.polls.put(records(r.settings, readings(1.0, 4.7, first=3)))
        await until(lambda: r.consumer.commits == 2)
        # A station registered with a district and in no area: its zone is the district.
        assert r.database.zone_signal_reads == [(ZONE, True)]  # rising: the rising stations

        r.database.open_zone_alarms.add(ZONE)
        await r.consumer.polls.put(records(r.settings, readings(1.0, 1.0, first=5)))
        await until(lambda: r.consumer.commits == 3)
    # An open alarm: every station, since the calm ones are what resolves it.
    assert r.database.zone_signal_reads[-1] == (ZONE, False)


async def test_a_station_that_now_lies_in_an_area_lets_its_districts_old_alarm_pass() -> None:
    r = rig(zone_area="ha-noi.ward.ba-dinh")
    r.database.open_zone_alarms.add(ZONE)
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.0, 1.0, 1.0)))
        await until(lambda: r.consumer.commits == 1)
    # The district's open alarm is judged from the stations still counting in it (none here).
    assert r.database.zone_signal_reads == [(ZONE, False)]
    passed = [f for f in r.database.findings if f.subject == ZONE]
    assert passed and not passed[0].active and passed[0].rule == "flood.district"


def _uninterrupted_findings(*batches: list[Reading]) -> list[Finding]:
    """What one detection run over `batches`, never interrupted, finds for the station."""
    profile = DeviceProfile.of(
        id=STATION.id,
        city=STATION.city,
        domain=STATION.domain,
        name=STATION.name,
        district=STATION.district,
        thresholds=STATION.thresholds,
    )
    state = DeviceDetectorState()
    detection = DeviceDetection()
    return [finding for batch in batches for finding in detection.evaluate(profile, batch, state)]


async def test_after_a_rebalance_detection_goes_on_from_the_stored_state() -> None:
    r = rig()
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 4.7)))
        await until(lambda: r.consumer.commits == 1)
        await r.consumer.listener.on_partitions_assigned(set())
        await r.consumer.polls.put(records(r.settings, readings(4.8, 1.0, 1.0, 1.0, first=2)))
        await until(lambda: r.consumer.commits == 2)
    assert "commits forgotten" in r.journal
    # The same findings as one uninterrupted run over all the readings.
    expected = _uninterrupted_findings(readings(1.2, 4.7), readings(4.8, 1.0, 1.0, 1.0, first=2))
    assert r.database.findings == expected


async def test_a_transaction_that_fails_after_detection_is_retried_from_the_committed_state() -> None:
    r = rig()
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 4.7)))
        await until(lambda: r.consumer.commits == 1)
        r.database.findings_failures = 1
        await r.consumer.polls.put(records(r.settings, readings(4.8, 1.0, 1.0, 1.0, first=2)))
        await until(lambda: r.consumer.commits == 2)
    assert "findings failed" in r.journal
    # Detection's state is kept in memory between batches; the failed attempt's changes to it
    # are dropped, so the retry finds what one uninterrupted run finds.
    expected = _uninterrupted_findings(readings(1.2, 4.7), readings(4.8, 1.0, 1.0, 1.0, first=2))
    assert r.database.findings == expected and len(expected) >= 2


def test_undecodable_records_and_dead_letters_become_the_batch_s_dead_letters() -> None:
    topics = Settings(topic_prefix="unit.").topics
    dead = json.dumps(
        {"reason": "bad_json", "topic": "ioc/ha-noi/flood/x/telemetry", "received_at": START.isoformat()}
    ).encode()
    batch = decode_batch(
        [
            BusRecord(topics.telemetry("flood"), 1, 7, None, b"not json"),
            BusRecord(topics.deadletter, 0, 3, None, dead),
            *records(Settings(topic_prefix="unit."), readings(1.0)),
        ],
        deadletter_topic=topics.deadletter,
    )
    assert [d.source for d in batch.dead_letters] == [
        f"{topics.telemetry('flood')}/1@7",
        f"{topics.deadletter}/0@3",
    ]
    assert [record for record, _ in batch.records] == readings(1.0)


def test_each_scheduled_job_runs_on_its_own_period() -> None:
    r = rig(silence_check_s=3, state_event_interval_s=4, retention_check_s=5)
    assert [(job.name, job.period_s) for job in r.processor.scheduled_jobs()] == [
        ("silence", 3),
        ("escalation", 3),
        ("maintenance", 2.0),
        ("incidents", 2.0),
        ("state events", 4),
        ("housekeeping", 60),
        ("retention", 5),
        ("dead-letter retention", 5),
        ("lag", 2),
    ]


async def test_start_runs_the_loops_and_every_job_under_the_supervisor() -> None:
    r = rig()
    async with r.processor:
        names = {task.get_name() for task in asyncio.all_tasks()}
    expected = [
        "consume",
        "relay",
        "silence",
        "escalation",
        "maintenance",
        "incidents",
        "state events",
        "housekeeping",
        "retention",
        "dead-letter retention",
        "lag",
    ]
    assert {f"processor: {name}" for name in expected} <= names


def offline(at: datetime) -> StatusTransition:
    return StatusTransition(
        STATION.id,
        STATION.city,
        STATION.domain,
        STATION.name,
        STATION.district,
        "offline",
        "online",
        "silence",
        at,
    )


async def test_the_silence_sweep_judges_caught_up_partitions_and_wakes_the_relay() -> None:
    r = rig(silence_check_s=0.005, outbox_poll_s=60)
    topics = r.settings.topics
    r.consumer.caught_up_partitions = [(topics.telemetry("flood"), 3), (topics.deadletter, 0)]
    r.database.silent = [offline(START)]
    r.database.pending = [OutboxEvent(1, topics.events, "k", '{"type": "device.offline"}')]
    async with r.processor:
        await until(lambda: bool(r.producer.sent))
    assert r.database.swept[0] == [("flood", 3)]
    assert summary(r.database.findings)[0] == ("offline", True, "medium")
    assert r.producer.sent[0] == (topics.events, b'{"type": "device.offline"}', "k")


async def test_escalation_wakes_the_relay_for_the_events_it_records() -> None:
    r = rig(silence_check_s=0.005, outbox_poll_s=60)
    r.database.escalated = [object()]
    r.database.pending = [OutboxEvent(1, r.settings.topics.events, None, "{}")]
    async with r.processor:
        await until(lambda: bool(r.producer.sent))
    assert "escalate" in r.journal


async def test_retention_housekeeping_and_lag_each_call_their_one_thing() -> None:
    r = rig(retention_days=30, audit_retention_days=400)
    jobs = {job.name: job for job in r.processor.scheduled_jobs()}
    r.consumer.partition_lag = {("unit.ioc.telemetry.flood", 2): 7}
    for name in ("retention", "housekeeping", "lag"):
        await jobs[name].run_once()
    assert r.database.retention == [timedelta(days=30)]
    assert r.database.housekept == 1 and r.database.audit_keep_days == 400
    lag = next(m for m in r.processor.metrics() if m.name == "ioc_processor_lag")
    assert lag.samples == [({"topic": "unit.ioc.telemetry.flood", "partition": "2"}, 7)]


async def test_the_state_events_job_sends_the_latest_state_of_a_stored_batch() -> None:
    r = rig()
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 4.7)))
        await until(lambda: r.consumer.commits == 1)
        jobs = {job.name: job for job in r.processor.scheduled_jobs()}
        await jobs["state events"].run_once()
        await jobs["state events"].run_once()  # nothing new: nothing sent
    ((topic, value, _),) = r.producer.sent
    event = json.loads(value)
    assert (topic, event["type"], event["subject"]) == (
        r.settings.topics.events,
        "state.changed",
        "ha-noi/flood",
    )
    assert event["data"]["items"][0]["metrics"] == {"currentLevel": 4.7}
    assert r.processor.state_events_sent == 1


async def test_the_relay_sends_recorded_events_in_order_and_marks_them_published() -> None:
    r = rig(outbox_poll_s=60)
    topic = r.settings.topics.events
    r.database.events_per_finding = [object()]
    r.database.pending = [OutboxEvent(i, topic, f"k{i}", f'{{"n": {i}}}') for i in range(3)]
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 4.7)))  # an alarm: events recorded
        await until(lambda: len(r.producer.sent) == 3)
    # Then, on stopping, the batch's state.changed snapshot.
    assert [key for _, _, key in r.producer.sent] == ["k0", "k1", "k2", "ha-noi/flood"]
    assert r.database.pending == []
    assert r.processor.events_relayed == 3


async def test_metrics_say_where_the_batches_spent_their_time() -> None:
    r = rig()
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 4.7)))
        await until(lambda: r.consumer.commits == 1)
        seconds = next(m for m in r.processor.metrics() if m.name == "ioc_processor_batch_seconds_total")
    spent = {labels["phase"]: value for labels, value in seconds.samples}
    assert list(spent) == list(PHASES)
    assert all(value >= 0 for value in spent.values())
    assert sum(spent.values()) > 0


def test_a_lap_charges_the_time_since_the_last_one_to_its_phase(monkeypatch: Any) -> None:
    now = iter([10.0, 10.5, 12.0, 12.25])
    monkeypatch.setattr("processors.phases.time.monotonic", lambda: next(now))
    clock = PhaseClock()
    clock.lap("poll")
    clock.lap("detect")
    clock.lap("poll")
    assert (clock.seconds["poll"], clock.seconds["detect"]) == (0.75, 1.5)
