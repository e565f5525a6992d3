"""An MQTT broker inside our own event loop, so that `ioc up` runs without Mosquitto.

It speaks MQTT 3.1.1 and 5.0 on one listener and implements what the gateway, the simulator and
field devices use, with the delivery guarantees the pipeline depends on:

- QoS 0 and 1 end to end. QoS 2 publishers are served the full PUBREC/PUBREL/PUBCOMP handshake
  (a resent QoS 2 PUBLISH is recognised by its packet id and not routed twice), but subscribers
  receive at most QoS 1: a SUBSCRIBE asking for QoS 2 is granted QoS 1.
- Wildcards (`+`, `#`; `$`-topics are not matched by a wildcard in the first level), shared
  subscriptions `$share/{group}/{filter}`, retained messages (an empty payload clears one), last
  wills (MQTT 5 will delay honoured), keep-alive (silent for 1.5 times it: closed, will sent),
  session takeover, persistent sessions (3.1.1 `clean_session=0`: kept until a clean connect;
  5.0 `clean_start` and Session Expiry Interval, which DISCONNECT may change; either ends after
  `max_session_expiry_s`, a day by default, without its client) with messages queued while the
  client is away and unacknowledged QoS 1 messages resent with DUP on reconnect.
- MQTT 5: Receive Maximum, Maximum Packet Size (both ways), message expiry, no-local,
  retain-as-published, retain handling, user properties and the other publish properties passed
  on, reason codes on DISCONNECT. Not offered: topic aliases (Topic Alias Maximum is 0, so a
  client alias is a protocol error), subscription identifiers (announced unavailable), enhanced
  authentication, response information.

Flow control. A connection's packets are handled one at a time, and its socket is read only when
the event loop gets to it, so a publisher the broker cannot keep up with is held back by TCP.
Towards a subscriber at most Receive Maximum QoS 1 messages are unacknowledged at once
(`max_inflight_v311` for 3.1.1 clients, which cannot say), and nothing is written while its socket
buffer is full. Messages beyond that wait in the session's queue (or, for a shared subscription, in
the group's queue, from which whichever member has room takes the next one). A queue never drops a
QoS 1 message: when it reaches `max_queued_per_session`, each publisher whose message it took is
held -- its PUBACK is withheld and its connection not read -- until the queue has room again; the
first time, a warning names the queue. (A publisher is not held for its own session's queue, nor
for a group it is a member of, which would deadlock it.) QoS 0 messages to a full queue are dropped
and counted.

A shared-subscription message that a member took and had not acknowledged when its connection
dropped goes back to its group, in front, for another connected member; with none connected it
stays with the member's session, to be resent (DUP) when the member returns, or handed to the
group when that session ends. Such a message may be delivered twice; one that a member
acknowledged never is. Which member takes a new message: the next one, in turn, that has room.

Limits. Packets over `max_packet_size` (1 MiB by default, well above the telemetry limit),
malformed packets, topics with wildcards, invalid UTF-8 or NUL, and protocol violations close that
connection with a warning in the log (and a DISCONNECT with a reason code for MQTT 5 clients);
nothing a client sends stops the broker.

State lives in memory only: sessions, queues and retained messages do not outlive the process.
`stop()` first stops accepting connections and publications and gives connected subscribers up to
`drain_timeout_s` to take what is queued for them, then logs a warning with the number of QoS 1
messages still undelivered.

There is no authentication and no TLS: this is a development broker for one machine. It binds
127.0.0.1 by default and must not be exposed to a network; it warns when asked to bind anything
else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import math
import struct
import time
import uuid
from collections.abc import Iterable
from typing import Any, Generic, TypeVar, cast

from ioc_core.component import Component
from ioc_core.errors import ServiceUnavailableError
from ioc_core.metrics import Metric

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED_PER_SESSION = 1_000_000
DEFAULT_MAX_PACKET_SIZE = 1024 * 1024
DEFAULT_MAX_INFLIGHT_V311 = 100
# Persistent sessions (an MQTT 3.1.1 one, or an MQTT 5 one asking for "never") end after a day
# without their client.
DEFAULT_MAX_SESSION_EXPIRY_S = 86_400.0

_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 1, 2, 3, 4, 5, 6, 7
_SUBSCRIBE, _SUBACK, _UNSUBSCRIBE, _UNSUBACK, _PINGREQ, _PINGRESP, _DISCONNECT, _AUTH = range(8, 16)
# The fixed-header flags every packet other than PUBLISH must carry.
_FLAGS = {_PUBREL: 2, _SUBSCRIBE: 2, _UNSUBSCRIBE: 2}

_V311, _V5 = 4, 5

# MQTT 5 reason codes this broker sends.
_SUCCESS = 0x00
_NO_SUBSCRIPTION_EXISTED = 0x11
_UNSPECIFIED_ERROR = 0x80
_MALFORMED = 0x81
_PROTOCOL_ERROR = 0x82
_UNSUPPORTED_VERSION = 0x84
_CLIENT_ID_INVALID = 0x85
_BAD_AUTH_METHOD = 0x8C
_SHUTTING_DOWN = 0x8B
_KEEPALIVE_TIMEOUT = 0x8D
_TAKEN_OVER = 0x8E
_FILTER_INVALID = 0x8F
_TOPIC_INVALID = 0x90
_PACKET_ID_NOT_FOUND = 0x92
_ALIAS_INVALID = 0x94
_PACKET_TOO_LARGE = 0x95
_SUB_IDS_UNSUPPORTED = 0xA1

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
_MESSAGE_EXPIRY, _SUBSCRIPTION_ID, _SESSION_EXPIRY, _AUTH_METHOD = 0x02, 0x0B, 0x11, 0x15
_WILL_DELAY, _RECEIVE_MAXIMUM, _TOPIC_ALIAS, _USER_PROPERTY, _MAX_PACKET_SIZE = 0x18, 0x21, 0x23, 0x26, 0x27
_CONNECT_PROPERTIES = frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27})
_WILL_PROPERTIES = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26})
_PUBLISH_PROPERTIES = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26})
# Passed on to subscribers unchanged; the message expiry is passed on as what is left of it.
_FORWARDED_PROPERTIES = frozenset({0x01, 0x03, 0x08, 0x09, 0x26})
_SUBSCRIBE_PROPERTIES = frozenset({0x0B, 0x26})
_UNSUBSCRIBE_PROPERTIES = frozenset({0x26})
_DISCONNECT_PROPERTIES = frozenset({0x11, 0x1C, 0x1F, 0x26})

_NEVER_EXPIRES = 0xFFFFFFFF
_CONNECT_TIMEOUT_S = 10.0
_SWEEP_INTERVAL_S = 0.5
# A socket whose buffer holds more than this is not given further messages until it drains.
_WRITE_HIGH_WATER = 256 * 1024
# After close(), a peer that does not read what we still have to send is cut off this much later.
_CLOSE_GRACE_S = 2.0

_U16_PACK = struct.Struct("!H").pack
_U32_PACK = struct.Struct("!I").pack
_VARINTS = [bytes((n,)) for n in range(128)]
_PINGRESP_PACKET = bytes((_PINGRESP << 4, 0))


class _ProtocolError(Exception):
    """What a client did wrong; its connection is closed with this reason code."""

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


def _varint(value: int) -> bytes:
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


def _utf8_field(text: str) -> bytes:
    data = text.encode()
    return _U16_PACK(len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _fixed_header(buffer: bytearray, start: int) -> tuple[int, int] | None:
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
            raise _ProtocolError(_MALFORMED, "remaining length longer than four bytes")


class _Reader:
    """A cursor over one packet body; running past its end is a malformed packet."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, count: int) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise _ProtocolError(_MALFORMED, "packet ends in the middle of a field")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise _ProtocolError(_MALFORMED, "packet ends in the middle of a field")
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
                raise _ProtocolError(_MALFORMED, "variable byte integer longer than four bytes")

    def binary(self) -> bytes:
        return self._take(self.u16())

    def utf8(self, what: str = "string") -> str:
        raw = self._take(self.u16())
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise _ProtocolError(_MALFORMED, f"{what} is not valid UTF-8") from None
        if "\x00" in text:
            raise _ProtocolError(_MALFORMED, f"{what} contains NUL")
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
            raise _ProtocolError(_MALFORMED, "properties run past the end of the packet")
        values: dict[int, Any] = {}
        kept = bytearray()
        while self.pos < end:
            start = self.pos
            identifier = self.varint()
            kind = _PROPERTY_TYPES.get(identifier)
            if kind is None or identifier not in allowed:
                raise _ProtocolError(_PROTOCOL_ERROR, f"property 0x{identifier:02x} is not allowed here")
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
            if identifier in (_USER_PROPERTY, _SUBSCRIPTION_ID):
                values.setdefault(identifier, []).append(value)
            elif identifier in values:
                raise _ProtocolError(_PROTOCOL_ERROR, f"property 0x{identifier:02x} appears twice")
            else:
                values[identifier] = value
            if identifier in forwarded:
                kept += self.data[start : self.pos]
        if self.pos != end:
            raise _ProtocolError(_MALFORMED, "properties run past their length")
        return values, bytes(kept)


