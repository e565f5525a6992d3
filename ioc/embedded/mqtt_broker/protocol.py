"""The MQTT 3.1.1 and 5.0 wire format as the embedded broker speaks it: packet types, reason
codes, properties, the reading of packet bodies and the encoding of packets, topic name and filter
rules, and the application message with its PUBLISH encoding.

Nothing here holds state or does I/O, so every rule about what a client may send is in one place.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
# The fixed-header flags every packet other than PUBLISH must carry.
FLAGS = {PUBREL: 2, SUBSCRIBE: 2, UNSUBSCRIBE: 2}

V311, V5 = 4, 5

# MQTT 5 reason codes this broker sends.
SUCCESS = 0x00
NO_SUBSCRIPTION_EXISTED = 0x11
UNSPECIFIED_ERROR = 0x80
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
NOT_AUTHORIZED = 0x87
UNSUPPORTED_VERSION = 0x84
CLIENT_ID_INVALID = 0x85
BAD_AUTH_METHOD = 0x8C
SHUTTING_DOWN = 0x8B
KEEPALIVE_TIMEOUT = 0x8D
TAKEN_OVER = 0x8E
FILTER_INVALID = 0x8F
_TOPIC_INVALID = 0x90
PACKET_ID_NOT_FOUND = 0x92
ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
SUB_IDS_UNSUPPORTED = 0xA1

# MQTT 5 properties: identifier -> wire type.
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE,  # payload format indicator
    0x02: _U32,  # message expiry interval
    0x03: _UTF8,  # content type
    0x08: _UTF8,  # response topic
    0x09: _BINARY,  # correlation data
    0x0B: _VARINT,  # subscription identifier
    0x11: _U32,  # session expiry interval
    0x12: _UTF8,  # assigned client identifier
    0x13: _U16,  # server keep alive
    0x15: _UTF8,  # authentication method
    0x16: _BINARY,  # authentication data
    0x17: _BYTE,  # request problem information
    0x18: _U32,  # will delay interval
    0x19: _BYTE,  # request response information
    0x1A: _UTF8,  # response information
    0x1C: _UTF8,  # server reference
    0x1F: _UTF8,  # reason string
    0x21: _U16,  # receive maximum
    0x22: _U16,  # topic alias maximum
    0x23: _U16,  # topic alias
    0x24: _BYTE,  # maximum QoS
    0x25: _BYTE,  # retain available
    0x26: _PAIR,  # user property
    0x27: _U32,  # maximum packet size
    0x28: _BYTE,  # wildcard subscription available
    0x29: _BYTE,  # subscription identifier available
    0x2A: _BYTE,  # shared subscription available
}
MESSAGE_EXPIRY, SUBSCRIPTION_ID, SESSION_EXPIRY, AUTH_METHOD = 0x02, 0x0B, 0x11, 0x15
WILL_DELAY, RECEIVE_MAXIMUM, TOPIC_ALIAS, _USER_PROPERTY, MAX_PACKET_SIZE = 0x18, 0x21, 0x23, 0x26, 0x27
CONNECT_PROPERTIES = frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27})
WILL_PROPERTIES = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26})
PUBLISH_PROPERTIES = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26})
# Passed on to subscribers unchanged; the message expiry is passed on as what is left of it.
FORWARDED_PROPERTIES = frozenset({0x01, 0x03, 0x08, 0x09, 0x26})
SUBSCRIBE_PROPERTIES = frozenset({0x0B, 0x26})
UNSUBSCRIBE_PROPERTIES = frozenset({0x26})
DISCONNECT_PROPERTIES = frozenset({0x11, 0x1C, 0x1F, 0x26})

NEVER_EXPIRES = 0xFFFFFFFF

U16_PACK = struct.Struct("!H").pack
U32_PACK = struct.Struct("!I").pack
_VARINTS = [bytes((n,)) for n in range(128)]
PINGRESP_PACKET = bytes((PINGRESP << 4, 0))


class ProtocolError(Exception):
    """What a client did wrong; its connection is closed with this reason code."""

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


def encode_varint(value: int) -> bytes:
    if value < 128:
        return _VARINTS[value]
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def utf8_field(text: str) -> bytes:
    data = text.encode()
    return U16_PACK(len(data)) + data


def encode_packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def fixed_header(buffer: bytearray, start: int) -> tuple[int, int] | None:
    """(offset of the body, body length) of the packet at `start`, or None while incomplete."""
    length, shift, index = 0, 0, start + 1
    while True:
        if index >= len(buffer):
            return None
        byte = buffer[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return index, length
        shift += 7
        if shift > 21:
            raise ProtocolError(MALFORMED, "remaining length longer than four bytes")


class Reader:
    """A cursor over one packet body; running past its end is a malformed packet."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, count: int) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise ProtocolError(MALFORMED, "packet ends in the middle of a field")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise ProtocolError(MALFORMED, "packet ends in the middle of a field")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        high, low = self._take(2)
        return high << 8 | low

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 21:
                raise ProtocolError(MALFORMED, "variable byte integer longer than four bytes")

    def binary(self) -> bytes:
        return self._take(self.u16())

    def utf8(self, what: str = "string") -> str:
        raw = self._take(self.u16())
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError(MALFORMED, f"{what} is not valid UTF-8") from None
        if "\x00" in text:
            raise ProtocolError(MALFORMED, f"{what} contains NUL")
        return text

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def properties(
        self, allowed: frozenset[int], forwarded: frozenset[int] = frozenset()
    ) -> tuple[dict[int, Any], bytes]:
        """MQTT 5 properties: their values (user properties and subscription identifiers as lists)
        and the raw bytes of those in `forwarded`, ready to be sent on."""
        end = self.varint() + self.pos
        if end > len(self.data):
            raise ProtocolError(MALFORMED, "properties run past the end of the packet")
        values: dict[int, Any] = {}
        kept = bytearray()
        while self.pos < end:
            start = self.pos
            identifier = self.varint()
            kind = _PROPERTY_TYPES.get(identifier)
            if kind is None or identifier not in allowed:
                raise ProtocolError(PROTOCOL_ERROR, f"property 0x{identifier:02x} is not allowed here")
            value: Any
            if kind == _BYTE:
                value = self.u8()
            elif kind == _U16:
                value = self.u16()
            elif kind == _U32:
                value = self.u32()
            elif kind == _VARINT:
                value = self.varint()
            elif kind == _UTF8:
                value = self.utf8("property")
            elif kind == _BINARY:
                value = self.binary()
            else:
                value = (self.utf8("user property"), self.utf8("user property"))
            if identifier in (_USER_PROPERTY, SUBSCRIPTION_ID):
                values.setdefault(identifier, []).append(value)
            elif identifier in values:
                raise ProtocolError(PROTOCOL_ERROR, f"property 0x{identifier:02x} appears twice")
            else:
                values[identifier] = value
            if identifier in forwarded:
                kept += self.data[start : self.pos]
        if self.pos != end:
            raise ProtocolError(MALFORMED, "properties run past their length")
        return values, bytes(kept)


