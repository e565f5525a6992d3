"""The embedded MQTT broker against real paho-mqtt clients, MQTT 3.1.1 and 5: delivery and
acknowledgement, flow control towards a slow subscriber, shared subscriptions, retained messages,
wills, persistent sessions, keep-alive, and bad input from one client not disturbing the others.

The broker runs in an event loop of its own thread, because paho's calls block."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ioc.embedded.mqtt_broker import EmbeddedBroker
from ioc_core.errors import ServiceUnavailableError

T = TypeVar("T")
V311, V5 = mqtt.MQTTv311, mqtt.MQTTv5
PROTOCOLS = pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])


class RunningBroker:
    """An `EmbeddedBroker` on a free port, served by a loop in a thread of its own."""

    def __init__(self, **options: Any) -> None:
        self.broker = EmbeddedBroker("127.0.0.1", 0, **options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-broker", daemon=True)

    @property
    def port(self) -> int:
        return self.broker.port

    def __enter__(self) -> RunningBroker:
        self._thread.start()
        self.run(self.broker.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.broker.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` in the broker's thread, to look at its state safely."""

        async def call() -> T:
            return function()

        return self.run(call())


@pytest.fixture
def broker() -> Iterator[RunningBroker]:
    with RunningBroker() as running:
        yield running


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Received:
    __slots__ = ("dup", "mid", "payload", "qos", "retain", "topic")

    def __init__(self, message: mqtt.MQTTMessage) -> None:
        self.topic = message.topic
        self.payload = bytes(message.payload)
        self.qos = message.qos
        self.retain = bool(message.retain)
        self.dup = bool(message.dup)
        self.mid = message.mid


class Client:
    """A paho client and what the tests look at: messages received, connect and disconnect
    results. It never reconnects by itself; a test reconnects with a new `Client`."""

    def __init__(
        self,
        running: RunningBroker,
        *,
        protocol: MQTTProtocolVersion = V311,
        client_id: str | None = None,
        clean: bool = True,
        session_expiry: int | None = None,
        receive_maximum: int | None = None,
        max_packet_size: int | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        will_delay: int | None = None,
        manual_ack: bool = False,
        keepalive: int = 30,
        inflight: int = 100,
    ) -> None:
        self.port = running.port
        self.protocol = protocol
        self.client_id = client_id or unique("client")
        self.clean = clean
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.receive_maximum = receive_maximum
        self.max_packet_size = max_packet_size
        options: dict[str, Any] = {} if protocol == V5 else {"clean_session": clean}
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            manual_ack=manual_ack,
            **options,
        )
        self.paho.max_inflight_messages_set(inflight)
        self.paho.max_queued_messages_set(0)
        if will is not None:
            will_properties = None
            if will_delay is not None:
                will_properties = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
                will_properties.WillDelayInterval = will_delay
            self.paho.will_set(*will, properties=will_properties)
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present: bool | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.granted: list[ReasonCode] = []
        self.on_message: Callable[[Received], None] | None = None
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_unsubscribe = self._on_unsubscribe
        self.unsubscribed = threading.Event()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.session_present = flags.session_present
        self.connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()
        client.loop_stop()  # no reconnection: from paho's own thread this only ends the loop

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = Received(message)
        with self.lock:
            self.messages.append(received)
        if self.on_message is not None:
            self.on_message(received)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, properties: Any
    ) -> None:
        self.granted = list(codes)
        self.subscribed.set()

    def _on_unsubscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, properties: Any
    ) -> None:
        self.unsubscribed.set()

    def connect(self) -> Client:
        extra: dict[str, Any] = {}
        if self.protocol == V5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self.session_expiry is not None:
                properties.SessionExpiryInterval = self.session_expiry
            if self.receive_maximum is not None:
                properties.ReceiveMaximum = self.receive_maximum
            if self.max_packet_size is not None:
                properties.MaximumPacketSize = self.max_packet_size
            extra = {"clean_start": self.clean, "properties": properties}
        self.paho.connect("127.0.0.1", self.port, self.keepalive, **extra)
        self.paho.loop_start()
        assert self.connected.wait(5), f"{self.client_id} got no CONNACK"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        self.subscribed.clear()
        self.paho.subscribe(topic, qos)
        assert self.subscribed.wait(5), f"no SUBACK for {topic}"
        return [code.value for code in self.granted]

    def unsubscribe(self, topic: str) -> None:
        self.unsubscribed.clear()
        self.paho.unsubscribe(topic)
        assert self.unsubscribed.wait(5), f"no UNSUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), f"the broker did not acknowledge {topic}"

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in self.received() if topic is None or m.topic == topic]

    def wait_for_messages(self, count: int, timeout: float = 10) -> list[Received]:
        wait_for(lambda: len(self.received()) >= count, timeout, f"{count} messages at {self.client_id}")
        return self.received()

    def disconnect(self) -> None:
        """A clean DISCONNECT."""
        self.paho.disconnect()
        self.disconnected.wait(5)
        self.paho.loop_stop()

    def kill(self) -> None:
        """Drop the connection without DISCONNECT, as a device losing power does."""
        sock = self.paho.socket()
        assert isinstance(sock, socket.socket)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        self.disconnected.wait(5)
        self.paho.loop_stop()


