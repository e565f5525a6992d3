"""In-memory stand-ins for what the processor works with: the bus consumer and producer and the
database, each recording what it was asked to do in one shared journal, so that a test can check
the order of writes and commits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import orjson

from ioc_core.alarms import Finding
from ioc_core.bus import BusRecord
from ioc_core.errors import ServiceUnavailableError
from ioc_core.events import Event
from ioc_core.storage import (
    DeviceProfileRow,
    OutboxEvent,
    StatusTransition,
    StoredSignal,
    TelemetryBatch,
    WriteResult,
    ZoneStation,
)
from ioc_core.telemetry import Reading


class FakeTransaction:
    """Stages its changes; the database takes them only when the transaction ends without error."""

    def __init__(self, database: FakeDatabase) -> None:
        self._database = database
        self.readings: list[Reading] = []
        self.detector_states_saved: dict[str, dict[str, Any]] = {}
        self.findings: list[Finding] = []

    async def write(self, batch: TelemetryBatch) -> WriteResult:
        database = self._database
        if database.write_failures > 0:
            database.write_failures -= 1
            database.journal.append("write failed")
            raise ServiceUnavailableError("the database is away")
        seen = set(database.stored)
        kept = []
        for record, _ in batch.records:
            if isinstance(record, Reading) and (record.device_id, record.ts) not in seen:
                seen.add((record.device_id, record.ts))
                kept.append(record)
        self.readings = kept
        return WriteResult(stored=len(kept), duplicates=len(batch.records) - len(kept), kept=kept)

    async def detector_states(self, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {
            d: self._database.detector_states[d] for d in device_ids if d in self._database.detector_states
        }

    async def save_detector_states(
        self, states: Mapping[str, str], signals: Mapping[str, StoredSignal | None]
    ) -> None:
        self.detector_states_saved.update((d, orjson.loads(state)) for d, state in states.items())

    async def open_zone_alarms(self, subjects: Sequence[str]) -> set[str]:
        return {subject for subject in subjects if subject in self._database.open_zone_alarms}

    async def zone_flood_signals(self, zone: str, *, rising_only: bool) -> list[ZoneStation]:
        self._database.zone_signal_reads.append((zone, rising_only))
        return []

    async def apply_findings(self, findings: Sequence[Finding]) -> list[Event]:
        database = self._database
        if database.findings_failures > 0:
            # Fails after detection has run: what it moved on in memory is not committed.
            database.findings_failures -= 1
            database.journal.append("findings failed")
            raise ServiceUnavailableError("the database went away mid-transaction")
        self.findings.extend(findings)
        return list(self._database.events_per_finding) if findings else []

    async def sweep_silent(
        self, owned: list[tuple[str, int]], offline_after: dict[str, float]
    ) -> list[StatusTransition]:
        self._database.swept.append(owned)
        return list(self._database.silent)

    async def escalate_alarms(self, after_s: dict[str, float]) -> list[Event]:
        self._database.journal.append("escalate")
        return list(self._database.escalated)

    def commit(self) -> None:
        database = self._database
        database.stored.update((r.device_id, r.ts) for r in self.readings)
        database.detector_states.update(self.detector_states_saved)
        database.findings.extend(self.findings)
        database.journal.append(f"stored {len(self.readings)}")


class FakeClaim:
    def __init__(self, database: FakeDatabase, events: list[OutboxEvent]) -> None:
        self._database = database
        self.events = events

    async def mark_published(self) -> None:
        published = {e.id for e in self.events}
        self._database.pending = [e for e in self._database.pending if e.id not in published]


class FakeDatabase:
    tier = "fake"

    def __init__(self, journal: list[str], profiles: Sequence[DeviceProfileRow] = ()) -> None:
        self.journal = journal
        self.profiles = {p.id: p for p in profiles}
        self.stored: set[tuple[str, Any]] = set()
        self.detector_states: dict[str, dict[str, Any]] = {}
        self.findings: list[Finding] = []
        self.write_failures = 0
        self.findings_failures = 0
        self.failures_after_commit = 0
        self.events_per_finding: list[Event] = []
        self.silent: list[StatusTransition] = []
        self.swept: list[list[tuple[str, int]]] = []
        self.escalated: list[Event] = []
        self.pending: list[OutboxEvent] = []
        self.open_zone_alarms: set[str] = set()
        # (zone, rising_only) of each read of its stations' signals.
        self.zone_signal_reads: list[tuple[str, bool]] = []
        self.retention: list[timedelta] = []
        self.housekept = 0
        self.audit_keep_days: float | None = None
        self.devices = _FakeDevices(self)
        self.readings = _FakeReadings(self)
        self.outbox = _FakeOutbox(self)
        self.rules = _FakeRules()
        self.dead_letters = _FakeDeadLetters()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeTransaction]:
        transaction = FakeTransaction(self)
        yield transaction
        transaction.commit()
        if self.failures_after_commit > 0:
            # The commit was made, but its answer was lost on the way back.
            self.failures_after_commit -= 1
            self.journal.append("commit answer lost")
            raise ServiceUnavailableError("the connection broke while committing")

    async def housekeeping(self, *, audit_keep_days: float = 365) -> None:
        self.housekept += 1
        self.audit_keep_days = audit_keep_days


class _FakeDevices:
    def __init__(self, database: FakeDatabase) -> None:
        self._database = database
        # The device profiles version; a test moves it as a device's update would.
        self.profiles_version = 0

    async def profiles(self, device_ids: Sequence[str]) -> list[DeviceProfileRow]:
        return [self._database.profiles[d] for d in device_ids if d in self._database.profiles]

    async def detection_version(self) -> tuple[int, int]:
        return self._database.rules.current, self.profiles_version


class _FakeDeadLetters:
    """Records each prune's retention."""

    def __init__(self) -> None:
        self.pruned: list[timedelta] = []

    async def prune(self, older_than: timedelta) -> int:
        self.pruned.append(older_than)
        return 0


