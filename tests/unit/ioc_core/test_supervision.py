"""The shared retry policy and background-task supervision."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import asyncpg
import pytest
from aiokafka import errors as kafka_errors

from ioc_core.errors import ConfigurationError, ServiceUnavailableError, StorageError
from ioc_core.supervision import ComponentFailed, Outage, RetryPolicy, Supervisor, is_retriable, retrying

FAST = RetryPolicy(initial_s=0.001, max_s=0.01, jitter_s=0.001)


@pytest.mark.parametrize(
    "error",
    [
        ServiceUnavailableError("down"),
        StorageError("deadlock", retriable=True),
        asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
        asyncpg.ConnectionDoesNotExistError("closed"),
        asyncpg.CannotConnectNowError("starting up"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
        kafka_errors.KafkaConnectionError("no broker"),
        kafka_errors.KafkaTimeoutError(),
        kafka_errors.NotEnoughReplicasError(),
        kafka_errors.RequestTimedOutError(),
    ],
)
def test_passing_failures_are_retriable(error: BaseException) -> None:
    assert is_retriable(error)


@pytest.mark.parametrize(
    "error",
    [
        ConfigurationError("bad setting"),
        StorageError("syntax error"),
        ValueError("bug"),
        KeyError("bug"),
        kafka_errors.TopicAuthorizationFailedError(),
        kafka_errors.ProducerClosed(),
    ],
)
def test_lasting_failures_are_not_retriable(error: BaseException) -> None:
    assert not is_retriable(error)


async def test_an_outage_is_logged_when_it_starts_and_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage("writing a batch")
    failures = 25

    async def flaky() -> str:
        nonlocal failures
        if failures:
            failures -= 1
            raise ServiceUnavailableError("database at db:5432 is unreachable")
        return "stored"

    with caplog.at_level(logging.INFO, logger="ioc_core.supervision"):
        assert await retrying(outage, flaky, policy=FAST) == "stored"
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(messages) == 2, messages
    assert "failed; retrying" in messages[0]
    assert "recovered after" in messages[1] and "25 failed attempts" in messages[1]
    assert not outage.active


def test_backoff_grows_and_is_capped() -> None:
    wait = RetryPolicy(initial_s=0.5, max_s=10.0, jitter_s=0.5).retrying(lambda state: None).wait
    # tenacity's wait strategies read only the attempt number of the call state.
    waits = [wait(SimpleNamespace(attempt_number=n)) for n in range(1, 12)]  # type: ignore[arg-type]
    assert 0.5 <= waits[0] <= 1.0
    assert waits[3] > waits[0] + 1
    assert all(w <= 10.0 + 0.5 for w in waits)
    assert waits[-1] >= 10.0


async def test_a_lasting_failure_is_raised_at_once() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await retrying(Outage("x"), broken, policy=FAST)
    assert calls == 1


async def test_supervisor_retries_a_task_and_reports_it_while_failing() -> None:
    supervisor = Supervisor("test", policy=RetryPolicy(initial_s=0.05, max_s=0.05, jitter_s=0))
    release = asyncio.Event()
    failed = asyncio.Event()
    done = asyncio.Event()

    async def work() -> None:
        if not release.is_set():
            failed.set()
            raise ServiceUnavailableError("Kafka at kafka-1.internal:9092 is away", public="Kafka is away")
        done.set()

    supervisor.spawn("consume", work)
    await asyncio.wait_for(failed.wait(), 5)
    # Readiness needs no key: which dependency, never where it is.
    assert supervisor.failing()["consume"] == "ServiceUnavailableError: Kafka is away"
    release.set()
    await asyncio.wait_for(done.wait(), 5)
    assert supervisor.failing() == {}
    await supervisor.stop()


async def test_a_lasting_failure_ends_the_supervisor() -> None:
    supervisor = Supervisor("test", policy=FAST)

    async def sweep() -> None:
        raise KeyError("device")

    supervisor.every("silence", 0.01, sweep)
    with pytest.raises(ComponentFailed, match="silence stopped: KeyError"):
        await asyncio.wait_for(supervisor.wait(), 5)
    assert supervisor.failing()["failed"] == "test: silence stopped: KeyError"
    await supervisor.stop()


async def test_readiness_never_carries_an_error_message() -> None:
    supervisor = Supervisor("test", policy=FAST)
    errors = [
        OSError("Multiple exceptions: [Errno 111] Connect call failed ('10.1.2.3', 5432)"),
        ConnectionRefusedError(111, "Connect call failed ('db.internal', 5432)"),
        asyncpg.InternalClientError("postgresql://ioc:secret@db.internal/ioc"),
        ServiceUnavailableError(
            "database at db.internal:5432/ioc is unreachable", public="the database is down"
        ),
    ]
    for number, error in enumerate(errors):
        supervisor.outage(f"part {number}").failed(error)
    shown = supervisor.failing()
    assert shown == {
        "part 0": "OSError",
        "part 1": "ConnectionRefusedError",
        "part 2": "InternalClientError",
        "part 3": "ServiceUnavailableError: the database is down",
    }
    await supervisor.stop()


async def test_periodic_work_survives_an_outage() -> None:
    supervisor = Supervisor("test", policy=FAST)
    outcomes = [
        asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
        ServiceUnavailableError("down"),
        None,
    ]
    recovered = asyncio.Event()

    async def sweep() -> None:
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome
        recovered.set()

    supervisor.every("silence", 0.01, sweep)
    await asyncio.wait_for(recovered.wait(), 5)
    assert supervisor.failing() == {}
    waiting = asyncio.ensure_future(supervisor.wait())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    waiting.cancel()
    await supervisor.stop()


async def test_failure_from_another_thread_ends_the_supervisor() -> None:
    supervisor = Supervisor("gateway")
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(lambda: loop.call_soon_threadsafe(supervisor.fail, "taking a message", OSError()))
    with pytest.raises(ComponentFailed, match="taking a message stopped"):
        await asyncio.wait_for(supervisor.wait(), 5)
