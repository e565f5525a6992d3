"""All SQL of the system lives in this package: the schema (`schema`) and every query (`database`)."""

from ioc_core.storage.database import (
    Database,
    DeadLetterRow,
    OutboxClaim,
    OutboxEvent,
    TelemetryBatch,
    WriteResult,
    ensure_database,
)
from ioc_core.storage.schema import StorageTier
from ioc_core.storage.views import ApiKeyRow, CityRow, StatePage, SummaryDevice

__all__ = [
    "ApiKeyRow",
    "CityRow",
    "Database",
    "DeadLetterRow",
    "OutboxClaim",
    "OutboxEvent",
    "StatePage",
    "StorageTier",
    "SummaryDevice",
    "TelemetryBatch",
    "WriteResult",
    "ensure_database",
]