def check_topic_name(topic: str) -> None:
    if not topic:
        raise ProtocolError(_TOPIC_INVALID, "empty topic name")
    if "+" in topic or "#" in topic:
        raise ProtocolError(_TOPIC_INVALID, f"topic name {topic!r} contains a wildcard")


def split_filter(text: str) -> tuple[str | None, str] | None:
    """(share group or None, topic filter), or None when the filter is not valid."""
    group: str | None = None
    if text.startswith("$share/"):
        parts = text.split("/", 2)
        if len(parts) < 3 or not parts[1] or any(c in parts[1] for c in "+#"):
            return None
        group, text = parts[1], parts[2]
    if not text:
        return None
    levels = text.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return None
        if "+" in level and level != "+":
            return None
    return group, text


def filter_matches(levels: list[str], topic: str) -> bool:
    """Whether a topic filter (split into levels) matches a topic name."""
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False
    names = topic.split("/")
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(names) or (level != "+" and level != names[index]):
            return False
    return len(levels) == len(names)


class Message:
    """One application message as published, shared by every copy delivered."""

    __slots__ = ("expires_at", "payload", "properties", "publisher", "qos", "retain", "topic", "topic_field")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        *,
        properties: bytes = b"",
        expires_at: float | None = None,
        publisher: str | None = None,
    ) -> None:
        self.topic = topic
        self.topic_field = utf8_field(topic)
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.expires_at = expires_at
        self.publisher = publisher

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def encode(self, qos: int, packet_id: int, *, dup: bool, retain: bool, v5: bool, now: float) -> bytes:
        parts = [self.topic_field]
        if qos:
            parts.append(U16_PACK(packet_id))
        if v5:
            properties = self.properties
            if self.expires_at is not None:
                left = max(1, math.ceil(self.expires_at - now))
                properties += bytes((MESSAGE_EXPIRY,)) + U32_PACK(left)
            parts.append(encode_varint(len(properties)))
            parts.append(properties)
        parts.append(self.payload)
        length = sum(len(part) for part in parts)
        first = PUBLISH << 4 | dup << 3 | qos << 1 | retain
        return b"".join((bytes((first,)), encode_varint(length), *parts))


