"""The live event stream `GET /v1/stream` (Server-Sent Events).

Through the session's system: a device's alarm, status and state events arrive, filters hold,
and a client that comes back with `Last-Event-ID` gets exactly what it missed. Against an event
hub run in this process, on a topic of its own fed straight from the tests: resuming across
partitions, a client too slow for its queue, heartbeats, the stream cap, the caller's scope,
Kafka being away, and shutdown.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI

from api import problems
from api.auth import Principal, current_principal
from api.routes import stream as stream_routes
from api.stream.hub import EventHub
from api.stream.positions import decode_position, encode_position
from ioc_core.bus import Topics, ensure_topics
from ioc_core.events import Event, device_status_event, state_changed_event
from ioc_core.http import HttpServer
from ioc_core.settings import Settings
from tests.integration.conftest import ADMIN_KEY, SESSION_CITY, System, free_port
from tests.integration.harness import ComponentProcess, Publisher, delete_topics, publish, unique, wait_until

BOOTSTRAP = "127.0.0.1:9092"
PARTITIONS = 6
LOCATION = {"lat": 21.03, "lon": 105.85}
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Streams are endless: reads wait as long as the test's own deadlines allow.
STREAM_TIMEOUT = httpx.Timeout(10, read=None)


# -- An SSE client on httpx ------------------------------------------------------------------------


@dataclass
class Frame:
    id: str | None
    event: str | None
    data: dict[str, Any] | None
    retry: str | None


@dataclass
class Stream:
    response: httpx.Response
    heartbeats: int = 0
    ended: bool = False
    frames: list[Frame] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lines = self.response.aiter_lines()

    @property
    def events(self) -> list[Frame]:
        return [f for f in self.frames if f.event is not None]

    async def frame(self) -> Frame | None:
        """The next frame (an event, or the opening `retry`/`id`), or None when the stream ends."""
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if fields:
                    data = fields.get("data")
                    frame = Frame(
                        fields.get("id"),
                        fields.get("event"),
                        json.loads(data) if data else None,
                        fields.get("retry"),
                    )
                    self.frames.append(frame)
                    return frame
                continue
            if line.startswith(":"):
                self.heartbeats += 1
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        self.ended = True
        return None

    async def read_until(
        self, done: Callable[[list[Frame]], bool], *, timeout: float, what: str
    ) -> list[Frame]:
        try:
            async with asyncio.timeout(timeout):
                while not done(self.events):
                    if await self.frame() is None:
                        break
        except TimeoutError:
            pass
        if not done(self.events):
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; got {self.summary()}")
        return self.events

    async def read_for(self, seconds: float) -> list[Frame]:
        """Whatever arrives within `seconds` (the stream is unusable afterwards)."""
        try:
            async with asyncio.timeout(seconds):
                while await self.frame() is not None:
                    pass
        except TimeoutError:
            pass
        return self.events

    @property
    def last_id(self) -> str:
        ids = [f.id for f in self.frames if f.id is not None]
        assert ids, "no id received"
        return ids[-1]

    def summary(self) -> str:
        return ", ".join(f"{f.event}:{(f.data or {}).get('type')}" for f in self.events[-20:]) or "nothing"


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, params: dict[str, str] | None = None, last_event_id: str | None = None
) -> AsyncIterator[Stream]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    async with client.stream("GET", "/v1/stream", params=params, headers=headers) as response:
        if response.status_code != 200:
            raise AssertionError(f"/v1/stream answered {response.status_code}: {(await response.aread())!r}")
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = Stream(response)
        first = await asyncio.wait_for(stream.frame(), 10)
        assert first is not None and first.retry == "3000" and first.event is None
        yield stream


def of_devices(frames: Iterable[Frame], device_ids: set[str]) -> list[Frame]:
    """Alarm and status events of these devices, and state events naming one of them."""
    chosen = []
    for frame in frames:
        data = (frame.data or {}).get("data", {})
        if data.get("device_id") in device_ids or any(
            item["device_id"] in device_ids for item in data.get("items", [])
        ):
            chosen.append(frame)
    return chosen


# -- Through the session's system ------------------------------------------------------------------


@pytest.fixture
async def viewer(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=system.api_url, headers=AUTH, timeout=STREAM_TIMEOUT) as client:
        yield client


async def register(admin: httpx.AsyncClient, domain: str, **extra: Any) -> str:
    device_id = unique(f"{domain}-live")
    body = {"id": device_id, "city": SESSION_CITY, "domain": domain, "location": LOCATION, **extra}
    response = await admin.post("/v1/devices", json=body)
    assert response.status_code == 201, response.text
    return device_id


async def wait_for_stream(client: httpx.AsyncClient) -> None:
    """Until the API's event hub follows Kafka (it starts without waiting for it)."""

    async def ready() -> bool | None:
        async with client.stream("GET", "/v1/stream", params={"types": "alarm"}) as response:
            return True if response.status_code == 200 else None

    await wait_until(ready, timeout=60, what="/v1/stream to answer 200", interval=0.5)


