"""The live events hub: one per API process, it follows every partition of the events topic with
a consumer of its own (no group: each process sees every event), keeps its position, and fans each
event out to the open streams' subscriptions, each a bounded queue of the events its filter lets
through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from api.auth import Principal
from api.stream.framing import event_frame
from api.stream.positions import Position, encode_position
from ioc_core.audit import AUDIT_RECORDED
from ioc_core.bus import ensure_topics, new_admin, new_consumer
from ioc_core.component import Component
from ioc_core.errors import IocError, ServiceUnavailableError
from ioc_core.settings import Settings
from ioc_core.supervision import Outage, RetryPolicy, Supervisor, is_retriable, retrying

log = logging.getLogger(__name__)

# What a stream sends unless `types` says otherwise.
KINDS: tuple[str, ...] = ("alarm", "status", "state")
# Audit entries (`audit.recorded`) go only to admins' streams that ask for them, within their scope.
AUDIT_KIND = "audit"
STREAM_KINDS: tuple[str, ...] = (*KINDS, AUDIT_KIND)
# Events waiting for one client, at most; a client that falls this far behind is disconnected
# and comes back with its Last-Event-ID, which Kafka serves instead of this process's memory.
QUEUE_LIMIT = 5000
_CONNECT_RETRY_MIN_S, _CONNECT_RETRY_MAX_S = 1.0, 30.0
_CONNECT_POLICY = RetryPolicy(initial_s=_CONNECT_RETRY_MIN_S, max_s=_CONNECT_RETRY_MAX_S)
KAFKA_TIMEOUT_S = 30.0
# A request waits this long at most for Kafka to say where the resume window starts.
RESUME_CHECK_TIMEOUT_S = 5.0
_POLL_MS = 1000


# -- Events and filters --------------------------------------------------------------------------


def kind_of(event_type: object) -> str | None:
    """The SSE event name of a CloudEvent type, or None for types the stream does not carry."""
    if not isinstance(event_type, str):
        return None
    if event_type.startswith("alarm."):
        return "alarm"
    if event_type in ("device.online", "device.offline"):
        return "status"
    if event_type == "state.changed":
        return "state"
    if event_type == AUDIT_RECORDED:
        return AUDIT_KIND
    return None


@dataclass(frozen=True, slots=True)
class ParsedEvent:
    kind: str
    city: str
    domain: str
    data: str  # the CloudEvent as one line of JSON
    # An audit entry's object's cities and domains (None: every one), instead of one place.
    cities: frozenset[str] | None = None
    domains: frozenset[str] | None = None
    # The areas the device of an alarm or status change lies in (other events name none).
    areas: frozenset[str] = frozenset()


def _scope(value: object) -> frozenset[str] | None:
    """An audit entry's scope list; anything but a list of strings is no scope at all (every one)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    return None


def parse_event(value: bytes | None) -> ParsedEvent | None:
    """What the stream needs of a record of `ioc.events`; None for anything it does not carry."""
    if not value:
        return None
    try:
        event = json.loads(value)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    kind = kind_of(event.get("type"))
    data = event.get("data")
    if kind is None or not isinstance(data, dict):
        return None
    # Re-serialised compactly: one line whatever the producer wrote, as an SSE `data:` needs.
    line = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    if kind == AUDIT_KIND:
        return ParsedEvent(kind, "", "", line, _scope(data.get("cities")), _scope(data.get("domains")))
    city, domain = data.get("city"), data.get("domain")
    if not isinstance(city, str) or not isinstance(domain, str):
        return None
    return ParsedEvent(kind, city, domain, line, areas=_scope(data.get("areas")) or frozenset())


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """Which events one stream sends: the asked kinds, city and domain, within the caller's scope."""

    kinds: frozenset[str]
    city: str | None
    domain: str | None
    principal: Principal
    # Only events naming one of these areas (alarms: of their device), when given.
    areas: frozenset[str] | None = None

    def matches(self, kind: str, city: str, domain: str) -> bool:
        return (
            kind in self.kinds
            and (self.city is None or city == self.city)
            and (self.domain is None or domain == self.domain)
            and self.principal.allows(city, domain)
        )

    def admits(self, event: ParsedEvent) -> bool:
        if self.areas is not None and not self.areas & event.areas:
            return False
        if event.kind != AUDIT_KIND:
            return self.matches(event.kind, event.city, event.domain)
        # An audit entry: for admins whose scope holds its object's, as `GET /v1/audit` shows it;
        # `city` and `domain` keep the entries that name them.
        return (
            AUDIT_KIND in self.kinds
            and self.principal.has_role("admin")
            and self.principal.covers(event.cities, event.domains)
            and (self.city is None or (event.cities is not None and self.city in event.cities))
            and (self.domain is None or (event.domains is not None and self.domain in event.domains))
        )


