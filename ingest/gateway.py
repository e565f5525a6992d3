"""The ingest gateway.

Delivery is at-least-once end to end: the gateway takes QoS-1 messages on a persistent MQTT
session with manual acknowledgement and acknowledges a message to the broker only once Kafka has
acknowledged what it became (readings, or a dead letter). Killed at any point, the broker still
holds every unacknowledged message and hands it out again. A bounded queue sits between paho's
network thread and the asyncio producer: when it is full paho's thread waits, stops reading the
socket, and the backlog stays in the broker instead of in our memory.

This module holds the worker and its acknowledgement bookkeeping; the paho client is
`ingest.mqtt_source`, the bounded hand-off `ingest.inbox`, and validation is the wire format's
(`ioc_core.telemetry.accept_message`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from ingest.inbox import InboundMessage, Inbox
from ingest.mqtt_source import MqttSource, SourceFactory, publish_properties, subscriptions
from ingest.registry import DeviceRegistry
from ioc_core.bus import BusProducer, ensure_topics
from ioc_core.component import Component
from ioc_core.errors import RejectedMessage
from ioc_core.metrics import Metric
from ioc_core.models import DeviceRoute
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.supervision import Supervisor, describe, public_description
from ioc_core.telemetry import DeadLetter, accept_message

log = logging.getLogger(__name__)

# Kafka that has acknowledged nothing for this long is not taking telemetry: the idempotent
# producer retries in-sync-replica and leader errors forever without failing a send, so a cluster
# with too few brokers shows up only as silence.
_KAFKA_STALL_S = 10.0

__all__ = ["Gateway", "GatewayStats", "InboundMessage", "RecordProducer", "RouteRegistry"]


class RecordProducer(Protocol):
    """What the gateway needs of the bus (`BusProducer`)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send(self, topic: str, value: bytes, *, key: str | None = None) -> asyncio.Future[Any]: ...
    async def send_and_wait(self, topic: str, value: bytes, *, key: str | None = None) -> None: ...


class RouteRegistry(Protocol):
    """What the gateway needs of the device registry (`DeviceRegistry`)."""

    async def start(self) -> None: ...
    def lookup(self, device_id: str) -> Awaitable[DeviceRoute | None]: ...
    def __len__(self) -> int: ...


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