async def test_a_devices_alarm_status_and_state_arrive_filtered(
    system: System, admin: httpx.AsyncClient, viewer: httpx.AsyncClient
) -> None:
    await wait_for_stream(viewer)
    device_id = await register(
        admin, "flood", thresholds={"currentLevel": {"warn_above": 3.0, "crit_above": 4.5}}
    )
    mine = {device_id}
    async with (
        open_stream(viewer, {"city": SESSION_CITY}) as everything,
        open_stream(viewer, {"city": SESSION_CITY, "domain": "flood", "types": "alarm"}) as alarms,
        open_stream(viewer, {"types": "status,state"}) as no_alarms,
        open_stream(viewer, {"city": SESSION_CITY, "domain": "water"}) as other_domain,
        open_stream(viewer, {"city": "somewhere-else"}) as other_city,
    ):
        ts = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(seconds=30)
        reading = {"ts": ts.isoformat(), "currentLevel": 4.9, "rainfall": 12.5}
        publish(f"ioc/v1/{SESSION_CITY}/flood/{device_id}/telemetry", json.dumps(reading).encode())

        def all_three(frames: list[Frame]) -> bool:
            return {f.event for f in of_devices(frames, mine)} >= {"alarm", "status", "state"}

        events = of_devices(
            await everything.read_until(all_three, timeout=30, what="alarm, status and state"), mine
        )
        by_kind = {f.event: f for f in events}
        assert by_kind["alarm"].data is not None and by_kind["alarm"].data["type"] == "alarm.raised"
        assert by_kind["alarm"].data["data"]["rule"] == "threshold.currentLevel"
        assert by_kind["alarm"].data["data"]["severity"] == "critical"
        status = by_kind["status"].data
        assert status is not None and status["type"] == "device.online"
        assert status["data"]["device_id"] == device_id and status["data"]["status"] == "online"
        assert status["data"]["city"] == SESSION_CITY and status["data"]["domain"] == "flood"
        state = by_kind["state"].data
        assert state is not None and state["type"] == "state.changed"
        assert state["subject"] == f"{SESSION_CITY}/flood"
        assert state["data"]["city"] == SESSION_CITY and state["data"]["domain"] == "flood"
        [item] = [i for i in state["data"]["items"] if i["device_id"] == device_id]
        assert item["status"] == "online"
        assert item["metrics"] == {"currentLevel": 4.9, "rainfall": 12.5}
        assert datetime.fromisoformat(item["ts"]) == ts
        for frame in events:
            assert frame.data is not None and frame.data["specversion"] == "1.0" and frame.data["id"]
            assert decode_position(frame.id, topic=system.topics.events) is not None

        await alarms.read_until(
            lambda frames: bool(of_devices(frames, mine)), timeout=10, what="the alarm on the alarm stream"
        )
        await no_alarms.read_until(
            lambda frames: {f.event for f in of_devices(frames, mine)} >= {"status", "state"},
            timeout=10,
            what="status and state on the stream without alarms",
        )
        # Every stream of this API process was offered these events at the same instant.
        await asyncio.sleep(1)
        assert {f.event for f in of_devices(await alarms.read_for(0.5), mine)} == {"alarm"}
        assert "alarm" not in {f.event for f in of_devices(await no_alarms.read_for(0.5), mine)}
        assert of_devices(await other_domain.read_for(0.5), mine) == []
        assert of_devices(await other_city.read_for(0.5), mine) == []


