"""One MQTT connection per simulated device, every one driven by the running asyncio loop rather
than a thread of its own, so that a few hundred devices cost a few hundred sockets and nothing more.

Each device connects with its last will, `offline` retained on its status topic, says `online`
(retained) whenever it connects, publishes with QoS 1 (paho keeps up to a thousand messages while
the connection is down and sends them once it is back), and reconnects by itself with exponential
backoff and jitter after losing its connection. Powering a device off drops its socket without an
MQTT DISCONNECT, as a power cut does, so the broker publishes the will; stopping cleanly clears the
retained status and disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ioc_core.errors import ServiceUnavailableError
from ioc_core.settings import MqttEndpoint

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0
# What a device keeps while its connection is down: an hour of readings at a few a minute.
DEVICE_BUFFER = 1000
_CONNECT_TIMEOUT_S = 5.0
_CONNECT_THREADS = 16


class LinkState(enum.Enum):
    OFF = "off"
    CONNECTING = "connecting"
    UP = "up"
    WAITING = "waiting"  # for the next reconnection attempt
    CLOSED = "closed"


class LinkStats:
    def __init__(self) -> None:
        self.sent = 0
        self.acknowledged = 0
        # Of `sent`, the retained `online` statuses said on each (re)connection.
        self.statuses = 0
        # Readings a powered-off or stopped device could not send.
        self.dropped = 0


class DeviceLinks:
    """The connections of one fleet; use with `async with`, inside a running loop."""

    def __init__(self, endpoint: MqttEndpoint, *, client_prefix: str = "ioc-sim-") -> None:
        self.endpoint = endpoint
        self.client_prefix = client_prefix
        self.stats = LinkStats()
        self.links: dict[str, DeviceLink] = {}
        self.all_acknowledged = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._executor: ThreadPoolExecutor | None = None
        self._housekeeping: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DeviceLinks:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._executor = ThreadPoolExecutor(_CONNECT_THREADS, thread_name_prefix="mqtt-connect")
        self._housekeeping = asyncio.create_task(self._keep_alive(), name="device-links-keepalive")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("DeviceLinks is used outside `async with`")
        return self._loop

    def add(self, device_id: str, status_topic: str | None) -> DeviceLink:
        """A connection for a device; without a status topic, one that carries several devices'
        telemetry and has no will nor status of its own."""
        link = DeviceLink(self, device_id, status_topic)
        self.links[device_id] = link
        return link

    async def connect_all(self, *, within_s: float = 20.0) -> None:
        """Power every device on and wait until all are connected; fails clearly if the broker
        cannot be reached (the devices keep trying in the background)."""
        for link in self.links.values():
            link.power_on()
        waits = asyncio.gather(*(link.connected.wait() for link in self.links.values()))
        deadline = self.loop.time() + within_s
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(waits), 1.0)
                    return
                except TimeoutError:
                    # Every device refused twice and none through: the broker is not there.
                    refused = all(link.failures >= 2 for link in self.links.values())
                    if refused or self.loop.time() > deadline:
                        break
        finally:
            waits.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waits
        up = sum(1 for link in self.links.values() if link.state is LinkState.UP)
        host, port = self.endpoint.host, self.endpoint.port
        raise ServiceUnavailableError(
            f"MQTT broker at {host}:{port} cannot be reached: {up} of {len(self.links)} devices connected"
        )

    async def close(self, *, within_s: float = 5.0) -> None:
        """Stop every device cleanly: clear its retained status, disconnect, wait for the sockets."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        for link in self.links.values():
            link.close()
        gone = [link.gone.wait() for link in self.links.values()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*gone), within_s)
        for link in self.links.values():
            link.abandon()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def settle(self, *, within_s: float) -> None:
        """Wait until the broker has acknowledged what was sent (for `within_s` at most)."""
        if self.stats.acknowledged >= self.stats.sent:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_acknowledged.wait(), within_s)

    def in_loop(self, function: Callable[..., None], *args: Any) -> None:
        """Run `function` on the loop's thread: paho calls some callbacks from the connecting thread."""
        if threading.get_ident() == self._loop_thread:
            function(*args)
        else:
            self.loop.call_soon_threadsafe(function, *args)

    def submit(self, function: Callable[[], None]) -> asyncio.Future[None]:
        if self._executor is None:
            raise RuntimeError("DeviceLinks is closed")
        return self.loop.run_in_executor(self._executor, function)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for link in list(self.links.values()):
                link.housekeeping()


