"""Every reading stored once, none lost, on community and Apache TimescaleDB and plain PostgreSQL
(each in a fresh database of its own): a device that restarts its `seq`, copies of messages stamped with
their receive time (a broker's redelivery of a SenML pack with relative times), and two messages
of one device at one instant with different metrics.

The broker's part of a redelivery (DUP flag, same packet id) is checked against the real
Mosquitto: the copy it sends again becomes readings that storage knows as a copy.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.inbox import InboundMessage
from ioc_core.domains import DOMAINS
from ioc_core.models import DeviceIn, DeviceRoute, Location
from ioc_core.storage import Database, StorageTier, TelemetryBatch, WriteResult
from ioc_core.storage import migrations as migrations_module
from ioc_core.storage.schema import MIGRATIONS
from ioc_core.telemetry import Reading, parse_payload, parse_topic, validate
from tests.integration.conftest import TIER_SERVERS
from tests.integration.harness import MQTT_HOST, MQTT_PORT, publish, unique

SERVERS = TIER_SERVERS
CITY = "once-city"
WINDOW_S = 3600.0


@dataclass
class TierDatabase:
    tier: StorageTier
    url: str
    db: Database


async def _admin(server: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(f"{server}/postgres", timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL server at {server} is not reachable ({exc}); start it with `make services`")


async def _create_database(server: str) -> str:
    name = f"ioc_test_{int(time.time())}_{uuid.uuid4().hex[:8]}"
    admin = await _admin(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name


async def _drop_database(server: str, name: str) -> None:
    admin = await _admin(server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="module", params=list(SERVERS), ids=str)
async def tier_database(request: pytest.FixtureRequest) -> AsyncIterator[TierDatabase]:
    tier: StorageTier = request.param
    server = SERVERS[tier]
    name = await _create_database(server)
    try:
        async with Database(f"{server}/{name}", seq_window_s=WINDOW_S) as db:
            offered = await db.migrate()
            if tier is StorageTier.COMMUNITY and offered is StorageTier.APACHE:
                pytest.skip("the TimescaleDB service runs without the community licence")
            assert offered is tier
            yield TierDatabase(tier, f"{server}/{name}", db)
    finally:
        await _drop_database(server, name)


async def _device(db: Database, domain: str) -> str:
    device_id = unique(f"once-{domain}")
    await db.devices.insert(
        DeviceIn(id=device_id, city=CITY, domain=domain, location=Location(lat=21.0, lon=105.8))
    )
    return device_id


def _received(
    payload: dict[str, Any] | list[dict[str, Any]],
    device_id: str,
    domain: str,
    at: datetime,
    *,
    packet_id: int | None = None,
    redelivered: bool = False,
) -> list[Reading]:
    """What a gateway makes of `payload` received at `at`."""
    measurements = parse_payload(json.dumps(payload).encode(), DOMAINS[domain], received_at=at)
    return [
        Reading(
            device_id=device_id,
            city=CITY,
            domain=domain,
            ts=m.ts,
            seq=m.seq,
            metrics=m.metrics,
            received_at=at,
            device_time=m.device_time,
            redelivered=redelivered,
            packet_id=packet_id,
        )
        for m in measurements
    ]


async def _write(db: Database, *readings: Reading | Sequence[Reading]) -> WriteResult:
    flat: list[Reading] = []
    for item in readings:
        flat.extend([item] if isinstance(item, Reading) else item)
    return await db.write_batch(TelemetryBatch(records=[(r, 0) for r in flat]))


async def _rows(url: str, domain: str, device_id: str, columns: str) -> list[tuple[Any, ...]]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            f"SELECT {columns} FROM readings_{domain} WHERE device_id = $1 ORDER BY ts", device_id
        )
    finally:
        await connection.close()
    return [tuple(row) for row in rows]


async def test_a_device_that_restarts_its_seq_loses_nothing(tier_database: TierDatabase) -> None:
    db, url = tier_database.db, tier_database.url
    device = await _device(db, "water")
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    first = await _write(
        db,
        _received({"seq": 1, "pressure": 3.0}, device, "water", t0),
        _received({"seq": 2, "pressure": 3.1}, device, "water", t0 + timedelta(minutes=1)),
    )
    assert (first.stored, first.duplicates) == (2, 0)
    # A redelivered copy of seq 1, then the device reboots and counts from 1 again with new values,
    # and the broker sends its new seq 1 twice.
    second = await _write(
        db,
        _received({"seq": 1, "pressure": 3.0}, device, "water", t0 + timedelta(minutes=2)),
        _received({"seq": 1, "pressure": 2.7}, device, "water", t0 + timedelta(minutes=3)),
        _received({"seq": 1, "pressure": 2.7}, device, "water", t0 + timedelta(minutes=3, seconds=20)),
        _received({"seq": 2, "pressure": 2.8}, device, "water", t0 + timedelta(minutes=4)),
    )
    assert (second.stored, second.duplicates) == (2, 2)
    assert [r.metrics for r in second.kept] == [{"pressure": 2.7}, {"pressure": 2.8}]
    # The reboot's readings are remembered as well: their copies are dropped in later batches too.
    third = await _write(
        db, _received({"seq": 2, "pressure": 2.8}, device, "water", t0 + timedelta(minutes=5))
    )
    assert (third.stored, third.duplicates) == (0, 1)
    assert await _rows(url, "water", device, "seq, pressure") == [(1, 3.0), (2, 3.1), (1, 2.7), (2, 2.8)]


@pytest.mark.parametrize("tier", list(SERVERS), ids=str)
async def test_seqs_remembered_before_the_upgrade_stand_for_any_values(
    tier: StorageTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 6 on a database of schema 5 keeps the remembered seqs; until they expire, each
    stands for whatever values the copy carries, since the values were not remembered."""
    server = SERVERS[tier]
    name = await _create_database(server)
    try:
        async with Database(f"{server}/{name}", seq_window_s=60) as db:
            monkeypatch.setattr(migrations_module, "MIGRATIONS", MIGRATIONS[:5])
            await db.migrate()
            now = datetime.now(UTC)
            connection = await asyncpg.connect(f"{server}/{name}")
            try:
                # Registered as that schema's code did: today's store also places devices in areas,
                # which that schema has not.
                device = unique("once-water")
                await connection.execute(
                    "INSERT INTO devices (id, city, domain, lat, lon, thresholds)"
                    " VALUES ($1, $2, 'water', 21.0, 105.8, '{}')",
                    device,
                    CITY,
                )
                await connection.execute(
                    "INSERT INTO reading_seqs (device_id, seq, ts) VALUES ($1, 5, $2), ($1, 6, $3)",
                    device,
                    now - timedelta(seconds=10),
                    now - timedelta(minutes=5),
                )
                monkeypatch.setattr(migrations_module, "MIGRATIONS", MIGRATIONS)
                await db.migrate()
                await db.migrate()  # safe to repeat
                kept = await connection.fetch("SELECT seq, digest FROM reading_seqs ORDER BY seq")
                assert [(r["seq"], r["digest"]) for r in kept] == [(5, 0), (6, 0)]
                key = await connection.fetchval(
                    "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i"
                    " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k (attnum, n)"
                    " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
                    " WHERE i.indrelid = 'reading_seqs'::regclass AND i.indisprimary"
                )
                assert key == ["device_id", "seq", "digest"]
            finally:
                await connection.close()
            result = await _write(
                db,
                _received({"seq": 5, "pressure": 4.4}, device, "water", now),  # within the window
                _received({"seq": 6, "pressure": 4.5}, device, "water", now),  # expired
            )
            assert (result.stored, result.duplicates) == (1, 1)
            assert await _rows(f"{server}/{name}", "water", device, "seq, pressure") == [(6, 4.5)]
    finally:
        await _drop_database(server, name)


