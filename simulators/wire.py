"""A minimal MQTT 3.1.1 publisher for load mode: CONNECT, QoS 1 PUBLISH, PUBACK, DISCONNECT.

paho costs a system call per PUBLISH and a properties object per PUBACK, which caps one core near
15,000 messages a second; load mode wants the broker and the pipeline to be the bottleneck, not
the generator. This one encodes a whole batch of PUBLISH packets into one buffer, writes it with
one call, and counts PUBACKs by scanning the bytes that come back. It does nothing else (no
subscriptions, no QoS 2, no session resumption): devices that need a will and reconnection are
simulated with paho in scenario mode.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import time

from ioc_core.errors import ServiceUnavailableError
from ioc_core.settings import MqttEndpoint

_CONNECT, _CONNACK, _PUBLISH_QOS1, _PUBACK = 0x10, 0x20, 0x32, 0x40
_PINGREQ, _DISCONNECT = b"\xc0\x00", b"\xe0\x00"
_KEEPALIVE_S = 60
# Packet ids are 16 bits; never reuse one the broker has not acknowledged yet.
_MAX_OUTSTANDING = 60_000


def remaining_length(length: int) -> bytes:
    """MQTT's variable-length integer (7 bits a byte, high bit: more follows)."""
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def _text(value: str) -> bytes:
    encoded = value.encode()
    return struct.pack("!H", len(encoded)) + encoded


def connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    flags = 0x02  # clean session
    payload = _text(client_id)
    if username is not None:
        flags |= 0x80
        payload += _text(username)
        if password is not None:
            flags |= 0x40
            payload += _text(password)
    variable = _text("MQTT") + bytes([4, flags]) + struct.pack("!H", _KEEPALIVE_S)
    body = variable + payload
    return bytes([_CONNECT]) + remaining_length(len(body)) + body


class WirePublisher:
    """One connection publishing QoS 1 messages in batches; not thread-safe."""

    def __init__(self, endpoint: MqttEndpoint, client_id: str) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.sent = 0
        self.acknowledged = 0
        self._sock: socket.socket | None = None
        self._next_id = 0
        self._inbox = bytearray()
        self._last_write = 0.0

    def connect(self, within_s: float = 10.0) -> None:
        endpoint = self.endpoint
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=within_s)
            if endpoint.tls:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=endpoint.host)
            password = endpoint.password.get_secret_value() if endpoint.password else None
            sock.sendall(connect_packet(self.client_id, endpoint.username, password))
            answer = b""
            while len(answer) < 4:
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    raise OSError("connection closed before CONNACK")
                answer += chunk
        except OSError as exc:
            raise ServiceUnavailableError(
                f"MQTT broker at {endpoint.host}:{endpoint.port} is unreachable: {exc}"
            ) from exc
        if answer[0] != _CONNACK or answer[3] != 0:
            sock.close()
            raise ServiceUnavailableError(f"MQTT broker refused the connection (return code {answer[3]})")
        sock.settimeout(None)
        self._sock = sock
        self._last_write = time.monotonic()

    def publish_batch(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Send PUBLISH (QoS 1) packets for `(topic, payload)` pairs, `topic` already encoded
        with its length prefix (`encode_topic`)."""
        sock = self._require()
        while self.sent + len(messages) - self.acknowledged > _MAX_OUTSTANDING:
            self.read_acks(wait_s=0.01)
        buffer = bytearray()
        packet_id = self._next_id
        for topic, payload in messages:
            packet_id = packet_id % 65535 + 1
            buffer.append(_PUBLISH_QOS1)
            buffer += remaining_length(len(topic) + 2 + len(payload))
            buffer += topic
            buffer += packet_id.to_bytes(2, "big")
            buffer += payload
        self._next_id = packet_id
        sock.sendall(buffer)
        self.sent += len(messages)
        self._last_write = time.monotonic()

    def read_acks(self, wait_s: float = 0.0) -> None:
        """Count the PUBACKs that have arrived (waiting up to `wait_s` for the first)."""
        sock = self._require()
        readable, _, _ = select.select([sock], [], [], wait_s)
        while readable:
            chunk = sock.recv(65536)
            if not chunk:
                raise ServiceUnavailableError("the MQTT broker closed the connection")
            self._inbox += chunk
            readable, _, _ = select.select([sock], [], [], 0)
        self._parse()
        if time.monotonic() - self._last_write > _KEEPALIVE_S / 2:
            sock.sendall(_PINGREQ)
            self._last_write = time.monotonic()

    def _parse(self) -> None:
        inbox, position, acks = self._inbox, 0, 0
        while position + 2 <= len(inbox):
            kind = inbox[position]
            # Remaining length: every packet the broker sends a publisher is short, but be exact.
            length, shift, cursor = 0, 0, position + 1
            while True:
                if cursor >= len(inbox):
                    del inbox[:position]
                    self.acknowledged += acks
                    return
                byte = inbox[cursor]
                length |= (byte & 0x7F) << shift
                shift += 7
                cursor += 1
                if not byte & 0x80:
                    break
            end = cursor + length
            if end > len(inbox):
                break
            if kind & 0xF0 == _PUBACK:
                acks += 1
            position = end
        del inbox[:position]
        self.acknowledged += acks

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendall(_DISCONNECT)
        self._sock.close()
        self._sock = None

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise ServiceUnavailableError("not connected to the MQTT broker")
        return self._sock


def encode_topic(topic: str) -> bytes:
    return _text(topic)