@dataclass(frozen=True, slots=True)
class HubEvent:
    partition: int
    offset: int
    position: Position  # the hub's position just after this event
    parsed: ParsedEvent
    frame: bytes  # with the id of `position`


class Subscription:
    """One stream's share of the fan-out: a bounded queue of the events that match its filter.

    A live stream whose queue overflows is ended (its client comes back with its Last-Event-ID and
    Kafka serves what it missed). While the stream still reads its backlog from Kafka, an
    overflow only marks the queue: the stream then catches up from Kafka once more (`restart`).
    """

    def __init__(self, stream_filter: StreamFilter, limit: int) -> None:
        self.filter = stream_filter
        self._limit = limit
        self._items: deque[HubEvent] = deque()
        self._wakeup = asyncio.Event()
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.live = False
        self.overflowed = False

    def offer(self, event: HubEvent) -> None:
        if self.ended.is_set() or self.overflowed or not self.filter.admits(event.parsed):
            return
        if len(self._items) >= self._limit:
            self.overflowed = True
            self._items.clear()
            if self.live:
                self.end("its queue overflowed")
            return
        self._items.append(event)
        self._wakeup.set()

    def restart(self) -> None:
        """Empty the queue, to take events again from the hub's present position."""
        self._items.clear()
        self.overflowed = False

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()
            self._wakeup.set()

    async def next(self, wait_s: float) -> HubEvent | None:
        """The next event, or None after `wait_s` seconds without one (or once ended)."""
        if not self._items and not self.ended.is_set():
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait_s)
        if self.ended.is_set():
            return None
        return self._items.popleft() if self._items else None


# -- The hub -------------------------------------------------------------------------------------


