"""Replaying dead letters: a stored letter's payload runs through the gateway's own validation
(`ioc_core.telemetry.accept_message`) and what it becomes goes on the telemetry topics, keyed by
device as the gateway keys it, so the processors store it as any other reading.

Why here rather than in the gateway: validation lives in the shared kernel, so the API runs it
itself, with the registry read from the database (the device registered a moment ago is found at
once, where a gateway's cache would lag), and answers with what it replayed. Handing letters to a
replay topic that the gateways consume would need a consumer in every gateway, and the answer
could only say what was handed over, not what was accepted.

A letter is replayed once: the route claims the letters (their rows locked) and marks them
replayed in one transaction, which commits only once the bus has acknowledged every record. If
the bus fails, nothing is marked and the letters can be replayed again; if the commit fails
after the bus acknowledged, a second replay sends the same readings again, and the readings
tables, keyed by (device, ts), store them once: the replay keeps the original receive time, which
is the time of a reading whose payload has none, and the delivery flags the processors tell
copies by.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from aiokafka.errors import KafkaError

from ioc_core.bus import BusProducer
from ioc_core.errors import RejectedMessage, ServiceUnavailableError
from ioc_core.models import DeviceRoute
from ioc_core.settings import Settings
from ioc_core.storage import Database, ReplayCandidate, ReplayRefusal
from ioc_core.telemetry import REASON_RETAINED, accept_message

log = logging.getLogger(__name__)

# The longest a replay waits for the bus to acknowledge its records. The idempotent producer
# retries some errors forever, and the letters' rows stay locked meanwhile.
SEND_TIMEOUT_S = 30.0


class ReplayProducer(Protocol):
    """What a replay needs of the bus (`BusProducer`)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send(self, topic: str, value: bytes, *, key: str | None = None) -> asyncio.Future[Any]: ...


@dataclass(frozen=True, slots=True)
class LetterMessage:
    """A stored letter as the MQTT message the gateway received (a `DeviceMessage`)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: datetime
    dup: bool
    retain: bool


def message_of(letter: ReplayCandidate) -> LetterMessage:
    """The message behind a letter. A letter stored before delivery flags were kept is taken as a
    QoS 0 message, retained only if that was why it was refused (so it is refused again)."""
    flags = letter.mqtt or {}
    return LetterMessage(
        topic=letter.topic,
        payload=letter.raw,
        mid=int(flags.get("packet_id") or 0),
        qos=int(flags.get("qos") or 0),
        received_at=letter.received_at,
        dup=bool(flags.get("dup", False)),
        retain=bool(flags.get("retain", letter.reason == REASON_RETAINED)),
    )


@dataclass(slots=True)
class ReplayOutcome:
    """Of the claimed letters: those whose records the bus acknowledged, those refused again."""

    replayed: list[int] = field(default_factory=list)
    refused: list[ReplayRefusal] = field(default_factory=list)
    records: int = 0


class Replayer:
    """Validates claimed letters and sends what they become; one per request."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        *,
        producer_factory: Callable[[], ReplayProducer] | None = None,
        send_timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self._topics = settings.topics
        self._database = database
        self._producer_factory = producer_factory or (
            lambda: BusProducer.of_settings(settings, client_id="ioc-api-replay")
        )
        self._send_timeout_s = send_timeout_s
        self._routes: dict[str, DeviceRoute | None] = {}

    async def _lookup(self, device_id: str) -> DeviceRoute | None:
        if device_id not in self._routes:
            self._routes[device_id] = await self._database.devices.route(device_id)
        return self._routes[device_id]

    async def replay(self, letters: list[ReplayCandidate]) -> ReplayOutcome:
        """Validate each letter as the gateway would and send the accepted ones' records; returns
        once the bus has acknowledged them all (raises `ServiceUnavailableError` when it does
        not, and then nothing counts as replayed)."""
        outcome = ReplayOutcome()
        records: list[tuple[str, bytes, str]] = []
        for letter in letters:
            accepted = await accept_message(message_of(letter), self._lookup)
            if isinstance(accepted, RejectedMessage):
                outcome.refused.append(ReplayRefusal(letter.id, accepted.reason, accepted.detail))
                continue
            outcome.replayed.append(letter.id)
            records.extend(
                (self._topics.telemetry(r.domain), r.to_bytes(), r.device_id) for r in accepted.records
            )
        if records:
            await self._send(records)
        outcome.records = len(records)
        return outcome

    async def _send(self, records: list[tuple[str, bytes, str]]) -> None:
        # A producer of its own per replay: replays are rare operator actions, and an idle API then
        # holds no connection to Kafka. Requests that replay nothing never start one.
        producer = self._producer_factory()

        async def send_all() -> None:
            # A send itself may wait (for the bus's room, for metadata), so the bound covers it too.
            futures = [await producer.send(topic, value, key=key) for topic, value, key in records]
            await asyncio.gather(*futures)

        try:
            await producer.start()
            await asyncio.wait_for(send_all(), self._send_timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise ServiceUnavailableError(
                f"replaying dead letters: Kafka did not take the records: {exc!r}",
                public="Kafka is unavailable",
            ) from exc
        finally:
            await producer.stop()
