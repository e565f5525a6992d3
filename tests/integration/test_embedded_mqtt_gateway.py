"""Our gateway on the embedded MQTT broker, against the real Kafka and database: telemetry
published to the embedded broker reaches Kafka and the database exactly once, and a gateway
restart loses nothing, because the broker keeps the gateway's session and what arrived meanwhile.

Broker, gateway and processor share one event loop here, as they do in `ioc up`; the MQTT
publishers are paho clients in threads."""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from aiokafka import AIOKafkaConsumer
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from ingest.gateway import Gateway
from ioc.embedded.mqtt_broker import EmbeddedBroker
from ioc.up import embedded_broker
from ioc_core.models import DeviceIn, Location
from ioc_core.settings import Settings, load_settings
from ioc_core.storage import Database, ensure_database
from processors.telemetry import TelemetryProcessor
from tests.conftest import Figures
from tests.integration.harness import delete_topics, unique, wait_until

DEVICES = 10
LOCATION = Location(lat=21.0285, lon=105.8542)


@dataclass
class Run:
    broker: EmbeddedBroker
    settings: Settings
    city: str
    devices: list[str]


@pytest.fixture
async def migrated(database_url: str) -> str:
    await ensure_database(database_url)
    async with Database(database_url, max_size=2) as database:
        await database.migrate()
    return database_url


@pytest.fixture
async def run(migrated: str) -> AsyncIterator[Run]:
    """An embedded broker on a free port, settings pointing the gateway at it, a city of this test's
    own with registered flood devices, and Kafka topics of its own."""
    tag = unique("emb")
    password = secrets.token_urlsafe(12)
    # As `ioc up` embeds it, the gateway's client id protected by a password.
    async with embedded_broker(0, f"gw-{tag}", password) as broker:
        city = unique("embcity")[:32]
        settings = load_settings(
            mqtt_url=f"mqtt://ioc:{password}@127.0.0.1:{broker.port}",
            kafka_bootstrap="127.0.0.1:9092",
            database_url=migrated,
            topic_prefix=f"{tag}.",
            gateway_client_id=f"gw-{tag}",
            gateway_share_group=f"grp-{tag}",
            gateway_cities=[city],
            mqtt_session_expiry_s=300,
            processor_group_id=f"proc-{tag}",
            registry_refresh_s=1,
        )
        devices = [f"{city}-flood-{i:02d}" for i in range(DEVICES)]
        async with Database(migrated, max_size=2) as database:
            for device in devices:
                await database.devices.insert(
                    DeviceIn(id=device, city=city, domain="flood", location=LOCATION)
                )
        try:
            yield Run(broker, settings, city, devices)
        finally:
            await delete_topics(f"{tag}.")


def telemetry(run: Run, start: int, count: int) -> Iterator[tuple[str, bytes]]:
    """Messages `start` .. `start + count - 1`, each with its own device time and `seq`."""
    base = datetime.now(tz=UTC) - timedelta(minutes=4)
    for i in range(start, start + count):
        device = run.devices[i % DEVICES]
        payload = {"ts": (base + timedelta(milliseconds=i)).isoformat(), "seq": i, "currentLevel": 1.5}
        yield f"ioc/v1/{run.city}/flood/{device}/telemetry", json.dumps(payload).encode()


def publish(port: int, messages: list[tuple[str, bytes]], *, pace_s: float = 0.0) -> None:
    """Publish with QoS 1 from one paho client and wait until the broker acknowledged each."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("emb-pub"), protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        infos = []
        for index, (topic, payload) in enumerate(messages):
            infos.append(client.publish(topic, payload, qos=1))
            if pace_s and index % 50 == 0:
                time.sleep(pace_s)
        for info in infos:
            info.wait_for_publish(60)
            assert info.is_published(), "the embedded broker did not acknowledge a message"
    finally:
        client.disconnect()
        client.loop_stop()


async def stored(database_url: str, devices: list[str]) -> tuple[int, int]:
    """(rows, distinct (device, ts)) of these devices' flood readings."""
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT (device_id, ts)) AS distinct_n"
            " FROM readings_flood WHERE device_id = ANY($1)",
            devices,
        )
        assert row is not None
        return int(row["n"]), int(row["distinct_n"])
    finally:
        await connection.close()