class EventHub(Component):
    """Follows `ioc.events` from its end and fans the events out to the open streams.

    Starting never waits for Kafka: the hub connects in the background, retrying, and until it
    is connected `/v1/stream` answers 503. Stopping ends every open stream.
    """

    def __init__(self, settings: Settings, *, queue_limit: int = QUEUE_LIMIT) -> None:
        self._settings = settings
        self.topic = settings.topics.events
        self.heartbeat_s = settings.stream_heartbeat_s
        self.max_streams = settings.api_max_streams
        self.resume_window_s = settings.stream_resume_window_s
        self._queue_limit = queue_limit
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._positions: list[int] = []
        self._subscriptions: set[Subscription] = set()
        self._supervisor = Supervisor("API event hub")
        self._following = Outage(f"live events: following {self.topic}", log)
        self._connected_event = asyncio.Event()
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._connected_event.is_set() and not self._closing

    async def until_connected(self, timeout_s: float) -> bool:
        """Wait until the hub follows the events (True), or `timeout_s` passed (False)."""
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout_s)
        except TimeoutError:
            return False
        return not self._closing

    @property
    def open_streams(self) -> int:
        return len(self._subscriptions)

    @property
    def position(self) -> Position:
        return tuple(self._positions)

    async def start(self) -> None:
        self._closing = False
        self._supervisor.spawn("following events", self._run, restart=False)

    async def wait(self) -> None:
        """Until following the events fails for good (raises `ComponentFailed`)."""
        await self._supervisor.wait()

    async def stop(self) -> None:
        self.close_streams()
        await self._supervisor.stop()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        self._connected_event.clear()

    def close_streams(self) -> None:
        """End every open stream and refuse new ones: the first step of shutting down."""
        self._closing = True
        for subscription in list(self._subscriptions):
            subscription.end("the API is shutting down")

    def subscribe(self, stream_filter: StreamFilter) -> tuple[Subscription, Position]:
        """Join the fan-out. The position returned is the hub's at this instant: every event
        after it, and none before, reaches the subscription (no await in between)."""
        subscription = Subscription(stream_filter, self._queue_limit)
        self._subscriptions.add(subscription)
        return subscription, tuple(self._positions)

    def restart(self, subscription: Subscription) -> Position:
        """Empty a subscription whose queue overflowed before it went live: from the position
        returned on (no await in between) it gets every event again."""
        subscription.restart()
        return tuple(self._positions)

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def consumer(self) -> AIOKafkaConsumer:
        """A consumer outside any group, for reading a stretch of the topic (the caller starts,
        assigns and stops it). Offsets older than the retention read from the earliest kept."""
        return new_consumer(
            self._settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="ioc-api-stream",
        )

    async def end_offsets(self) -> Position:
        if self._consumer is None:
            raise ServiceUnavailableError(
                "the event hub is not connected to Kafka", public="the live event stream is not connected yet"
            )
        ends = await self._consumer.end_offsets(self._partitions)
        return tuple(ends[tp] for tp in self._partitions)

    async def oldest_served(self) -> Position:
        """The oldest position a stream may resume from: in each partition the first event at
        most `stream_resume_window_s` old (the end, where all are older or none is left)."""
        if self._consumer is None:
            raise ServiceUnavailableError("the event hub is not connected to Kafka")
        cutoff_ms = max(0, int((time.time() - self.resume_window_s) * 1000))
        found = await asyncio.wait_for(
            self._consumer.offsets_for_times({tp: cutoff_ms for tp in self._partitions}),
            RESUME_CHECK_TIMEOUT_S,
        )
        if any(found.get(tp) is None for tp in self._partitions):
            ends = await asyncio.wait_for(self.end_offsets(), RESUME_CHECK_TIMEOUT_S)
        else:
            ends = ()
        return tuple(
            at.offset if (at := found.get(tp)) is not None else ends[index]
            for index, tp in enumerate(self._partitions)
        )

    async def _run(self) -> None:
        while True:
            await self._connect_with_retries()
            log.info(
                "live events: following %s from its end (%d partitions)", self.topic, len(self._partitions)
            )
            try:
                await self._follow()
            except Exception as exc:
                if not is_retriable(exc):
                    raise
                self._following.failed(exc)
            # The open streams end; their clients come back with their Last-Event-ID.
            self._connected_event.clear()
            for subscription in list(self._subscriptions):
                subscription.end("the event hub starts over")
            if self._consumer is not None:
                with contextlib.suppress(KafkaError):
                    await self._consumer.stop()
                self._consumer = None
            await asyncio.sleep(_CONNECT_RETRY_MIN_S)

    async def _connect_with_retries(self) -> None:
        await retrying(self._following, self._connect, policy=_CONNECT_POLICY)

    async def _connect(self) -> None:
        bootstrap = self._settings.kafka_bootstrap
        # Created if missing (as the processors do), so that asking for its metadata cannot make
        # the broker auto-create it with its own defaults.
        await ensure_topics(
            bootstrap,
            [self.topic],
            partitions=self._settings.topic_partitions,
            replication_factor=self._settings.kafka_replication_factor,
            min_insync_replicas=self._settings.kafka_min_insync_replicas,
        )
        count = await asyncio.wait_for(_partition_count(bootstrap, self.topic), KAFKA_TIMEOUT_S)
        consumer = new_consumer(
            bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            client_id="ioc-api-events",
        )
        try:
            await consumer.start()
            partitions = [TopicPartition(self.topic, p) for p in range(count)]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            positions = [await asyncio.wait_for(consumer.position(tp), KAFKA_TIMEOUT_S) for tp in partitions]
        except BaseException:
            await consumer.stop()
            raise
        self._consumer, self._partitions, self._positions = consumer, partitions, positions
        self._connected_event.set()

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=_POLL_MS)
            except KafkaError as exc:
                log.warning("live events: reading %s failed, reading again: %s", self.topic, exc)
                await asyncio.sleep(1)
                continue
            # No await from here to the end of the batch: a subscriber's position is exact.
            for records in batches.values():
                for record in records:
                    self._dispatch(record.partition, record.offset, record.value)

    def _dispatch(self, partition: int, offset: int, value: bytes | None) -> None:
        self._positions[partition] = offset + 1
        if not self._subscriptions:
            return
        parsed = parse_event(value)
        if parsed is None:
            return
        position = tuple(self._positions)
        event = HubEvent(
            partition,
            offset,
            position,
            parsed,
            event_frame(encode_position(position, topic=self.topic), parsed.kind, parsed.data),
        )
        for subscription in self._subscriptions:
            subscription.offer(event)


async def _partition_count(bootstrap: str, topic: str) -> int:
    admin = new_admin(bootstrap, request_timeout_ms=15_000)
    try:
        await admin.start()
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for item in described:
        if item.get("topic") == topic and not item.get("error_code") and item.get("partitions"):
            ids = sorted(p["partition"] for p in item["partitions"])
            if ids != list(range(len(ids))):
                raise IocError(f"{topic} has unexpected partition ids {ids}")
            return len(ids)
    raise ServiceUnavailableError(
        f"{topic} has no partitions yet", public="the event topic has no partitions yet"
    )
