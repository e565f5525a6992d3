"""The messages the gateway has taken from the broker and not yet acknowledged, and the bounded
hand-off that carries them from the MQTT client's network thread to the asyncio worker.

When every slot is taken, the network thread waits, stops reading the socket, and the backlog
stays in the broker instead of in our memory.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass
from datetime import datetime

# How often a network thread waiting for a slot looks whether the gateway is stopping.
_SLOT_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: datetime
    # Which MQTT connection delivered it: a packet id means something only on its own connection.
    connection: int = 0
    # The broker's DUP flag: it may have delivered this message before (under the same packet id).
    dup: bool = False
    # The publisher's retain flag: the gateway subscribes with "retain as published".
    retain: bool = False
    # MQTT 5 properties as received (length and bytes, b"" when none): decoded only for a dead
    # letter, which keeps them.
    properties: bytes = b""


class Inbox:
    """Taken in the network thread (`put`), drained by the worker (`wait`, `pop`); a slot is held
    from `put` until the message is acknowledged (`release`)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots = threading.BoundedSemaphore(capacity)
        self._messages: collections.deque[InboundMessage] = collections.deque()
        self._signal = asyncio.Event()
        self._signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the worker runs on, which `put` wakes."""
        self._loop = loop

    def put(self, message: InboundMessage, stopping: threading.Event) -> None:
        """Wait for a slot, then hand `message` over; gives up (dropping it, unacknowledged, for the
        broker to send again) once `stopping` is set."""
        # Waiting for a slot is the back-pressure: paho stops reading and the broker keeps the rest.
        while not self._slots.acquire(timeout=_SLOT_POLL_S):
            if stopping.is_set():
                return
        self._messages.append(message)
        # One wake-up per burst, not per message; the worker clears the flag before it drains.
        if not self._signalled:
            self._signalled = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._signal.set)

    async def wait(self) -> None:
        """Until messages have arrived; then `pop` them."""
        await self._signal.wait()
        self._signal.clear()
        self._signalled = False

    def pop(self) -> InboundMessage | None:
        return self._messages.popleft() if self._messages else None

    def release(self) -> None:
        """A message is acknowledged (or given up): its slot is free."""
        self._slots.release()

    def __len__(self) -> int:
        """Messages handed over and not yet taken by the worker."""
        return len(self._messages)