def _check_topic_name(topic: str) -> None:
    if not topic:
        raise _ProtocolError(_TOPIC_INVALID, "empty topic name")
    if "+" in topic or "#" in topic:
        raise _ProtocolError(_TOPIC_INVALID, f"topic name {topic!r} contains a wildcard")


def _split_filter(text: str) -> tuple[str | None, str] | None:
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


def _filter_matches(levels: list[str], topic: str) -> bool:
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


class _Message:
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
        self.topic_field = _utf8_field(topic)
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
            parts.append(_U16_PACK(packet_id))
        if v5:
            properties = self.properties
            if self.expires_at is not None:
                left = max(1, math.ceil(self.expires_at - now))
                properties += bytes((_MESSAGE_EXPIRY,)) + _U32_PACK(left)
            parts.append(_varint(len(properties)))
            parts.append(properties)
        parts.append(self.payload)
        length = sum(len(part) for part in parts)
        first = _PUBLISH << 4 | dup << 3 | qos << 1 | retain
        return b"".join((bytes((first,)), _varint(length), *parts))


class _Delivery:
    """A message on its way to one session, with the QoS and retain flag of that copy."""

    __slots__ = ("group", "message", "qos", "retain")

    def __init__(self, message: _Message, qos: int, retain: bool, group: _SharedGroup | None) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.group = group


_Item = TypeVar("_Item")


class _Queue(Generic[_Item]):
    """A FIFO that holds back publishers, rather than dropping, once it reaches its limit."""

    __slots__ = ("items", "limit", "name", "waiters", "warned")

    def __init__(self, limit: int, name: str) -> None:
        self.items: collections.deque[_Item] = collections.deque()
        self.limit = limit
        self.name = name
        self.waiters: list[_Connection] = []
        self.warned = False

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limit

    def append(self, item: _Item) -> None:
        self.items.append(item)
        if not self.warned and len(self.items) >= self.limit:
            self.warned = True
            log.warning(
                "MQTT queue of %s reached %d messages; holding its publishers until it drains",
                self.name,
                self.limit,
            )

    def appendleft(self, item: _Item) -> None:
        self.items.appendleft(item)

    def popleft(self) -> _Item:
        item = self.items.popleft()
        if self.waiters and len(self.items) < self.limit:
            self._release()
        return item

    def clear(self) -> list[_Item]:
        items = list(self.items)
        self.items.clear()
        self._release()
        return items

    def _release(self) -> None:
        if len(self.items) < self.limit // 2:
            self.warned = False
        waiters, self.waiters = self.waiters, []
        for connection in waiters:
            connection.queue_has_room(self)


class _Subscription:
    __slots__ = ("group", "no_local", "qos", "retain_as_published", "session", "text")

    def __init__(
        self,
        session: _Session,
        text: str,
        qos: int,
        *,
        no_local: bool,
        retain_as_published: bool,
        group: _SharedGroup | None,
    ) -> None:
        self.session = session
        self.text = text
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.group = group


