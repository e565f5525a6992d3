"""One client's live stream: its frames (a backfill from Kafka from its Last-Event-ID up to where
it joined the hub, then the hub's fan-out, with heartbeats when idle) and the streaming response
that ends properly when the stream does, so the client reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from api.stream.framing import EVENT_STREAM_MEDIA_TYPE, HEARTBEAT, event_frame, opening
from api.stream.hub import KAFKA_TIMEOUT_S, EventHub, Subscription, parse_event
from api.stream.positions import Position, encode_position
from ioc_core.errors import IocError

log = logging.getLogger(__name__)

_FINAL_WRITE_S = 1.0


class ClientStream:
    """The frames of one client: a backfill from its Last-Event-ID up to the hub's position when
    it subscribed, then the live fan-out from there, with heartbeats when idle."""

    def __init__(
        self, hub: EventHub, subscription: Subscription, live_from: Position, resume: Position | None
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
            # A new stream starts from the hub's position, which its opening id gives the client.
            yield opening(encode_position(live_from, topic=topic))
            start = live_from
        else:
            yield opening(None)
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
                    parsed = parse_event(record.value)
                    if parsed is not None and stream_filter.admits(parsed):
                        self._wrote()
                        yield event_frame(encode_position(position, topic=topic), parsed.kind, parsed.data)
            for partition, tp in list(behind.items()):
                reached = await asyncio.wait_for(consumer.position(tp), KAFKA_TIMEOUT_S)
                if reached >= limits[partition]:
                    del behind[partition]
            if self._quiet_for() >= self._hub.heartbeat_s:
                self._wrote()
                yield HEARTBEAT

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
                yield HEARTBEAT
                continue
            if event.offset < floor[event.partition]:
                continue  # the client had it from another API process
            self._wrote()
            if ahead and any(e < f for e, f in zip(event.position, floor, strict=True)):
                merged = tuple(max(e, f) for e, f in zip(event.position, floor, strict=True))
                yield event_frame(encode_position(merged, topic=topic), event.parsed.kind, event.parsed.data)
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

    def __init__(self, stream: ClientStream) -> None:
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