class DeviceLink:
    """One device's MQTT connection. Every method runs on the loop's thread."""

    def __init__(self, hub: DeviceLinks, device_id: str, status_topic: str | None) -> None:
        self.hub = hub
        self.device_id = device_id
        self.status_topic = status_topic
        self.connected = asyncio.Event()
        # Set once the device is stopped and its connection closed.
        self.gone = asyncio.Event()
        self.state = LinkState.OFF
        self._client: mqtt.Client | None = None
        self._watched: tuple[mqtt.Client, int] | None = None
        self._attempt = 0
        # Connection attempts that failed since the device last got through.
        self.failures = 0
        self._retry: asyncio.TimerHandle | None = None

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Send (or, while reconnecting, buffer) one QoS 1 message; False if the device is off."""
        client = self._client
        if client is None or self.state in (LinkState.OFF, LinkState.CLOSED):
            self.hub.stats.dropped += 1
            return False
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.hub.stats.dropped += 1
            return False
        self.hub.stats.sent += 1
        self.hub.all_acknowledged.clear()
        return True

    def power_on(self) -> None:
        if self.state is not LinkState.OFF:
            return
        self._client = self._new_client()
        self._attempt = 0
        self._connect(first=True)

    def power_off(self) -> None:
        """Lose power: the socket goes without a DISCONNECT, so the broker publishes the will."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        client, self._client = self._client, None
        self.state = LinkState.OFF
        self.connected.clear()
        if client is not None:
            self._drop(client)

    def close(self) -> None:
        """Stop cleanly: clear the retained status (the device is gone, not failed) and disconnect."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        previous, self.state = self.state, LinkState.CLOSED
        client = self._client
        if client is None:
            self.gone.set()
            return
        if previous is LinkState.UP:
            if self.status_topic is not None:
                client.publish(self.status_topic, b"", qos=1, retain=True)
            client.disconnect()
        else:
            self._client = None
            self._drop(client)
            self.gone.set()

    def abandon(self) -> None:
        """After `close()`: drop whatever socket is still open."""
        client, self._client = self._client, None
        if client is not None:
            self._drop(client)

    def housekeeping(self) -> None:
        if self.state is LinkState.UP and self._client is not None:
            self._client.loop_misc()

    # -- connecting -------------------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        endpoint = self.hub.endpoint
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{self.hub.client_prefix}{self.device_id}"[:128]
        )
        if self.status_topic is not None:
            client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        if endpoint.username:
            client.username_pw_set(
                endpoint.username, endpoint.password.get_secret_value() if endpoint.password else None
            )
        if endpoint.tls:
            client.tls_set()
        client.connect_timeout = _CONNECT_TIMEOUT_S
        client.max_queued_messages_set(DEVICE_BUFFER)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    def _connect(self, *, first: bool) -> None:
        client = self._client
        if client is None:
            return
        self.state = LinkState.CONNECTING
        endpoint = self.hub.endpoint

        def blocking() -> None:
            # The TCP (and TLS) handshake blocks; everything after it runs on the loop.
            if first:
                client.connect(endpoint.host, endpoint.port, KEEPALIVE_S)
            else:
                client.reconnect()

        self.hub.submit(blocking).add_done_callback(lambda done: self._connected_or_not(client, done))

    def _connected_or_not(self, client: mqtt.Client, done: asyncio.Future[None]) -> None:
        if done.cancelled():
            return
        failure = done.exception()
        if client is not self._client or self.state in (LinkState.OFF, LinkState.CLOSED):
            # Powered off or stopped while connecting: that connection must not live on.
            if failure is None:
                self._drop(client)
            return
        if failure is not None and self.state is LinkState.CONNECTING:
            log.debug("device %s cannot connect: %s", self.device_id, failure)
            self.failures += 1
            self._wait_and_retry()
        # Otherwise the broker's CONNACK arrives through the socket and `_on_connect` follows; on
        # a busy machine it can even come first (the connecting thread is told last), and the
        # device is already up.

    def _wait_and_retry(self) -> None:
        self.state = LinkState.WAITING
        self.connected.clear()
        delay = min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2**self._attempt) * random.uniform(0.5, 1.0)
        self._attempt += 1
        self._retry = self.hub.loop.call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self.state is LinkState.WAITING:
            self._connect(first=False)

    def _drop(self, client: mqtt.Client) -> None:
        sock = client.socket()
        self._unwatch(client)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.close()

    # -- paho callbacks (on the loop's thread, except the socket ones while connecting) ------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if client is not self._client:
            return
        if reason_code.is_failure:
            log.warning("broker refused device %s: %s", self.device_id, reason_code)
            return  # the broker closes the connection, and `_on_disconnect` retries
        self.state = LinkState.UP
        self._attempt = self.failures = 0
        if self.status_topic is not None:
            self.publish(self.status_topic, b"online", retain=True)
            self.hub.stats.statuses += 1
        self.connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if client is not self._client:
            return
        self.connected.clear()
        if self.state is LinkState.CLOSED:
            self._client = None
        elif self.state in (LinkState.UP, LinkState.CONNECTING):
            log.info("device %s lost its connection (%s); reconnecting", self.device_id, reason_code)
            self._wait_and_retry()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        stats = self.hub.stats
        stats.acknowledged += 1
        if stats.acknowledged >= stats.sent:
            self.hub.all_acknowledged.set()

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._watch, client, sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._unwatch, client)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._want_write, client, sock)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._done_writing, client)

    def _watch(self, client: mqtt.Client, sock: Any) -> None:
        current = client.socket()
        if client is not self._client or current is None or current is not sock or current.fileno() < 0:
            return
        self._unwatch(client)
        fd = current.fileno()
        self._watched = (client, fd)
        self.hub.loop.add_reader(fd, client.loop_read)

    def _unwatch(self, client: mqtt.Client) -> None:
        # By file number as recorded: the socket may already be closed when this runs.
        if self._watched is None or self._watched[0] is not client:
            return
        fd = self._watched[1]
        self._watched = None
        self.hub.loop.remove_reader(fd)
        self.hub.loop.remove_writer(fd)
        if self.state is LinkState.CLOSED:
            self.gone.set()

    def _want_write(self, client: mqtt.Client, sock: Any) -> None:
        if self._watched is not None and self._watched[0] is client and client.socket() is sock:
            self.hub.loop.add_writer(self._watched[1], client.loop_write)

    def _done_writing(self, client: mqtt.Client) -> None:
        if self._watched is not None and self._watched[0] is client:
            self.hub.loop.remove_writer(self._watched[1])
