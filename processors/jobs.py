"""The processor's periodic jobs besides batches: the silence sweep, alarm escalation, the end of
maintenance windows, retention, database housekeeping and the lag gauge. Each has a name (its
supervisor outage and readiness key), a period and one `run_once`; the runner schedules them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from ioc_core.bus import BusConsumer
from ioc_core.settings import Settings
from ioc_core.storage import Database, StatusTransition
from ioc_core.storage.alarms import release_suppressed
from ioc_core.storage.maintenance import close_ended
from ioc_core.storage.outbox import insert_events
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


class IncidentWork:
    """New alarms join incidents (or open them), and assignments left unacknowledged past their
    kind's delay escalate (`ioc_core.incidents`). A job rather than a step of each batch, so the
    batch path stays as cheap as it was; incidents follow their alarms within a period."""

    name = "incidents"

    def __init__(self, database: Database, settings: Settings, *, on_events: Callable[[], None]) -> None:
        self._database = database
        self._window_s = settings.incident_window_s
        self._on_events = on_events
        self.period_s = settings.incident_check_s

    async def run_once(self) -> None:
        grouping = await self._database.incidents.group_new_alarms(window_s=self._window_s)
        escalated = await self._database.incidents.escalate_assignments()
        if grouping.grouped:
            log.info("%d alarms grouped into incidents (%d opened)", grouping.grouped, grouping.opened)
        if escalated:
            log.warning("%d incident assignments escalated: nobody acknowledged them in time", len(escalated))
        if grouping.events or escalated:
            self._on_events()


class MaintenanceEnded:
    """What outlived a maintenance window raises when it ends: open alarms raised inside it are
    released (agencies get their `alarm.raised` now), and the devices that went offline inside it
    and are offline still raise their offline alarm. A removed or rescheduled window ends what of
    it was under way, and is handled the same way."""

    name = "maintenance"

    def __init__(self, database: Database, settings: Settings, *, on_events: Callable[[], None]) -> None:
        self._database = database
        self._on_events = on_events
        self.period_s = settings.maintenance_check_s

    async def run_once(self) -> None:
        async with self._database.transaction() as transaction:
            connection = transaction.connection
            released = await release_suppressed(connection)
            for event in released:
                transaction.touch(event.data["city"], event.data["domain"])
            await insert_events(connection, released)
            closed, still_offline = await close_ended(connection)
            # Their status changed inside the window; their offline alarm is raised as of now.
            raised = await transaction.apply_findings(
                offline_findings(
                    [
                        StatusTransition(
                            device_id=d.device_id,
                            city=d.city,
                            domain=d.domain,
                            name=d.name,
                            district=d.district,
                            status="offline",
                            previous="offline",
                            cause="maintenance_ended",
                            at=d.at,
                            areas=d.areas,
                        )
                        for d in still_offline
                    ]
                )
            )
        if released or raised:
            log.info(
                "%d maintenance occurrences ended: %d alarms released, %d offline alarms raised",
                closed,
                len(released),
                len(raised),
            )
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


class DeadLetterRetention:
    """Dead letters older than `IOC_DEAD_LETTER_RETENTION_DAYS` are deleted, replayed or not."""

    name = "dead-letter retention"

    def __init__(self, database: Database, settings: Settings) -> None:
        self._database = database
        self._keep = timedelta(days=settings.dead_letter_retention_days)
        self.period_s = settings.retention_check_s

    async def run_once(self) -> None:
        await self._database.dead_letters.prune(self._keep)


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
