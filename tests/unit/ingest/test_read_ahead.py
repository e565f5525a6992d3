"""The gateway's paho client reads the socket in large chunks and serves paho's small reads from
them, and parses QoS 0/1 publishes itself: what it reads must be what paho would have read."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.mqtt_source import ReadAheadSocket, _parse_publish, publish_properties


class ChunkedSocket:
    """A non-blocking socket that has `chunks` to give, one per recv(), then would block."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.recv_calls = 0

    def recv(self, size: int) -> bytes:
        self.recv_calls += 1
        if not self.chunks:
            raise BlockingIOError
        chunk = self.chunks.pop(0)
        assert len(chunk) <= size
        return chunk

    def send(self, buffer: bytes | bytearray) -> int:
        return len(buffer)

    def close(self) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def setblocking(self, flag: bool) -> None:
        pass


def test_small_reads_are_served_from_one_system_call() -> None:
    stream = bytes(range(256)) * 4
    inner = ChunkedSocket([stream])
    sock = ReadAheadSocket(inner)
    read = b""
    while len(read) < len(stream):
        read += sock.recv(1)
        assert sock.pending() == len(stream) - len(read)
    assert read == stream and inner.recv_calls == 1
    with pytest.raises(BlockingIOError):
        sock.recv(1)


@pytest.mark.parametrize("seed", range(20))
def test_any_chunking_and_any_read_sizes_give_the_same_bytes(seed: int) -> None:
    generator = random.Random(seed)
    stream = generator.randbytes(20_000)
    cuts = sorted(generator.sample(range(1, len(stream)), 30))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    sock = ReadAheadSocket(ChunkedSocket(chunks))
    read = b""
    while True:
        try:
            part = sock.recv(generator.choice([1, 2, 5, 100, 4096]))
        except BlockingIOError:
            break
        assert part
        read += part
    assert read == stream and sock.pending() == 0


def test_end_of_stream_is_passed_on() -> None:
    sock = ReadAheadSocket(ChunkedSocket([b"ab", b""]))
    assert sock.recv(1) == b"a" and sock.recv(1) == b"b"
    assert sock.recv(1) == b""


def test_many_acknowledgements_are_one_write_of_mqtt_pubacks() -> None:
    from paho.mqtt.enums import CallbackAPIVersion

    from ingest.mqtt_source import GatewayClient

    client = GatewayClient(CallbackAPIVersion.VERSION2, client_id="t", manual_ack=True)
    queued: list[tuple[int, bytes]] = []
    client._packet_queue = lambda command, packet, mid, qos, info=None: queued.append((command, packet))  # type: ignore[method-assign]
    client.ack_many([1, 300, 65535])
    assert queued == [(PUBACK, b"\x40\x02\x00\x01" + b"\x40\x02\x01\x2c" + b"\x40\x02\xff\xff")]


# What MQTT allows in a string: UTF-8 without surrogates or NUL.
_MQTT_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=200)


@given(
    topic=st.binary(min_size=1, max_size=80),
    qos=st.sampled_from([0, 1]),
    mid=st.integers(1, 65535),
    expiry=st.none() | st.integers(0, 2**32 - 1),
    user=st.lists(st.tuples(_MQTT_TEXT, _MQTT_TEXT), max_size=5),
    payload=st.binary(max_size=3000),
)
@settings(max_examples=300, deadline=None)
def test_the_fast_publish_parser_reads_what_paho_reads(
    topic: bytes, qos: int, mid: int, expiry: int | None, user: list[tuple[str, str]], payload: bytes
) -> None:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if expiry is not None:
        properties.MessageExpiryInterval = expiry
    if user:
        properties.UserProperty = user
    packet = (
        len(topic).to_bytes(2, "big")
        + topic
        + (mid.to_bytes(2, "big") if qos else b"")
        + properties.pack()  # type: ignore[no-untyped-call]
        + payload
    )
    header = 0x30 | (qos << 1)
    expected = _packet.decode_publish(header, packet, MQTTProtocolVersion.MQTTv5)
    raw_properties = properties.pack() if (expiry is not None or user) else b""  # type: ignore[no-untyped-call]
    assert _parse_publish(packet, qos) == (expected.topic, expected.mid, expected.payload, raw_properties)
    # Kept undecoded, they decode to what paho read.
    decoded = publish_properties(raw_properties)
    assert (decoded or {}).get("message_expiry_interval") == getattr(
        expected.properties, "MessageExpiryInterval", None
    )
    assert (decoded or {}).get("user_properties", []) == [
        list(p) for p in getattr(expected.properties, "UserProperty", [])
    ]
    # Cut anywhere inside its header, the packet is refused (and paho then words the error).
    header_length = len(packet) - len(payload)
    for cut in range(header_length):
        try:
            parsed = _parse_publish(packet[:cut], qos)
        except (IndexError, ValueError):
            continue
        assert parsed is None or cut >= header_length


def test_a_publish_without_a_topic_is_left_to_paho() -> None:
    assert _parse_publish(b"\x00\x00\x00\x01\x00payload", 1) is None


def test_properties_are_decoded_for_a_dead_letter_and_kept_as_they_came_when_they_do_not_decode() -> None:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ContentType = "application/json"
    properties.CorrelationData = b"\xff\x00"
    properties.SubscriptionIdentifier = 7  # the broker's, for the gateway's subscription: left out
    raw = properties.pack()  # type: ignore[no-untyped-call]
    assert publish_properties(raw) == {"content_type": "application/json", "correlation_data_base64": "/wA="}
    assert publish_properties(b"") is None
    broken = b"\x03\x03\x00\x09"  # a content type running past its properties
    assert publish_properties(broken) == {"undecoded_base64": "AwMACQ=="}
