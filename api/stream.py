"""The live event stream `GET /v1/stream`: Server-Sent Events fed from `ioc.events`.

One `EventHub` per API process follows every partition of `ioc.events` with a consumer of its own
(no group: each process sees every event) and fans each event out to the open streams, each with
a bounded queue. An event's SSE `id` encodes the hub's whole position after it: the next offset of
every partition. A client that comes back with `Last-Event-ID` is subscribed to the fan-out first,
noting the hub's position H at that instant; a temporary consumer then reads from the client's
position up to H, and the live queue goes on from H. So nothing still retained in Kafka is missed
and nothing is sent twice, whichever partitions the events were on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from api import problems
from api.auth import Principal, require
from api.common import CityFilter, DomainFilter, comma_list
from ioc_core.bus import ensure_topics, new_admin, new_consumer
from ioc_core.component import Component
from ioc_core.errors import IocError, ServiceUnavailableError
from ioc_core.settings import Settings
from ioc_core.supervision import Outage, RetryPolicy, Supervisor, is_retriable, retrying

log = logging.getLogger(__name__)

Position = tuple[int, ...]

KINDS: tuple[str, ...] = ("alarm", "status", "state")
EVENT_STREAM_MEDIA_TYPE = "text/event-stream"
RETRY_MS = 3000
# Events waiting for one client, at most; a client that falls this far behind is disconnected
# and comes back with its Last-Event-ID, which Kafka serves instead of this process's memory.
QUEUE_LIMIT = 5000
_RETRY_AFTER_S = 5
_CONNECT_RETRY_MIN_S, _CONNECT_RETRY_MAX_S = 1.0, 30.0
_CONNECT_POLICY = RetryPolicy(initial_s=_CONNECT_RETRY_MIN_S, max_s=_CONNECT_RETRY_MAX_S)
_KAFKA_TIMEOUT_S = 30.0
_POLL_MS = 1000
_FINAL_WRITE_S = 1.0

_ID_VERSION = 1
_ID_MAX_CHARS = 4096
_ID_ALPHABET = re.compile(r"^[A-Za-z0-9_-]+$")
_OFFSET_MAX = 2**63 - 1


def _problem(description: str) -> dict[str, Any]:
    """An error answer in the schema. Spelt out rather than with `model`, which would document it
    under the route's own media type (`text/event-stream`) as well."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {"description": description, "content": {problems.PROBLEM_MEDIA_TYPE: {"schema": schema}}}


# -- Event ids: the position vector -------------------------------------------------------------


def _topic_tag(topic: str) -> bytes:
    """Two bytes naming the topic, so that an id of another deployment (or of a test run with
    another topic prefix) is recognised as foreign rather than read as offsets of this one."""
    return hashlib.blake2b(topic.encode(), digest_size=2).digest()


def encode_position(offsets: Sequence[int], *, topic: str) -> str:
    """The SSE id for a position: the next offset of every partition of `topic`.

    Version byte, topic tag, partition count and offsets as unsigned LEB128 varints, in URL-safe
    base64 without padding: 30 characters for 6 partitions with offsets below two million.
    """
    body = bytearray((_ID_VERSION,))
    body += _topic_tag(topic)
    _put_varint(body, len(offsets))
    for offset in offsets:
        if not 0 <= offset <= _OFFSET_MAX:
            raise ValueError(f"offset {offset} is out of range")
        _put_varint(body, offset)
    return base64.urlsafe_b64encode(bytes(body)).rstrip(b"=").decode("ascii")


def decode_position(text: str | None, *, topic: str) -> Position | None:
    """The position an id stands for, or None when it is not an id of this topic's stream
    (missing, garbled, another version, another topic)."""
    if not text or len(text) > _ID_MAX_CHARS or not _ID_ALPHABET.match(text):
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None
    if len(raw) < 4 or raw[0] != _ID_VERSION or raw[1:3] != _topic_tag(topic):
        return None
    values: list[int] = []
    index = 3
    while index < len(raw):
        value, index = _get_varint(raw, index)
        if value is None:
            return None
        values.append(value)
    if not values or values[0] != len(values) - 1 or values[0] == 0:
        return None
    offsets = tuple(values[1:])
    # Only the canonical spelling counts, so that one position has exactly one id.
    return offsets if encode_position(offsets, topic=topic) == text else None


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(raw: bytes, index: int) -> tuple[int | None, int]:
    value = shift = 0
    while index < len(raw) and shift < 64:
        byte = raw[index]
        index += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value, index) if value <= _OFFSET_MAX else (None, index)
        shift += 7
    return None, index


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
    return None