# A bin that reports its level with times relative to the moment the pack is sent (RFC 8428 §4.5.3).
BIN_PACK = [
    {"bn": "urn:dev:bin:", "n": "fillingLevel", "t": -300, "v": 0.5},
    {"n": "fillingLevel", "v": 0.5},
    {"n": "temperature", "v": 31},
]


async def test_a_redelivered_pack_with_relative_times_is_stored_once(tier_database: TierDatabase) -> None:
    db, url = tier_database.db, tier_database.url
    device = await _device(db, "waste")
    r0 = datetime.now(UTC) - timedelta(minutes=30)
    original = _received(BIN_PACK, device, "waste", r0, packet_id=17)
    assert [r.device_time for r in original] == [False, False]
    first = await _write(db, original)
    assert (first.stored, first.duplicates) == (2, 0)
    # The broker sends it again (DUP, same packet id) 30 s later: new receive time, same values.
    copy = _received(BIN_PACK, device, "waste", r0 + timedelta(seconds=30), packet_id=17, redelivered=True)
    again = await _write(db, copy)
    assert (again.stored, again.duplicates) == (0, 2)
    assert again.kept == []
    # The same pack, sent again minutes later, is a new report: stored, even under a packet id
    # used before, and also when the broker flags it as a redelivery of a message never stored.
    later = [
        _received(BIN_PACK, device, "waste", r0 + timedelta(seconds=317.25), packet_id=18),
        _received(BIN_PACK, device, "waste", r0 + timedelta(seconds=611.5), packet_id=17),
        _received(BIN_PACK, device, "waste", r0 + timedelta(seconds=905.75), packet_id=99, redelivered=True),
    ]
    reports = await _write(db, *later)
    assert (reports.stored, reports.duplicates) == (6, 0)
    # A first delivery and its copy in one batch, and a copy of it in the next.
    at = r0 + timedelta(seconds=1203.125)
    pair = await _write(
        db,
        _received(BIN_PACK, device, "waste", at, packet_id=20),
        _received(BIN_PACK, device, "waste", at + timedelta(seconds=2), packet_id=20, redelivered=True),
    )
    assert (pair.stored, pair.duplicates) == (2, 2)
    late_copy = _received(
        BIN_PACK, device, "waste", at + timedelta(seconds=9), packet_id=20, redelivered=True
    )
    assert (await _write(db, late_copy)).stored == 0
    # A replayed bus record (the same record read again) is a copy too.
    replay = await _write(db, later[2])
    assert (replay.stored, replay.duplicates) == (0, 2)
    rows = await _rows(url, "waste", device, "filling_level, temperature")
    assert len(rows) == 10
    assert rows.count((0.5, None)) == 5 and rows.count((0.5, 31.0)) == 5