@dataclass
class ConnectRequest:
    """What a CONNECT packet asks for, read and checked but not yet acted on."""

    flags: int
    keepalive_s: int
    properties: dict[int, Any]
    client_id: str
    will: Message | None = None
    will_delay_s: int = 0
    will_expiry_s: int | None = None
    password: bytes | None = None

    @property
    def clean(self) -> bool:
        return bool(self.flags & 0x02)


def read_connect(reader: Reader, *, v5: bool) -> ConnectRequest:
    """The rest of a CONNECT after the protocol name and level. The checks run in the order of the
    packet's fields, so a client with several faults is told about the first one."""
    flags = reader.u8()
    if flags & 0x01:
        raise ProtocolError(MALFORMED, "reserved CONNECT flag set")
    keepalive_s = reader.u16()
    properties: dict[int, Any] = {}
    if v5:
        properties, _ = reader.properties(CONNECT_PROPERTIES)
    request = ConnectRequest(flags, keepalive_s, properties, reader.utf8("client id"))
    if flags & 0x04:
        _read_will(reader, request, v5=v5)
    elif flags & 0x38:
        raise ProtocolError(MALFORMED, "will QoS or retain without a will")
    if flags & 0x80:
        reader.utf8("user name")
    elif flags & 0x40 and not v5:
        raise ProtocolError(MALFORMED, "password without a user name")
    if flags & 0x40:
        request.password = reader.binary()
    if not reader.at_end():
        raise ProtocolError(MALFORMED, "bytes after the CONNECT payload")
    if AUTH_METHOD in properties:
        raise ProtocolError(BAD_AUTH_METHOD, "enhanced authentication is not supported")
    return request


def _read_will(reader: Reader, request: ConnectRequest, *, v5: bool) -> None:
    flags = request.flags
    will_properties: dict[int, Any] = {}
    forwarded = b""
    if v5:
        will_properties, forwarded = reader.properties(WILL_PROPERTIES, FORWARDED_PROPERTIES)
    will_topic = reader.utf8("will topic")
    check_topic_name(will_topic)
    will_payload = reader.binary()
    will_qos = (flags >> 3) & 0x03
    if will_qos == 3:
        raise ProtocolError(MALFORMED, "will QoS 3")
    request.will_delay_s = will_properties.get(WILL_DELAY, 0)
    request.will_expiry_s = will_properties.get(MESSAGE_EXPIRY)
    request.will = Message(
        will_topic,
        will_payload,
        will_qos,
        bool(flags & 0x20),
        properties=forwarded,
        publisher=request.client_id,
    )