@dataclass(frozen=True, slots=True)
class _Parsed:
    kind: str
    city: str
    domain: str
    data: str  # the CloudEvent as one line of JSON


def _parse(value: bytes | None) -> _Parsed | None:
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
    city, domain = data.get("city"), data.get("domain")
    if not isinstance(city, str) or not isinstance(domain, str):
        return None
    # Re-serialised compactly: one line whatever the producer wrote, as an SSE `data:` needs.
    return _Parsed(kind, city, domain, json.dumps(event, separators=(",", ":"), ensure_ascii=False))


def _frame(event_id: str, parsed: _Parsed) -> bytes:
    return f"id: {event_id}\nevent: {parsed.kind}\ndata: {parsed.data}\n\n".encode()


_HEARTBEAT = b": heartbeat\n\n"


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """Which events one stream sends: the asked kinds, city and domain, within the caller's scope."""

    kinds: frozenset[str]
    city: str | None
    domain: str | None
    principal: Principal

    def matches(self, kind: str, city: str, domain: str) -> bool:
        return (
            kind in self.kinds
            and (self.city is None or city == self.city)
            and (self.domain is None or domain == self.domain)
            and self.principal.allows(city, domain)
        )


@dataclass(frozen=True, slots=True)
class _HubEvent:
    partition: int
    offset: int
    position: Position  # the hub's position just after this event
    parsed: _Parsed
    frame: bytes  # with the id of `position`


