"""Supervision: one retry policy and one way to run background work, for every component.

A component's background loops run under a `Supervisor`. A retriable failure (a dependency that
cannot be reached, a connection in a bad state, a timeout) is retried with capped, jittered
exponential backoff and logged once when the outage starts and once when it ends, never once per
attempt; while it lasts, the component's readiness names it. A failure that is not retriable (a
bug, a refused configuration) ends the supervisor: its `wait()` raises `ComponentFailed`, which the
command line turns into one line on stderr and a non-zero exit, so that a supervisor of processes
(compose `restart:`, systemd) starts a clean process instead of this one running half a system.

The retrying itself is tenacity's; what is ours is the classification of errors across asyncpg,
aiokafka and the OS, and the outage bookkeeping that readiness and logs share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from aiokafka import errors as kafka_errors
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from ioc_core.errors import IocError, ServiceUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Kafka errors that no wait cures: credentials, authorisation, a record the broker will never take,
# or our own misuse of a client. Every other Kafka error is a broker, leader or group in transition.
_FATAL_KAFKA_ERRORS: tuple[type[BaseException], ...] = tuple(
    error
    for error in (
        getattr(kafka_errors, name, None)
        for name in (
            "TopicAuthorizationFailedError",
            "GroupAuthorizationFailedError",
            "ClusterAuthorizationFailedError",
            "TransactionalIdAuthorizationFailedError",
            "SaslAuthenticationFailedError",
            "AuthenticationFailedError",
            "UnsupportedVersionError",
            "UnsupportedSaslMechanismError",
            "InvalidTopicError",
            "MessageSizeTooLargeError",
            "RecordListTooLargeError",
            "IllegalStateError",
            "IllegalArgumentError",
            "ProducerClosed",
        )
    )
    if isinstance(error, type)
)

# asyncpg errors that say the connection (not the statement) is in trouble: after a server restart a
# pooled connection can be left mid-protocol ("cannot switch to state 15; another operation is in
# progress"), which a fresh connection cures.
_DATABASE_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InternalClientError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,  # statement_timeout: a server that hangs
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InsufficientResourcesError,
)


def is_retriable(exc: BaseException) -> bool:
    """Whether doing the same thing later can succeed."""
    if isinstance(exc, IocError):
        return exc.retriable
    if isinstance(exc, kafka_errors.KafkaError):
        return not isinstance(exc, _FATAL_KAFKA_ERRORS)
    if isinstance(exc, _DATABASE_CONNECTION_ERRORS):
        return True
    # TimeoutError and ConnectionError are OSErrors too.
    return isinstance(exc, OSError)


def describe(exc: BaseException) -> str:
    """One line for a log or a readiness check: the type and a bounded message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name