async def test_state_changes_are_throttled_and_latest_wins(
    system: System, admin: httpx.AsyncClient, viewer: httpx.AsyncClient
) -> None:
    await wait_for_stream(viewer)
    device_id = await register(admin, "grid")
    async with open_stream(viewer, {"city": SESSION_CITY, "domain": "grid", "types": "state"}) as stream:
        start = datetime.now(tz=UTC).replace(microsecond=0) - timedelta(minutes=5)
        topic = f"ioc/v1/{SESSION_CITY}/grid/{device_id}/telemetry"
        readings = [
            (start + timedelta(seconds=i), {"voltage": 220.0 + i, "frequency": 50.0}) for i in range(40)
        ]
        began = time.monotonic()
        with Publisher() as publisher:
            for chunk in (readings[:20], readings[20:]):
                publisher.publish_all(
                    [(topic, json.dumps({"ts": t.isoformat(), **m}).encode()) for t, m in chunk]
                )
                await asyncio.sleep(0.5)
        newest = start + timedelta(seconds=39)

        def newest_seen(frames: list[Frame]) -> bool:
            items = [i for f in of_devices(frames, {device_id}) for i in f.data["data"]["items"]]  # type: ignore[index]
            return any(
                datetime.fromisoformat(i["ts"]) == newest for i in items if i["device_id"] == device_id
            )

        events = of_devices(
            await stream.read_until(newest_seen, timeout=30, what="the newest state"), {device_id}
        )
        elapsed = time.monotonic() - began
    items = [i for f in events for i in f.data["data"]["items"] if i["device_id"] == device_id]  # type: ignore[index]
    # 40 readings, but one state per interval (2 s) and processor at most.
    assert len(items) <= elapsed / 2 + 2, items
    assert items[-1]["metrics"] == {"voltage": 259.0, "frequency": 50.0}
    assert [i["ts"] for i in items] == sorted(i["ts"] for i in items)


async def test_a_client_that_comes_back_gets_exactly_what_it_missed(
    system: System, admin: httpx.AsyncClient, viewer: httpx.AsyncClient
) -> None:
    """Status changes of devices spread over the partitions, while the client is away."""
    await wait_for_stream(viewer)
    devices = [await register(admin, "traffic") for _ in range(5)]
    mine = set(devices)
    params = {"city": SESSION_CITY, "domain": "traffic", "types": "status"}

    def say(device_id: str, status: str) -> None:
        publish(f"ioc/v1/{SESSION_CITY}/traffic/{device_id}/status", status.encode(), retain=False)

    async def step(witness: Stream, changes: list[tuple[str, str]]) -> None:
        """Make the changes and wait until the witness has seen them (so none collapse)."""
        before = len(of_devices(witness.events, mine))
        for device_id, status in changes:
            say(device_id, status)
        await witness.read_until(
            lambda frames: len(of_devices(frames, mine)) >= before + len(changes),
            timeout=30,
            what=f"{len(changes)} status events",
        )

    async with open_stream(viewer, params) as witness:
        async with open_stream(viewer, params) as client:
            await step(witness, [(d, "online") for d in devices])
            await client.read_until(
                lambda frames: len(of_devices(frames, mine)) >= len(devices), timeout=10, what="online events"
            )
            seen = [f.data["id"] for f in of_devices(client.events, mine)]  # type: ignore[index]
            last_id = client.last_id
        # Away: every device goes offline, then some come back.
        await step(witness, [(d, "offline") for d in devices])
        await step(witness, [(d, "online") for d in devices[:3]])
        async with open_stream(viewer, params, last_event_id=last_id) as back:
            await step(witness, [(devices[0], "offline")])
            expected = [f.data["id"] for f in of_devices(witness.events, mine)][len(devices) :]  # type: ignore[index]
            assert len(expected) == 9
            await back.read_until(
                lambda frames: len(of_devices(frames, mine)) >= len(expected),
                timeout=20,
                what="the missed events",
            )
            await asyncio.sleep(1)
            got = [f.data["id"] for f in of_devices(await back.read_for(0.5), mine)]  # type: ignore[index]
    assert sorted(got) == sorted(expected), "none missed, none twice"
    assert not set(got) & set(seen)
    # Per device, in the order they happened.
    order = {event_id: i for i, event_id in enumerate(expected)}
    by_device: dict[str, list[int]] = {}
    for frame in of_devices(back.events, mine):
        assert frame.data is not None
        by_device.setdefault(frame.data["data"]["device_id"], []).append(order[frame.data["id"]])
    assert all(positions == sorted(positions) for positions in by_device.values())


