"""A simulated device's connection, without a broker: the order in which a busy machine tells the
loop that the socket is open, that the broker said CONNACK, and that the connecting thread is done."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from ioc_core.settings import MqttEndpoint
from simulators.links import DeviceLinks, LinkState

_OK = SimpleNamespace(is_failure=False)


async def test_a_connack_told_before_the_connecting_thread_keeps_the_device_up() -> None:
    ours, theirs = socket.socketpair()
    client = SimpleNamespace(socket=lambda: ours, loop_read=lambda: None)
    endpoint = MqttEndpoint(host="127.0.0.1", port=1, tls=False, username=None, password=None)
    try:
        async with DeviceLinks(endpoint) as links:
            link = links.add("waste-00013", None)
            link._client = client  # type: ignore[assignment]
            link.state = LinkState.CONNECTING
            link._watch(client, ours)  # type: ignore[arg-type]
            # The CONNACK is read before the thread that sent CONNECT has returned.
            link._on_connect(client, None, None, _OK, None)  # type: ignore[arg-type]
            connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            connected.set_result(None)
            link._connected_or_not(client, connected)  # type: ignore[arg-type]

            assert link.state is LinkState.UP and link.connected.is_set()
            assert ours.fileno() >= 0, "the device's live connection was closed"
            link._unwatch(client)  # type: ignore[arg-type]
            link._client = None
    finally:
        ours.close()
        theirs.close()


async def test_a_connection_made_after_power_off_is_dropped() -> None:
    ours, theirs = socket.socketpair()
    client = SimpleNamespace(socket=lambda: ours, loop_read=lambda: None)
    endpoint = MqttEndpoint(host="127.0.0.1", port=1, tls=False, username=None, password=None)
    try:
        async with DeviceLinks(endpoint) as links:
            link = links.add("waste-00013", None)
            link._client = client  # type: ignore[assignment]
            link.state = LinkState.CONNECTING
            link._watch(client, ours)  # type: ignore[arg-type]
            link._client, link.state = None, LinkState.OFF  # power cut while connecting
            connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            connected.set_result(None)
            link._connected_or_not(client, connected)  # type: ignore[arg-type]

            assert ours.fileno() < 0
    finally:
        ours.close()
        theirs.close()
