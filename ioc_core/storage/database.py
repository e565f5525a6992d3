"""The database as the rest of the system sees it: a connection pool started and stopped as a
component, with one store per aggregate over it (`devices`, `readings`, `status`, `alarms`,
`outbox`, `api_keys`, `dead_letters`, `webhooks`, `audit`, `areas`, `regions`), migrations, the
processor's unit of work (`transaction`, see `batch`), and a plain unit of work that a change and
its audit entry share (`unit_of_work`)."""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta

import asyncpg

from ioc_core.component import Component
from ioc_core.sealing import SecretSealer
from ioc_core.storage import migrations
from ioc_core.storage.agencies import AgencyStore
from ioc_core.storage.alarms import AlarmStore
from ioc_core.storage.api_keys import ApiKeyStore
from ioc_core.storage.areas import AreaStore, SpatialEngine, detect_engine
from ioc_core.storage.audit import AuditStore
from ioc_core.storage.batch import BatchTransaction, TelemetryBatch, WriteResult
from ioc_core.storage.dead_letters import DeadLetterStore
from ioc_core.storage.devices import DeviceStore
from ioc_core.storage.incidents import IncidentStore
from ioc_core.storage.maintenance import MaintenanceStore
from ioc_core.storage.outbox import OutboxStore
from ioc_core.storage.pool import Pool, Transaction
from ioc_core.storage.readings import ReadingStore
from ioc_core.storage.regions import RegionStore
from ioc_core.storage.rules import RuleStore
from ioc_core.storage.schema import StorageTier
from ioc_core.storage.status import StatusStore
from ioc_core.storage.tiers import COMPRESS_AFTER, DEFAULT_RETENTION
from ioc_core.storage.webhooks import WebhookStore

log = logging.getLogger(__name__)


class Database(Component):
    """A connection pool and the stores over it. Use with `async with`. `sealer` seals and opens
    webhook signing secrets (`Settings.sealer()`); without it no webhook endpoint can be made."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        seq_window_s: float = 3600,
        timeout_s: float | None = None,
        sealer: SecretSealer | None = None,
    ) -> None:
        self._pool = Pool(url, min_size=min_size, max_size=max_size, timeout_s=timeout_s)
        self.seq_window_s = seq_window_s
        self.tier: StorageTier | None = None
        self.spatial: SpatialEngine | None = None
        self.devices = DeviceStore(self._pool, self._current_spatial)
        self.areas = AreaStore(self._pool, self._current_spatial)
        self.regions = RegionStore(self._pool)
        self.readings = ReadingStore(self._pool, self._current_tier, seq_window_s)
        self.status = StatusStore(self._pool)
        self.alarms = AlarmStore(self._pool)
        self.outbox = OutboxStore(self._pool)
        self.api_keys = ApiKeyStore(self._pool)
        self.dead_letters = DeadLetterStore(self._pool)
        self.audit = AuditStore(self._pool)
        # Maintenance windows and their occurrences (ioc_core.maintenance).
        self.maintenance = MaintenanceStore(self._pool)
        # Incidents (with the cities' procedures) and the agencies they are assigned to.
        self.incidents = IncidentStore(self._pool)
        self.agencies = AgencyStore(self._pool)
        # Rule overrides at run time and the rules version processors watch.
        self.rules = RuleStore(self._pool)
        # Webhook endpoints, deliveries and attempts, over this pool.
        self.webhooks = WebhookStore(lambda: self._pool.pool, url, sealer)
        self._sealer = sealer

    async def start(self) -> None:
        await self._pool.start()
        self.tier = await self.detect_tier()
        self.spatial = await detect_engine(self._pool)

    async def stop(self) -> None:
        await self._pool.stop()

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool.pool

    async def _current_tier(self) -> StorageTier:
        return self.tier if self.tier is not None else await self.detect_tier()

    async def _current_spatial(self) -> SpatialEngine:
        # Asked again while the schema predates areas: another process may migrate it meanwhile.
        if self.spatial in (None, SpatialEngine.NONE):
            self.spatial = await detect_engine(self._pool)
        assert self.spatial is not None
        return self.spatial

    async def detect_tier(self) -> StorageTier:
        return await migrations.detect_tier(self._pool)

    async def migrate(
        self,
        *,
        retention: timedelta = DEFAULT_RETENTION,
        compress_after: timedelta = COMPRESS_AFTER,
        reader_password: str | None = None,
        postgis: bool = True,
    ) -> StorageTier:
        """Create or upgrade the schema (see `migrations.migrate`), then seal the webhook secrets
        an earlier version stored in plain text, and those an old key sealed, with the current key."""
        self.tier = await migrations.migrate(
            self._pool,
            retention=retention,
            compress_after=compress_after,
            reader_password=reader_password,
            postgis=postgis,
        )
        self.spatial = await detect_engine(self._pool)
        if self._sealer is not None:
            report = await self.webhooks.seal_stored_secrets()
            if report.sealed or report.resealed:
                log.info(
                    "webhook signing secrets: %d sealed that were in plain text, %d sealed again with"
                    " the current key",
                    report.sealed,
                    report.resealed,
                )
        elif plain := await self.webhooks.plain_secrets():
            log.warning(
                "%d webhook signing secrets are stored in plain text: set IOC_SECRETS_KEY and run"
                " `ioc migrate` to seal them",
                plain,
            )
        return self.tier

    async def ping(self) -> None:
        await self._pool.fetchrow("SELECT 1")

    def transaction(self) -> contextlib.AbstractAsyncContextManager[BatchTransaction]:
        """One unit of work: everything done through the yielded object commits together when
        the block ends, or not at all. Durable when the block has ended."""
        return self._pool.unit_of_work(lambda connection: BatchTransaction(connection, self.seq_window_s))

    def unit_of_work(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A transaction that stores join with `within=`: their changes and whatever else is done
        in it (the change's audit entry) commit together when the block ends, or not at all."""
        return self._pool.transaction()

    async def write_batch(self, batch: TelemetryBatch) -> WriteResult:
        """Store one poll of the bus in one transaction (see `BatchTransaction.write`)."""
        async with self.transaction() as transaction:
            return await transaction.write(batch)

    async def housekeeping(self, *, outbox_keep_s: float = 86_400, audit_keep_days: float = 365) -> None:
        """Forget what no longer matters: relayed events, expired de-duplication windows, and
        audit entries older than `audit_keep_days`."""
        await self.outbox.forget_published(keep_s=outbox_keep_s)
        await self.readings.forget_expired_windows()
        await self.audit.forget(older_than_days=audit_keep_days)
