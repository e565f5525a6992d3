"""All SQL of the system lives in this package: the schema (`schema`, `migrations`), the pool and
transaction core (`pool`), one store per aggregate (`devices`, `readings`, `status`, `alarms`,
`outbox`, `api_keys`, `dead_letters`, `webhooks`, `audit`), the processor's unit of work (`batch`)
and the `Database` that composes them."""

from ioc_core.storage.alarms import StoredSignal, ZoneStation
from ioc_core.storage.audit import AuditQuery
from ioc_core.storage.batch import BatchTransaction, TelemetryBatch, WriteResult
from ioc_core.storage.connections import is_statement_timeout
from ioc_core.storage.database import Database
from ioc_core.storage.dead_letters import (
    DeadLetterDetail,
    DeadLetterFilter,
    DeadLetterRow,
    ReplayCandidate,
    ReplayRefusal,
)
from ioc_core.storage.devices import DeviceProfileRow
from ioc_core.storage.outbox import OutboxClaim, OutboxEvent
from ioc_core.storage.pool import Transaction, drop_database, ensure_database
from ioc_core.storage.rules import RuleOverride, RuleScope
from ioc_core.storage.schema import StorageTier
from ioc_core.storage.status import StatusTransition
from ioc_core.storage.views import ApiKeyRow, CityRow, StatePage, SummaryDevice

__all__ = [
    "ApiKeyRow",
    "AuditQuery",
    "BatchTransaction",
    "CityRow",
    "Database",
    "DeadLetterDetail",
    "DeadLetterFilter",
    "DeadLetterRow",
    "DeviceProfileRow",
    "OutboxClaim",
    "OutboxEvent",
    "ReplayCandidate",
    "ReplayRefusal",
    "RuleOverride",
    "RuleScope",
    "StatePage",
    "StatusTransition",
    "StorageTier",
    "StoredSignal",
    "SummaryDevice",
    "TelemetryBatch",
    "Transaction",
    "WriteResult",
    "ZoneStation",
    "drop_database",
    "ensure_database",
    "is_statement_timeout",
]
