"""The processor's unit of work: one transaction that writes a poll of the bus (readings, latest
state, status transitions, dead letters), alarms from findings, detector state and the events of
all of it (with their webhook deliveries), composing the stores' statements on one connection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ioc_core.alarms import Finding
from ioc_core.events import Event
from ioc_core.storage import alarms, copies, dead_letters, readings, status
from ioc_core.storage.outbox import insert_events
from ioc_core.storage.pool import Connection, Transaction
from ioc_core.storage.status import StatusTransition
from ioc_core.telemetry import BusTelemetry, Reading, StoredDeadLetter


@dataclass
class TelemetryBatch:
    """One poll of the bus: telemetry records with their partition, in bus order, and dead letters."""

    records: list[tuple[BusTelemetry, int]] = field(default_factory=list)
    dead_letters: list[StoredDeadLetter] = field(default_factory=list)


@dataclass
class WriteResult:
    stored: int = 0
    duplicates: int = 0
    events: list[Event] = field(default_factory=list)
    # The readings stored by this batch (repeats left out), and the status changes it caused.
    kept: list[Reading] = field(default_factory=list)
    transitions: list[StatusTransition] = field(default_factory=list)


class BatchTransaction(Transaction):
    """The statements of one storage transaction (see `Database.transaction`)."""

    def __init__(self, connection: Connection, seq_window_s: float) -> None:
        super().__init__(connection)
        self._seq_window_s = seq_window_s

    async def write(self, batch: TelemetryBatch) -> WriteResult:
        """Store one poll of the bus: readings (each once), latest state, status transitions with
        their events in the outbox, and dead letters."""
        connection = self.connection
        pairs = [(r, p) for r, p in batch.records if isinstance(r, Reading)]
        result = WriteResult()
        keep = await copies.first_copies(connection, [r for r, _ in pairs], self._seq_window_s)
        candidates = [pair for pair, kept_ in zip(pairs, keep, strict=True) if kept_]
        added = await readings.insert_readings(connection, [r for r, _ in candidates])
        # A reading counts as stored when it made a row or added a metric to one.
        result.stored = sum(1 for metrics in added if metrics)
        result.duplicates = len(pairs) - result.stored
        kept = readings.stored_readings(candidates, added)
        result.kept = [r for r, _ in kept]
        self.touched.update((r.city, r.domain) for r, _ in kept)
        await status.save_latest(connection, kept)
        result.transitions = await status.apply_statuses(connection, batch.records)
        self.touched.update((t.city, t.domain) for t in result.transitions)
        result.events = [status.status_event(t) for t in result.transitions]
        await insert_events(connection, result.events)
        await dead_letters.insert_dead_letters(connection, batch.dead_letters)
        return result

    async def sweep_silent(
        self, owned: Sequence[tuple[str, int]], offline_after_s: dict[str, float]
    ) -> list[StatusTransition]:
        """Mark offline the online devices, among those whose (domain, partition) is in `owned`,
        that have been silent longer than their domain allows; records their events."""
        if not owned:
            return []
        transitions = await status.sweep_silent(self.connection, owned, offline_after_s)
        self.touched.update((t.city, t.domain) for t in transitions)
        await insert_events(self.connection, [status.status_event(t) for t in transitions])
        return transitions

    async def detector_states(self, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return await alarms.detector_states(self.connection, device_ids)

    async def save_detector_states(
        self, states: Mapping[str, str], flood_signals: Mapping[str, alarms.StoredSignal | None]
    ) -> None:
        """Store detector state, each a JSON document (and, for flood stations, their signal and
        zone) of registered devices."""
        await alarms.save_detector_states(self.connection, states, flood_signals)

    async def open_zone_alarms(self, subjects: Sequence[str]) -> set[str]:
        """Which of these zones have an open flood alarm."""
        return await alarms.open_zone_alarms(self.connection, subjects)

    async def zone_flood_signals(self, zone: str, *, rising_only: bool) -> list[alarms.ZoneStation]:
        """The stored signals of a zone's flood stations (or of those whose water rises), each with
        the areas its station lies in."""
        return await alarms.zone_flood_signals(self.connection, zone, rising_only=rising_only)

    async def escalate_alarms(self, after_s: dict[str, float]) -> list[Event]:
        """Escalate the alarms nobody acknowledged in time; records `alarm.updated` events with
        `escalated: true`."""
        events = await alarms.escalate(self.connection, after_s)
        self._record(events)
        await insert_events(self.connection, events)
        return events

    async def apply_findings(self, findings: Sequence[Finding]) -> list[Event]:
        """Raise, repeat, escalate or resolve alarms; records and returns their lifecycle events."""
        events = await alarms.apply_findings(self.connection, findings)
        self._record(events)
        await insert_events(self.connection, events)
        return events

    def _record(self, events: Sequence[Event]) -> None:
        """Touch the (city, domain) pairs of alarm events."""
        self.touched.update((e.data["city"], e.data["domain"]) for e in events)