async def test_bad_requests_are_problems(system: System, viewer: httpx.AsyncClient) -> None:
    await wait_for_stream(viewer)
    for types in ["alarms", "alarm,telemetry", ""]:
        response = await viewer.get("/v1/stream", params={"types": types})
        assert response.status_code == 400, (types, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    async with httpx.AsyncClient(base_url=system.api_url, timeout=10) as anonymous:
        response = await anonymous.get("/v1/stream")
        assert response.status_code == 401
        assert response.headers["content-type"].startswith("application/problem+json")
        response = await anonymous.get("/v1/stream", headers={"X-API-Key": "not-a-key"})
        assert response.status_code == 401


async def test_the_stream_is_documented(system: System, viewer: httpx.AsyncClient) -> None:
    operation = (await viewer.get("/openapi.json")).json()["paths"]["/v1/stream"]["get"]
    assert operation["tags"] == ["live"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    for status in ("400", "401", "503"):
        assert "application/problem+json" in operation["responses"][status]["content"]
    assert {p["name"] for p in operation["parameters"]} >= {"city", "domain", "types", "Last-Event-ID"}


# -- Against an event hub in this process ----------------------------------------------------------


@dataclass
class LocalBus:
    topics: Topics
    producer: AIOKafkaProducer

    @property
    def topic(self) -> str:
        return self.topics.events

    async def produce(self, events: list[tuple[int, Event]]) -> None:
        futures = [
            await self.producer.send(self.topic, e.to_bytes(), key=e.key.encode(), partition=p)
            for p, e in events
        ]
        await asyncio.gather(*futures)


@asynccontextmanager
async def own_bus() -> AsyncIterator[LocalBus]:
    """An events topic of its own, empty, and a producer for it."""
    topics = Topics(f"{unique('sse')}.")
    await ensure_topics(BOOTSTRAP, [topics.events], partitions=PARTITIONS)
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        yield LocalBus(topics, producer)
    finally:
        await producer.stop()
        await delete_topics(topics.prefix)


@pytest.fixture(scope="module")
async def bus() -> AsyncIterator[LocalBus]:
    async with own_bus() as local:
        yield local


def hub_settings(bus: LocalBus, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap": BOOTSTRAP,
        "topic_prefix": bus.topics.prefix,
        "topic_partitions": PARTITIONS,
        "admin_api_key": ADMIN_KEY,
        "stream_heartbeat_s": 15,
        **overrides,
    }
    return Settings(**values)


@dataclass
class LocalApi:
    hub: EventHub
    server: HttpServer
    client: httpx.AsyncClient


@asynccontextmanager
async def local_api(
    settings: Settings,
    *,
    principal: Principal | None = None,
    queue_limit: int | None = None,
    connect: bool = True,
) -> AsyncIterator[LocalApi]:
    """The stream route alone, served by uvicorn, with a hub of its own."""
    hub = EventHub(settings) if queue_limit is None else EventHub(settings, queue_limit=queue_limit)
    app = FastAPI()
    problems.install(app)
    app.state.settings = settings
    app.state.event_hub = hub
    if principal is not None:
        app.dependency_overrides[current_principal] = lambda: principal
    app.include_router(stream_routes.router)
    port = free_port()
    async with (
        hub,
        HttpServer(app, host="127.0.0.1", port=port, name="stream test API") as server,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=STREAM_TIMEOUT
        ) as client,
    ):
        if connect:
            await wait_until(
                lambda: _true_if(hub.connected), timeout=60, what="the hub to follow Kafka", interval=0.1
            )
        yield LocalApi(hub, server, client)
        await wait_until(lambda: _true_if(hub.open_streams == 0), timeout=10, what="every stream closed")


async def _true_if(condition: bool) -> bool | None:
    return True if condition else None


def status_event(n: int, *, city: str = "ha-noi", domain: str = "flood") -> Event:
    return device_status_event(
        device_id=f"dev-{n}",
        city=city,
        domain=domain,
        status="online" if n % 2 else "offline",
        previous="unknown",
        cause="status_message",
        at=datetime.now(tz=UTC),
    )


def alarm_event(n: int, *, city: str = "ha-noi", domain: str = "flood") -> Event:
    data = {"id": n, "device_id": f"dev-{n}", "city": city, "domain": domain, "rule": "offline"}
    return Event(
        id=unique("alarm"), type="alarm.raised", subject=f"dev-{n}", time=datetime.now(tz=UTC), data=data
    )


def spread(events: list[Event], start: int = 0) -> list[tuple[int, Event]]:
    """Round-robin over the partitions, so that resuming must get every partition right."""
    return [((start + i) % PARTITIONS, e) for i, e in enumerate(events)]


def ids_of(frames: Iterable[Frame]) -> list[str]:
    return [f.data["id"] for f in frames if f.data is not None]


async def test_resume_is_exact_across_partitions(bus: LocalBus) -> None:
    async with local_api(hub_settings(bus)) as api:
        first = [status_event(n) for n in range(60)]
        second = [status_event(n) for n in range(60, 90)]
        third = [alarm_event(n) for n in range(90, 110)]
        async with open_stream(api.client) as stream:
            await bus.produce(spread(first))
            await stream.read_until(lambda f: len(f) >= 25, timeout=20, what="25 events")
            received = ids_of(stream.events[:25])
            last_id = stream.events[24].id
        await bus.produce(spread(second, 3))
        async with open_stream(api.client, last_event_id=last_id) as back:
            # Some of these arrive while the backlog is read, some after.
            await bus.produce(spread(third, 1))
            expected = set(ids_of_events(first + second + third)) - set(received)
            await back.read_until(lambda f: len(f) >= len(expected), timeout=20, what="the rest")
            await back.read_for(1)
        got = ids_of(back.events)
        assert len(got) == len(expected) == 85
        assert set(got) == expected and not Counter(got) - Counter(expected)
        # Every id is a position of this topic, and positions only move forward.
        positions = [decode_position(f.id, topic=bus.topic) for f in back.events]
        assert all(p is not None for p in positions)
        for earlier, later in itertools.pairwise(positions):
            assert earlier is not None and later is not None
            assert all(a <= b for a, b in zip(earlier, later, strict=True))


def ids_of_events(events: Iterable[Event]) -> list[str]:
    return [e.id for e in events]


async def test_an_id_that_is_not_ours_starts_from_now(bus: LocalBus) -> None:
    async with local_api(hub_settings(bus)) as api:
        await bus.produce(spread([status_event(n) for n in range(6)]))
        await asyncio.sleep(1)
        foreign = [
            "garbage",
            encode_position([0] * PARTITIONS, topic="another.ioc.events"),  # another deployment's
            encode_position([0] * (PARTITIONS + 1), topic=bus.topic),  # another partition count
            encode_position([10**9] * PARTITIONS, topic=bus.topic),  # beyond the end (a recreated topic)
        ]
        for last_id in foreign:
            async with open_stream(api.client, last_event_id=last_id) as stream:
                opening = stream.frames[0]
                assert decode_position(opening.id, topic=bus.topic) == api.hub.position
                event = status_event(1000)
                await bus.produce([(2, event)])
                [frame] = await stream.read_until(lambda f: len(f) >= 1, timeout=10, what="the new event")
                assert frame.data is not None and frame.data["id"] == event.id
        # A client that reconnects before its first event resumes from the opening id.
        async with open_stream(api.client) as stream:
            opening_id = stream.frames[0].id
        missed = status_event(2000)
        await bus.produce([(4, missed)])
        async with open_stream(api.client, last_event_id=opening_id) as stream:
            [frame] = await stream.read_until(lambda f: len(f) >= 1, timeout=10, what="the missed event")
            assert frame.data is not None and frame.data["id"] == missed.id


async def test_a_resume_older_than_the_window_is_refused_with_where_to_resume() -> None:
    async with own_bus() as fresh, local_api(hub_settings(fresh, stream_resume_window_s=60)) as api:
        old, recent = alarm_event(1), alarm_event(2)
        two_hours_ago_ms = int((time.time() - 7200) * 1000)
        await (
            await fresh.producer.send(fresh.topic, old.to_bytes(), partition=0, timestamp_ms=two_hours_ago_ms)
        )
        await fresh.produce([(0, recent)])
        await wait_until(lambda: _true_if(api.hub.position[0] == 2), timeout=10, what="the hub past both")
        # An id from the topic's very beginning would replay all of it: refused.
        beginning = encode_position([0] * PARTITIONS, topic=fresh.topic)
        started = time.monotonic()
        refused = await api.client.get("/v1/stream", headers={"Last-Event-ID": beginning})
        took = time.monotonic() - started
        assert refused.status_code == 409, refused.text
        assert refused.headers["content-type"] == problems.PROBLEM_MEDIA_TYPE
        body = refused.json()
        assert body["status"] == 409 and "60 s" in body["detail"]
        # Where to resume: past the old event, the recent one still served; nothing else moved.
        assert decode_position(body["oldest_event_id"], topic=fresh.topic) == (1, 0, 0, 0, 0, 0)
        assert took < 1, took
        async with open_stream(api.client, last_event_id=body["oldest_event_id"]) as stream:
            [frame] = await stream.read_until(lambda f: len(f) >= 1, timeout=10, what="the recent event")
            assert frame.data is not None and frame.data["id"] == recent.id
        # Ids within the window resume as before, also as a query parameter.
        async with open_stream(api.client, {"last_event_id": body["oldest_event_id"]}) as stream:
            await stream.read_until(lambda f: len(f) >= 1, timeout=10, what="the recent event again")


async def test_a_client_too_slow_for_its_queue_is_disconnected_and_resumes(bus: LocalBus) -> None:
    async with local_api(hub_settings(bus), queue_limit=5) as api:
        events = [status_event(n) for n in range(300)]
        async with open_stream(api.client) as stream:
            await bus.produce(spread(events))
            await stream.read_for(10)
            assert stream.ended, "the stream should end when its queue overflows"
            got = ids_of(stream.events)
            assert len(got) < len(events)
        # More arrive while the client reads its backlog, overflowing its queue again: it catches
        # up from Kafka once more, or ends and comes back; either way it gets each event once.
        more = [status_event(n) for n in range(300, 600)]
        connections = 1
        while len(got) < len(events) + len(more) and connections < 20:
            async with open_stream(api.client, last_event_id=stream.last_id) as stream:
                connections += 1
                if connections == 2:
                    await bus.produce(spread(more))
                await stream.read_for(3)
                got += ids_of(stream.events)
        assert sorted(got) == sorted(e.id for e in events + more)


async def test_idle_streams_get_heartbeats(bus: LocalBus) -> None:
    async with local_api(hub_settings(bus, stream_heartbeat_s=0.3)) as api, open_stream(api.client) as stream:
        await stream.read_for(2)
        assert stream.heartbeats >= 3
        assert stream.events == []


async def test_streams_beyond_the_cap_are_refused(bus: LocalBus) -> None:
    async with local_api(hub_settings(bus, api_max_streams=2)) as api:
        async with open_stream(api.client), open_stream(api.client):
            response = await api.client.get("/v1/stream")
            assert response.status_code == 503
            assert response.headers["content-type"].startswith("application/problem+json")
            assert int(response.headers["retry-after"]) > 0
            assert response.json()["status"] == 503
        # Closed streams give their places back.
        await wait_until(lambda: _true_if(api.hub.open_streams == 0), timeout=10, what="streams released")
        async with open_stream(api.client), open_stream(api.client):
            pass


async def test_only_events_in_the_callers_scope_are_sent(bus: LocalBus) -> None:
    scoped = Principal(
        name="hn-flood", role="viewer", cities=frozenset({"ha-noi"}), domains=frozenset({"flood"})
    )
    async with (
        local_api(hub_settings(bus), principal=scoped) as api,
        open_stream(api.client) as stream,
        open_stream(api.client, {"city": "hai-phong"}) as elsewhere,
    ):
        at = datetime.now(tz=UTC)
        events = [
            status_event(1, city="ha-noi", domain="flood"),
            status_event(2, city="ha-noi", domain="grid"),
            alarm_event(3, city="hai-phong", domain="flood"),
            state_changed_event(city="ha-noi", domain="water", items=[], at=at),
            state_changed_event(city="ha-noi", domain="flood", items=[], at=at),
            alarm_event(4, city="ha-noi", domain="flood"),
        ]
        # One partition: the hub offers them in this order, so the last one marks the end.
        await bus.produce([(0, e) for e in events])
        frames = await stream.read_until(
            lambda f: events[-1].id in ids_of(f), timeout=10, what="the last in-scope event"
        )
        assert ids_of(frames) == [events[0].id, events[4].id, events[5].id]
        assert [f.event for f in frames] == ["status", "state", "alarm"]
        assert await elsewhere.read_for(1) == []


async def test_the_api_starts_without_kafka_and_answers_503(bus: LocalBus) -> None:
    settings = hub_settings(bus, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    began = time.monotonic()
    async with local_api(settings, connect=False) as api:
        assert time.monotonic() - began < 5
        response = await api.client.get("/v1/stream")
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "retry-after" in response.headers
        assert not api.hub.connected


async def test_closing_the_streams_lets_the_server_stop(bus: LocalBus) -> None:
    """The order of an API process's shutdown: the hub ends the streams, then uvicorn, which
    waits for open responses, can stop."""
    async with local_api(hub_settings(bus)) as api:
        async with open_stream(api.client) as stream:
            await bus.produce([(1, status_event(1))])
            await stream.read_until(lambda f: len(f) >= 1, timeout=10, what="an event")
            began = time.monotonic()
            api.hub.close_streams()
            await asyncio.wait_for(api.server.stop(), 5)
            await stream.read_for(5)
            assert stream.ended
            assert time.monotonic() - began < 3
        assert not api.hub.connected
        await api.hub.stop()


async def test_stopping_the_api_ends_open_streams(system: System, log_dir: Path) -> None:
    """uvicorn waits for open responses before it shuts the app down: the streams must end first."""
    port = free_port()
    api = ComponentProcess("api", {**system.env, "IOC_API_PORT": str(port)}, log_dir, name="api-stream-stop")
    api.start()
    stopping: asyncio.Future[int | None] | None = None
    try:
        await api.wait_for_log("API listening")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=STREAM_TIMEOUT
        ) as client:
            await wait_for_stream(client)
            async with open_stream(client) as stream:
                began = time.monotonic()
                stopping = asyncio.get_running_loop().run_in_executor(None, api.stop)
                await stream.read_for(15)
                assert stream.ended, api.tail()
        assert await stopping == 0, api.tail()
        assert time.monotonic() - began < 10, api.tail()
    finally:
        if stopping is not None:
            await asyncio.wait([stopping])
        api.stop()
