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

__all__ = [
    "Database",
    "DeadLetterRow",
    "OutboxClaim",
    "OutboxEvent",
    "StorageTier",
    "TelemetryBatch",
    "WriteResult",
    "ensure_database",
]