async def kafka_seqs(settings: Settings, expected: int) -> collections.Counter[int]:
    """How often each `seq` is on the flood telemetry topic, read from the beginning."""
    consumer = AIOKafkaConsumer(
        settings.topics.telemetry("flood"),
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=unique("emb-check"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seqs: collections.Counter[int] = collections.Counter()
    try:
        deadline = time.monotonic() + 60
        quiet_since: float | None = None
        # Past the expected count, keep reading a little: a copy would come after the original.
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            records = [record for batch in batches.values() for record in batch]
            for record in records:
                seqs[json.loads(record.value)["seq"]] += 1
            if sum(seqs.values()) >= expected:
                if records:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 1.5:
                    break
    finally:
        await consumer.stop()
    return seqs


async def test_telemetry_through_the_embedded_broker_is_stored_exactly_once(run: Run) -> None:
    total = 2000
    async with TelemetryProcessor(run.settings), Gateway(run.settings) as gateway:
        await asyncio.to_thread(publish, run.broker.port, list(telemetry(run, 0, total)))

        async def all_stored() -> bool | None:
            return (
                True
                if (await stored(run.settings.database_url.get_secret_value(), run.devices))[0] >= total
                else None
            )

        await wait_until(all_stored, timeout=60, what=f"{total} readings stored")
        assert gateway.stats.accepted == total and not gateway.stats.rejected
    assert await stored(run.settings.database_url.get_secret_value(), run.devices) == (total, total)
    seqs = await kafka_seqs(run.settings, total)
    assert set(seqs) == set(range(total))
    assert max(seqs.values()) == 1, "a message reached Kafka twice"
    assert not run.broker.stats.dropped


async def test_a_gateway_restart_loses_nothing(run: Run, figures: Figures) -> None:
    before, during, after = 1000, 1500, 500
    database_url = run.settings.database_url.get_secret_value()
    async with TelemetryProcessor(run.settings):
        async with Gateway(run.settings):
            await asyncio.to_thread(publish, run.broker.port, list(telemetry(run, 0, before)))
            # Devices keep publishing while the gateway goes away and comes back.
            publishing = threading.Thread(
                target=publish,
                args=(run.broker.port, list(telemetry(run, before, during))),
                kwargs={"pace_s": 0.02},
            )
            publishing.start()
            await asyncio.sleep(0.2)
        # The broker keeps the gateway's session: what arrives now waits for it.
        session = run.broker.sessions.get(run.settings.gateway_client_id)
        assert session is not None and session.connection is None
        await asyncio.to_thread(publishing.join, 60)
        assert not publishing.is_alive()
        held = run.broker.stats.messages_received - run.broker.stats.messages_acked
        async with Gateway(run.settings):
            await asyncio.to_thread(publish, run.broker.port, list(telemetry(run, before + during, after)))
            total = before + during + after

            async def all_stored() -> bool | None:
                return True if (await stored(database_url, run.devices))[0] >= total else None

            await wait_until(all_stored, timeout=90, what=f"{total} readings stored across the restart")
    assert await stored(database_url, run.devices) == (total, total)
    seqs = await kafka_seqs(run.settings, total)
    assert set(seqs) == set(range(total)), "a message was lost across the gateway restart"
    copies = sum(seqs.values()) - total
    assert not run.broker.stats.dropped
    assert held > 0, "the restart happened after the publishing, so it proved nothing"
    figures.lines.append(
        f"embedded MQTT broker, gateway restart: {total} messages, {held} waited in the broker,"
        f" {copies} repeated to Kafka (at-least-once), all stored once"
    )


async def test_hostile_clients_on_the_broker_of_ioc_up(run: Run) -> None:
    """Retained telemetry is a dead letter and kept by nobody, a payload over 64 KiB is a dead
    letter, a megabyte closes its connection at the broker, and a client claiming the gateway's
    client id is refused while the gateway keeps its session."""
    device = run.devices[0]
    topic = f"ioc/v1/{run.city}/flood/{device}/telemetry"
    async with Gateway(run.settings) as gateway:
        codes = await asyncio.to_thread(
            publish_answers,
            run.broker.port,
            [
                (topic, b'{"currentLevel": 7.5, "seq": 1}', True),
                (topic, b'{"currentLevel": 1, "pad": "' + b"x" * 100_000 + b'"}', False),
                (topic, b'{"currentLevel": 1.5, "seq": 2}', False),
            ],
        )
        assert codes == [0, 0, 0]

        async def judged() -> bool | None:
            return gateway.stats.acked >= 3 or None

        await wait_until(judged, timeout=30, what="the gateway to judge all three")
        rejected = {"retained_telemetry": 1, "payload_too_large": 1}
        assert dict(gateway.stats.rejected) == rejected and gateway.stats.accepted == 1
        assert topic not in run.broker.retained
        huge = await asyncio.to_thread(disconnect_answer, run.broker.port, topic, 1_048_576)
        assert huge == 0x95  # packet too large
        refusal = await asyncio.to_thread(connect_answer, run.broker.port, run.settings.gateway_client_id)
        assert refusal == 0x87  # not authorized
        session = run.broker.sessions[run.settings.gateway_client_id]
        assert gateway.connected and session.connection is not None and not session.connection.closed
        assert run.broker.stats.connections_refused == {"client_id_protected": 1}
        assert gateway.stats.received == 3, "the megabyte reached the gateway"


def disconnect_answer(port: int, topic: str, size: int) -> int:
    """Publish `size` bytes as an MQTT 5 device; the reason of the DISCONNECT that answers it."""
    reasons: list[int] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("emb-dev"), protocol=mqtt.MQTTv5)

    def on_disconnect(c: mqtt.Client, u: object, flags: object, reason: ReasonCode, p: object) -> None:
        reasons.append(reason.value)
        done.set()

    client.on_disconnect = on_disconnect
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        client.publish(topic, b"x" * size, qos=1)
        assert done.wait(10), "the connection stayed open"
    finally:
        client.loop_stop()
    return reasons[0]


def publish_answers(port: int, messages: list[tuple[str, bytes, bool]]) -> list[int]:
    """Publish QoS 1 messages (topic, payload, retain) as a device; the broker's PUBACK codes."""
    codes: dict[int, int] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("emb-dev"), protocol=mqtt.MQTTv5)
    client.on_publish = lambda c, u, mid, reason, p: codes.__setitem__(mid, reason.value)
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in messages]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return [codes[info.mid] for info in infos]


def connect_answer(port: int, client_id: str) -> int:
    """The CONNACK reason code for an MQTT 5 client connecting with `client_id` and no password."""
    answers: list[int] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)

    def on_connect(c: mqtt.Client, u: object, flags: object, reason: ReasonCode, p: object) -> None:
        answers.append(reason.value)
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, 30, clean_start=False)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return answers[0]
