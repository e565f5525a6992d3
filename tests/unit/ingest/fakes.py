"""In-memory stand-ins for what the gateway talks to: the MQTT broker (the real `MqttSource`
driven through its own callbacks, over a client that records acknowledgements instead of sending
them), the bus producer (records kept, acknowledgements resolved or failed by the test) and the
device registry."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from paho.mqtt.subscribeoptions import SubscribeOptions

from ingest.mqtt_source import MqttSource
from ioc_core.errors import ServiceUnavailableError
from ioc_core.models import DeviceRoute


class FakeClient:
    """The part of paho's client the source uses once connected."""

    def __init__(self) -> None:
        self.acks: list[tuple[int, int]] = []
        self.subscribed: list[tuple[str, SubscribeOptions]] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append((mid, qos))

    def ack_many(self, mids: list[int]) -> None:
        self.acks.extend((mid, 1) for mid in mids)

    def subscribe(self, topics: list[tuple[str, SubscribeOptions]]) -> None:
        self.subscribed.extend(topics)

    def disconnect(self) -> None:
        pass

    def loop_stop(self) -> None:
        pass


class FakeMqtt(MqttSource):
    """The gateway's MQTT source with no network: the test connects, drops the connection and
    publishes, and each goes through the callbacks paho would call."""

    client = FakeClient()

    async def connect(self) -> None:
        self.client = FakeClient()
        self._client = self.client  # type: ignore[assignment]
        self.reconnect()

    def reconnect(self) -> None:
        accepted = SimpleNamespace(is_failure=False)
        self._on_connect(self.client, None, SimpleNamespace(session_present=True), accepted, None)  # type: ignore[arg-type]

    def drop(self) -> None:
        self._on_disconnect(self.client, None, None, "connection lost", None)  # type: ignore[arg-type]

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        mid: int,
        qos: int = 1,
        dup: bool = False,
        retain: bool = False,
        properties: bytes = b"",
    ) -> None:
        # As the gateway's client hands over a publish it parsed.
        self._on_publish(topic.encode(), payload, mid, qos, dup, retain, properties)

    @property
    def acks(self) -> list[tuple[int, int]]:
        return self.client.acks


class FakeProducer:
    """A bus producer whose acknowledgements the test gives (`acknowledge_all`) or fails
    (`fail_all`); while `down`, every send_and_wait fails as an unreachable Kafka does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str | None]] = []
        self.pending: list[asyncio.Future[Any]] = []
        self.down = False
        self.resends = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, *, key: str | None = None) -> asyncio.Future[Any]:
        self.sent.append((topic, value, key))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        return future

    async def send_and_wait(self, topic: str, value: bytes, *, key: str | None = None) -> None:
        self.resends += 1
        if self.down:
            raise ServiceUnavailableError("Kafka is down")
        self.sent.append((topic, value, key))

    def acknowledge_all(self) -> None:
        for future in self.pending:
            future.set_result(None)
        self.pending.clear()

    def fail_all(self, error: BaseException) -> None:
        for future in self.pending:
            future.set_exception(error)
        self.pending.clear()


class FakeRegistry:
    def __init__(self, *routes: DeviceRoute) -> None:
        self.routes = {route.id: route for route in routes}

    async def start(self) -> None:
        pass

    async def lookup(self, device_id: str) -> DeviceRoute | None:
        return self.routes.get(device_id)

    def __len__(self) -> int:
        return len(self.routes)
