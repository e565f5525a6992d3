"""The ingest gateway.

Delivery is at-least-once end to end: the gateway takes QoS-1 messages on a persistent MQTT
session with manual acknowledgement and acknowledges a message to the broker only once Kafka has
acknowledged what it became (readings, or a dead letter). Killed at any point, the broker still
holds every unacknowledged message and hands it out again. A bounded queue sits between paho's
network thread and the asyncio producer: when it is full paho's thread waits, stops reading the
socket, and the backlog stays in the broker instead of in our memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.registry import DeviceRegistry
from ioc_core.bus import BusProducer, ensure_topics
from ioc_core.component import Component
from ioc_core.domains import DOMAINS
from ioc_core.errors import IocError, RejectedMessage, ServiceUnavailableError
from ioc_core.metrics import Metric
from ioc_core.models import DeviceRoute
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.telemetry import (
    REASON_DEVICE_MISMATCH,
    REASON_UNKNOWN_DEVICE,
    TOPIC_ROOT,
    BusTelemetry,
    DeadLetter,
    Reading,
    StatusReport,
    TopicAddress,
    parse_payload,
    parse_status,
    parse_topic,
    utcnow,
)

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 15.0
_RETRY_BACKOFF_MAX_S = 10.0


@dataclass(frozen=True, slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: datetime


class GatewayStats:
    """Counters for the gateway's health and the `/metrics` page."""

    def __init__(self) -> None:
        self.received = 0
        self.accepted = 0
        self.readings_produced = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.acked = 0
        self.produce_retries = 0
        self.produce_error: str | None = None


def _readings_in(records: list[tuple[str, bytes, str | None]]) -> int:
    # Telemetry records are keyed by device; dead letters have no key.
    return sum(1 for _, _, key in records if key is not None)


def validate(message: InboundMessage, address: TopicAddress, route: DeviceRoute | None) -> list[BusTelemetry]:
    """Turn one message into bus records (readings, or a status report), given its parsed topic
    and the registry's view of its device."""
    if route is None:
        raise RejectedMessage(REASON_UNKNOWN_DEVICE, f"device {address.device_id!r} is not registered")
    if (route.city, route.domain) != (address.city, address.domain):
        raise RejectedMessage(
            REASON_DEVICE_MISMATCH,
            f"device {address.device_id!r} is registered as {route.city}/{route.domain}, "
            f"topic says {address.city}/{address.domain}",
        )
    if address.kind == "status":
        if not message.payload:
            return []  # an empty retained message only clears the broker's copy
        status = parse_status(message.payload)
        return [StatusReport(address.device_id, address.city, address.domain, status, message.received_at)]
    measurements = parse_payload(message.payload, DOMAINS[address.domain], received_at=message.received_at)
    return [
        Reading(
            device_id=address.device_id,
            city=address.city,
            domain=address.domain,
            ts=m.ts,
            seq=m.seq,
            metrics=m.metrics,
            received_at=message.received_at,
            device_time=m.device_time,
        )
        for m in measurements
    ]


