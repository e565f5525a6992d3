"""The gateway's MQTT side: a paho client on a persistent session with manual acknowledgement,
subscribed to the telemetry and status topics through `$share`, handing each message to the
inbox and acknowledging it when the gateway says so, on the connection that delivered it only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ingest.inbox import InboundMessage, Inbox
from ioc_core.errors import ServiceUnavailableError
from ioc_core.settings import Settings
from ioc_core.telemetry import TOPIC_ROOT, utcnow

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 15.0

_PUBACK = struct.Struct("!BBH")
# A PUBLISH's properties when there are none: their length, 0.
_NO_PROPERTIES = b"\x00"

# Told of an error in the client's own thread, which would otherwise end that thread silently.
FailureHandler = Callable[[str, BaseException], None]


class MessageSource(Protocol):
    """Where the gateway's messages come from and where their acknowledgements go."""

    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None: ...

    def begin_stop(self) -> None: ...

    def close(self) -> None: ...

    def acknowledge(self, message: InboundMessage) -> bool:
        """Acknowledge `message` to the broker; False when it was not, because the connection
        that delivered it has ended."""
        ...


# Makes the gateway's source from its settings, its inbox and its failure handler.
SourceFactory = Callable[[Settings, Inbox, FailureHandler], MessageSource]


def subscriptions(settings: Settings) -> list[str]:
    """The gateway's shared subscriptions: telemetry and status of its cities (or all)."""
    group = settings.gateway_share_group
    cities = settings.gateway_cities or ["+"]
    return [
        f"$share/{group}/{TOPIC_ROOT}/{city}/+/+/{kind}"
        for city in cities
        for kind in ("telemetry", "status")
    ]


def subscription_options() -> SubscribeOptions:
    """QoS 1; the publisher's retain flag kept on what is forwarded (without it the broker clears
    the flag on live messages, and retained telemetry would pass for ordinary readings); retained
    messages sent only when the subscription is new. Mosquitto 2.0 sends retained messages to
    shared subscriptions too (MQTT 5 says it should not): with the default it would replay every
    retained status and reading on each reconnection; this way only a subscription the broker lost
    (a broker restart forgets shared subscriptions) gets the retained statuses once, the ones
    published while nobody was subscribed among them."""
    return SubscribeOptions(
        qos=1, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
    )


# What the network thread reads from the socket at once; a burst of publishes is parsed from it.
_READ_AHEAD_BYTES = 64 * 1024
# Packets parsed per wake-up of the network thread before it looks at what it has to write.
_PACKETS_PER_WAKE = 512


class ReadAheadSocket:
    """The broker connection as paho sees it, reading ahead.

    paho reads each packet a few bytes at a time (type, then each length byte, then the body), each
    read a system call, and goes back to select() after every packet; with the asyncio thread
    wanting the GIL at each of those, the network thread was half of the gateway's time. This
    reads whatever the socket has, up to 64 KiB, and serves paho's small reads from it; `pending`
    (which paho asks of TLS sockets) tells paho's loop that more is already here."""

    __slots__ = ("_data", "_position", "_socket")

    def __init__(self, sock: SocketLike) -> None:
        self._socket = sock
        self._data = b""
        self._position = 0

    def recv(self, buffer_size: int) -> bytes:
        if self._position >= len(self._data):
            # Raises BlockingIOError (or TLS's want-read) when nothing is there, as paho expects.
            data = self._socket.recv(max(buffer_size, _READ_AHEAD_BYTES))
            if len(data) <= buffer_size:
                self._data, self._position = b"", 0
                return data
            self._data, self._position = data, 0
        start = self._position
        chunk = self._data[start : start + buffer_size]
        self._position = start + len(chunk)
        return chunk

    def pending(self) -> int:
        inner = getattr(self._socket, "pending", None)
        return len(self._data) - self._position + (inner() if inner is not None else 0)

    def send(self, buffer: bytes | bytearray) -> int:
        return self._socket.send(buffer)

    def close(self) -> None:
        self._socket.close()

    def fileno(self) -> int:
        return self._socket.fileno()

    def setblocking(self, flag: bool) -> None:
        self._socket.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


# Told of each QoS 0/1 publish the fast path parses: topic (raw bytes), payload, packet id, QoS,
# DUP and RETAIN flags, and the MQTT 5 properties as received (b"" when there are none).
PublishHandler = Callable[[bytes, bytes, int, int, bool, bool, bytes], None]


