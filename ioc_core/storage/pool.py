"""The core every store is built on: the connection pool's lifecycle, how a connection is set up,
fetch helpers that turn an unreachable server into `ServiceUnavailableError`, the transaction
that bumps the state versions of what it touched, and creating or dropping a database."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from ioc_core.errors import StorageError
from ioc_core.storage import views
from ioc_core.storage.connections import CONNECTION_ERRORS, TRANSIENT_ERRORS, unavailable
from ioc_core.storage.schema import ident

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

log = logging.getLogger(__name__)


def text_list(values: Sequence[str] | None) -> list[str] | None:
    """A filter list as a `text[]` parameter; None (no filter) stays None."""
    return list(values) if values is not None else None


async def init_connection(connection: asyncpg.Connection) -> None:
    # Timestamps that PostgreSQL renders itself (JSON built in SQL) come out in UTC.
    await connection.execute("SET TIME ZONE 'UTC'")
    for type_name in ("jsonb", "json"):
        await connection.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
        )


async def _maintenance_connection(url: str) -> tuple[str, asyncpg.Connection]:
    """The name of the database in `url`, and a connection to the server's `postgres` database
    from which it can be created or dropped."""
    parts = urlsplit(url)
    name = ident(parts.path.lstrip("/"))
    try:
        return name, await asyncpg.connect(parts._replace(path="/postgres").geturl(), timeout=10)
    except CONNECTION_ERRORS as exc:
        raise unavailable(url, exc) from exc


async def ensure_database(url: str) -> bool:
    """Create the database named in `url` when it does not exist; True when it was created."""
    try:
        connection = await asyncpg.connect(url, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        pass
    except CONNECTION_ERRORS as exc:
        raise unavailable(url, exc) from exc
    else:
        await connection.close()
        return False
    name, admin = await _maintenance_connection(url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("created database %s", name)
    return True


async def drop_database(url: str) -> None:
    """Remove the database named in `url`, disconnecting its sessions (benchmarks and tests)."""
    name, admin = await _maintenance_connection(url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()
    log.info("dropped database %s", name)


class Transaction:
    """The connection of one storage transaction, and the (city, domain) pairs whose screens
    change when it commits (see `Pool.transaction`)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        # (city, domain) pairs whose screens change when this transaction commits.
        self.touched: set[tuple[str, str]] = set()

    @property
    def connection(self) -> Connection:
        return self._connection

    def touch(self, city: str, domain: str) -> None:
        self.touched.add((city, domain))

    async def flush_versions(self) -> None:
        """Bump the touched pairs' state versions; the last statement, so the rows stay locked
        only until the commit that follows."""
        if not self.touched:
            return
        pairs = sorted(self.touched)
        await self._connection.execute(
            views.BUMP_STATE_VERSIONS_SQL, [p[0] for p in pairs], [p[1] for p in pairs]
        )
        self.touched.clear()


TransactionT = TypeVar("TransactionT", bound=Transaction)


class Pool:
    """A connection pool to the database at `url`, made by `start` and closed by `stop`."""

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float | None = None
    ) -> None:
        self.url = url
        # Bounds every statement, on the server (statement_timeout) and in the client (a server
        # that hangs, answering nothing): either way the caller gets a retriable error instead of
        # waiting forever. None keeps the long default, for migrations.
        self._timeout_s = timeout_s
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min_size,
                max_size=self._max_size,
                init=init_connection,
                # A connection attempt to a server that hangs waits no longer than a statement.
                timeout=10 if self._timeout_s is None else min(10.0, self._timeout_s),
                command_timeout=60 if self._timeout_s is None else self._timeout_s + 2,
                server_settings=(
                    {} if self._timeout_s is None else {"statement_timeout": str(int(self._timeout_s * 1000))}
                ),
            )
        except CONNECTION_ERRORS as exc:
            raise unavailable(self.url, exc) from exc
        except asyncpg.InvalidCatalogNameError as exc:
            raise StorageError(f"{exc}; run `ioc migrate` to create it") from exc

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("database is not started")
        return self._pool

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Turns an unreachable server inside the block into `ServiceUnavailableError`, and a
        statement cancelled by `statement_timeout` into a retriable `StorageError`."""
        try:
            yield
        except CONNECTION_ERRORS as exc:
            raise unavailable(self.url, exc) from exc
        except asyncpg.QueryCanceledError as exc:
            raise StorageError(f"a statement was cancelled: {exc}", retriable=True) from exc

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.guard():
            return list(await self.pool.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with self.guard():
            return await self.pool.fetchrow(sql, *args)

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """One unit of work (see `unit_of_work`) through a plain `Transaction`."""
        return self.unit_of_work(Transaction)

    @contextlib.asynccontextmanager
    async def joined(self, within: Transaction | None) -> AsyncIterator[Transaction]:
        """`within`, the caller's open transaction, so that a store's change commits (or not)
        with whatever else the caller does in it (its audit entry, say); without one, a
        transaction of the store's own."""
        if within is not None:
            yield within
            return
        async with self.transaction() as transaction:
            yield transaction

    @contextlib.asynccontextmanager
    async def unit_of_work(self, make: Callable[[Connection], TransactionT]) -> AsyncIterator[TransactionT]:
        """One unit of work: everything done through the yielded object commits together when
        the block ends, or not at all. Durable when the block has ended."""
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                transaction = make(connection)
                yield transaction
                await transaction.flush_versions()
        except CONNECTION_ERRORS as exc:
            raise unavailable(self.url, exc) from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"a storage transaction failed: {exc}", retriable=isinstance(exc, TRANSIENT_ERRORS)
            ) from exc
