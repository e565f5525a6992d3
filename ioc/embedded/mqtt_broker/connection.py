"""One client's network connection to the embedded broker: reading packets off the socket, the
CONNECT handshake and the handling of every other packet a client sends, batching writes, holding
a publisher whose messages filled a queue, and closing with a reason code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

from ioc.embedded.mqtt_broker.protocol import (
    ALIAS_INVALID,
    AUTH,
    CLIENT_ID_INVALID,
    CONNACK,
    CONNECT,
    DISCONNECT,
    DISCONNECT_PROPERTIES,
    FILTER_INVALID,
    FLAGS,
    FORWARDED_PROPERTIES,
    MALFORMED,
    MAX_PACKET_SIZE,
    MESSAGE_EXPIRY,
    NEVER_EXPIRES,
    NO_SUBSCRIPTION_EXISTED,
    NOT_AUTHORIZED,
    PACKET_ID_NOT_FOUND,
    PACKET_TOO_LARGE,
    PINGREQ,
    PINGRESP_PACKET,
    PROTOCOL_ERROR,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBLISH_PROPERTIES,
    PUBREC,
    PUBREL,
    RECEIVE_MAXIMUM,
    SESSION_EXPIRY,
    SUB_IDS_UNSUPPORTED,
    SUBACK,
    SUBSCRIBE,
    SUBSCRIBE_PROPERTIES,
    SUBSCRIPTION_ID,
    SUCCESS,
    TOPIC_ALIAS,
    U16_PACK,
    U32_PACK,
    UNSPECIFIED_ERROR,
    UNSUBACK,
    UNSUBSCRIBE,
    UNSUBSCRIBE_PROPERTIES,
    UNSUPPORTED_VERSION,
    V5,
    V311,
    ConnectRequest,
    Message,
    ProtocolError,
    Reader,
    check_topic_name,
    encode_packet,
    encode_varint,
    fixed_header,
    read_connect,
    split_filter,
    utf8_field,
)
from ioc.embedded.mqtt_broker.session import Queue, Session

if TYPE_CHECKING:
    from ioc.embedded.mqtt_broker.server import EmbeddedBroker

log = logging.getLogger(__name__)

# A socket whose buffer holds more than this is not given further messages until it drains.
_WRITE_HIGH_WATER = 256 * 1024
# After close(), a peer that does not read what we still have to send is cut off this much later.
_CLOSE_GRACE_S = 2.0


class _Hold:
    """A publisher's acknowledgement withheld until every full queue it fed has room."""

    __slots__ = ("ack", "queues")

    def __init__(self, ack: bytes | None, queues: set[Queue[Any]]) -> None:
        self.ack = ack
        self.queues = queues