class GatewayClient(mqtt.Client):
    """paho's client with the gateway's hot paths made cheaper:
    - reads through a `ReadAheadSocket`, parsing every packet already read before going back to
      select();
    - QoS 0 and 1 publishes parsed here and handed to `on_incoming_publish`: paho builds an
      `MQTTMessage` and a `Properties` for each and parses properties the gateway does not read,
      a third of the network thread's time (their bytes are passed on as they are, and decoded
      only for a dead letter);
    - acknowledgements queued as one write (`ack_many`) instead of a write and a wake-up of the
      network thread each.
    Everything else, and any packet the fast path does not take (QoS 2, a topic alias, a malformed
    packet, no `on_incoming_publish`), is paho's."""

    on_incoming_publish: PublishHandler | None = None

    def _handle_publish(self) -> MQTTErrorCode:
        handler = self.on_incoming_publish
        command = self._in_packet["command"]
        qos = (command & 0x06) >> 1
        if handler is None or qos == 2 or self._protocol != mqtt.MQTTv5:
            return super()._handle_publish()
        packet = self._in_packet["packet"]
        try:
            parsed = _parse_publish(packet, qos)
        except (IndexError, ValueError):
            parsed = None
        if parsed is None:
            return super()._handle_publish()  # paho words the protocol error
        topic, mid, payload, properties = parsed
        with self._in_callback_mutex:
            handler(topic, payload, mid, qos, bool(command & 0x08), bool(command & 0x01), properties)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _create_socket(self) -> SocketLike:
        sock = super()._create_socket()
        return sock if self._transport == "websockets" else ReadAheadSocket(sock)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        for _ in range(_PACKETS_PER_WAKE):
            sock = self._sock
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, ReadAheadSocket):
                break
            if not sock.pending():
                break
            rc = super().loop_read(max_packets)
        return rc

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK each of `mids` (QoS 1 messages of this connection), in one queued write."""
        if not mids:
            return
        if not self._manual_ack:
            return
        packet = b"".join([_PUBACK.pack(PUBACK, 2, mid) for mid in mids])
        # One queued packet of many PUBACKs: paho writes it as it would one, and the broker reads
        # them one by one (MQTT 5 allows a PUBACK of success without its reason code, as paho's
        # own `ack` sends it).
        self._packet_queue(PUBACK, packet, 0, 0)


def _parse_publish(packet: bytes | bytearray, qos: int) -> tuple[bytes, int, bytes, bytes] | None:
    """An MQTT 5 PUBLISH's variable header and payload: topic, packet id (0 at QoS 0), payload,
    and its properties undecoded (their length and bytes as on the wire, b"" when there are none);
    None for what paho should handle (an empty topic, which only a topic alias fills). Raises
    IndexError or ValueError on a truncated or malformed packet."""
    topic_length = (packet[0] << 8) | packet[1]
    if topic_length == 0:
        return None
    position = 2 + topic_length
    if position > len(packet):
        raise ValueError("topic runs past the packet")
    topic = bytes(packet[2:position])
    mid = 0
    if qos:
        mid = (packet[position] << 8) | packet[position + 1]
        position += 2
    # Properties: a variable byte integer length (at most four bytes), then that many bytes.
    properties_start = position
    length = 0
    for shift in (0, 7, 14, 21):
        byte = packet[position]
        position += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise ValueError("properties length longer than four bytes")
    position += length
    if position > len(packet):
        raise ValueError("properties run past the packet")
    properties = bytes(packet[properties_start:position]) if length else b""
    return topic, mid, bytes(packet[position:]), properties


def publish_properties(raw: bytes) -> dict[str, Any] | None:
    """A PUBLISH's MQTT 5 properties (as `_parse_publish` keeps them) as a dead letter records
    them: what the publisher set. Subscription identifiers and topic aliases are left out: the
    broker sets them for the gateway's own connection. None when there are none."""
    if not raw:
        return None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    try:
        properties.unpack(raw)  # type: ignore[no-untyped-call]
    except Exception:
        # paho raises bare exceptions on malformed properties; the broker passed them on, so the
        # letter keeps them as they came.
        return {"undecoded_base64": base64.b64encode(raw).decode("ascii")}
    decoded: dict[str, Any] = {}
    for attribute, key in _PUBLISHER_PROPERTIES:
        value = getattr(properties, attribute, None)
        if value is None:
            continue
        if isinstance(value, bytes):
            decoded[key] = base64.b64encode(value).decode("ascii")
        elif attribute == "UserProperty":
            decoded[key] = [[name, text] for name, text in value]
        else:
            decoded[key] = value
    return decoded or None


# paho's attribute -> the dead letter's key.
_PUBLISHER_PROPERTIES = (
    ("PayloadFormatIndicator", "payload_format_indicator"),
    ("MessageExpiryInterval", "message_expiry_interval"),
    ("ContentType", "content_type"),
    ("ResponseTopic", "response_topic"),
    ("CorrelationData", "correlation_data_base64"),
    ("UserProperty", "user_properties"),
)