def public_description(exc: BaseException) -> str:
    """The error as readiness shows it (no key needed to read it): its type and, for an
    unreachable dependency, which one; never the message, which may say where it is."""
    name = type(exc).__name__
    return f"{name}: {exc.public}" if isinstance(exc, ServiceUnavailableError) else name


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, shared by every retry in the system."""

    initial_s: float = 0.5
    max_s: float = 10.0
    jitter_s: float = 0.5

    def retrying(self, before_sleep: Callable[[RetryCallState], None]) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(is_retriable),
            wait=wait_exponential_jitter(initial=self.initial_s, max=self.max_s, jitter=self.jitter_s),
            before_sleep=before_sleep,
            reraise=True,
        )


DEFAULT_POLICY = RetryPolicy()


class Outage:
    """One kind of work that keeps failing: logged when it starts failing and when it recovers."""

    def __init__(self, what: str, logger: logging.Logger | None = None, *, blocking: bool = True) -> None:
        self.what = what
        # Whether the component makes no progress while this fails (its readiness says so), or
        # goes on with less (a cache that cannot refresh, a notification it replaces by polling).
        self.blocking = blocking
        self._log = logger or log
        self.since: float | None = None
        self.attempts = 0
        self.last_error = ""
        self.public_error = ""
        self.public_error = ""

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        self.attempts += 1
        self.last_error = describe(exc)
        self.public_error = public_description(exc)
        if self.since is None:
            self.since = time.monotonic()
            self._log.warning("%s failed; retrying with backoff until it recovers: %s", self.what, exc)
        else:
            self._log.debug("%s failed again (attempt %d): %s", self.what, self.attempts, exc)

    def recovered(self) -> None:
        if self.since is None:
            return
        self._log.warning(
            "%s recovered after %.1f s and %d failed attempts",
            self.what,
            time.monotonic() - self.since,
            self.attempts,
        )
        self.since = None
        self.attempts = 0
        self.last_error = ""
        self.public_error = ""


class ComponentFailed(IocError):
    """A background task met an error that retrying cannot cure; the process should end."""


async def retrying(
    outage: Outage, operation: Callable[[], Awaitable[T]], *, policy: RetryPolicy = DEFAULT_POLICY
) -> T:
    """Run `operation` until it succeeds, retrying retriable errors under `policy` and reporting
    them to `outage`; a non-retriable error is raised at once."""
    if not outage.active:
        # The common case, a first attempt that succeeds, costs one await: tenacity's machinery
        # (its attempt objects and state) is set up only once something has failed. This runs per
        # message on the gateway's hot path.
        try:
            return await operation()
        except Exception as exc:
            if not is_retriable(exc):
                raise
            outage.failed(exc)
    async for attempt in policy.retrying(lambda state: outage.failed(_outcome_error(state))):
        with attempt:
            result = await operation()
    outage.recovered()
    return result


def _outcome_error(state: RetryCallState) -> BaseException:
    error = state.outcome.exception() if state.outcome is not None else None
    return error if error is not None else RuntimeError("unknown failure")


class Supervisor:
    """The background tasks of one component. Each runs until the component stops; a retriable
    failure is retried, any other ends the supervisor, and `wait()` raises it."""

    def __init__(self, component: str, *, policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self.component = component
        self.policy = policy
        self._tasks: set[asyncio.Task[None]] = set()
        self._outages: dict[str, Outage] = {}
        self._failure: ComponentFailed | None = None
        self._failure_what = ""
        self._failed = asyncio.Event()

    def outage(self, what: str, *, blocking: bool = True) -> Outage:
        """The outage record for one kind of work (created on first use)."""
        if what not in self._outages:
            self._outages[what] = Outage(f"{self.component}: {what}", blocking=blocking)
        return self._outages[what]

    def failing(self) -> dict[str, str]:
        """What cannot make progress right now, with the kind of its last error (as readiness
        shows it: `public_description`); empty when all is well."""
        failing = {what: o.public_error for what, o in self._outages.items() if o.active and o.blocking}
        if self._failure is not None and self._failure.__cause__ is not None:
            failing["failed"] = f"{self._failure_what} stopped: {public_description(self._failure.__cause__)}"
        return failing

    async def retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await retrying(self.outage(what), operation, policy=self.policy)

    def spawn(
        self, name: str, work: Callable[[], Awaitable[None]], *, restart: bool = True
    ) -> asyncio.Task[None]:
        """Run `work` in the background. When it raises a retriable error it is run again after
        backoff (with `restart`); any other error ends the supervisor. Returning ends just it."""

        async def run() -> None:
            outage = self.outage(name)
            if restart:
                await retrying(outage, work, policy=self.policy)
            else:
                await work()

        task = asyncio.create_task(run(), name=f"{self.component}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def every(
        self, name: str, seconds: float, action: Callable[[], Awaitable[object]], *, blocking: bool = True
    ) -> None:
        """Run `action` every `seconds`. A retriable failure is logged once per outage and tried
        again at the next period."""
        outage = self.outage(name, blocking=blocking)

        async def periodic() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await action()
                except Exception as exc:
                    if not is_retriable(exc):
                        raise
                    outage.failed(exc)
                    continue
                outage.recovered()

        self.spawn(name, periodic, restart=False)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.fail(task.get_name(), error)

    def fail(self, what: str, error: BaseException) -> None:
        """Record a failure that retrying cannot cure (also from work outside the supervisor's
        tasks, such as a client library's callback); `wait()` raises it."""
        if self._failure is not None:
            return
        self._failure = ComponentFailed(f"{what} stopped: {describe(error)}")
        self._failure_what = what
        self._failure.__cause__ = error
        log.critical("%s", self._failure)
        log.debug("%s failed with", what, exc_info=error)
        self._failed.set()

    async def wait(self) -> None:
        """Until a task fails for good; then raise `ComponentFailed` (cancelling does not stop
        the tasks)."""
        await self._failed.wait()
        assert self._failure is not None
        raise self._failure

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