class Gateway(Component):
    """MQTT → Kafka. Use with `async with`; several gateways share the load through `$share`.

    The bus producer, the device registry and the MQTT source are made from the settings unless
    given (tests give in-memory ones)."""

    def __init__(
        self,
        settings: Settings,
        *,
        producer: RecordProducer | None = None,
        registry: RouteRegistry | None = None,
        source_factory: SourceFactory = MqttSource,
    ) -> None:
        self._settings = settings
        self.stats = GatewayStats()
        self._supervisor = Supervisor("gateway")
        self._producer = producer or BusProducer.of_settings(settings, client_id=settings.gateway_client_id)
        # The database serves the registry only: none when the registry is given.
        self._database: Database | None = None
        if registry is None:
            self._database = Database(
                settings.database_url.get_secret_value(),
                min_size=1,
                max_size=4,
                timeout_s=settings.database_timeout_s,
            )
            registry = DeviceRegistry(self._database, self._supervisor, refresh_s=settings.registry_refresh_s)
        self._registry = registry
        # Slots bound what we hold: taken in paho's thread per message, given back on its ack.
        self._inbox = Inbox(settings.gateway_queue_size)
        self._source = source_factory(settings, self._inbox, self._fail_from_thread)
        self._in_process = 0
        self._drained = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker_started = False
        self.stale_acks_skipped = 0
        # Since when the oldest message now in hand has waited for Kafka (None: nothing waits).
        self._kafka_waiting_since: float | None = None

    @property
    def subscriptions(self) -> list[str]:
        return subscriptions(self._settings)

    @property
    def backlog(self) -> int:
        """Messages taken from the broker and not yet acknowledged to it."""
        return len(self._inbox) + self._in_process

    @property
    def connected(self) -> bool:
        return self._source.connected

    def readiness(self) -> dict[str, str]:
        """Each dependency's state; all "ok" means the gateway is taking telemetry."""
        checks = {
            "mqtt": "ok" if self.connected else "disconnected",
            "kafka": self._kafka_state(),
            "backlog": "ok" if self.backlog < self._settings.gateway_queue_size else "full",
        }
        checks.update(self._supervisor.failing())
        return checks

    def _kafka_state(self) -> str:
        if self.stats.produce_error is not None:
            return f"failing: {self.stats.produce_error}"
        waiting_since = self._kafka_waiting_since
        if waiting_since is not None and time.monotonic() - waiting_since > _KAFKA_STALL_S:
            return f"no acknowledgement for {time.monotonic() - waiting_since:.0f} s"
        return "ok"

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
            Metric(
                "ioc_gateway_stale_acks_skipped_total",
                "counter",
                "messages not acknowledged because their connection had ended (the broker sends them again)",
            ).add(self.stale_acks_skipped),
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
        self._inbox.bind(self._loop)
        try:
            if self._database is not None:
                await self._database.start()
            await ensure_topics(
                self._settings.kafka_bootstrap,
                self._settings.topics.all(),
                partitions=self._settings.topic_partitions,
                replication_factor=self._settings.kafka_replication_factor,
                min_insync_replicas=self._settings.kafka_min_insync_replicas,
            )
            await self._producer.start()
            await self._registry.start()
            self._supervisor.spawn("worker", self._work, restart=False)
            self._worker_started = True
            await self._source.connect()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "gateway %s subscribed to %s with %d devices known",
            self._settings.gateway_client_id,
            " and ".join(self.subscriptions),
            len(self._registry),
        )

    async def stop(self) -> None:
        self._source.begin_stop()
        # Let Kafka acknowledge what is already sent, so those messages are not redelivered.
        if self._in_process and self._worker_started:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=10)
        self._source.close()
        await self._supervisor.stop()
        self._worker_started = False
        await self._producer.stop()
        if self._database is not None:
            await self._database.stop()

    async def wait(self) -> None:
        """Until the gateway fails for good (raises `ComponentFailed`); cancelling this wait does
        not stop it."""
        await self._supervisor.wait()

    def _fail_from_thread(self, what: str, error: BaseException) -> None:
        """An error in paho's thread would end that thread silently; end the gateway instead."""
        log.error("%s failed in the MQTT client's thread: %s", what, describe(error))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._supervisor.fail, what, error)

    # -- asyncio side -------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self._inbox.wait()
            while (message := self._inbox.pop()) is not None:
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
        if self._kafka_waiting_since is None:
            self._kafka_waiting_since = time.monotonic()
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

        self._supervisor.spawn(f"resend of message {message.mid}", resend, restart=False)

    def _complete(self, message: InboundMessage, *, produced: int) -> None:
        if not self._source.acknowledge(message):
            self.stale_acks_skipped += 1
        self.stats.acked += 1
        self.stats.readings_produced += produced
        self._in_process -= 1
        # Each acknowledgement shows Kafka is moving; the clock restarts for what still waits.
        self._kafka_waiting_since = time.monotonic() if self._in_process else None
        if not self._in_process:
            self._drained.set()
        self._inbox.release()

    def _note_produce_failure(self, exc: BaseException) -> None:
        self.stats.produce_retries += 1
        # Shown by /ready, which needs no key: the kind of error, not the message naming brokers.
        self.stats.produce_error = public_description(exc)

    async def _records_for(self, message: InboundMessage) -> list[tuple[str, bytes, str | None]]:
        """What to put on the bus for one message: its readings, or one dead letter."""
        outcome = await accept_message(message, self._lookup)
        if isinstance(outcome, RejectedMessage):
            return [self._dead_letter(message, outcome)]
        self.stats.accepted += 1
        return [
            (self._settings.topics.telemetry(r.domain), r.to_bytes(), r.device_id) for r in outcome.records
        ]

    def _dead_letter(
        self, message: InboundMessage, rejection: RejectedMessage
    ) -> tuple[str, bytes, str | None]:
        self.stats.rejected[rejection.reason] += 1
        log.debug("rejected message on %s: %s", message.topic, rejection)
        letter = DeadLetter(
            reason=rejection.reason,
            detail=rejection.detail,
            topic=message.topic,
            received_at=message.received_at,
            payload=message.payload,
            # How the broker delivered it: a replay validates and de-duplicates it by the same.
            qos=message.qos,
            retain=message.retain,
            dup=message.dup,
            packet_id=message.mid if message.qos else None,
            properties=publish_properties(message.properties),
        )
        return (self._settings.topics.deadletter, letter.to_bytes(), None)

    async def _lookup(self, device_id: str) -> DeviceRoute | None:
        return await self._supervisor.retry("device registry", lambda: self._registry.lookup(device_id))

    async def _produce(self, topic: str, value: bytes, key: str | None) -> None:
        """Send until Kafka acknowledges; an unacknowledged MQTT message is never given up while
        the failure is one that passes."""

        async def send() -> None:
            try:
                await self._producer.send_and_wait(topic, value, key=key)
            except Exception as exc:
                self._note_produce_failure(exc)
                raise

        await self._supervisor.retry("Kafka", send)
        self.stats.produce_error = None
