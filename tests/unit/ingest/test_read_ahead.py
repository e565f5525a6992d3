"""The gateway's paho client reads the socket in large chunks and serves paho's small reads from
them; what paho reads must be the byte stream the socket delivered, whatever the chunking."""

from __future__ import annotations

import random

import pytest
from paho.mqtt.client import PUBACK

from ingest.mqtt_source import ReadAheadSocket


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