# -- raw MQTT, for what paho would never send -----------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return struct.pack("!H", len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    level: int = 4,
    keepalive: int = 30,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    flags = 0x02
    payload = _field(client_id)
    if will is not None:
        flags |= 0x04 | 1 << 3
        payload += (b"\x00" if level == 5 else b"") + _field(will[0]) + _field(will[1])
    header = _field("MQTT") + bytes((level, flags)) + struct.pack("!H", keepalive)
    return packet(0x10, header + (b"\x00" if level == 5 else b"") + payload)


def publish_packet(
    topic: bytes, payload: bytes, *, packet_id: int = 1, properties: bytes | None = None
) -> bytes:
    body = _field(topic) + struct.pack("!H", packet_id)
    if properties is not None:
        body += _varint(len(properties)) + properties
    return packet(0x32, body + payload)


def read_packet(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next packet, or None when the broker closed the connection."""
    try:
        first = sock.recv(1)
        if not first:
            return None
        length, shift = 0, 0
        while True:
            byte = sock.recv(1)
            if not byte:
                return None
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
        return first[0], body
    except ConnectionResetError:
        return None


def raw_client(running: RunningBroker, client_id: str | None = None, **options: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", running.port), timeout=5)
    sock.sendall(connect_packet(client_id or unique("raw"), **options))
    connack = read_packet(sock)
    assert connack is not None and connack[0] == 0x20, connack
    return sock


def closed_by_broker(sock: socket.socket, timeout: float = 5) -> list[tuple[int, bytes]]:
    """Read until the broker closes the connection; returns the packets it sent before."""
    sock.settimeout(timeout)
    packets: list[tuple[int, bytes]] = []
    while (received := read_packet(sock)) is not None:
        packets.append(received)
    return packets


def roundtrip(running: RunningBroker, protocol: MQTTProtocolVersion = V311) -> None:
    """A fresh subscriber gets what a fresh publisher sends: the broker is serving."""
    topic = unique("alive")
    subscriber = Client(running, protocol=protocol).connect()
    subscriber.subscribe(topic)
    publisher = Client(running, protocol=protocol).connect()
    publisher.publish(topic, b"still here")
    assert [m.payload for m in subscriber.wait_for_messages(1)] == [b"still here"]
    publisher.disconnect()
    subscriber.disconnect()


# -- delivery -------------------------------------------------------------------------------------


@PROTOCOLS
def test_qos1_publish_is_acknowledged_and_delivered(
    broker: RunningBroker, protocol: MQTTProtocolVersion
) -> None:
    subscriber = Client(broker, protocol=protocol).connect()
    assert subscriber.session_present is False
    assert subscriber.subscribe("ioc/v1/ha-noi/+/+/telemetry", qos=1) == [1]
    publisher = Client(broker, protocol=protocol).connect()
    publisher.publish("ioc/v1/ha-noi/flood/hn-1/telemetry", b'{"currentLevel": 2.35}', qos=1)
    publisher.publish("ioc/v1/ha-noi/flood/hn-1/status", b"online", qos=1)  # matches nothing
    [message] = subscriber.wait_for_messages(1)
    assert (message.topic, message.payload, message.qos, message.retain, message.dup) == (
        "ioc/v1/ha-noi/flood/hn-1/telemetry",
        b'{"currentLevel": 2.35}',
        1,
        False,
        False,
    )
    time.sleep(0.2)
    assert len(subscriber.received()) == 1
    assert broker.broker.stats.messages_received == 2
    publisher.disconnect()
    subscriber.disconnect()


@PROTOCOLS
def test_qos0_and_qos2_and_overlapping_wildcards(
    broker: RunningBroker, protocol: MQTTProtocolVersion
) -> None:
    subscriber = Client(broker, protocol=protocol).connect()
    # QoS 2 is granted as QoS 1; two filters matching one topic give one copy at the higher QoS.
    assert subscriber.subscribe("w/#", qos=2) == [1]
    assert subscriber.subscribe("w/+/x", qos=0) == [0]
    publisher = Client(broker, protocol=protocol).connect()
    publisher.publish("w/a/x", b"qos2", qos=2)  # waits for the PUBREC/PUBREL/PUBCOMP handshake
    publisher.publish("w/a/x", b"qos0", qos=0)
    publisher.publish("w", b"parent", qos=1)  # "w/#" matches "w" itself
    publisher.publish("other/a/x", b"no", qos=1)
    messages = subscriber.wait_for_messages(3)
    time.sleep(0.2)
    assert [(m.topic, m.payload, m.qos) for m in subscriber.received()] == [
        ("w/a/x", b"qos2", 1),
        ("w/a/x", b"qos0", 0),
        ("w", b"parent", 1),
    ]
    assert len(messages) == 3
    publisher.disconnect()
    subscriber.disconnect()


@PROTOCOLS
def test_a_20000_message_burst_reaches_a_slow_subscriber_complete_and_in_order(
    broker: RunningBroker, protocol: MQTTProtocolVersion
) -> None:
    total, window = 20_000, 50 if protocol == V5 else broker.broker.max_inflight_v311
    subscriber = Client(
        broker, protocol=protocol, manual_ack=True, receive_maximum=window if protocol == V5 else None
    ).connect()
    subscriber.subscribe("burst/#", qos=1)
    to_ack: queue.Queue[int | None] = queue.Queue()
    acked = 0
    most_unacked = 0

    def on_message(message: Received) -> None:
        nonlocal most_unacked
        most_unacked = max(most_unacked, len(subscriber.messages) - acked)
        to_ack.put(message.mid)

    def acknowledge() -> None:
        nonlocal acked
        while (mid := to_ack.get()) is not None:
            if acked < 500:
                time.sleep(0.002)  # slow at first: the broker must wait, not flood
            acked += 1  # counted before it is sent, so the broker cannot see it first
            subscriber.paho.ack(mid, 1)

    subscriber.on_message = on_message
    acker = threading.Thread(target=acknowledge, daemon=True)
    acker.start()
    publisher = Client(broker, protocol=protocol, inflight=200).connect()
    infos = [publisher.paho.publish(f"burst/{i % 7}", str(i).encode(), qos=1) for i in range(total)]
    for info in infos:
        info.wait_for_publish(60)
        assert info.is_published()
    messages = subscriber.wait_for_messages(total, timeout=60)
    time.sleep(0.3)
    to_ack.put(None)
    acker.join(10)
    messages = subscriber.received()
    assert [int(m.payload) for m in messages] == list(range(total))  # complete, in order, no copies
    assert not any(m.dup for m in messages)
    assert 0 < most_unacked <= window
    publisher.disconnect()
    subscriber.disconnect()


# -- shared subscriptions -------------------------------------------------------------------------


def test_shared_subscription_splits_and_loses_nothing_when_a_member_drops(broker: RunningBroker) -> None:
    total, group = 3000, unique("grp")
    share = f"$share/{group}/shared/+/telemetry"
    # The first member's session outlives its connection: its unacknowledged messages still go
    # to the member that is there.
    first = Client(broker, protocol=V5, manual_ack=True, receive_maximum=20, clean=False, session_expiry=60)
    first.connect()
    second = Client(broker, protocol=V311).connect()
    first.subscribe(share)
    second.subscribe(share)
    first_acked: list[bytes] = []
    stop_acking_after = 300

    def first_on_message(message: Received) -> None:
        # Acknowledges its first messages, then takes more without acknowledging and is cut off.
        if len(first_acked) < stop_acking_after:
            first.paho.ack(message.mid, 1)
            first_acked.append(message.payload)

    first.on_message = first_on_message
    publisher = Client(broker, protocol=V311, inflight=100).connect()
    published = threading.Event()

    def publish_all() -> None:
        infos = [
            publisher.paho.publish(f"shared/{i % 10}/telemetry", str(i).encode(), qos=1) for i in range(total)
        ]
        for info in infos:
            info.wait_for_publish(60)
        published.set()

    threading.Thread(target=publish_all, daemon=True).start()
    first.wait_for_messages(stop_acking_after + 20, timeout=30)
    assert not published.is_set() or len(second.received()) > 0
    unacked = [m.payload for m in first.received()[stop_acking_after:]]
    assert len(unacked) == 20  # Receive Maximum: no more were sent while these were unacknowledged
    first.kill()
    assert published.wait(60)
    wait_for(
        lambda: len(second.received()) >= total - len(first_acked), 30, "the rest of the stream at the second"
    )
    time.sleep(0.3)
    second_payloads = second.payloads()
    everything = {str(i).encode() for i in range(total)}
    assert set(first_acked) | set(second_payloads) == everything
    assert not set(first_acked) & set(second_payloads), "a message acknowledged by one member reached another"
    assert len(second_payloads) == len(set(second_payloads)) == total - len(first_acked)
    assert set(unacked) <= set(second_payloads), "unacknowledged messages of the dropped member were lost"
    assert len(second_payloads) > len(unacked)  # the second member had its share all along
    publisher.disconnect()
    second.disconnect()


def test_a_lone_shared_member_gets_its_unacknowledged_messages_again_on_return(broker: RunningBroker) -> None:
    share, client_id = f"$share/{unique('grp')}/alone/#", unique("alone")

    def member(**options: Any) -> Client:
        return Client(broker, protocol=V5, client_id=client_id, clean=False, session_expiry=60, **options)

    first = member(manual_ack=True).connect()
    first.subscribe(share)
    publisher = Client(broker).connect()
    for i in range(5):
        publisher.publish("alone/x", f"taken-{i}".encode())
    first.wait_for_messages(5)
    first.kill()  # none acknowledged
    # Only once the broker has seen the connection go do the next messages wait for the member's
    # return; published before that, they would be in flight to it and come back as duplicates.
    wait_for(
        lambda: broker.call(lambda: broker.broker.sessions[client_id].connection is None),
        10,
        "the broker to see the member gone",
    )
    for i in range(3):
        publisher.publish("alone/x", f"waiting-{i}".encode())
    back = member().connect()
    assert back.session_present is True
    messages = back.wait_for_messages(8)
    time.sleep(0.2)
    assert [(m.payload, m.dup) for m in back.received()] == [
        *((f"taken-{i}".encode(), True) for i in range(5)),
        *((f"waiting-{i}".encode(), False) for i in range(3)),
    ]
    assert [m.mid for m in messages[:5]] == [m.mid for m in first.received()]  # resent as they were
    back.disconnect()
    publisher.disconnect()


def test_unsubscribing_from_a_shared_subscription(broker: RunningBroker) -> None:
    share = f"$share/{unique('grp')}/unsub/#"
    first = Client(broker, protocol=V5).connect()
    second = Client(broker, protocol=V5).connect()
    first.subscribe(share)
    second.subscribe(share)
    second.unsubscribe(share)
    publisher = Client(broker).connect()
    for i in range(20):
        publisher.publish(f"unsub/{i}", b"x")
    first.wait_for_messages(20)
    time.sleep(0.2)
    assert second.received() == []
    first.unsubscribe(share)
    publisher.publish("unsub/after", b"nobody")
    time.sleep(0.2)
    assert len(first.received()) == 20
    assert broker.call(lambda: sum(1 for _ in broker.broker._groups())) == 0
    for client in (publisher, first, second):
        client.disconnect()


# -- retained messages ----------------------------------------------------------------------------


@PROTOCOLS
def test_retained_messages_set_replace_clear_and_stay_where_they_belong(
    broker: RunningBroker, protocol: MQTTProtocolVersion
) -> None:
    publisher = Client(broker, protocol=protocol).connect()
    live = Client(broker, protocol=protocol).connect()
    live.subscribe("ret/#")
    publisher.publish("ret/hn-1/status", b"online", retain=True)
    publisher.publish("ret/hn-1/status", b"offline", retain=True)
    publisher.publish("ret/hn-2/status", b"online", retain=True)
    publisher.publish("$SYS/ret/uptime", b"42", retain=True)
    live.wait_for_messages(3)
    # Subscribers present when it was published get a live message, not a retained one.
    assert [(m.payload, m.retain) for m in live.received()] == [
        (b"online", False),
        (b"offline", False),
        (b"online", False),
    ]

    late = Client(broker, protocol=protocol).connect()
    late.subscribe("ret/+/status")
    late.wait_for_messages(2)
    time.sleep(0.2)
    assert sorted((m.topic, m.payload, m.retain) for m in late.received()) == [
        ("ret/hn-1/status", b"offline", True),
        ("ret/hn-2/status", b"online", True),
    ]

    elsewhere = Client(broker, protocol=protocol).connect()
    elsewhere.subscribe("other/#")
    elsewhere.subscribe("ret/hn-1/telemetry")
    elsewhere.subscribe("#")  # every topic, but not the `$` ones
    elsewhere.subscribe(f"$share/{unique('g')}/ret/#")  # shared subscriptions get no retained messages
    elsewhere.wait_for_messages(2)
    time.sleep(0.2)
    assert sorted(m.topic for m in elsewhere.received()) == ["ret/hn-1/status", "ret/hn-2/status"]
    system = Client(broker, protocol=protocol).connect()
    system.subscribe("$SYS/#")
    assert [m.payload for m in system.wait_for_messages(1)] == [b"42"]

    publisher.publish("ret/hn-1/status", b"", retain=True)  # clears it
    cleared = Client(broker, protocol=protocol).connect()
    cleared.subscribe("ret/#")
    cleared.wait_for_messages(1)
    time.sleep(0.2)
    assert [(m.topic, m.payload) for m in cleared.received()] == [("ret/hn-2/status", b"online")]
    for client in (publisher, live, late, elsewhere, system, cleared):
        client.disconnect()


# -- wills ----------------------------------------------------------------------------------------


@PROTOCOLS
def test_will_is_sent_on_an_abrupt_close_but_not_after_disconnect(
    broker: RunningBroker, protocol: MQTTProtocolVersion
) -> None:
    watcher = Client(broker, protocol=protocol).connect()
    watcher.subscribe("will/#")
    device = Client(broker, protocol=protocol, will=("will/dropped/status", b"offline", 1, True)).connect()
    device.kill()
    [message] = watcher.wait_for_messages(1)
    assert (message.topic, message.payload) == ("will/dropped/status", b"offline")
    polite = Client(broker, protocol=protocol, will=("will/polite/status", b"offline", 1, True)).connect()
    polite.disconnect()
    time.sleep(0.5)
    assert [m.topic for m in watcher.received()] == ["will/dropped/status"]
    # The will was retained: a later subscriber sees the dropped device offline.
    late = Client(broker, protocol=protocol).connect()
    late.subscribe("will/+/status")
    assert [(m.topic, m.payload, m.retain) for m in late.wait_for_messages(1)] == [
        ("will/dropped/status", b"offline", True)
    ]
    watcher.disconnect()
    late.disconnect()


def test_v5_will_on_request_and_after_its_delay(broker: RunningBroker) -> None:
    watcher = Client(broker).connect()
    watcher.subscribe("will5/#")
    asking = Client(broker, protocol=V5, will=("will5/asked", b"gone", 1, False)).connect()
    asking.paho.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
    assert [m.topic for m in watcher.wait_for_messages(1)] == ["will5/asked"]

    # With a will delay, coming back in time cancels the will; staying away sends it late.
    client_id = unique("delayed")
    delayed = Client(
        broker, protocol=V5, client_id=client_id, clean=False, session_expiry=60,
        will=("will5/delayed", b"gone", 1, False), will_delay=1,
    ).connect()  # fmt: skip
    delayed.kill()
    back = Client(broker, protocol=V5, client_id=client_id, clean=False, session_expiry=60).connect()
    time.sleep(1.5)
    assert [m.topic for m in watcher.received()] == ["will5/asked"]
    back.disconnect()

    late = Client(
        broker,
        protocol=V5,
        clean=False,
        session_expiry=60,
        will=("will5/late", b"gone", 1, False),
        will_delay=1,
    ).connect()
    killed_at = time.monotonic()
    late.kill()
    watcher.wait_for_messages(2, timeout=5)
    assert time.monotonic() - killed_at >= 0.8
    assert [m.topic for m in watcher.received()] == ["will5/asked", "will5/late"]
    watcher.disconnect()


# -- sessions -------------------------------------------------------------------------------------


def test_v311_persistent_session_keeps_messages_and_resends_unacknowledged(broker: RunningBroker) -> None:
    client_id = unique("persist3")
    subscriber = Client(broker, client_id=client_id, clean=False).connect()
    assert subscriber.session_present is False
    subscriber.subscribe("p3/#")
    subscriber.disconnect()
    publisher = Client(broker).connect()
    for i in range(5):
        publisher.publish("p3/data", f"offline-{i}".encode())
    publisher.publish("p3/data", b"qos0-while-away", qos=0)  # not kept for an absent client

    back = Client(broker, client_id=client_id, clean=False, manual_ack=True).connect()
    assert back.session_present is True
    back.wait_for_messages(5)
    time.sleep(0.2)
    assert back.payloads() == [f"offline-{i}".encode() for i in range(5)]
    # It acknowledged nothing and drops off: the same five come again, marked DUP.
    back.kill()
    again = Client(broker, client_id=client_id, clean=False).connect()
    assert again.session_present is True
    messages = again.wait_for_messages(5)
    assert [m.payload for m in messages] == [f"offline-{i}".encode() for i in range(5)]
    assert all(m.dup for m in messages)
    again.disconnect()
    # A clean connection ends the session.
    clean = Client(broker, client_id=client_id, clean=True).connect()
    assert clean.session_present is False
    clean.disconnect()
    publisher.disconnect()


def test_v5_session_lives_for_its_expiry_interval_and_no_longer(broker: RunningBroker) -> None:
    client_id = unique("persist5")

    def connect() -> Client:
        return Client(broker, protocol=V5, client_id=client_id, clean=False, session_expiry=1).connect()

    subscriber = connect()
    assert subscriber.session_present is False
    subscriber.subscribe("p5/#")
    subscriber.disconnect()
    publisher = Client(broker, protocol=V5).connect()
    for i in range(3):
        publisher.publish("p5/data", f"kept-{i}".encode())
    back = connect()
    assert back.session_present is True
    back.wait_for_messages(3)
    assert back.payloads() == [b"kept-0", b"kept-1", b"kept-2"]
    back.disconnect()

    publisher.publish("p5/data", b"expires")
    time.sleep(1.6)
    assert broker.call(lambda: client_id in broker.broker.sessions) is False
    late = connect()
    assert late.session_present is False
    time.sleep(0.3)
    assert late.received() == []
    late.disconnect()

    # Without a Session Expiry Interval, an MQTT 5 session ends with its connection.
    short_id = unique("short5")
    short = Client(broker, protocol=V5, client_id=short_id, clean=False).connect()
    short.subscribe("p5/#")
    short.disconnect()
    assert Client(broker, protocol=V5, client_id=short_id, clean=False).connect().session_present is False
    publisher.disconnect()


def test_persistent_sessions_nobody_returns_to_end_after_the_longest_expiry() -> None:
    with RunningBroker(max_session_expiry_s=1) as running:
        forgotten = unique("forgotten3")
        subscriber = Client(running, client_id=forgotten, clean=False).connect()
        subscriber.subscribe("f/#")
        subscriber.disconnect()
        forever = unique("forever5")
        v5 = Client(running, protocol=V5, client_id=forever, clean=False, session_expiry=0xFFFFFFFF).connect()
        v5.subscribe("f/#")
        v5.disconnect()
        assert running.call(lambda: {forgotten, forever} <= set(running.broker.sessions))
        time.sleep(1.6)
        assert running.call(lambda: not {forgotten, forever} & set(running.broker.sessions))
        assert Client(running, client_id=forgotten, clean=False).connect().session_present is False


def test_a_second_connection_with_the_same_client_id_takes_over(broker: RunningBroker) -> None:
    client_id = unique("twice")
    old = Client(broker, protocol=V5, client_id=client_id, clean=False, session_expiry=60).connect()
    old.subscribe("takeover/#")
    new = Client(broker, protocol=V5, client_id=client_id, clean=False, session_expiry=60).connect()
    assert new.session_present is True
    assert old.disconnected.wait(5)
    assert old.disconnect_reason is not None and old.disconnect_reason.value == 0x8E
    publisher = Client(broker).connect()
    publisher.publish("takeover/x", b"to the new one")
    assert new.wait_for_messages(1)[0].payload == b"to the new one"
    new.disconnect()
    publisher.disconnect()


# -- flow control ---------------------------------------------------------------------------------


def test_a_full_queue_holds_the_publisher_instead_of_dropping() -> None:
    with RunningBroker(max_queued_per_session=100) as broker:
        client_id = unique("away")
        subscriber = Client(broker, client_id=client_id, clean=False).connect()
        subscriber.subscribe("held/#")
        subscriber.disconnect()
        publisher = Client(broker, inflight=200).connect()
        infos = [publisher.paho.publish("held/x", str(i).encode(), qos=1) for i in range(150)]
        time.sleep(1.0)
        acknowledged = sum(1 for info in infos if info.is_published())
        # The hundredth message filled the queue: its PUBACK waits, and nothing after it is read.
        assert acknowledged == 99
        assert broker.broker.stats.publishers_held == 1
        back = Client(broker, client_id=client_id, clean=False).connect()
        back.wait_for_messages(150, timeout=20)
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
        time.sleep(0.2)
        assert back.payloads() == [str(i).encode() for i in range(150)]
        assert not broker.broker.stats.dropped
        back.disconnect()
        publisher.disconnect()


def test_v5_maximum_packet_size_of_a_client_is_respected(broker: RunningBroker) -> None:
    small = Client(broker, protocol=V5, max_packet_size=256).connect()
    small.subscribe("size/#")
    publisher = Client(broker, protocol=V5).connect()
    publisher.publish("size/big", b"x" * 1000)
    publisher.publish("size/small", b"fits")
    assert [m.topic for m in small.wait_for_messages(1)] == ["size/small"]
    assert broker.broker.stats.dropped["too_large_for_client"] == 1
    small.disconnect()
    publisher.disconnect()


def test_stop_lets_connected_subscribers_take_their_backlog_first(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ioc.embedded.mqtt_broker")
    with RunningBroker(drain_timeout_s=10) as broker:
        subscriber = Client(broker, manual_ack=True).connect()
        subscriber.subscribe("drain/#")
        publisher = Client(broker, inflight=300).connect()
        infos = [publisher.paho.publish("drain/x", str(i).encode(), qos=1) for i in range(300)]
        for info in infos:
            info.wait_for_publish(10)
        subscriber.wait_for_messages(100)  # its window; the other 200 wait in the broker
        stopping = asyncio.run_coroutine_threadsafe(broker.broker.stop(), broker.loop)
        time.sleep(0.3)
        assert not stopping.done()
        # Publications are no longer acknowledged: the publisher keeps them for the next broker.
        late = publisher.paho.publish("drain/x", b"late", qos=1)

        def acknowledge(message: Received) -> None:
            subscriber.paho.ack(message.mid, 1)

        subscriber.on_message = acknowledge
        for message in subscriber.received():
            subscriber.paho.ack(message.mid, 1)
        stopping.result(10)
        assert subscriber.payloads() == [str(i).encode() for i in range(300)]
        assert not late.is_published()
        assert not [r for r in caplog.records if "not delivered" in r.getMessage()]
        publisher.paho.loop_stop()
        subscriber.paho.loop_stop()

    with RunningBroker(drain_timeout_s=0.5) as broker:
        stuck = Client(broker, manual_ack=True).connect()
        stuck.subscribe("drain/#")
        publisher = Client(broker).connect()
        for i in range(150):
            publisher.publish("drain/x", str(i).encode())
        broker.run(broker.broker.stop())
        stuck.paho.loop_stop()
        publisher.paho.loop_stop()
    [warning] = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert "with 150 QoS 1 messages not delivered" in warning


# -- keep-alive and bad input ---------------------------------------------------------------------


def test_keepalive_timeout_closes_a_silent_client_and_sends_its_will(broker: RunningBroker) -> None:
    watcher = Client(broker).connect()
    watcher.subscribe("silent/#")
    sock = raw_client(broker, keepalive=1, will=("silent/status", b"offline"))
    opened = time.monotonic()
    assert closed_by_broker(sock, timeout=5) == []
    assert 1.4 <= time.monotonic() - opened <= 3.0
    assert [m.payload for m in watcher.wait_for_messages(1)] == [b"offline"]
    sock.close()
    watcher.disconnect()


def test_malformed_and_oversize_packets_close_only_that_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ioc.embedded.mqtt_broker")
    with RunningBroker(max_packet_size=4096) as broker:
        bystander = Client(broker, protocol=V5).connect()
        bystander.subscribe("bad/#")
        bad_inputs = {
            "reserved packet type": packet(0x00, b""),
            "five-byte remaining length": b"\x30\xff\xff\xff\xff\x7f",
            "wildcard in a topic name": publish_packet(b"bad/+", b"x"),
            "topic not UTF-8": publish_packet(b"bad/\xff\xfe", b"x"),
            "NUL in a topic": publish_packet(b"bad/\x00", b"x"),
            "SUBSCRIBE with wrong flags": packet(0x80, struct.pack("!H", 1) + _field("bad/#") + b"\x01"),
            "truncated PUBLISH": packet(0x32, b"\x00\x10bad"),
            "oversize PUBLISH": publish_packet(b"bad/big", b"x" * 5000),
        }
        for what, data in bad_inputs.items():
            sock = raw_client(broker)
            sock.sendall(data)
            assert closed_by_broker(sock) == [], what
            sock.close()
        # Not MQTT at all.
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_broker(sock) == []
        sock.close()
        # An MQTT 5 client is told why.
        sock = raw_client(broker, level=5)
        sock.sendall(publish_packet(b"bad/big", b"x" * 5000, properties=b""))
        [(first, body)] = closed_by_broker(sock)
        assert first == 0xE0 and body[0] == 0x95  # DISCONNECT, packet too large
        sock.close()
        sock = raw_client(broker, level=5)
        sock.sendall(publish_packet(b"bad/alias", b"x", properties=b"\x23\x00\x01"))
        [(first, body)] = closed_by_broker(sock)
        assert first == 0xE0 and body[0] == 0x94  # DISCONNECT, topic alias invalid
        sock.close()
        # paho sending more than the limit is cut off the same way.
        big = Client(broker, protocol=V311).connect()
        big.paho.publish("bad/big", b"y" * 5000, qos=1)
        assert big.disconnected.wait(5)
        big.paho.loop_stop()

        assert bystander.connected.is_set() and not bystander.disconnected.is_set()
        assert bystander.received() == []
        roundtrip(broker, V5)
        roundtrip(broker, V311)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("wildcard" in w for w in warnings) and any("over the limit of 4096" in w for w in warnings)
        bystander.disconnect()


def test_unsupported_protocol_levels_are_answered_and_closed(broker: RunningBroker) -> None:
    for level, expected in ((3, bytes((0, 1))), (6, bytes((0, 0x84, 0)))):
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
        sock.sendall(connect_packet("old", level=level))
        assert closed_by_broker(sock) == [(0x20, expected)]
        sock.close()
    # 3.1.1 allows an empty client id only with a clean session.
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    body = _field("MQTT") + bytes((4, 0x00)) + struct.pack("!H", 30) + _field("")
    sock.sendall(packet(0x10, body))
    assert closed_by_broker(sock) == [(0x20, bytes((0, 2)))]
    sock.close()
    roundtrip(broker)


def test_port_in_use_is_a_clear_service_unavailable_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def start() -> None:
            await EmbeddedBroker("127.0.0.1", port).start()

        with pytest.raises(ServiceUnavailableError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(start())


def test_url_port_and_metrics(broker: RunningBroker) -> None:
    assert broker.port > 0
    assert broker.broker.url == f"mqtt://127.0.0.1:{broker.port}"
    roundtrip(broker)
    metrics = {m.name: m for m in broker.call(broker.broker.metrics)}
    assert metrics["ioc_mqtt_broker_received_total"].samples[0][1] >= 1
    assert metrics["ioc_mqtt_broker_queued"].samples[0][1] == 0
