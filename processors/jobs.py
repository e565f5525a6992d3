"""The processor's periodic jobs besides batches: the silence sweep, alarm escalation, retention,
database housekeeping and the lag gauge. Each has a name (its supervisor outage and readiness
key), a period and one `run_once`; the runner schedules them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from ioc_core.bus import BusConsumer
from ioc_core.settings import Settings
from ioc_core.storage import Database, StatusTransition
from processors.batches import offline_findings

log = logging.getLogger(__name__)

# A partition counts as caught up (its devices' silence is real, not our lag) within this many records.
CAUGHT_UP_LAG = 100
LAG_CHECK_S = 2.0
HOUSEKEEPING_S = 60.0


class ScheduledJob(Protocol):
    name: str
    period_s: float

    async def run_once(self) -> None: ...


class SilenceSweep:
    """Devices of the partitions we own and have caught up on that fell silent go offline."""

    name = "silence"

    def __init__(
        self,
        database: Database,
        consumer: BusConsumer,
        settings: Settings,
        *,
        on_transitions: Callable[[list[StatusTransition]], None],
        on_events: Callable[[], None],
    ) -> None:
        self._database = database
        self._consumer = consumer
        self._topics = settings.topics
        self._offline_after = settings.offline_after
        self._on_transitions = on_transitions
        self._on_events = on_events
        self.period_s = settings.silence_check_s

    async def run_once(self) -> None:
        caught_up = await self._consumer.caught_up(max_lag=CAUGHT_UP_LAG)
        owned = [
            (domain, partition)
            for topic, partition in caught_up
            if (domain := self._topics.domain_of(topic)) is not None
        ]
        if not owned:
            return
        async with self._database.transaction() as transaction:
            transitions = await transaction.sweep_silent(owned, self._offline_after())
            await transaction.apply_findings(offline_findings(transitions))
        self._on_transitions(transitions)
        if transitions:
            log.info("%d devices went silent", len(transitions))
            self._on_events()


class Escalation:
    """Alarms nobody acknowledged in time are escalated."""

    name = "escalation"

    def __init__(self, database: Database, settings: Settings, *, on_events: Callable[[], None]) -> None:
        self._database = database
        self._escalate_after = settings.escalate_after
        self._on_events = on_events
        self.period_s = settings.silence_check_s

    async def run_once(self) -> None:
        async with self._database.transaction() as transaction:
            events = await transaction.escalate_alarms(self._escalate_after())
        if events:
            log.warning("%d alarms escalated: nobody acknowledged them in time", len(events))
            self._on_events()


class Retention:
    """Readings older than `IOC_RETENTION_DAYS` are dropped."""

    name = "retention"

    def __init__(self, database: Database, settings: Settings) -> None:
        self._database = database
        self._days = settings.retention_days
        self.period_s = settings.retention_check_s

    async def run_once(self) -> None:
        removed = await self._database.readings.apply_retention(timedelta(days=self._days))
        if removed:
            log.info("retention removed %d chunks or rows older than %d days", removed, self._days)


class Housekeeping:
    """The database's own tidying (published outbox events, audit entries past
    `IOC_AUDIT_RETENTION_DAYS`, and the like)."""

    name = "housekeeping"
    period_s = HOUSEKEEPING_S

    def __init__(self, database: Database, settings: Settings) -> None:
        self._database = database
        self._audit_days = settings.audit_retention_days

    async def run_once(self) -> None:
        await self._database.housekeeping(audit_keep_days=self._audit_days)


class LagRefresh:
    """Keeps the lag gauge: per partition, records on the bus not yet stored and committed."""

    name = "lag"
    period_s = LAG_CHECK_S

    def __init__(self, consumer: BusConsumer) -> None:
        self._consumer = consumer
        self.lag: dict[tuple[str, int], int] = {}

    async def run_once(self) -> None:
        self.lag = await self._consumer.lag()