class Gateway(Component):
    """MQTT → Kafka. Use with `async with`; several gateways share the load through `$share`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.stats = GatewayStats()
        self._database = Database(settings.database_url.get_secret_value(), min_size=1, max_size=4)
        self._producer = BusProducer(settings.kafka_bootstrap, client_id=settings.gateway_client_id)
        self._registry = DeviceRegistry(self._database, refresh_s=settings.registry_refresh_s)
        # Slots bound what we hold: taken in paho's thread per message, given back on its ack.
        self._slots = threading.BoundedSemaphore(settings.gateway_queue_size)
        self._inbox: collections.deque[InboundMessage] = collections.deque()
        self._inbox_signal = asyncio.Event()
        self._inbox_signalled = False
        self._in_process = 0
        self._drained = asyncio.Event()
        self._retries: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._worker: asyncio.Task[None] | None = None

    @property
    def subscriptions(self) -> list[str]:
        group = self._settings.gateway_share_group
        cities = self._settings.gateway_cities or ["+"]
        return [
            f"$share/{group}/{TOPIC_ROOT}/{city}/+/+/{kind}"
            for city in cities
            for kind in ("telemetry", "status")
        ]

    @property
    def backlog(self) -> int:
        """Messages taken from the broker and not yet acknowledged to it."""
        return len(self._inbox) + self._in_process

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def readiness(self) -> dict[str, str]:
        """Each dependency's state; all "ok" means the gateway is taking telemetry."""
        return {
            "mqtt": "ok" if self.connected else "disconnected",
            "kafka": "ok" if self.stats.produce_error is None else f"failing: {self.stats.produce_error}",
            "backlog": "ok" if self.backlog < self._settings.gateway_queue_size else "full",
        }

    def metrics(self) -> list[Metric]:
        stats = self.stats
        rejected = Metric("ioc_gateway_rejected_total", "counter", "messages dead-lettered, by reason")
        for reason, count in sorted(stats.rejected.items()):
            rejected.add(count, reason=reason)
        return [
            Metric("ioc_gateway_received_total", "counter", "messages taken from the broker").add(
                stats.received
            ),
            Metric("ioc_gateway_accepted_total", "counter", "messages that passed validation").add(
                stats.accepted
            ),
            rejected,
            Metric("ioc_gateway_acked_total", "counter", "messages acknowledged to the broker").add(
                stats.acked
            ),
            Metric("ioc_gateway_readings_produced_total", "counter", "readings Kafka acknowledged").add(
                stats.readings_produced
            ),
            Metric("ioc_gateway_produce_retries_total", "counter", "Kafka sends retried").add(
                stats.produce_retries
            ),
            Metric("ioc_gateway_backlog", "gauge", "messages taken and not yet acknowledged").add(
                self.backlog
            ),
            Metric("ioc_gateway_backlog_capacity", "gauge", "most messages held at once").add(
                self._settings.gateway_queue_size
            ),
            Metric("ioc_gateway_mqtt_connected", "gauge", "1 when connected to the broker").add(
                int(self.connected)
            ),
            Metric("ioc_gateway_registry_devices", "gauge", "devices in the registry cache").add(
                len(self._registry)
            ),
        ]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._database.start()
        try:
            await ensure_topics(
                self._settings.kafka_bootstrap,
                self._settings.topics.all(),
                partitions=self._settings.topic_partitions,
            )
            await self._producer.start()
            await self._registry.start()
            self._worker = asyncio.create_task(self._work(), name="gateway-worker")
            await self._connect_mqtt()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "gateway %s subscribed to %s with %d devices known",
            self._settings.gateway_client_id,
            " and ".join(self.subscriptions),
            len(self._registry),
        )

    async def _connect_mqtt(self) -> None:
        endpoint = self._settings.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._settings.gateway_client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if endpoint.username:
            client.username_pw_set(
                endpoint.username, endpoint.password.get_secret_value() if endpoint.password else None
            )
        if endpoint.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._settings.mqtt_session_expiry_s
        # The broker may have this many unacknowledged messages out to us at once.
        properties.ReceiveMaximum = min(65535, self._settings.gateway_queue_size)
        self._client = client
        try:
            await asyncio.to_thread(
                client.connect, endpoint.host, endpoint.port, 30, clean_start=False, properties=properties
            )
        except OSError as exc:
            raise ServiceUnavailableError(
                f"MQTT broker at {endpoint.host}:{endpoint.port} is unreachable: {exc}"
            ) from exc
        client.loop_start()
        if not await asyncio.to_thread(self._connected.wait, _CONNECT_TIMEOUT_S):
            raise ServiceUnavailableError(
                f"MQTT broker at {endpoint.host}:{endpoint.port} did not accept the connection"
            )

    async def stop(self) -> None:
        self._stopping.set()
        # Let Kafka acknowledge what is already sent, so those messages are not redelivered.
        if self._in_process and self._worker is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=10)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for task in list(self._retries):
            task.cancel()
        await self._registry.stop()
        await self._producer.stop()
        await self._database.stop()
        self._connected.clear()

    # -- paho's network thread ----------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker refused the connection: %s", reason_code)
            return
        client.subscribe([(topic, 1) for topic in self.subscriptions])
        log.info("connected to MQTT broker (session present: %s)", flags.session_present)
        self._connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("MQTT connection lost (%s); reconnecting, the broker keeps our session", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        inbound = InboundMessage(
            topic=message.topic,
            payload=bytes(message.payload),
            mid=message.mid,
            qos=message.qos,
            received_at=utcnow(),
        )
        # Waiting for a slot is the back-pressure: paho stops reading and the broker keeps the rest.
        while not self._slots.acquire(timeout=0.5):
            if self._stopping.is_set():
                return
        self._inbox.append(inbound)
        # One wake-up per burst, not per message; the worker clears the flag before it drains.
        if not self._inbox_signalled:
            self._inbox_signalled = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._inbox_signal.set)

    # -- asyncio side -------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self._inbox_signal.wait()
            self._inbox_signal.clear()
            self._inbox_signalled = False
            while self._inbox:
                message = self._inbox.popleft()
                self._in_process += 1
                self._drained.clear()
                self.stats.received += 1
                records = await self._records_for(message)
                await self._send(message, records)

    async def _send(self, message: InboundMessage, records: list[tuple[str, bytes, str | None]]) -> None:
        """Hand the records to the producer without waiting for Kafka; the last acknowledgement
        acknowledges the message to the broker."""
        if not records:
            self._complete(message, produced=0)
            return
        try:
            futures = [await self._producer.send(topic, value, key=key) for topic, value, key in records]
        except Exception as exc:
            self._note_produce_failure(exc)
            self._retry(message, records)
            return
        remaining = len(futures)
        failed = False

        def delivered(future: asyncio.Future[Any]) -> None:
            nonlocal remaining, failed
            remaining -= 1
            if future.cancelled() or future.exception() is not None:
                failed = True
                self._note_produce_failure(future.exception() or asyncio.CancelledError())
            if remaining:
                return
            if failed:
                # The idempotent producer keeps per-partition order; a record sent twice is one row.
                self._retry(message, records)
            else:
                self.stats.produce_error = None
                self._complete(message, produced=_readings_in(records))

        for future in futures:
            future.add_done_callback(delivered)

    def _retry(self, message: InboundMessage, records: list[tuple[str, bytes, str | None]]) -> None:
        async def resend() -> None:
            for topic, value, key in records:
                await self._produce(topic, value, key)
            self._complete(message, produced=_readings_in(records))

        task = asyncio.create_task(resend(), name="gateway-resend")
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    def _complete(self, message: InboundMessage, *, produced: int) -> None:
        if message.qos > 0 and self._client is not None:
            self._client.ack(message.mid, message.qos)
        self.stats.acked += 1
        self.stats.readings_produced += produced
        self._in_process -= 1
        if not self._in_process:
            self._drained.set()
        self._slots.release()

    def _note_produce_failure(self, exc: BaseException) -> None:
        self.stats.produce_retries += 1
        self.stats.produce_error = f"{type(exc).__name__}: {exc}"[:200]

    async def _records_for(self, message: InboundMessage) -> list[tuple[str, bytes, str | None]]:
        """What to put on the bus for one message: its readings, or one dead letter."""
        try:
            address = parse_topic(message.topic)
            route = await self._lookup(address.device_id)
            records = validate(message, address, route)
        except RejectedMessage as rejection:
            self.stats.rejected[rejection.reason] += 1
            log.debug("rejected message on %s: %s", message.topic, rejection)
            letter = DeadLetter(
                reason=rejection.reason,
                detail=rejection.detail,
                topic=message.topic,
                received_at=message.received_at,
                payload=message.payload,
            )
            return [(self._settings.topics.deadletter, letter.to_bytes(), None)]
        self.stats.accepted += 1
        return [(self._settings.topics.telemetry(r.domain), r.to_bytes(), r.device_id) for r in records]

    async def _lookup(self, device_id: str) -> DeviceRoute | None:
        delay = 0.5
        while True:
            try:
                return await self._registry.lookup(device_id)
            except IocError as exc:
                if not exc.retriable:
                    raise
                log.warning("device lookup failed, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_BACKOFF_MAX_S)

    async def _produce(self, topic: str, value: bytes, key: str | None) -> None:
        """Send until Kafka acknowledges; an unacknowledged MQTT message is never given up."""
        delay = 0.5
        while True:
            try:
                await self._producer.send_and_wait(topic, value, key=key)
                self.stats.produce_error = None
                return
            except Exception as exc:
                if self._stopping.is_set():
                    raise
                self._note_produce_failure(exc)
                log.warning("Kafka did not take a record for %s, retrying in %.1fs: %s", topic, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_BACKOFF_MAX_S)