class _SharedGroup:
    """The members of one `$share/{group}/{filter}`; each message goes to one of them."""

    def __init__(self, broker: EmbeddedBroker, name: str, topic_filter: str) -> None:
        self.broker = broker
        self.name = name
        self.filter = topic_filter
        self.members: dict[_Session, _Subscription] = {}
        self.order: list[_Session] = []
        self.cursor = 0
        self.pending: _Queue[_Message] = _Queue(
            broker.max_queued_per_session, f"$share/{name}/{topic_filter}"
        )

    def add(self, subscription: _Subscription) -> None:
        if subscription.session not in self.members:
            self.order.append(subscription.session)
        self.members[subscription.session] = subscription

    def remove(self, session: _Session) -> None:
        if self.members.pop(session, None) is not None:
            self.order.remove(session)

    def dispatch(self, message: _Message) -> _Queue[_Message] | None:
        """Hand a new message to a member with room, else queue it; returns the queue when it is
        full and the publisher should be held."""
        if not self.pending:
            count = len(self.order)
            for step in range(count):
                session = self.order[(self.cursor + step) % count]
                subscription = self.members[session]
                qos = min(message.qos, subscription.qos)
                if session.has_room(qos):
                    self.cursor = (self.cursor + step + 1) % count
                    session.send(
                        _Delivery(message, qos, message.retain and subscription.retain_as_published, self)
                    )
                    return None
        if message.qos == 0 and (self.pending.full or not any(s.connection for s in self.order)):
            self.broker.stats.count_drop("qos0_queue_full_or_offline")
            return None
        self.pending.append(message)
        return self.pending if self.pending.full and message.qos else None

    def feed(self, session: _Session) -> None:
        """Give a member with room the messages waiting in the group."""
        subscription = self.members.get(session)
        if subscription is None:
            return
        while self.pending and session.has_room(min(self.pending.items[0].qos, subscription.qos)):
            message = self.pending.popleft()
            qos = min(message.qos, subscription.qos)
            session.send(_Delivery(message, qos, message.retain and subscription.retain_as_published, self))

    def feed_all(self) -> None:
        for session in list(self.order):
            if not self.pending:
                return
            if session.connection is not None:
                self.feed(session)


