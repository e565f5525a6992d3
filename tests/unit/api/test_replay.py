"""Replaying dead letters over fakes: each letter runs through the gateway's validation; accepted
ones go to their domain's telemetry topic keyed by device, with their original receive time and
delivery flags; refused ones say why; the bus is not touched when nothing is accepted, and a bus
that does not acknowledge fails the replay as a whole."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from aiokafka.errors import KafkaTimeoutError

from api.replay import Replayer, message_of
from ioc_core.errors import ServiceUnavailableError
from ioc_core.models import DeviceRoute
from ioc_core.settings import Settings
from ioc_core.storage import Database, ReplayCandidate
from ioc_core.telemetry import Reading, StatusReport, decode_record

AT = datetime(2026, 12, 7, 8, 30, tzinfo=UTC)
SETTINGS = Settings(kafka_bootstrap="memory://unit-replay", topic_prefix="unit.")


class FakeDevices:
    def __init__(self, *routes: DeviceRoute) -> None:
        self.routes = {r.id: r for r in routes}
        self.lookups: list[str] = []

    async def route(self, device_id: str) -> DeviceRoute | None:
        self.lookups.append(device_id)
        return self.routes.get(device_id)


class FakeDatabase:
    def __init__(self, *routes: DeviceRoute) -> None:
        self.devices = FakeDevices(*routes)


class FakeProducer:
    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.started = self.stopped = 0
        self.sent: list[tuple[str, bytes, str | None]] = []

    async def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1

    async def send(self, topic: str, value: bytes, *, key: str | None = None) -> asyncio.Future[Any]:
        self.sent.append((topic, value, key))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail:
            future.set_exception(KafkaTimeoutError())
        else:
            future.set_result(None)
        return future


def letter(
    letter_id: int,
    device: str,
    payload: bytes,
    *,
    kind: str = "telemetry",
    reason: str = "unknown_device",
    mqtt: dict[str, Any] | None = None,
) -> ReplayCandidate:
    return ReplayCandidate(
        id=letter_id,
        topic=f"ioc/v1/ha-noi/flood/{device}/{kind}",
        reason=reason,
        received_at=AT,
        raw=payload,
        mqtt=mqtt,
    )


def replayer(database: FakeDatabase, producer: FakeProducer) -> Replayer:
    return Replayer(SETTINGS, cast(Database, database), producer_factory=lambda: producer)


FLOOD = DeviceRoute(id="hn-flood-7", city="ha-noi", domain="flood")


async def test_accepted_letters_go_to_the_telemetry_topic_as_the_gateway_sends_them() -> None:
    database, producer = FakeDatabase(FLOOD), FakeProducer()
    flags = {"qos": 1, "retain": False, "dup": True, "packet_id": 77}
    letters = [
        letter(1, "hn-flood-7", b'{"currentLevel": 1.5}', mqtt=flags),
        letter(2, "hn-flood-7", b"online", kind="status"),
        letter(3, "hn-flood-7", b'{"currentLevel": 999}'),
        letter(4, "nobody", b'{"currentLevel": 1}'),
    ]
    outcome = await replayer(database, producer).replay(letters)
    assert outcome.replayed == [1, 2] and outcome.records == 2
    assert [(r.id, r.reason) for r in outcome.refused] == [(3, "out_of_range"), (4, "unknown_device")]
    sent_to = [(topic, key) for topic, _, key in producer.sent]
    assert sent_to == [("unit.ioc.telemetry.flood", "hn-flood-7")] * 2
    reading, status = (decode_record(value) for _, value, _ in producer.sent)
    assert isinstance(reading, Reading) and isinstance(status, StatusReport)
    # The receive time is the original one, which is the reading's time when it carries none; the
    # packet id and DUP flag are those the processors tell copies by.
    assert (reading.ts, reading.received_at, reading.device_time) == (AT, AT, False)
    assert (reading.packet_id, reading.redelivered, reading.metrics) == (77, True, {"currentLevel": 1.5})
    assert status.status == "online"
    assert (producer.started, producer.stopped) == (1, 1)
    assert database.devices.lookups == ["hn-flood-7", "nobody"]  # each device looked up once


async def test_nothing_accepted_touches_no_bus() -> None:
    producer = FakeProducer()
    outcome = await replayer(FakeDatabase(), producer).replay([letter(1, "nobody", b'{"currentLevel": 1}')])
    assert outcome.replayed == [] and len(outcome.refused) == 1
    assert producer.started == 0 and producer.sent == []


async def test_a_bus_that_does_not_acknowledge_fails_the_whole_replay() -> None:
    producer = FakeProducer(fail=True)
    accepted = letter(1, "hn-flood-7", b'{"currentLevel": 1}')
    with pytest.raises(ServiceUnavailableError):
        await replayer(FakeDatabase(FLOOD), producer).replay([accepted])
    assert producer.stopped == 1


def test_a_letter_stored_without_flags_is_a_qos_0_message_retained_only_if_refused_for_it() -> None:
    plain = message_of(letter(1, "d", b"{}"))
    assert (plain.qos, plain.mid, plain.dup, plain.retain) == (0, 0, False, False)
    assert message_of(letter(1, "d", b"{}", reason="retained_telemetry")).retain is True
    flags = {"qos": 1, "retain": False, "dup": False, "packet_id": 5}
    flagged = message_of(letter(1, "d", b"{}", mqtt=flags))
    assert (flagged.qos, flagged.mid) == (1, 5)


async def test_a_retained_reading_is_refused_again() -> None:
    flags = {"qos": 1, "retain": True, "dup": False, "packet_id": 8}
    outcome = await replayer(FakeDatabase(FLOOD), FakeProducer()).replay(
        [letter(1, "hn-flood-7", b'{"currentLevel": 1}', reason="retained_telemetry", mqtt=flags)]
    )
    assert [r.reason for r in outcome.refused] == ["retained_telemetry"]