class _Subscription:
    """One stream's share of the fan-out: a bounded queue of the events that match its filter.

    A live stream whose queue overflows is ended (its client comes back with its Last-Event-ID and
    Kafka serves what it missed). While the stream still reads its backlog from Kafka, an
    overflow only marks the queue: the stream then catches up from Kafka once more (`restart`).
    """

    def __init__(self, stream_filter: StreamFilter, limit: int) -> None:
        self.filter = stream_filter
        self._limit = limit
        self._items: deque[_HubEvent] = deque()
        self._wakeup = asyncio.Event()
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.live = False
        self.overflowed = False

    def offer(self, event: _HubEvent) -> None:
        if (
            self.ended.is_set()
            or self.overflowed
            or not self.filter.matches(event.parsed.kind, event.parsed.city, event.parsed.domain)
        ):
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

    async def next(self, wait_s: float) -> _HubEvent | None:
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
        self._queue_limit = queue_limit
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._positions: list[int] = []
        self._subscriptions: set[_Subscription] = set()
        self._supervisor = Supervisor("API event hub")
        self._following = Outage(f"live events: following {self.topic}", log)
        self._connected = False
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._connected and not self._closing

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
        self._connected = False

    def close_streams(self) -> None:
        """End every open stream and refuse new ones: the first step of shutting down."""
        self._closing = True
        for subscription in list(self._subscriptions):
            subscription.end("the API is shutting down")

    def subscribe(self, stream_filter: StreamFilter) -> tuple[_Subscription, Position]:
        """Join the fan-out. The position returned is the hub's at this instant: every event
        after it, and none before, reaches the subscription (no await in between)."""
        subscription = _Subscription(stream_filter, self._queue_limit)
        self._subscriptions.add(subscription)
        return subscription, tuple(self._positions)

    def restart(self, subscription: _Subscription) -> Position:
        """Empty a subscription whose queue overflowed before it went live: from the position
        returned on (no await in between) it gets every event again."""
        subscription.restart()
        return tuple(self._positions)

    def unsubscribe(self, subscription: _Subscription) -> None:
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
            raise ServiceUnavailableError("the event hub is not connected to Kafka")
        ends = await self._consumer.end_offsets(self._partitions)
        return tuple(ends[tp] for tp in self._partitions)

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
            self._connected = False
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
        count = await asyncio.wait_for(_partition_count(bootstrap, self.topic), _KAFKA_TIMEOUT_S)
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
            positions = [await asyncio.wait_for(consumer.position(tp), _KAFKA_TIMEOUT_S) for tp in partitions]
        except BaseException:
            await consumer.stop()
            raise
        self._consumer, self._partitions, self._positions = consumer, partitions, positions
        self._connected = True

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
        parsed = _parse(value)
        if parsed is None:
            return
        position = tuple(self._positions)
        event = _HubEvent(
            partition, offset, position, parsed, _frame(encode_position(position, topic=self.topic), parsed)
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
    raise ServiceUnavailableError(f"{topic} has no partitions yet")


# -- One client's stream -------------------------------------------------------------------------


class _ClientStream:
    """The frames of one client: a backfill from its Last-Event-ID up to the hub's position when
    it subscribed, then the live fan-out from there, with heartbeats when idle."""

    def __init__(
        self, hub: EventHub, subscription: _Subscription, live_from: Position, resume: Position | None
    ) -> None:
        self._hub = hub
        self._subscription = subscription
        self._live_from = live_from
        self._resume = resume
        self._backfill_consumer: AIOKafkaConsumer | None = None
        self._last_write = time.monotonic()
        self.chunks = self._generate()

    @property
    def ended(self) -> asyncio.Event:
        return self._subscription.ended

    @property
    def end_reason(self) -> str:
        return self._subscription.end_reason

    def _quiet_for(self) -> float:
        return time.monotonic() - self._last_write

    def _wrote(self) -> None:
        self._last_write = time.monotonic()

    async def _generate(self) -> AsyncGenerator[bytes, None]:
        topic = self._hub.topic
        resume = await self._usable_resume()
        live_from = self._live_from
        if resume is None:
            # An id without data sets the client's last event id without an event: one that
            # reconnects before its first event still resumes from here.
            yield f"retry: {RETRY_MS}\nid: {encode_position(live_from, topic=topic)}\n\n".encode()
            start = live_from
        else:
            yield f"retry: {RETRY_MS}\n\n".encode()
            start = resume
        try:
            while True:
                async for chunk in self._backfill(start, live_from):
                    yield chunk
                start = tuple(max(s, h) for s, h in zip(start, live_from, strict=True))
                if self.ended.is_set():
                    return
                if not self._subscription.overflowed:
                    # No await since the check: nothing can have been dropped in between.
                    self._subscription.live = True
                    break
                # More arrived meanwhile than the queue holds: catch up from Kafka again.
                log.debug("live events: a stream fell behind before going live; catching up again")
                live_from = self._hub.restart(self._subscription)
        except (KafkaError, TimeoutError) as exc:
            # The stream ends; the client comes back with the id of the last event it got.
            log.warning("live events: a stream could not read its backlog from Kafka: %s", exc)
            return
        # Not in a `finally`: a cancelled stream's consumer is stopped by `close`.
        await self._stop_backfill()
        self._wrote()
        async for chunk in self._live(start, live_from):
            yield chunk

    async def _usable_resume(self) -> Position | None:
        resume = self._resume
        if resume is None or len(resume) != len(self._live_from):
            return None
        if all(r <= h for r, h in zip(resume, self._live_from, strict=True)):
            return resume
        # Ahead of this hub in some partition: fine if another API process was further on, but
        # beyond the end of the topic it is not a position of this topic (recreated, say).
        try:
            ends = await self._hub.end_offsets()
        except (KafkaError, IocError) as exc:
            log.warning("live events: cannot check a Last-Event-ID against the topic's end: %s", exc)
            return None
        return resume if all(r <= e for r, e in zip(resume, ends, strict=True)) else None

    async def _backfill(self, resume: Position, limits: Position) -> AsyncIterator[bytes]:
        """The events from `resume` up to (not including) `limits` that the filter lets through."""
        topic = self._hub.topic
        behind = {
            p: TopicPartition(topic, p) for p, (r, h) in enumerate(zip(resume, limits, strict=True)) if r < h
        }
        if not behind:
            return
        position = list(resume)
        consumer = self._backfill_consumer
        if consumer is None:
            consumer = self._backfill_consumer = self._hub.consumer()
            await consumer.start()
        consumer.assign(list(behind.values()))
        for partition, tp in behind.items():
            consumer.seek(tp, resume[partition])
        stream_filter = self._subscription.filter
        while behind and not self.ended.is_set():
            wait_ms = max(1, int(min(self._hub.heartbeat_s - self._quiet_for(), 1.0) * 1000))
            batches = await consumer.getmany(*behind.values(), timeout_ms=wait_ms)
            for tp, records in batches.items():
                for record in records:
                    if record.offset < resume[tp.partition]:
                        continue  # fetched for an earlier round of catching up
                    if record.offset >= limits[tp.partition]:
                        break  # from here on the live queue has it
                    position[tp.partition] = record.offset + 1
                    parsed = _parse(record.value)
                    if parsed is not None and stream_filter.matches(parsed.kind, parsed.city, parsed.domain):
                        self._wrote()
                        yield _frame(encode_position(position, topic=topic), parsed)
            for partition, tp in list(behind.items()):
                reached = await asyncio.wait_for(consumer.position(tp), _KAFKA_TIMEOUT_S)
                if reached >= limits[partition]:
                    del behind[partition]
            if self._quiet_for() >= self._hub.heartbeat_s:
                self._wrote()
                yield _HEARTBEAT

    async def _live(self, floor: Position, live_from: Position) -> AsyncIterator[bytes]:
        topic = self._hub.topic
        # Only when the client's position was ahead of this hub in some partition do ids need the
        # larger of both; otherwise every event's own frame is right as it is.
        ahead = floor != live_from
        while True:
            event = await self._subscription.next(max(0.0, self._hub.heartbeat_s - self._quiet_for()))
            if event is None:
                if self.ended.is_set():
                    return
                self._wrote()
                yield _HEARTBEAT
                continue
            if event.offset < floor[event.partition]:
                continue  # the client had it from another API process
            self._wrote()
            if ahead and any(e < f for e, f in zip(event.position, floor, strict=True)):
                merged = tuple(max(e, f) for e, f in zip(event.position, floor, strict=True))
                yield _frame(encode_position(merged, topic=topic), event.parsed)
            else:
                ahead = False
                yield event.frame

    async def _stop_backfill(self) -> None:
        consumer = self._backfill_consumer
        if consumer is not None:
            with contextlib.suppress(KafkaError):
                await consumer.stop()
            self._backfill_consumer = None

    async def close(self) -> None:
        self._hub.unsubscribe(self._subscription)
        await self.chunks.aclose()
        await self._stop_backfill()


class EventStreamResponse(StreamingResponse):
    """Streams one client's frames until it disconnects, or its stream ends (queue overflow,
    shutdown): then the response is finished properly, so the client reconnects."""

    media_type = EVENT_STREAM_MEDIA_TYPE

    def __init__(self, stream: _ClientStream) -> None:
        # `no-cache` keeps caches out; `X-Accel-Buffering` keeps nginx from holding frames back.
        super().__init__(stream.chunks, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream = stream
        self._started = self._completed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._started = True
            elif not message.get("more_body", False):
                self._completed = True
            await send(message)

        outcome: list[str] = []
        try:
            async with anyio.create_task_group() as tasks:

                async def until(name: str, step: Callable[[], Awaitable[object]]) -> None:
                    try:
                        await step()
                    except OSError:
                        name = "disconnected"
                    outcome.append(name)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(until, "finished", lambda: self.stream_response(tracked_send))
                tasks.start_soon(until, "disconnected", lambda: self.listen_for_disconnect(receive))
                await until("ended", self._stream.ended.wait)
            if outcome and outcome[0] == "ended":
                log.info("live events: a stream ended: %s", self._stream.end_reason)
                if not self._completed:
                    with anyio.move_on_after(_FINAL_WRITE_S), contextlib.suppress(OSError):
                        if not self._started:
                            await tracked_send(
                                {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                            )
                        await tracked_send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._stream.close()


# -- The route -----------------------------------------------------------------------------------


_DESCRIPTION = f"""Server-Sent Events (`{EVENT_STREAM_MEDIA_TYPE}`) of what happens in the caller's scope:

* `event: alarm`: alarm lifecycle (`alarm.raised`, `alarm.updated`, `alarm.acknowledged`,
  `alarm.resolved`); the CloudEvent's `data` is the alarm.
* `event: status`: a device went online or offline (`device.online`, `device.offline`).
* `event: state`: `state.changed`, the latest state of devices of one city and domain that changed
  lately, sent every few seconds at most: `data.items` is a list of
  `{{device_id, status, ts, metrics}}`. `metrics` are those of the readings since the previous
  state event: merge them into what you have; the newest `ts` wins.

Every `data:` is the CloudEvent 1.0 as one line of JSON. Every event has an `id`; a client that
reconnects with `Last-Event-ID` (browsers' EventSource does so by itself) gets every event it
missed that Kafka still retains, then the live ones, none twice. An id that is not one of this
stream's starts from now. The stream starts with `retry: {RETRY_MS}` and, for a new stream, an `id:`
without data that gives the starting position. Comment lines (`: heartbeat`) keep idle
connections open. `types` is a comma-separated list of `alarm`, `status`, `state` (default all);
`city` and `domain` narrow the stream further. One API process serves a limited number of streams:
beyond it, and while the process is not connected to Kafka, the answer is 503 with `Retry-After`."""


def _kinds(types: str | None) -> frozenset[str]:
    return frozenset(comma_list(types, KINDS, "types") or KINDS)


def add_stream_route(app: FastAPI) -> None:
    """Register `GET /v1/stream`; it uses the hub at `app.state.event_hub`."""

    @app.get(
        "/v1/stream",
        tags=["live"],
        summary="Live alarms, device status and state changes as Server-Sent Events.",
        description=_DESCRIPTION,
        response_class=EventStreamResponse,
        status_code=200,
        responses={
            200: {
                "description": "an endless stream of events",
                "content": {EVENT_STREAM_MEDIA_TYPE: {"schema": {"type": "string"}}},
            },
            400: _problem("`types` names an unknown kind"),
            401: _problem("no API key, or not a valid one"),
            403: _problem("the key lacks the viewer role"),
            422: _problem("`city` or `domain` is not valid"),
            500: _problem("internal error"),
            503: {
                **_problem("not connected to Kafka yet, or too many open streams"),
                "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
            },
        },
    )
    async def stream(
        request: Request,
        principal: Annotated[Principal, require("viewer")],
        city: CityFilter = None,
        domain: DomainFilter = None,
        types: Annotated[
            str | None, Query(description="comma-separated: alarm, status, state (default all)")
        ] = None,
        last_event_id: Annotated[
            str | None, Query(description="where to resume, for clients that cannot send the header")
        ] = None,
        last_event_id_header: Annotated[
            str | None, Header(alias="Last-Event-ID", description="the id of the last event received")
        ] = None,
    ) -> EventStreamResponse:
        kinds = _kinds(types)
        hub: EventHub = request.app.state.event_hub
        retry_after = {"Retry-After": str(_RETRY_AFTER_S)}
        if not hub.connected:
            raise HTTPException(
                503, "the live event stream is not connected to Kafka yet", headers=retry_after
            )
        if hub.open_streams >= hub.max_streams:
            raise HTTPException(
                503, f"this API process already serves {hub.max_streams} streams", headers=retry_after
            )
        resume = decode_position(last_event_id_header or last_event_id, topic=hub.topic)
        subscription, live_from = hub.subscribe(StreamFilter(kinds, city, domain, principal))
        return EventStreamResponse(_ClientStream(hub, subscription, live_from, resume))
