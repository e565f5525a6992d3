"""How database failures are told apart: an unreachable server (retry later) or a refusal."""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg

from ioc_core.errors import ServiceUnavailableError

# Failures that pass by themselves: retry the same transaction later.
TRANSIENT_ERRORS = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.OperatorInterventionError,  # includes QueryCanceledError: a statement timeout
    asyncpg.InsufficientResourcesError,
)

CONNECTION_ERRORS = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    # A pooled connection left mid-protocol by a server restart ("cannot switch to state 15;
    # another operation is in progress"): the pool replaces it, so this passes like an outage.
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
)


def unavailable(url: str, exc: BaseException) -> ServiceUnavailableError:
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 5432}{parts.path}"
    return ServiceUnavailableError(
        f"database at {where} is unreachable: {exc}", public="the database is unavailable"
    )


def is_statement_timeout(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, is the server cancelling a statement that
    ran past `statement_timeout` (rather than the server being unreachable)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, asyncpg.QueryCanceledError):
            return True
        seen = seen.__cause__
    return False