async def test_readings_at_one_time_merge_into_one_row(tier_database: TierDatabase) -> None:
    db, url = tier_database.db, tier_database.url
    device = await _device(db, "water")
    ts = datetime.now(UTC) - timedelta(minutes=20)
    stamp = ts.isoformat()

    def at(**metrics: float) -> Reading:
        [reading] = _received({"ts": stamp, **metrics}, device, "water", datetime.now(UTC))
        return reading

    assert (await _write(db, at(pressure=3.0))).stored == 1
    merged = await _write(db, at(flow=120))
    assert (merged.stored, merged.duplicates) == (1, 0)
    assert [r.metrics for r in merged.kept] == [{"flow": 120.0}]
    # A metric the row has keeps its first value; the one it lacks is added.
    third = await _write(db, at(pressure=9.9, turbidity=0.7))
    assert (third.stored, third.duplicates) == (1, 0)
    assert [r.metrics for r in third.kept] == [{"turbidity": 0.7}]
    repeats = await _write(db, at(pressure=3.0), at(flow=120), at(pressure=9.9, turbidity=0.7))
    assert (repeats.stored, repeats.duplicates, repeats.kept) == (0, 3, [])
    assert await _rows(url, "water", device, "pressure, flow, turbidity, ph") == [(3.0, 120.0, 0.7, None)]
    device_state = await db.devices.get(device)
    assert device_state.latest is not None
    assert device_state.latest.metrics == {"pressure": 3.0, "flow": 120.0, "turbidity": 0.7}
    # Within one batch, in order of arrival: the first value of a metric is the one kept.
    later = ts + timedelta(minutes=1)
    stamp = later.isoformat()
    batch = await _write(db, at(pressure=1.0), at(flow=2.0), at(pressure=5.0, flow=6.0), at(pH=7.1))
    assert (batch.stored, batch.duplicates) == (3, 1)
    assert [r.metrics for r in batch.kept] == [{"pressure": 1.0, "flow": 2.0, "pH": 7.1}]
    assert await _rows(url, "water", device, "pressure, flow, turbidity, ph") == [
        (3.0, 120.0, 0.7, None),
        (1.0, 2.0, None, 7.1),
    ]


class _Subscriber:
    """An MQTT v5 client on a persistent session that acknowledges nothing by itself, as the
    gateway does, recording every message it is given."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.messages: list[mqtt.MQTTMessage] = []
        self._arrived = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=unique("once-sub"), protocol=mqtt.MQTTv5, manual_ack=True
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    def connect(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 120
        self._subscribed.clear()
        self.client.connect(MQTT_HOST, MQTT_PORT, 30, clean_start=False, properties=properties)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the broker did not confirm the subscription"

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, count: int) -> None:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.messages) >= count, timeout=10), self.messages


async def test_a_broker_redelivery_is_known_by_storage(tier_database: TierDatabase) -> None:
    """A gateway that took a message and lost its connection before acknowledging it gets the
    message again from Mosquitto, flagged DUP under the same packet id; whether or not the first
    delivery reached storage, the pack is stored once."""
    db, url = tier_database.db, tier_database.url
    device = await _device(db, "waste")
    # Not under ioc/v1/: the gateways of other tests must not take it.
    broker_topic = f"test/{unique('redelivery')}/telemetry"
    subscriber = _Subscriber(broker_topic)
    subscriber.connect()
    try:
        publish(broker_topic, json.dumps(BIN_PACK).encode())
        subscriber.wait_for(1)
        subscriber.disconnect()  # without acknowledging
        subscriber.connect()
        subscriber.wait_for(2)
        first, again = subscriber.messages[:2]
        subscriber.client.ack(again.mid, again.qos)
    finally:
        subscriber.disconnect()
    assert (first.dup, again.dup) == (False, True)
    assert first.mid == again.mid and first.payload == again.payload

    topic = f"ioc/v1/{CITY}/waste/{device}/telemetry"
    route = DeviceRoute(id=device, city=CITY, domain="waste")
    readings = []
    for delay, message in enumerate((first, again)):
        inbound = InboundMessage(
            topic=topic,
            payload=bytes(message.payload),
            mid=message.mid,
            qos=message.qos,
            received_at=datetime.now(UTC) + timedelta(seconds=delay),
            dup=bool(message.dup),
        )
        readings.append([r for r in validate(inbound, parse_topic(topic), route) if isinstance(r, Reading)])
    assert (await _write(db, readings[0])).stored == 2
    assert (await _write(db, readings[1])).stored == 0
    assert len(await _rows(url, "waste", device, "ts")) == 2
