"""The gateway end to end over in-memory fakes: a message is acknowledged to the broker only
once the bus has acknowledged what it became; a bad one becomes a dead letter; a bus failure
withholds the acknowledgement and the records are sent again; a message of an earlier connection
is never acknowledged."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

from ingest.gateway import Gateway
from ioc_core.metrics import render
from ioc_core.models import DeviceRoute
from ioc_core.settings import Settings
from ioc_core.telemetry import Reading, decode_record
from tests.unit.ingest.fakes import FakeMqtt, FakeProducer, FakeRegistry

TOPIC = "ioc/v1/ha-noi/flood/hn-flood-001/telemetry"
GOOD = b'{"currentLevel": 1.25, "seq": 7}'


@dataclass
class Rig:
    gateway: Gateway
    mqtt: FakeMqtt
    producer: FakeProducer
    settings: Settings


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    settings = Settings(kafka_bootstrap=f"memory://gateway-{uuid.uuid4().hex}", gateway_queue_size=4)
    producer = FakeProducer()
    registry = FakeRegistry(DeviceRoute(id="hn-flood-001", city="ha-noi", domain="flood"))
    gateway = Gateway(settings, producer=producer, registry=registry, source_factory=FakeMqtt)
    async with gateway:
        mqtt = gateway._source
        assert isinstance(mqtt, FakeMqtt)
        yield Rig(gateway, mqtt, producer, settings)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll `condition`: what the worker and its resends do has no event of its own to wait on."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not so within {timeout_s} s")


async def test_a_good_message_is_acknowledged_only_after_the_bus(rig: Rig) -> None:
    rig.mqtt.publish(TOPIC, GOOD, mid=11)
    await until(lambda: len(rig.producer.sent) == 1)
    [(topic, value, key)] = rig.producer.sent
    assert (topic, key) == (rig.settings.topics.telemetry("flood"), "hn-flood-001")
    reading = decode_record(value)
    assert isinstance(reading, Reading)
    assert (reading.device_id, reading.seq, reading.metrics, reading.packet_id) == (
        "hn-flood-001",
        7,
        {"currentLevel": 1.25},
        11,
    )
    await asyncio.sleep(0.05)
    assert rig.mqtt.acks == [] and rig.gateway.backlog == 1
    rig.producer.acknowledge_all()
    await until(lambda: rig.mqtt.acks == [(11, 1)])
    stats = rig.gateway.stats
    assert (stats.received, stats.accepted, stats.acked, stats.readings_produced) == (1, 1, 1, 1)
    assert rig.gateway.backlog == 0


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (TOPIC, b'{"currentLevel": "high"}', "malformed_payload"),
        (TOPIC, b'{"currentLevel": 99999}', "out_of_range"),
        ("ioc/v1/ha-noi/flood/nobody/telemetry", GOOD, "unknown_device"),
        ("ioc/v1/ha-noi/grid/hn-flood-001/telemetry", b'{"voltage": 230}', "device_mismatch"),
        ("not/a/topic", GOOD, "bad_topic"),
    ],
)
async def test_a_bad_message_becomes_a_dead_letter_and_is_acknowledged(
    rig: Rig, topic: str, payload: bytes, reason: str
) -> None:
    rig.mqtt.publish(topic, payload, mid=12)
    await until(lambda: len(rig.producer.sent) == 1)
    [(sent_to, value, key)] = rig.producer.sent
    assert (sent_to, key) == (rig.settings.topics.deadletter, None)
    letter = json.loads(value)
    assert (letter["reason"], letter["topic"], letter["payload"]) == (reason, topic, payload.decode())
    assert letter["detail"] and letter["payload_size"] == len(payload)
    assert rig.mqtt.acks == []
    rig.producer.acknowledge_all()
    await until(lambda: rig.mqtt.acks == [(12, 1)])
    stats = rig.gateway.stats
    assert (stats.accepted, dict(stats.rejected), stats.readings_produced) == (0, {reason: 1}, 0)


async def test_retained_telemetry_is_a_dead_letter_and_a_retained_status_is_not(rig: Rig) -> None:
    # The gateway asks the broker to keep the publisher's retain flag, or it would never see it.
    assert {
        str(topic): (options.QoS, options.retainAsPublished, options.retainHandling)
        for topic, options in rig.mqtt.client.subscribed
    } == {topic: (1, True, SubscribeOptions.RETAIN_SEND_IF_NEW_SUB) for topic in rig.gateway.subscriptions}
    rig.mqtt.publish(TOPIC, GOOD, mid=21, retain=True)
    rig.mqtt.publish(TOPIC.replace("/telemetry", "/status"), b"online", mid=22, retain=True)
    await until(lambda: len(rig.producer.sent) == 2)
    (letter_topic, letter, _), (status_topic, _, device) = rig.producer.sent
    assert letter_topic == rig.settings.topics.deadletter
    assert json.loads(letter)["reason"] == "retained_telemetry"
    assert (status_topic, device) == (rig.settings.topics.telemetry("flood"), "hn-flood-001")
    rig.producer.acknowledge_all()
    await until(lambda: sorted(rig.mqtt.acks) == [(21, 1), (22, 1)])
    assert dict(rig.gateway.stats.rejected) == {"retained_telemetry": 1}
    assert (
        'ioc_gateway_rejected_total{reason="retained_telemetry"} 1' in render(rig.gateway.metrics()).decode()
    )


async def test_a_bus_failure_withholds_the_acknowledgement_and_sends_again(rig: Rig) -> None:
    rig.producer.down = True
    rig.mqtt.publish(TOPIC, GOOD, mid=13)
    await until(lambda: len(rig.producer.pending) == 1)
    rig.producer.fail_all(ConnectionError("broker gone"))
    # The resend fails too while Kafka is down; the broker hears nothing meanwhile.
    await until(lambda: rig.producer.resends >= 1)
    assert rig.mqtt.acks == []
    assert rig.gateway.readiness()["kafka"].startswith("failing: ")
    assert rig.gateway.stats.produce_retries >= 1
    rig.producer.down = False
    await until(lambda: rig.mqtt.acks == [(13, 1)])
    [_, (topic, value, _)] = rig.producer.sent
    assert topic == rig.settings.topics.telemetry("flood") and isinstance(decode_record(value), Reading)
    assert rig.gateway.stats.readings_produced == 1 and rig.gateway.readiness()["kafka"] == "ok"


async def test_an_acknowledgement_for_an_earlier_connection_is_skipped(rig: Rig) -> None:
    rig.mqtt.publish(TOPIC, GOOD, mid=14)
    await until(lambda: len(rig.producer.pending) == 1)
    rig.mqtt.drop()
    rig.mqtt.reconnect()
    rig.producer.acknowledge_all()
    await until(lambda: rig.gateway.stats.acked == 1)
    assert rig.mqtt.acks == [] and rig.gateway.stale_acks_skipped == 1
    # The broker sends it again on the new connection, where it is acknowledged.
    rig.mqtt.publish(TOPIC, GOOD, mid=14, dup=True)
    await until(lambda: len(rig.producer.pending) == 1)
    rig.producer.acknowledge_all()
    await until(lambda: rig.mqtt.acks == [(14, 1)])
    assert rig.gateway.stale_acks_skipped == 1
