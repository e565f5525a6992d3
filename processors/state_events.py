"""The devices' latest state for the live screens: what committed batches changed waits here and
goes out every `IOC_STATE_EVENT_INTERVAL_S` as `state.changed` events (latest wins).

Straight to the bus, not through the outbox: they are snapshots, and a lost one is superseded by
the next.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from aiokafka.errors import KafkaError

from ioc_core.bus import BusProducer
from ioc_core.events import ChangedDevice, state_changed_event
from ioc_core.storage import StatusTransition, TelemetryBatch
from ioc_core.telemetry import Reading
from processors.detection import DeviceProfile

log = logging.getLogger(__name__)

# Devices per `state.changed` event, so that one event stays far below Kafka's message size limit.
STATE_ITEMS_MAX = 500


@dataclass(frozen=True, slots=True)
class PendingState:
    device_id: str
    city: str
    domain: str
    status: str
    ts: datetime
    metrics: dict[str, float]

    def snapshot(self) -> ChangedDevice:
        return {
            "device_id": self.device_id,
            "status": self.status,
            "ts": self.ts.isoformat(),
            "metrics": self.metrics,
        }


class StateEvents:
    """The pending latest states and the job that sends them."""

    name = "state events"

    def __init__(self, producer: BusProducer, *, topic: str, period_s: float) -> None:
        self._producer = producer
        self._topic = topic
        self.period_s = period_s
        # Latest state of the devices changed since the last flush, and the newest reading time
        # seen per device, so that a late reading never moves a screen backwards.
        self._pending: dict[str, PendingState] = {}
        self._newest_ts: dict[str, datetime] = {}
        self.sent = 0

    def remember(
        self,
        batch: TelemetryBatch,
        kept: list[Reading],
        transitions: list[StatusTransition],
        profiles: dict[str, DeviceProfile],
    ) -> None:
        """Note a committed batch's changes for the next flush (latest wins). Metrics merge into
        what is pending, as they do in the stored latest state."""
        # A device's status after the batch: its last record decides, as in storage.
        statuses: dict[str, str] = {}
        for record, _ in batch.records:
            statuses[record.device_id] = "online" if isinstance(record, Reading) else record.status
        statuses.update((t.device_id, t.status) for t in transitions)
        for reading in sorted(kept, key=lambda r: r.ts):
            profile = profiles.get(reading.device_id)
            if profile is None:
                continue  # no longer registered: it has no latest state either
            newest = self._newest_ts.get(reading.device_id)
            if newest is not None and reading.ts < newest:
                continue  # a late reading is stored but never moves "latest" backwards
            pending = self._pending.get(reading.device_id)
            self._pending[reading.device_id] = PendingState(
                device_id=reading.device_id,
                city=profile.city,
                domain=profile.domain,
                status=statuses.get(reading.device_id, "online"),
                ts=reading.ts,
                metrics={**pending.metrics, **reading.metrics} if pending else dict(reading.metrics),
            )
            self._newest_ts[reading.device_id] = reading.ts
        self.note_status(transitions)

    def note_status(self, transitions: Iterable[StatusTransition]) -> None:
        for transition in transitions:
            pending = self._pending.get(transition.device_id)
            if pending is not None:
                self._pending[transition.device_id] = replace(pending, status=transition.status)

    async def run_once(self) -> None:
        """Send the pending latest states as `state.changed` events, per city and domain.

        A failed send puts its devices back into the pending set (unless newer state is pending
        by then), so a device that falls silent still gets its last state out.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        places: dict[tuple[str, str], list[PendingState]] = {}
        for state in pending.values():
            places.setdefault((state.city, state.domain), []).append(state)
        now = datetime.now(tz=UTC)
        chunks = [
            states[start : start + STATE_ITEMS_MAX]
            for _, states in sorted(places.items())
            for start in range(0, len(states), STATE_ITEMS_MAX)
        ]
        try:
            results = await asyncio.gather(
                *(self._send(chunk, now) for chunk in chunks), return_exceptions=True
            )
        except BaseException:
            # Stopped while sending: what was sent may go again, which a snapshot allows.
            self._restore(pending.values())
            raise
        failures = [(chunk, r) for chunk, r in zip(chunks, results, strict=True) if r is not None]
        for chunk, error in failures:
            if not isinstance(error, KafkaError):
                raise error
            self._restore(chunk)
        if failures:
            log.warning(
                "sending %d of %d state.changed events failed, retrying with the next: %s",
                len(failures),
                len(chunks),
                failures[0][1],
            )
        self.sent += len(chunks) - len(failures)

    def _restore(self, states: Iterable[PendingState]) -> None:
        for state in states:
            newer = self._pending.get(state.device_id)
            self._pending[state.device_id] = (
                replace(newer, metrics={**state.metrics, **newer.metrics}) if newer else state
            )

    async def _send(self, states: list[PendingState], at: datetime) -> None:
        event = state_changed_event(
            city=states[0].city, domain=states[0].domain, items=[s.snapshot() for s in states], at=at
        )
        await self._producer.send_and_wait(self._topic, event.to_bytes(), key=event.key)
