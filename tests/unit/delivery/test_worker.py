"""The webhook delivery worker over an in-memory delivery store and an httpx MockTransport
receiver: what each answer makes of a delivery, and what is sent."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from delivery.worker import WebhookDispatcher
from ioc_core.errors import ConfigurationError, ServiceUnavailableError
from ioc_core.sealing import SecretUnreadable
from ioc_core.settings import Settings
from ioc_core.storage.webhooks import DeliveryJob
from ioc_core.webhooks import new_secret, sign

SETTINGS = Settings(
    webhook_poll_s=0.005,
    webhook_backoff_initial_s=10,
    webhook_backoff_max_s=600,
    webhook_retry_window_s=3600,
    webhook_timeout_s=2,
)


class FakeListener:
    def is_closed(self) -> bool:
        return False

    async def close(self) -> None:
        pass


class FakeDeliveryStore:
    """Hands out the jobs put in `due` once each and keeps every recorded attempt."""

    def __init__(self, *jobs: DeliveryJob) -> None:
        self.due = list(jobs)
        self.finished: list[dict[str, Any]] = []
        self.claim_failures = 0
        self.unreadable: list[str] = []

    async def check_secrets(self) -> None:
        if self.unreadable:
            raise SecretUnreadable(f"the signing secrets of webhook endpoints {', '.join(self.unreadable)}")

    async def claim(self, *, owner: str, per_endpoint: int, limit: int, lease_s: float) -> list[DeliveryJob]:
        if self.claim_failures > 0:
            self.claim_failures -= 1
            raise ServiceUnavailableError("the database is away")
        jobs, self.due = self.due[:limit], self.due[limit:]
        return jobs

    async def finish_attempt(self, job: DeliveryJob, **outcome: Any) -> None:
        self.finished.append({"job": job, **outcome})

    async def expire(self, *, window_s: float) -> int:
        return 0

    async def forget(self, *, older_than_days: float) -> int:
        return 0

    async def listen(self, callback: Callable[[], None]) -> FakeListener:
        return FakeListener()


class FakeDatabase:
    def __init__(self, store: FakeDeliveryStore) -> None:
        self.webhooks = store
        self.running = False

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False


def answer(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    """A response as a server streams it (a plain `httpx.Response(status)` comes already read)."""
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(b"ok"))


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(2):
        while True:
            if condition():
                return
            await asyncio.sleep(0.001)


def job(*, attempts: int = 0, window_started_at: datetime | None = None) -> DeliveryJob:
    return DeliveryJob(
        id=1,
        endpoint_id="wh_1",
        url="https://agency.example/hook",
        secret=new_secret(),
        message_id="msg_0001",
        event_type="alarm.raised",
        body='{"type": "alarm.raised"}',
        attempts=attempts,
        window_started_at=window_started_at or datetime.now(UTC),
    )


async def deliver(
    respond: Callable[[httpx.Request], httpx.Response], delivery: DeliveryJob
) -> tuple[dict[str, Any], list[httpx.Request], WebhookDispatcher]:
    """Run a worker until it has recorded its one attempt at `delivery`."""
    store = FakeDeliveryStore(delivery)
    received: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return respond(request)

    dispatcher = WebhookDispatcher(
        SETTINGS,
        database=FakeDatabase(store),
        client_factory=lambda _: httpx.AsyncClient(transport=httpx.MockTransport(receiver)),
    )
    async with dispatcher:
        await until(lambda: bool(store.finished))
    (finished,) = store.finished
    return finished, received, dispatcher


def waited_s(finished: dict[str, Any]) -> float:
    return float((finished["next_attempt_at"] - finished["attempted_at"]).total_seconds())


async def test_a_2xx_marks_the_delivery_delivered_and_the_request_is_signed() -> None:
    delivery = job()
    finished, (request,), dispatcher = await deliver(lambda _: answer(204), delivery)
    assert (finished["state"], finished["status_code"], finished["error"]) == ("delivered", 204, None)
    assert finished["next_attempt_at"] is None and dispatcher.delivered == 1
    assert request.method == "POST" and str(request.url) == delivery.url
    assert request.content == delivery.body.encode()
    assert request.headers["webhook-id"] == delivery.message_id
    timestamp = int(request.headers["webhook-timestamp"])
    assert abs(timestamp - datetime.now(UTC).timestamp()) < 5
    assert request.headers["webhook-signature"] == sign(
        delivery.secret, delivery.message_id, timestamp, request.content
    )


async def test_a_5xx_is_tried_again_after_a_backoff_inside_its_bounds() -> None:
    finished, _, dispatcher = await deliver(lambda _: answer(500), job())
    assert (finished["state"], finished["status_code"], finished["error"]) == ("pending", 500, "HTTP 500")
    # After the first failure: half the initial wait fixed, half of it random.
    assert 5 - 0.5 <= waited_s(finished) <= 10 + 0.5
    assert dispatcher.retried == 1


async def test_the_backoff_doubles_with_each_attempt_up_to_its_maximum() -> None:
    finished, _, _ = await deliver(lambda _: answer(502), job(attempts=3))
    assert 40 - 0.5 <= waited_s(finished) <= 80 + 0.5
    finished, _, _ = await deliver(lambda _: answer(502), job(attempts=30))
    assert 300 - 0.5 <= waited_s(finished) <= 600 + 0.5


async def test_a_timeout_is_tried_again() -> None:
    def too_slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    finished, _, _ = await deliver(too_slow, job())
    assert (finished["state"], finished["status_code"]) == ("pending", None)
    assert finished["error"] == "timed out: ReadTimeout"
    assert 5 - 0.5 <= waited_s(finished) <= 10 + 0.5


async def test_retry_after_is_honoured_on_503_and_429() -> None:
    for status in (503, 429):
        finished, _, _ = await deliver(lambda _, status=status: answer(status, {"retry-after": "120"}), job())
        assert finished["state"] == "pending"
        assert 120 - 0.5 <= waited_s(finished) <= 120 + 0.5


async def test_a_410_fails_the_delivery_and_disables_the_endpoint() -> None:
    finished, _, dispatcher = await deliver(lambda _: answer(410), job())
    assert (finished["state"], finished["next_attempt_at"]) == ("failed", None)
    assert finished["disable_endpoint"] == finished["failure_reason"] == "the endpoint answered 410 Gone"
    assert dispatcher.failed == 1


async def test_a_failure_after_the_retry_window_ends_the_delivery() -> None:
    started = datetime.now(UTC) - timedelta(seconds=3600 - 1)
    finished, _, _ = await deliver(lambda _: answer(500), job(attempts=6, window_started_at=started))
    assert (finished["state"], finished["next_attempt_at"], finished["disable_endpoint"]) == (
        "failed",
        None,
        None,
    )
    assert finished["failure_reason"] == "retry window ended after 7 attempts; last: HTTP 500"


async def test_a_database_outage_while_claiming_shows_in_readiness_and_passes() -> None:
    store = FakeDeliveryStore(job())
    store.claim_failures = 10**9
    dispatcher = WebhookDispatcher(
        SETTINGS,
        database=FakeDatabase(store),
        client_factory=lambda _: httpx.AsyncClient(transport=httpx.MockTransport(lambda _: answer(200))),
    )
    async with dispatcher:
        await until(lambda: "claiming deliveries" in dispatcher.readiness())
        store.claim_failures = 0
        await until(lambda: bool(store.finished))
        assert dispatcher.readiness() == {"webhooks": "ok"}
    assert store.finished[0]["state"] == "delivered"


async def test_a_secret_no_key_opens_is_not_sent_and_tried_again_later() -> None:
    """Sealed with a key this worker lacks: nothing unsigned goes out, and the delivery waits for
    a worker that has the key (or for this one's settings to get it)."""
    finished, received, dispatcher = await deliver(
        lambda _: answer(200), dataclasses.replace(job(), secret=None)
    )
    assert received == []
    assert (finished["state"], finished["status_code"]) == ("pending", None)
    assert "IOC_SECRETS_KEY" in finished["error"]
    assert 5 - 0.5 <= waited_s(finished) <= 10 + 0.5 and dispatcher.retried == 1


async def test_a_worker_whose_keys_open_no_stored_secret_refuses_to_start() -> None:
    store = FakeDeliveryStore(job())
    store.unreadable = ["wh_1"]
    database = FakeDatabase(store)
    dispatcher = WebhookDispatcher(SETTINGS, database=database)
    with pytest.raises(SecretUnreadable, match="wh_1"):
        await dispatcher.start()
    assert not database.running and store.finished == []


def test_a_worker_without_a_secrets_key_refuses_to_be_made() -> None:
    without_key = SETTINGS.model_copy(update={"secrets_key": None})
    with pytest.raises(ConfigurationError, match="IOC_SECRETS_KEY is not set"):
        WebhookDispatcher(without_key)