class MqttSource:
    """The paho client. Its callbacks run in paho's network thread."""

    def __init__(self, settings: Settings, inbox: Inbox, on_failure: FailureHandler) -> None:
        self._settings = settings
        self._inbox = inbox
        self._on_failure = on_failure
        self._client: GatewayClient | None = None
        self._connected = threading.Event()
        self._stopping = threading.Event()
        # Counts connections; paho's thread bumps it on each CONNACK.
        self._connection = 0
        # Acknowledgements made in this turn of the event loop, written together at its end.
        self._acks: list[InboundMessage] = []

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self) -> None:
        endpoint = self._settings.mqtt
        client = self._new_client()
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._settings.mqtt_session_expiry_s
        # The broker may have this many unacknowledged messages out to us at once.
        properties.ReceiveMaximum = min(65535, self._settings.gateway_queue_size)
        self._client = client
        try:
            await asyncio.to_thread(
                client.connect, endpoint.host, endpoint.port, 30, clean_start=False, properties=properties
            )
        except OSError as exc:
            raise ServiceUnavailableError(
                f"MQTT broker at {endpoint.host}:{endpoint.port} is unreachable: {exc}",
                public="the MQTT broker is unavailable",
            ) from exc
        client.loop_start()
        if not await asyncio.to_thread(self._connected.wait, _CONNECT_TIMEOUT_S):
            raise ServiceUnavailableError(
                f"MQTT broker at {endpoint.host}:{endpoint.port} did not accept the connection",
                public="the MQTT broker did not accept the connection",
            )

    def _new_client(self) -> GatewayClient:
        endpoint = self._settings.mqtt
        client = GatewayClient(
            CallbackAPIVersion.VERSION2,
            client_id=self._settings.gateway_client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if endpoint.username:
            client.username_pw_set(
                endpoint.username, endpoint.password.get_secret_value() if endpoint.password else None
            )
        if endpoint.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_incoming_publish = self._on_publish
        # Mosquitto (2.0) does not keep shared subscriptions across its own restart: until we are
        # back and subscribed again, what devices publish has no subscriber and is dropped. Coming
        # back within two seconds keeps that window short; a handful of gateways retrying that
        # often costs a broker nothing.
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        return client

    def begin_stop(self) -> None:
        """No more waiting for inbox slots, and a disconnection is no longer news."""
        self._stopping.set()

    def close(self) -> None:
        self._flush_acks()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        self._connected.clear()

    def acknowledge(self, message: InboundMessage) -> bool:
        if message.qos == 0 or self._client is None:
            return True
        if message.connection == self._connection and self.connected:
            if not self._acks:
                asyncio.get_running_loop().call_soon(self._flush_acks)
            self._acks.append(message)
            return True
        return False

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        client = self._client
        if client is None:
            return
        # A reconnection since `acknowledge` makes their packet ids mean nothing: the broker sends
        # those messages again.
        connection = self._connection
        client.ack_many([m.mid for m in acks if m.qos == 1 and m.connection == connection])
        for message in acks:
            if message.qos == 2 and message.connection == connection:
                client.ack(message.mid, message.qos)

    # -- paho's network thread ----------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker refused the connection: %s", reason_code)
            return
        # Messages taken on an earlier connection are acknowledged no more: their packet ids may
        # name other messages now. The broker sends them again, and storage drops the copies.
        self._connection += 1
        client.subscribe([(topic, subscription_options()) for topic in subscriptions(self._settings)])
        log.info("connected to MQTT broker (session present: %s)", flags.session_present)
        self._connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("MQTT connection lost (%s); reconnecting, the broker keeps our session", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # What the fast path leaves to paho (QoS 2, a topic alias) arrives here.
        properties = getattr(message, "properties", None)
        packed = bytes(properties.pack()) if properties is not None else b""
        self._on_publish(
            bytes(message._topic),
            bytes(message.payload),
            message.mid,
            message.qos,
            bool(message.dup),
            bool(message.retain),
            b"" if packed == _NO_PROPERTIES else packed,
        )

    def _on_publish(
        self, topic: bytes, payload: bytes, mid: int, qos: int, dup: bool, retain: bool, properties: bytes
    ) -> None:
        try:
            try:
                topic_name = topic.decode()
            except UnicodeDecodeError:
                # MQTT requires UTF-8 topic names; a broker that lets one through still gets a
                # dead letter.
                topic_name = topic.decode("utf-8", errors="replace")
            inbound = InboundMessage(
                topic=topic_name,
                payload=payload,
                mid=mid,
                qos=qos,
                received_at=utcnow(),
                connection=self._connection,
                dup=dup,
                retain=retain,
                properties=properties,
            )
            self._inbox.put(inbound, self._stopping)
        except Exception as exc:
            self._on_failure("taking a message", exc)
            raise
