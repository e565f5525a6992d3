"""The outbox relay: events recorded in the database with the changes that caused them go to
`ioc.events`, at least once and in order, then are marked published.

It runs every `IOC_OUTBOX_POLL_S`, and at once when woken by work that has just recorded events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ioc_core.bus import BusProducer
from ioc_core.storage import Database
from ioc_core.supervision import Supervisor

log = logging.getLogger(__name__)

# Events claimed per round; a full round is followed by another at once.
_CLAIM_LIMIT = 500


class OutboxRelay:
    """Relays recorded events; `run` is its loop, `run_once` one pass over what is pending."""

    name = "relay"

    def __init__(
        self,
        database: Database,
        producer: BusProducer,
        supervisor: Supervisor,
        *,
        topic: str,
        period_s: float,
    ) -> None:
        self._database = database
        self._producer = producer
        self._supervisor = supervisor
        self._topic = topic
        self.period_s = period_s
        self._pending = asyncio.Event()
        self.relayed = 0

    def wake(self) -> None:
        """Events were recorded: relay them now rather than at the next period."""
        self._pending.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pending.wait(), timeout=self.period_s)
            self._pending.clear()
            await self._supervisor.retry("relaying events", self.run_once)

    async def run_once(self) -> None:
        while await self._relay_some(_CLAIM_LIMIT) == _CLAIM_LIMIT:
            pass

    async def _relay_some(self, limit: int) -> int:
        async with self._database.outbox.unpublished(limit) as claim:
            if not claim.events:
                return 0
            futures = [
                await self._producer.send(self._topic, event.payload.encode(), key=event.key)
                for event in claim.events
            ]
            await asyncio.gather(*futures)
            await claim.mark_published()
        self.relayed += len(claim.events)
        return len(claim.events)