class Connection(asyncio.Protocol):
    """One client's network connection; parses packets from the socket buffer one at a time."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.buffer = bytearray()
        self.offset = 0
        self.session: Session | None = None
        self.client_id = "?"
        self.v5 = False
        self.keepalive_s = 0
        self.receive_maximum = broker.max_inflight_v311
        self.max_outgoing_packet = 268_435_460
        self.connect_expiry = 0
        self.will: Message | None = None
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
                header = fixed_header(buffer, start)
                if header is None:
                    break
                body_start, length = header
                size = body_start - start + length
                if size > self.broker.max_packet_size:
                    raise ProtocolError(
                        PACKET_TOO_LARGE,
                        f"packet of {size} bytes is over the limit of {self.broker.max_packet_size}",
                    )
                end = body_start + length
                if len(buffer) < end:
                    break
                self.offset = end
                self.handle(buffer[start], bytes(buffer[body_start:end]), start)
        except ProtocolError as error:
            log.warning("closing MQTT connection of client %s (%s): %s", self.client_id, self.peer, error)
            self.terminate(will=True, reason_code=error.reason_code, reason=str(error))
        except Exception:
            log.exception(
                "internal error on the MQTT connection of client %s (%s); closing it",
                self.client_id,
                self.peer,
            )
            self.terminate(will=True, reason_code=UNSPECIFIED_ERROR)
        finally:
            if self.offset:
                del buffer[: self.offset]
                self.offset = 0

    def check_first_byte(self, first: int) -> None:
        kind, flags = first >> 4, first & 0x0F
        if self.session is None and kind != CONNECT:
            raise ProtocolError(PROTOCOL_ERROR, f"packet type {kind} before CONNECT")
        if kind != PUBLISH and flags != FLAGS.get(kind, 0):
            raise ProtocolError(MALFORMED, f"packet type {kind} with flags {flags:#x}")

    def handle(self, first: int, body: bytes, start: int) -> None:
        kind, flags = first >> 4, first & 0x0F
        if self.session is None:
            self.on_connect(body)
        elif kind == PUBLISH:
            self.on_publish(flags, body, start)
        elif kind == PUBACK:
            self.on_puback(body)
        elif kind == PUBREL:
            self.on_pubrel(body)
        elif kind == SUBSCRIBE:
            self.on_subscribe(body)
        elif kind == UNSUBSCRIBE:
            self.on_unsubscribe(body)
        elif kind == PINGREQ:
            self.write(PINGRESP_PACKET)
        elif kind == DISCONNECT:
            self.on_disconnect(body)
        elif kind in (PUBREC, PUBCOMP):
            raise ProtocolError(PROTOCOL_ERROR, "PUBREC/PUBCOMP for a message the broker sent at QoS 1")
        elif kind == CONNECT:
            raise ProtocolError(PROTOCOL_ERROR, "second CONNECT")
        elif kind == AUTH:
            raise ProtocolError(PROTOCOL_ERROR, "AUTH without an authentication method")
        else:
            raise ProtocolError(MALFORMED, f"packet type {kind} is not one a client sends")

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

    def hold(self, ack: bytes | None, queues: set[Queue[Any]]) -> None:
        assert self.transport is not None
        self.held = _Hold(ack, queues)
        self.broker.stats.publishers_held += 1
        self.transport.pause_reading()
        for queue in queues:
            queue.waiters.append(self)

    def queue_has_room(self, queue: Queue[Any]) -> None:
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
                encoded = utf8_field(reason[:200])
                if len(encoded) + 8 <= self.max_outgoing_packet:
                    properties = b"\x1f" + encoded
            self.out.append(
                encode_packet(
                    DISCONNECT << 4, bytes((reason_code,)) + encode_varint(len(properties)) + properties
                )
            )
        self.flush()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            self.broker.loop.call_later(_CLOSE_GRACE_S, transport.abort)
        self.broker.detach(self, publish_will=will)

    # -- packets -----------------------------------------------------------------------------

    def on_connect(self, body: bytes) -> None:
        reader = Reader(body)
        name = reader.utf8("protocol name")
        level = reader.u8()
        if name not in ("MQTT", "MQIsdp"):
            raise ProtocolError(PROTOCOL_ERROR, f"unknown protocol name {name!r}")
        if level not in (V311, V5):
            log.warning(
                "refusing MQTT connection from %s: protocol level %d (only 4, MQTT 3.1.1, and 5)",
                self.peer,
                level,
            )
            if level < V5:
                self.write(bytes((CONNACK << 4, 2, 0, 1)))
            else:
                self.write(bytes((CONNACK << 4, 3, 0, UNSUPPORTED_VERSION, 0)))
            self.terminate(will=False)
            return
        self.v5 = level == V5
        try:
            self._accept(reader)
        except ProtocolError as error:
            # A v5 client is told why; a 3.1.1 client that sent a bad CONNECT just loses the line.
            if self.v5:
                self.write(bytes((CONNACK << 4, 3, 0, error.reason_code, 0)))
            raise

    def _accept(self, reader: Reader) -> None:
        request = read_connect(reader, v5=self.v5)
        self.keepalive_s = request.keepalive_s
        self.will = request.will
        self.will_delay_s = request.will_delay_s
        self.will_expiry_s = request.will_expiry_s
        client_id, assigned = self._client_id(request)
        if not self.broker.may_take(client_id, request.password):
            self._refuse_client_id(client_id)
            return
        expiry_s = self._take_limits(request)
        self.client_id = client_id
        session, present = self.broker.attach(self, client_id, clean=request.clean, expiry_s=expiry_s)
        self._send_connack(client_id, present=present, assigned=assigned)
        log.debug(
            "MQTT client %s connected from %s (MQTT %s, clean %s, session present %s)",
            client_id,
            self.peer,
            "5" if self.v5 else "3.1.1",
            request.clean,
            present,
        )
        session.resend_inflight()
        session.pump()

    def _client_id(self, request: ConnectRequest) -> tuple[str, bool]:
        """The client id asked for, or one assigned to a client that sent none; and whether it
        was assigned."""
        if request.client_id:
            return request.client_id, False
        if not self.v5 and not request.clean:
            self.write(bytes((CONNACK << 4, 2, 0, 2)))
            raise ProtocolError(CLIENT_ID_INVALID, "empty client id with clean_session=0")
        return f"auto-{uuid.uuid4().hex}", True

    def _refuse_client_id(self, client_id: str) -> None:
        """Refuse a connection that claims a protected client id without its password, before it
        touches the session of that id (and the connection holding it now)."""
        self.broker.stats.connections_refused["client_id_protected"] += 1
        log.warning(
            "refused an MQTT connection from %s claiming the protected client id %s", self.peer, client_id
        )
        # 3.1.1 return code 5 and MQTT 5 reason 0x87 both say "not authorized".
        self.write(
            bytes((CONNACK << 4, 3, 0, NOT_AUTHORIZED, 0)) if self.v5 else bytes((CONNACK << 4, 2, 0, 5))
        )
        self.terminate(will=False)

    def _take_limits(self, request: ConnectRequest) -> float:
        """Adopt the MQTT 5 limits the client declared; returns how long its session outlives the
        connection, in seconds."""
        if not self.v5:
            return 0.0 if request.clean else math.inf
        properties = request.properties
        self.receive_maximum = properties.get(RECEIVE_MAXIMUM, 65_535)
        if self.receive_maximum == 0:
            raise ProtocolError(PROTOCOL_ERROR, "Receive Maximum 0")
        if properties.get(MAX_PACKET_SIZE, 1) == 0:
            raise ProtocolError(PROTOCOL_ERROR, "Maximum Packet Size 0")
        self.max_outgoing_packet = properties.get(MAX_PACKET_SIZE, self.max_outgoing_packet)
        self.connect_expiry = properties.get(SESSION_EXPIRY, 0)
        return math.inf if self.connect_expiry == NEVER_EXPIRES else float(self.connect_expiry)

    def _send_connack(self, client_id: str, *, present: bool, assigned: bool) -> None:
        if self.v5:
            properties_out = b"\x27" + U32_PACK(self.broker.max_packet_size) + b"\x29\x00"
            if assigned:
                properties_out += b"\x12" + utf8_field(client_id)
            connack = bytes((int(present), SUCCESS)) + encode_varint(len(properties_out)) + properties_out
        else:
            connack = bytes((int(present), 0))
        self.write(encode_packet(CONNACK << 4, connack))

    def on_publish(self, flags: int, body: bytes, start: int) -> None:
        session = self.session
        assert session is not None
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise ProtocolError(MALFORMED, "PUBLISH with QoS 3")
        if qos == 0 and flags & 0x08:
            raise ProtocolError(MALFORMED, "DUP set on a QoS 0 PUBLISH")
        reader = Reader(body)
        topic = reader.utf8("topic name")
        packet_id = 0
        if qos:
            packet_id = reader.u16()
            if packet_id == 0:
                raise ProtocolError(MALFORMED, "packet id 0")
        forwarded, expires_at = self._publish_properties(reader)
        check_topic_name(topic)
        if self.broker.draining:
            # Not acknowledged, so the publisher keeps it and sends it again to the next broker.
            self.offset = start
            self.hold(None, set())
            return
        ack = b""
        if qos == 1:
            ack = bytes((PUBACK << 4, 2)) + U16_PACK(packet_id)
        elif qos == 2:
            ack = bytes((PUBREC << 4, 2)) + U16_PACK(packet_id)
            if packet_id in session.awaiting_release:
                self.write(ack)  # a resend of a message already routed
                return
            session.awaiting_release.add(packet_id)
        self.broker.stats.messages_received += 1
        message = Message(
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

    def _publish_properties(self, reader: Reader) -> tuple[bytes, float | None]:
        """A PUBLISH's properties to pass on, and when the message expires (None: never)."""
        if not self.v5:
            return b"", None
        properties, forwarded = reader.properties(PUBLISH_PROPERTIES, FORWARDED_PROPERTIES)
        if TOPIC_ALIAS in properties:
            raise ProtocolError(ALIAS_INVALID, "topic aliases are not supported (Topic Alias Maximum 0)")
        if SUBSCRIPTION_ID in properties:
            raise ProtocolError(PROTOCOL_ERROR, "subscription identifier in a client's PUBLISH")
        if MESSAGE_EXPIRY in properties:
            return forwarded, time.monotonic() + properties[MESSAGE_EXPIRY]
        return forwarded, None

    def on_puback(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        packet_id = Reader(body).u16()
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
        packet_id = Reader(body).u16()
        if packet_id in session.awaiting_release:
            session.awaiting_release.discard(packet_id)
            self.write(bytes((PUBCOMP << 4, 2)) + U16_PACK(packet_id))
        elif self.v5:
            self.write(bytes((PUBCOMP << 4, 3)) + U16_PACK(packet_id) + bytes((PACKET_ID_NOT_FOUND,)))
        else:
            self.write(bytes((PUBCOMP << 4, 2)) + U16_PACK(packet_id))

    def on_subscribe(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        reader = Reader(body)
        packet_id = reader.u16()
        if self.v5:
            properties, _ = reader.properties(SUBSCRIBE_PROPERTIES)
            if SUBSCRIPTION_ID in properties:
                raise ProtocolError(SUB_IDS_UNSUPPORTED, "subscription identifiers are not supported")
        requests: list[tuple[str, int]] = []
        while not reader.at_end():
            requests.append((reader.utf8("topic filter"), reader.u8()))
        if not requests:
            raise ProtocolError(PROTOCOL_ERROR, "SUBSCRIBE without a topic filter")
        codes = bytearray()
        retained: list[tuple[str, int, bool]] = []
        for text, options in requests:
            if options & (0xC0 if self.v5 else 0xFC) or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
                raise ProtocolError(MALFORMED, f"subscription options {options:#x} for {text!r}")
            parsed = split_filter(text)
            if parsed is None:
                codes.append(FILTER_INVALID if self.v5 else 0x80)
                continue
            group, topic_filter = parsed
            no_local = self.v5 and bool(options & 0x04)
            if group is not None and no_local:
                raise ProtocolError(PROTOCOL_ERROR, f"no-local on shared subscription {text!r}")
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
        head = U16_PACK(packet_id) + (b"\x00" if self.v5 else b"")
        self.write(encode_packet(SUBACK << 4, head + bytes(codes)))
        for topic_filter, granted, _ in retained:
            self.broker.send_retained(session, topic_filter, granted)

    def on_unsubscribe(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        reader = Reader(body)
        packet_id = reader.u16()
        if self.v5:
            reader.properties(UNSUBSCRIBE_PROPERTIES)
        texts: list[str] = []
        while not reader.at_end():
            texts.append(reader.utf8("topic filter"))
        if not texts:
            raise ProtocolError(PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter")
        codes = bytes(
            SUCCESS if self.broker.unsubscribe(session, text) else NO_SUBSCRIPTION_EXISTED for text in texts
        )
        body_out = U16_PACK(packet_id) + (b"\x00" + codes if self.v5 else b"")
        self.write(encode_packet(UNSUBACK << 4, body_out))

    def on_disconnect(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        reason_code = SUCCESS
        if self.v5 and body:
            reader = Reader(body)
            reason_code = reader.u8()
            if not reader.at_end():
                properties, _ = reader.properties(DISCONNECT_PROPERTIES)
                if SESSION_EXPIRY in properties:
                    expiry = properties[SESSION_EXPIRY]
                    if self.connect_expiry == 0 and expiry != 0:
                        raise ProtocolError(
                            PROTOCOL_ERROR, "DISCONNECT sets a session expiry after CONNECT set none"
                        )
                    session.expiry_s = math.inf if expiry == NEVER_EXPIRES else float(expiry)
        # Reason 0x04 is "disconnect with will message": the client asks for its will.
        if reason_code != 0x04:
            self.will = None
        log.debug("MQTT client %s disconnected (reason 0x%02x)", self.client_id, reason_code)
        self.terminate(will=True)
