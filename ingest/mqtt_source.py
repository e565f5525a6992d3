"""The gateway's MQTT side: a paho client on a persistent session with manual acknowledgement,
subscribed to the telemetry and status topics through `$share`, handing each message to the
inbox and acknowledging it when the gateway says so, on the connection that delivered it only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.inbox import InboundMessage, Inbox
from ioc_core.errors import ServiceUnavailableError
from ioc_core.settings import Settings
from ioc_core.telemetry import TOPIC_ROOT, utcnow

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 15.0

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


class MqttSource:
    """The paho client. Its callbacks run in paho's network thread."""

    def __init__(self, settings: Settings, inbox: Inbox, on_failure: FailureHandler) -> None:
        self._settings = settings
        self._inbox = inbox
        self._on_failure = on_failure
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._stopping = threading.Event()
        # Counts connections; paho's thread bumps it on each CONNACK.
        self._connection = 0

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

    def _new_client(self) -> mqtt.Client:
        endpoint = self._settings.mqtt
        client = mqtt.Client(
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
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        self._connected.clear()

    def acknowledge(self, message: InboundMessage) -> bool:
        if message.qos == 0 or self._client is None:
            return True
        if message.connection == self._connection and self.connected:
            self._client.ack(message.mid, message.qos)
            return True
        return False

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
        client.subscribe([(topic, 1) for topic in subscriptions(self._settings)])
        log.info("connected to MQTT broker (session present: %s)", flags.session_present)
        self._connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("MQTT connection lost (%s); reconnecting, the broker keeps our session", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._take(message)
        except Exception as exc:
            self._on_failure("taking a message", exc)
            raise

    def _take(self, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            # MQTT requires UTF-8 topic names; a broker that lets one through still gets a dead letter.
            topic = bytes(message._topic).decode("utf-8", errors="replace")
        inbound = InboundMessage(
            topic=topic,
            payload=bytes(message.payload),
            mid=message.mid,
            qos=message.qos,
            received_at=utcnow(),
            connection=self._connection,
            dup=bool(message.dup),
        )
        self._inbox.put(inbound, self._stopping)