class _Session:
    """What the broker keeps for one client id, connected or not."""

    def __init__(self, broker: EmbeddedBroker, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.connection: _Connection | None = None
        self.expiry_s: float = 0.0
        self.subscriptions: dict[str, _Subscription] = {}
        # The shared groups among those subscriptions, looked at after every acknowledgement.
        self.groups: list[_SharedGroup] = []
        self.queue: _Queue[_Delivery] = _Queue(broker.max_queued_per_session, f"client {client_id!r}")
        # Packet id -> delivery, in the order sent, which is the order resent.
        self.inflight: dict[int, _Delivery] = {}
        # QoS 2 packet ids taken from the client and not yet released by its PUBREL.
        self.awaiting_release: set[int] = set()
        self.next_packet_id = 1
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.pending_will: _Message | None = None
        self.will_expiry_s: int | None = None
        self.will_timer: asyncio.TimerHandle | None = None

    def has_room(self, qos: int) -> bool:
        connection = self.connection
        if connection is None or connection.writing_paused or connection.closed:
            return False
        return qos == 0 or len(self.inflight) < connection.receive_maximum

    def deliver(self, delivery: _Delivery) -> _Queue[_Delivery] | None:
        """Send now or queue; returns the queue when it is full and the publisher should be held."""
        if not self.queue and self.has_room(delivery.qos):
            self.send(delivery)
            return None
        if delivery.qos == 0 and (self.connection is None or self.queue.full):
            self.broker.stats.count_drop("qos0_queue_full_or_offline")
            return None
        self.queue.append(delivery)
        return self.queue if self.queue.full and delivery.qos else None

    def send(self, delivery: _Delivery) -> None:
        connection = self.connection
        assert connection is not None
        now = time.monotonic()
        message = delivery.message
        if message.expired(now):
            self.broker.stats.count_drop("expired")
            return
        packet_id = 0
        if delivery.qos:
            packet_id = self._allocate_packet_id()
        packet = message.encode(
            delivery.qos, packet_id, dup=False, retain=delivery.retain, v5=connection.v5, now=now
        )
        if len(packet) > connection.max_outgoing_packet:
            # MQTT 5 says to discard what the client declared it cannot take, as if delivered.
            self.broker.stats.count_drop("too_large_for_client")
            log.warning(
                "dropped a %d-byte message on %s for client %r, whose maximum packet size is %d",
                len(packet),
                message.topic,
                self.client_id,
                connection.max_outgoing_packet,
            )
            return
        if delivery.qos:
            self.inflight[packet_id] = delivery
        self.broker.stats.messages_sent += 1
        connection.write(packet)

    def resend_inflight(self) -> None:
        connection = self.connection
        assert connection is not None
        now = time.monotonic()
        for packet_id, delivery in self.inflight.items():
            connection.write(
                delivery.message.encode(
                    delivery.qos, packet_id, dup=True, retain=delivery.retain, v5=connection.v5, now=now
                )
            )

    def pump(self) -> None:
        """Send what waits for this session, as far as its window allows."""
        queue = self.queue
        while queue and self.has_room(queue.items[0].qos):
            self.send(queue.popleft())
        if not queue:
            for group in self.groups:
                if group.pending:
                    group.feed(self)

    def _allocate_packet_id(self) -> int:
        packet_id = self.next_packet_id
        while packet_id in self.inflight:
            packet_id = packet_id % 0xFFFF + 1
        self.next_packet_id = packet_id % 0xFFFF + 1
        return packet_id

    def undelivered(self) -> int:
        queued = sum(1 for delivery in self.queue.items if delivery.qos)
        return queued + len(self.inflight)


class _Node:
    __slots__ = ("children", "groups", "subscriptions")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subscriptions: dict[_Session, _Subscription] = {}
        self.groups: dict[str, _SharedGroup] = {}

    def empty(self) -> bool:
        return not (self.children or self.subscriptions or self.groups)


class _TopicTree:
    """Subscriptions by topic filter level, so matching costs the depth of the topic, not the
    number of subscriptions."""

    def __init__(self) -> None:
        self.root = _Node()

    def node(self, topic_filter: str) -> _Node:
        node = self.root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        return node

    def find(self, topic_filter: str) -> _Node | None:
        node: _Node | None = self.root
        for level in topic_filter.split("/"):
            assert node is not None
            node = node.children.get(level)
            if node is None:
                return None
        return node

    def prune(self, topic_filter: str) -> None:
        path = [self.root]
        levels = topic_filter.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        for depth in range(len(levels), 0, -1):
            if not path[depth].empty():
                return
            del path[depth - 1].children[levels[depth - 1]]

    def match(self, topic: str) -> list[_Node]:
        found: list[_Node] = []
        self._match(self.root, topic.split("/"), 0, found, topic.startswith("$"))
        return found

    def _match(self, node: _Node, levels: list[str], index: int, found: list[_Node], dollar: bool) -> None:
        wildcards = not (dollar and index == 0)
        if wildcards:
            rest = node.children.get("#")
            if rest is not None:
                found.append(rest)
        if index == len(levels):
            found.append(node)
            return
        child = node.children.get(levels[index])
        if child is not None:
            self._match(child, levels, index + 1, found, dollar)
        if wildcards:
            plus = node.children.get("+")
            if plus is not None:
                self._match(plus, levels, index + 1, found, dollar)


class _Hold:
    """A publisher's acknowledgement withheld until every full queue it fed has room."""

    __slots__ = ("ack", "queues")

    def __init__(self, ack: bytes | None, queues: set[_Queue[Any]]) -> None:
        self.ack = ack
        self.queues = queues


class _Connection(asyncio.Protocol):
    """One client's network connection; parses packets from the socket buffer one at a time."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.buffer = bytearray()
        self.offset = 0
        self.session: _Session | None = None
        self.client_id = "?"
        self.v5 = False
        self.keepalive_s = 0
        self.receive_maximum = broker.max_inflight_v311
        self.max_outgoing_packet = 268_435_460
        self.connect_expiry = 0
        self.will: _Message | None = None
        self.will_delay_s = 0
        self.will_expiry_s: int | None = None
        self.opened_at = self.last_read = time.monotonic()
        self.closed = False
        self.writing_paused = False
        self.held: _Hold | None = None
        self.out: list[bytes] = []
        self.flush_scheduled = False

    # -- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.broker.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.broker.connections.discard(self)
        if not self.closed:
            log.debug("MQTT client %s (%s) went away: %s", self.client_id, self.peer, exc or "closed")
            self.terminate(will=True)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self.buffer += data
        if self.held is None:
            self.process()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.session is not None and not self.closed:
            self.session.pump()

    # -- reading -----------------------------------------------------------------------------

    def process(self) -> None:
        buffer = self.buffer
        try:
            while not self.closed and self.held is None:
                start = self.offset
                if len(buffer) - start < 1:
                    break
                # Judged before the body arrives, so that a stranger (say, an HTTP client) is
                # turned away at once rather than left waiting for a packet that never completes.
                self.check_first_byte(buffer[start])
                header = _fixed_header(buffer, start)
                if header is None:
                    break
                body_start, length = header
                size = body_start - start + length
                if size > self.broker.max_packet_size:
                    raise _ProtocolError(
                        _PACKET_TOO_LARGE,
                        f"packet of {size} bytes is over the limit of {self.broker.max_packet_size}",
                    )
                end = body_start + length
                if len(buffer) < end:
                    break
                self.offset = end
                self.handle(buffer[start], bytes(buffer[body_start:end]), start)
        except _ProtocolError as error:
            log.warning("closing MQTT connection of client %s (%s): %s", self.client_id, self.peer, error)
            self.terminate(will=True, reason_code=error.reason_code, reason=str(error))
        except Exception:
            log.exception(
                "internal error on the MQTT connection of client %s (%s); closing it",
                self.client_id,
                self.peer,
            )
            self.terminate(will=True, reason_code=_UNSPECIFIED_ERROR)
        finally:
            if self.offset:
                del buffer[: self.offset]
                self.offset = 0

    def check_first_byte(self, first: int) -> None:
        kind, flags = first >> 4, first & 0x0F
        if self.session is None and kind != _CONNECT:
            raise _ProtocolError(_PROTOCOL_ERROR, f"packet type {kind} before CONNECT")
        if kind != _PUBLISH and flags != _FLAGS.get(kind, 0):
            raise _ProtocolError(_MALFORMED, f"packet type {kind} with flags {flags:#x}")

    def handle(self, first: int, body: bytes, start: int) -> None:
        kind, flags = first >> 4, first & 0x0F
        if self.session is None:
            self.on_connect(body)
        elif kind == _PUBLISH:
            self.on_publish(flags, body, start)
        elif kind == _PUBACK:
            self.on_puback(body)
        elif kind == _PUBREL:
            self.on_pubrel(body)
        elif kind == _SUBSCRIBE:
            self.on_subscribe(body)
        elif kind == _UNSUBSCRIBE:
            self.on_unsubscribe(body)
        elif kind == _PINGREQ:
            self.write(_PINGRESP_PACKET)
        elif kind == _DISCONNECT:
            self.on_disconnect(body)
        elif kind in (_PUBREC, _PUBCOMP):
            raise _ProtocolError(_PROTOCOL_ERROR, "PUBREC/PUBCOMP for a message the broker sent at QoS 1")
        elif kind == _CONNECT:
            raise _ProtocolError(_PROTOCOL_ERROR, "second CONNECT")
        elif kind == _AUTH:
            raise _ProtocolError(_PROTOCOL_ERROR, "AUTH without an authentication method")
        else:
            raise _ProtocolError(_MALFORMED, f"packet type {kind} is not one a client sends")

    # -- writing -----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        # Many packets written in one turn of the loop go out in one system call.
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.broker.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
        self.out.clear()

    # -- holding publishers ------------------------------------------------------------------

    def hold(self, ack: bytes | None, queues: set[_Queue[Any]]) -> None:
        assert self.transport is not None
        self.held = _Hold(ack, queues)
        self.broker.stats.publishers_held += 1
        self.transport.pause_reading()
        for queue in queues:
            queue.waiters.append(self)

    def queue_has_room(self, queue: _Queue[Any]) -> None:
        held = self.held
        if held is None or self.closed:
            return
        if queue.full:
            queue.waiters.append(self)
            return
        held.queues.discard(queue)
        if not held.queues:
            self.broker.loop.call_soon(self.release)

    def release(self) -> None:
        held = self.held
        if held is None or held.queues or self.closed:
            return
        self.held = None
        if held.ack is not None:
            self.write(held.ack)
        assert self.transport is not None
        self.transport.resume_reading()
        self.last_read = time.monotonic()
        self.process()

    # -- closing -----------------------------------------------------------------------------

    def terminate(self, *, will: bool, reason_code: int | None = None, reason: str = "") -> None:
        """Close the connection and detach it from its session; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.v5 and self.session is not None and reason_code is not None:
            properties = b""
            if reason:
                encoded = _utf8_field(reason[:200])
                if len(encoded) + 8 <= self.max_outgoing_packet:
                    properties = b"\x1f" + encoded
            self.out.append(
                _packet(_DISCONNECT << 4, bytes((reason_code,)) + _varint(len(properties)) + properties)
            )
        self.flush()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            self.broker.loop.call_later(_CLOSE_GRACE_S, transport.abort)
        self.broker.detach(self, publish_will=will)

    # -- packets -----------------------------------------------------------------------------

    def on_connect(self, body: bytes) -> None:
        reader = _Reader(body)
        name = reader.utf8("protocol name")
        level = reader.u8()
        if name not in ("MQTT", "MQIsdp"):
            raise _ProtocolError(_PROTOCOL_ERROR, f"unknown protocol name {name!r}")
        if level not in (_V311, _V5):
            log.warning(
                "refusing MQTT connection from %s: protocol level %d (only 4, MQTT 3.1.1, and 5)",
                self.peer,
                level,
            )
            if level < _V5:
                self.write(bytes((_CONNACK << 4, 2, 0, 1)))
            else:
                self.write(bytes((_CONNACK << 4, 3, 0, _UNSUPPORTED_VERSION, 0)))
            self.terminate(will=False)
            return
        self.v5 = level == _V5
        try:
            self._accept(reader)
        except _ProtocolError as error:
            # A v5 client is told why; a 3.1.1 client that sent a bad CONNECT just loses the line.
            if self.v5:
                self.write(bytes((_CONNACK << 4, 3, 0, error.reason_code, 0)))
            raise

    def _accept(self, reader: _Reader) -> None:
        flags = reader.u8()
        if flags & 0x01:
            raise _ProtocolError(_MALFORMED, "reserved CONNECT flag set")
        self.keepalive_s = reader.u16()
        properties: dict[int, Any] = {}
        if self.v5:
            properties, _ = reader.properties(_CONNECT_PROPERTIES)
        client_id = reader.utf8("client id")
        will_qos = (flags >> 3) & 0x03
        if flags & 0x04:
            will_properties: dict[int, Any] = {}
            forwarded = b""
            if self.v5:
                will_properties, forwarded = reader.properties(_WILL_PROPERTIES, _FORWARDED_PROPERTIES)
            will_topic = reader.utf8("will topic")
            _check_topic_name(will_topic)
            will_payload = reader.binary()
            if will_qos == 3:
                raise _ProtocolError(_MALFORMED, "will QoS 3")
            self.will_delay_s = will_properties.get(_WILL_DELAY, 0)
            self.will_expiry_s = will_properties.get(_MESSAGE_EXPIRY)
            self.will = _Message(
                will_topic,
                will_payload,
                will_qos,
                bool(flags & 0x20),
                properties=forwarded,
                publisher=client_id,
            )
        elif flags & 0x38:
            raise _ProtocolError(_MALFORMED, "will QoS or retain without a will")
        if flags & 0x80:
            reader.utf8("user name")
        elif flags & 0x40 and not self.v5:
            raise _ProtocolError(_MALFORMED, "password without a user name")
        if flags & 0x40:
            reader.binary()
        if not reader.at_end():
            raise _ProtocolError(_MALFORMED, "bytes after the CONNECT payload")
        if _AUTH_METHOD in properties:
            raise _ProtocolError(_BAD_AUTH_METHOD, "enhanced authentication is not supported")
        clean = bool(flags & 0x02)
        assigned = False
        if not client_id:
            if not self.v5 and not clean:
                self.write(bytes((_CONNACK << 4, 2, 0, 2)))
                raise _ProtocolError(_CLIENT_ID_INVALID, "empty client id with clean_session=0")
            client_id = f"auto-{uuid.uuid4().hex}"
            assigned = True
        if self.v5:
            self.receive_maximum = properties.get(_RECEIVE_MAXIMUM, 65_535)
            if self.receive_maximum == 0:
                raise _ProtocolError(_PROTOCOL_ERROR, "Receive Maximum 0")
            if properties.get(_MAX_PACKET_SIZE, 1) == 0:
                raise _ProtocolError(_PROTOCOL_ERROR, "Maximum Packet Size 0")
            self.max_outgoing_packet = properties.get(_MAX_PACKET_SIZE, self.max_outgoing_packet)
            self.connect_expiry = properties.get(_SESSION_EXPIRY, 0)
            expiry_s = math.inf if self.connect_expiry == _NEVER_EXPIRES else float(self.connect_expiry)
        else:
            expiry_s = 0.0 if clean else math.inf
        self.client_id = client_id
        session, present = self.broker.attach(self, client_id, clean=clean, expiry_s=expiry_s)
        properties_out = b""
        if self.v5:
            properties_out = b"\x27" + _U32_PACK(self.broker.max_packet_size) + b"\x29\x00"
            if assigned:
                properties_out += b"\x12" + _utf8_field(client_id)
            connack = bytes((int(present), _SUCCESS)) + _varint(len(properties_out)) + properties_out
        else:
            connack = bytes((int(present), 0))
        self.write(_packet(_CONNACK << 4, connack))
        log.debug(
            "MQTT client %s connected from %s (MQTT %s, clean %s, session present %s)",
            client_id,
            self.peer,
            "5" if self.v5 else "3.1.1",
            clean,
            present,
        )
        session.resend_inflight()
        session.pump()

    def on_publish(self, flags: int, body: bytes, start: int) -> None:
        session = self.session
        assert session is not None
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise _ProtocolError(_MALFORMED, "PUBLISH with QoS 3")
        if qos == 0 and flags & 0x08:
            raise _ProtocolError(_MALFORMED, "DUP set on a QoS 0 PUBLISH")
        reader = _Reader(body)
        topic = reader.utf8("topic name")
        packet_id = 0
        if qos:
            packet_id = reader.u16()
            if packet_id == 0:
                raise _ProtocolError(_MALFORMED, "packet id 0")
        forwarded = b""
        expires_at: float | None = None
        if self.v5:
            properties, forwarded = reader.properties(_PUBLISH_PROPERTIES, _FORWARDED_PROPERTIES)
            if _TOPIC_ALIAS in properties:
                raise _ProtocolError(
                    _ALIAS_INVALID, "topic aliases are not supported (Topic Alias Maximum 0)"
                )
            if _SUBSCRIPTION_ID in properties:
                raise _ProtocolError(_PROTOCOL_ERROR, "subscription identifier in a client's PUBLISH")
            if _MESSAGE_EXPIRY in properties:
                expires_at = time.monotonic() + properties[_MESSAGE_EXPIRY]
        _check_topic_name(topic)
        if self.broker.draining:
            # Not acknowledged, so the publisher keeps it and sends it again to the next broker.
            self.offset = start
            self.hold(None, set())
            return
        ack = b""
        if qos == 1:
            ack = bytes((_PUBACK << 4, 2)) + _U16_PACK(packet_id)
        elif qos == 2:
            ack = bytes((_PUBREC << 4, 2)) + _U16_PACK(packet_id)
            if packet_id in session.awaiting_release:
                self.write(ack)  # a resend of a message already routed
                return
            session.awaiting_release.add(packet_id)
        self.broker.stats.messages_received += 1
        message = _Message(
            topic,
            reader.rest(),
            qos,
            bool(flags & 0x01),
            properties=forwarded,
            expires_at=expires_at,
            publisher=session.client_id,
        )
        full = self.broker.publish(message, publisher=session)
        if full:
            self.hold(ack or None, full)
        elif ack:
            self.write(ack)

    def on_puback(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        packet_id = _Reader(body).u16()
        if session.inflight.pop(packet_id, None) is None:
            log.debug("MQTT client %s acknowledged unknown packet id %d", self.client_id, packet_id)
        else:
            self.broker.stats.messages_acked += 1
        session.pump()
        if self.broker.draining:
            self.broker.progress.set()

    def on_pubrel(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        packet_id = _Reader(body).u16()
        if packet_id in session.awaiting_release:
            session.awaiting_release.discard(packet_id)
            self.write(bytes((_PUBCOMP << 4, 2)) + _U16_PACK(packet_id))
        elif self.v5:
            self.write(bytes((_PUBCOMP << 4, 3)) + _U16_PACK(packet_id) + bytes((_PACKET_ID_NOT_FOUND,)))
        else:
            self.write(bytes((_PUBCOMP << 4, 2)) + _U16_PACK(packet_id))

    def on_subscribe(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        reader = _Reader(body)
        packet_id = reader.u16()
        if self.v5:
            properties, _ = reader.properties(_SUBSCRIBE_PROPERTIES)
            if _SUBSCRIPTION_ID in properties:
                raise _ProtocolError(_SUB_IDS_UNSUPPORTED, "subscription identifiers are not supported")
        requests: list[tuple[str, int]] = []
        while not reader.at_end():
            requests.append((reader.utf8("topic filter"), reader.u8()))
        if not requests:
            raise _ProtocolError(_PROTOCOL_ERROR, "SUBSCRIBE without a topic filter")
        codes = bytearray()
        retained: list[tuple[str, int, bool]] = []
        for text, options in requests:
            if options & (0xC0 if self.v5 else 0xFC) or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
                raise _ProtocolError(_MALFORMED, f"subscription options {options:#x} for {text!r}")
            parsed = _split_filter(text)
            if parsed is None:
                codes.append(_FILTER_INVALID if self.v5 else 0x80)
                continue
            group, topic_filter = parsed
            no_local = self.v5 and bool(options & 0x04)
            if group is not None and no_local:
                raise _ProtocolError(_PROTOCOL_ERROR, f"no-local on shared subscription {text!r}")
            granted = min(options & 0x03, 1)
            is_new = self.broker.subscribe(
                session,
                text,
                group,
                topic_filter,
                granted,
                no_local=no_local,
                retain_as_published=self.v5 and bool(options & 0x08),
            )
            codes.append(granted)
            retain_handling = (options >> 4) & 0x03 if self.v5 else 0
            if group is None and (retain_handling == 0 or (retain_handling == 1 and is_new)):
                retained.append((topic_filter, granted, is_new))
        head = _U16_PACK(packet_id) + (b"\x00" if self.v5 else b"")
        self.write(_packet(_SUBACK << 4, head + bytes(codes)))
        for topic_filter, granted, _ in retained:
            self.broker.send_retained(session, topic_filter, granted)

    def on_unsubscribe(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        reader = _Reader(body)
        packet_id = reader.u16()
        if self.v5:
            reader.properties(_UNSUBSCRIBE_PROPERTIES)
        texts: list[str] = []
        while not reader.at_end():
            texts.append(reader.utf8("topic filter"))
        if not texts:
            raise _ProtocolError(_PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter")
        codes = bytes(
            _SUCCESS if self.broker.unsubscribe(session, text) else _NO_SUBSCRIPTION_EXISTED for text in texts
        )
        body_out = _U16_PACK(packet_id) + (b"\x00" + codes if self.v5 else b"")
        self.write(_packet(_UNSUBACK << 4, body_out))

    def on_disconnect(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        reason_code = _SUCCESS
        if self.v5 and body:
            reader = _Reader(body)
            reason_code = reader.u8()
            if not reader.at_end():
                properties, _ = reader.properties(_DISCONNECT_PROPERTIES)
                if _SESSION_EXPIRY in properties:
                    expiry = properties[_SESSION_EXPIRY]
                    if self.connect_expiry == 0 and expiry != 0:
                        raise _ProtocolError(
                            _PROTOCOL_ERROR, "DISCONNECT sets a session expiry after CONNECT set none"
                        )
                    session.expiry_s = math.inf if expiry == _NEVER_EXPIRES else float(expiry)
        # Reason 0x04 is "disconnect with will message": the client asks for its will.
        if reason_code != 0x04:
            self.will = None
        log.debug("MQTT client %s disconnected (reason 0x%02x)", self.client_id, reason_code)
        self.terminate(will=True)


class BrokerStats:
    """Counters for logs, tests and `/metrics`."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.messages_received = 0
        self.messages_sent = 0
        self.messages_acked = 0
        self.publishers_held = 0
        self.dropped: collections.Counter[str] = collections.Counter()

    def count_drop(self, reason: str) -> None:
        self.dropped[reason] += 1


class EmbeddedBroker(Component):
    """An MQTT 3.1.1/5.0 broker in the running event loop. See the module documentation."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        max_queued_per_session: int = DEFAULT_MAX_QUEUED_PER_SESSION,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        max_inflight_v311: int = DEFAULT_MAX_INFLIGHT_V311,
        drain_timeout_s: float = 5.0,
        max_session_expiry_s: float = DEFAULT_MAX_SESSION_EXPIRY_S,
    ) -> None:
        if max_session_expiry_s <= 0:
            raise ValueError("the longest session expiry must be positive")
        if max_queued_per_session < 1 or max_inflight_v311 < 1 or not 2 <= max_packet_size <= 268_435_460:
            raise ValueError("queue and in-flight limits must be positive; packet size 2 B to 256 MiB")
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self.max_queued_per_session = max_queued_per_session
        self.max_packet_size = max_packet_size
        self.max_inflight_v311 = max_inflight_v311
        self.drain_timeout_s = drain_timeout_s
        self.max_session_expiry_s = max_session_expiry_s
        self.stats = BrokerStats()
        self.connections: set[_Connection] = set()
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, _Message] = {}
        self.draining = False
        # Set on every acknowledgement and disconnection while draining, to re-check what is left.
        self.progress = asyncio.Event()
        self._tree = _TopicTree()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the broker is not started"
        return self._loop

    @property
    def port(self) -> int:
        """The port listened on (the one picked by the system when 0 was asked for)."""
        if self._port is None:
            raise RuntimeError("the embedded MQTT broker has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.draining = False
        try:
            self._server = await self._loop.create_server(
                lambda: _Connection(self), self.host, self._requested_port
            )
        except OSError as exc:
            raise ServiceUnavailableError(
                f"the embedded MQTT broker cannot listen on {self.host}:{self._requested_port}"
                f" ({exc.strerror or exc}); is another broker running there? Stop it, or set"
                " IOC_MQTT_URL to use it instead"
            ) from exc
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = asyncio.create_task(self._sweep(), name="mqtt-broker-keepalive")
        log.info("embedded MQTT broker listening on %s (MQTT 3.1.1 and 5, no authentication)", self.url)
        if not _is_loopback(self.host):
            log.warning(
                "the embedded MQTT broker listens on %s without authentication or TLS; it is meant for"
                " one machine and must not be reachable from a network",
                self.host,
            )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self.draining = True
        deadline = time.monotonic() + self.drain_timeout_s
        while self._deliverable() and (remaining := deadline - time.monotonic()) > 0:
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), remaining)
        undelivered = sum(session.undelivered() for session in self.sessions.values())
        undelivered += sum(sum(1 for m in group.pending.items if m.qos) for group in self._groups())
        if undelivered:
            log.warning(
                "embedded MQTT broker stopping with %d QoS 1 messages not delivered to their subscribers;"
                " they are lost with it",
                undelivered,
            )
        for connection in list(self.connections):
            connection.terminate(will=False, reason_code=_SHUTTING_DOWN)
        for session in self.sessions.values():
            for timer in (session.expiry_timer, session.will_timer):
                if timer is not None:
                    timer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await server.wait_closed()
        self.sessions.clear()
        self.retained.clear()
        self._tree = _TopicTree()
        log.info("embedded MQTT broker on port %d stopped", self._port)

    def metrics(self) -> list[Metric]:
        stats = self.stats
        dropped = Metric("ioc_mqtt_broker_dropped_total", "counter", "messages not delivered, by reason")
        for reason, count in sorted(stats.dropped.items()):
            dropped.add(count, reason=reason)
        queued = sum(len(s.queue) for s in self.sessions.values()) + sum(
            len(g.pending) for g in self._groups()
        )
        return [
            Metric("ioc_mqtt_broker_connections", "gauge", "open client connections").add(
                len(self.connections)
            ),
            Metric("ioc_mqtt_broker_sessions", "gauge", "sessions, connected or kept").add(
                len(self.sessions)
            ),
            Metric("ioc_mqtt_broker_received_total", "counter", "messages published to the broker").add(
                stats.messages_received
            ),
            Metric("ioc_mqtt_broker_sent_total", "counter", "message copies sent to subscribers").add(
                stats.messages_sent
            ),
            Metric("ioc_mqtt_broker_queued", "gauge", "messages waiting for a subscriber").add(queued),
            Metric("ioc_mqtt_broker_publishers_held_total", "counter", "times a publisher waited").add(
                stats.publishers_held
            ),
            dropped,
        ]

    # -- sessions ----------------------------------------------------------------------------

    def attach(
        self, connection: _Connection, client_id: str, *, clean: bool, expiry_s: float
    ) -> tuple[_Session, bool]:
        """Bind a connection to its session, taking over from an older connection; returns the
        session and whether it existed before."""
        self.stats.connections_total += 1
        existing = self.sessions.get(client_id)
        if existing is not None:
            if existing.connection is not None:
                log.debug("MQTT client %s connected again; closing its older connection", client_id)
                existing.connection.terminate(will=True, reason_code=_TAKEN_OVER, reason="session taken over")
            # A new connection cancels a will still waiting for its delay.
            if existing.will_timer is not None:
                existing.will_timer.cancel()
                existing.will_timer = None
                existing.pending_will = None
            if existing.expiry_timer is not None:
                existing.expiry_timer.cancel()
                existing.expiry_timer = None
            existing = self.sessions.get(client_id)
        if clean and existing is not None:
            self.end_session(existing)
            existing = None
        session = existing or _Session(self, client_id)
        session.connection = connection
        session.expiry_s = expiry_s
        connection.session = session
        self.sessions[client_id] = session
        return session, existing is not None

    def detach(self, connection: _Connection, *, publish_will: bool) -> None:
        session = connection.session
        will = connection.will if publish_will else None
        connection.will = None
        if session is None or session.connection is not connection:
            return
        session.connection = None
        self.progress.set()
        self._return_shared(session, ending=False)
        if session.expiry_s == 0:
            self.end_session(session)
        else:
            # A persistent session nobody comes back for (an MQTT 3.1.1 one never expires by the
            # protocol) would queue its subscriptions' messages until it held every publisher up.
            expiry_s = min(session.expiry_s, self.max_session_expiry_s)
            session.expiry_timer = self.loop.call_later(expiry_s, self._expire, session)
        if will is not None:
            if connection.will_delay_s and self.sessions.get(session.client_id) is session:
                session.pending_will = will
                session.will_expiry_s = connection.will_expiry_s
                session.will_timer = self.loop.call_later(
                    connection.will_delay_s, self._publish_pending_will, session
                )
            else:
                self._publish_will(will, connection.will_expiry_s)

    def _return_shared(self, session: _Session, *, ending: bool) -> None:
        """Give shared-subscription messages a session took and did not acknowledge back to their
        groups, in front: all of them when the session ends; when it only lost its connection,
        those of groups where another member is connected and can take them now. The others stay
        in flight, to be resent with the same packet ids when the session returns, so that an
        acknowledgement it sends late can never be taken for one of another message."""
        returned: list[tuple[int, _Delivery]] = []
        for packet_id, delivery in session.inflight.items():
            group = delivery.group
            if group is not None and (
                ending or any(m.connection is not None for m in group.order if m is not session)
            ):
                returned.append((packet_id, delivery))
        groups: set[_SharedGroup] = set()
        for packet_id, delivery in reversed(returned):
            del session.inflight[packet_id]
            assert delivery.group is not None
            delivery.group.pending.appendleft(delivery.message)
            groups.add(delivery.group)
        for group in groups:
            group.feed_all()

    def _publish_will(self, will: _Message, expiry_s: int | None) -> None:
        # A will's message expiry counts from when it is published, not from the CONNECT.
        if expiry_s is not None:
            will.expires_at = time.monotonic() + expiry_s
        self.publish(will, publisher=None)

    def _publish_pending_will(self, session: _Session) -> None:
        will, session.pending_will, session.will_timer = session.pending_will, None, None
        if will is not None:
            self._publish_will(will, session.will_expiry_s)

    def _expire(self, session: _Session) -> None:
        session.expiry_timer = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            log.debug("MQTT session of %s expired", session.client_id)
            self.end_session(session)

    def end_session(self, session: _Session) -> None:
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None
        if session.will_timer is not None:
            session.will_timer.cancel()
            self._publish_pending_will(session)
        # While it is still a member, so that a group it leaves empty counts them as lost.
        self._return_shared(session, ending=True)
        for text in list(session.subscriptions):
            self.unsubscribe(session, text)
        undelivered = session.undelivered()
        if undelivered:
            log.info(
                "MQTT session of %s ended with %d QoS 1 messages it had not taken",
                session.client_id,
                undelivered,
            )
            self.stats.dropped["session_ended"] += undelivered
        session.inflight.clear()
        session.queue.clear()

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe(
        self,
        session: _Session,
        text: str,
        group_name: str | None,
        topic_filter: str,
        qos: int,
        *,
        no_local: bool,
        retain_as_published: bool,
    ) -> bool:
        """Add or replace a subscription; returns whether it is new."""
        node = self._tree.node(topic_filter)
        group: _SharedGroup | None = None
        if group_name is not None:
            group = node.groups.get(group_name)
            if group is None:
                group = node.groups[group_name] = _SharedGroup(self, group_name, topic_filter)
        subscription = _Subscription(
            session, text, qos, no_local=no_local, retain_as_published=retain_as_published, group=group
        )
        is_new = text not in session.subscriptions
        session.subscriptions[text] = subscription
        if group is not None:
            if group not in session.groups:
                session.groups.append(group)
            group.add(subscription)
            group.feed(session)
        else:
            node.subscriptions[session] = subscription
        return is_new

    def unsubscribe(self, session: _Session, text: str) -> bool:
        subscription = session.subscriptions.pop(text, None)
        if subscription is None:
            return False
        group = subscription.group
        topic_filter = group.filter if group is not None else text
        node = self._tree.find(topic_filter)
        if group is not None and group in session.groups:
            session.groups.remove(group)
        if node is not None:
            if group is not None:
                group.remove(session)
                if not group.members:
                    del node.groups[group.name]
                    lost = sum(1 for message in group.pending.clear() if message.qos)
                    if lost:
                        log.warning(
                            "MQTT shared subscription $share/%s/%s lost its last member with %d messages"
                            " waiting; they are dropped",
                            group.name,
                            group.filter,
                            lost,
                        )
                        self.stats.dropped["shared_group_ended"] += lost
            else:
                node.subscriptions.pop(session, None)
            self._tree.prune(topic_filter)
        return True

    def send_retained(self, session: _Session, topic_filter: str, granted: int) -> None:
        levels = topic_filter.split("/")
        now = time.monotonic()
        for topic, message in list(self.retained.items()):
            if message.expired(now):
                del self.retained[topic]
            elif _filter_matches(levels, topic):
                session.deliver(_Delivery(message, min(message.qos, granted), True, None))

    def _groups(self) -> Iterable[_SharedGroup]:
        stack = [self._tree.root]
        while stack:
            node = stack.pop()
            yield from node.groups.values()
            stack.extend(node.children.values())

    # -- routing -----------------------------------------------------------------------------

    def publish(self, message: _Message, *, publisher: _Session | None) -> set[_Queue[Any]]:
        """Route a message to every matching subscription; returns the queues that are full and
        on which the publisher should wait."""
        if message.retain:
            if message.payload:
                self.retained[message.topic] = message
            else:
                self.retained.pop(message.topic, None)
        nodes = self._tree.match(message.topic)
        chosen: dict[_Session, _Subscription] = {}
        rap: set[_Session] = set()
        for node in nodes:
            for session, subscription in node.subscriptions.items():
                if subscription.no_local and session is publisher:
                    continue
                current = chosen.get(session)
                if current is None or subscription.qos > current.qos:
                    chosen[session] = subscription
                if subscription.retain_as_published:
                    rap.add(session)
        full: set[_Queue[Any]] = set()
        for session, subscription in chosen.items():
            delivery = _Delivery(
                message, min(message.qos, subscription.qos), message.retain and session in rap, None
            )
            queue = session.deliver(delivery)
            if queue is not None and session is not publisher:
                full.add(queue)
        for node in nodes:
            for group in list(node.groups.values()):
                pending = group.dispatch(message)
                if pending is not None and (publisher is None or publisher not in group.members):
                    full.add(pending)
        return full

    # -- housekeeping ------------------------------------------------------------------------

    def _deliverable(self) -> bool:
        for session in self.sessions.values():
            if session.connection is not None and (session.inflight or session.queue):
                return True
        return any(
            group.pending and any(s.connection is not None for s in group.order) for group in self._groups()
        )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.closed or connection.held is not None:
                    continue  # a held publisher is silent because we stopped reading it
                if connection.session is None:
                    if now - connection.opened_at > _CONNECT_TIMEOUT_S:
                        log.debug("closing MQTT connection from %s: no CONNECT in time", connection.peer)
                        connection.terminate(will=False)
                elif connection.keepalive_s and now - connection.last_read > 1.5 * connection.keepalive_s:
                    log.debug(
                        "MQTT client %s silent for 1.5 times its keep-alive of %d s; closing",
                        connection.client_id,
                        connection.keepalive_s,
                    )
                    connection.terminate(
                        will=True, reason_code=_KEEPALIVE_TIMEOUT, reason="keep-alive timeout"
                    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