class _FakeRules:
    """The rules version processors watch; a test moves it to change the rules at run time."""

    def __init__(self) -> None:
        self.current = 0

    async def version(self) -> int:
        return self.current


class _FakeReadings:
    def __init__(self, database: FakeDatabase) -> None:
        self._database = database

    async def apply_retention(self, older_than: timedelta) -> int:
        self._database.retention.append(older_than)
        return 0


class _FakeOutbox:
    def __init__(self, database: FakeDatabase) -> None:
        self._database = database

    @contextlib.asynccontextmanager
    async def unpublished(self, limit: int) -> AsyncIterator[FakeClaim]:
        yield FakeClaim(self._database, self._database.pending[:limit])


class FakeConsumer:
    """Hands out the batches put in `polls`, one per poll; remembers the rebalance listener."""

    def __init__(self, journal: list[str], listener: Any) -> None:
        self.journal = journal
        self.listener = listener
        self.polls: asyncio.Queue[list[BusRecord]] = asyncio.Queue()
        self.commits = 0
        self.caught_up_partitions: list[tuple[str, int]] = []
        self.partition_lag: dict[tuple[str, int], int] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def getmany(self, timeout_ms: int = 1_000) -> list[BusRecord]:
        try:
            return await asyncio.wait_for(self.polls.get(), timeout_ms / 1000)
        except TimeoutError:
            return []

    async def commit(self) -> None:
        self.commits += 1
        self.journal.append("offsets committed")

    def forget_commits(self) -> None:
        self.journal.append("commits forgotten")

    async def lag(self) -> dict[tuple[str, int], int]:
        return dict(self.partition_lag)

    async def uncommitted(self) -> int:
        return self.polls.qsize()

    async def caught_up(self, *, max_lag: int) -> list[tuple[str, int]]:
        return list(self.caught_up_partitions)


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str | None]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, *, key: str | None = None) -> asyncio.Future[Any]:
        self.sent.append((topic, value, key))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def send_and_wait(self, topic: str, value: bytes, *, key: str | None = None) -> None:
        await (await self.send(topic, value, key=key))
