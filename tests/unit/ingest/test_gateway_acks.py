"""A packet id means something only on the MQTT connection that carried it: the gateway never
acknowledges a message taken on an earlier connection (the broker sends it again instead)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from ingest.gateway import Gateway, InboundMessage
from ioc_core.settings import Settings
from tests.unit.ingest.fakes import FakeProducer, FakeRegistry


class FakeClient:
    def __init__(self) -> None:
        self.acks: list[tuple[int, int]] = []
        self.writes = 0

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append((mid, qos))
        self.writes += 1

    def ack_many(self, mids: list[int]) -> None:
        self.acks.extend((mid, 1) for mid in mids)
        self.writes += 1


def _gateway() -> tuple[Gateway, FakeClient]:
    gateway = Gateway(Settings(), producer=FakeProducer(), registry=FakeRegistry())
    client = FakeClient()
    gateway._source._client = client  # type: ignore[attr-defined]
    gateway._source._connected.set()  # type: ignore[attr-defined]
    return gateway, client


def _message(mid: int, connection: int) -> InboundMessage:
    return InboundMessage(
        topic="ioc/v1/ha-noi/flood/x/telemetry",
        payload=b"{}",
        mid=mid,
        qos=1,
        received_at=datetime.now(tz=UTC),
        connection=connection,
    )


def _take(gateway: Gateway, message: InboundMessage) -> None:
    # What `_on_message` and the worker do before a message completes.
    gateway._inbox._slots.acquire()
    gateway._in_process += 1


def _gateway_that_completed(*, mid: int, connection: int) -> tuple[Gateway, FakeClient]:
    """A gateway on `connection` that has just completed message `mid` taken on it."""
    gateway, client = _gateway()
    gateway._source._connection = connection  # type: ignore[attr-defined]
    message = _message(mid, connection=connection)
    _take(gateway, message)
    gateway._complete(message, produced=1)
    return gateway, client


async def test_a_message_is_acknowledged_on_its_own_connection() -> None:
    gateway, client = _gateway_that_completed(mid=7, connection=3)
    await asyncio.sleep(0)  # acknowledgements are written at the end of the loop's turn
    assert client.acks == [(7, 1)]
    assert gateway.stale_acks_skipped == 0


async def test_acknowledgements_of_one_turn_are_written_together() -> None:
    gateway, client = _gateway()
    gateway._source._connection = 3
    messages = [_message(mid, connection=3) for mid in (7, 8, 9)]
    for message in messages:
        _take(gateway, message)
        gateway._complete(message, produced=1)
    assert client.acks == []
    await asyncio.sleep(0)
    assert client.acks == [(7, 1), (8, 1), (9, 1)] and client.writes == 1


async def test_a_reconnection_before_the_write_drops_the_acknowledgement() -> None:
    gateway, client = _gateway_that_completed(mid=7, connection=3)
    gateway._source._connection = 4  # paho's thread reconnected before the loop's turn ended
    await asyncio.sleep(0)
    assert client.acks == []


async def test_a_message_of_an_earlier_connection_is_not_acknowledged() -> None:
    gateway, client = _gateway()
    gateway._source._connection = 4  # reconnected after taking the message
    message = _message(7, connection=3)
    _take(gateway, message)
    gateway._complete(message, produced=1)
    await asyncio.sleep(0)
    assert client.acks == []
    assert gateway.stale_acks_skipped == 1
    metrics: dict[str, Any] = {m.name: m for m in gateway.metrics()}
    assert "ioc_gateway_stale_acks_skipped_total" in metrics


async def test_nothing_is_acknowledged_while_disconnected() -> None:
    gateway, client = _gateway()
    gateway._source._connection = 3
    gateway._source._connected.clear()
    message = _message(9, connection=3)
    _take(gateway, message)
    gateway._complete(message, produced=1)
    assert client.acks == []
