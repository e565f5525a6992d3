"""Webhook signing, routing and retry timing (pure parts of `ioc_core.webhooks`).

Signatures are checked with the Standard Webhooks reference library, an implementation of the
spec independent of ours.
"""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook as ReferenceVerifier
from standardwebhooks.webhooks import WebhookVerificationError

from ioc_core.events import Event, state_changed_event
from ioc_core.webhooks import (
    AttemptResult,
    WebhookFilter,
    backoff,
    new_secret,
    next_attempt,
    retry_after,
    routed,
    sign,
    signed_headers,
)


def alarm_event(severity: str = "critical", *, city: str = "ha-noi", escalated: bool = False) -> Event:
    return Event(
        id="5b0f8c7e-4c1b-4b8a-9a57-0c1d2e3f4a5b",
        type="alarm.raised",
        subject="hn-flood-001",
        time=datetime(2026, 11, 20, 8, 0, tzinfo=UTC),
        data={"id": 7, "city": city, "domain": "flood", "severity": severity, "escalated": escalated},
    )


def test_secret_has_the_prefix_and_enough_random_bytes() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    assert new_secret() != secret


def test_signature_matches_the_published_example() -> None:
    # The worked example of the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_reference_library_verifies_our_headers_and_rejects_tampering() -> None:
    secret = new_secret()
    event = alarm_event()
    body = routed([event])[0].body.encode()
    headers = signed_headers(secret, "msg_abc", body)
    payload = ReferenceVerifier(secret).verify(body, headers)
    assert payload["type"] == "alarm.raised"
    assert payload["timestamp"] == "2026-11-20T08:00:00+00:00"
    assert payload["data"]["severity"] == "critical"
    with pytest.raises(WebhookVerificationError):
        ReferenceVerifier(secret).verify(body.replace(b"critical", b"low"), headers)
    with pytest.raises(WebhookVerificationError):
        ReferenceVerifier(new_secret()).verify(body, headers)


def test_message_id_is_stable_per_event_and_screens_only_events_are_not_routed() -> None:
    event = alarm_event()
    first, second = routed([event])[0], routed([event])[0]
    assert first.message_id == second.message_id == "msg_5b0f8c7e4c1b4b8a9a570c1d2e3f4a5b"
    assert json.loads(first.body) == {
        "type": "alarm.raised",
        "timestamp": "2026-11-20T08:00:00+00:00",
        "data": event.data,
    }
    snapshot = state_changed_event(city="ha-noi", domain="flood", items=[], at=datetime.now(UTC))
    assert routed([snapshot]) == []


def test_filter_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="not a domain"):
        WebhookFilter(domains=["sewage"])
    with pytest.raises(ValueError):
        WebhookFilter.model_validate({"types": ["state.changed"]})
    with pytest.raises(ValueError, match="city slug"):
        WebhookFilter(cities=["Hà Nội"])


def test_backoff_doubles_with_jitter_up_to_the_maximum() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 2), (2, 4), (3, 8), (10, 60), (5000, 60)]:
        delays = [backoff(attempt, initial_s=2, maximum_s=60, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not fixed


def test_retry_after_in_seconds_or_as_a_date_and_capped() -> None:
    now = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    assert retry_after("7", now=now) == 7
    assert retry_after("Fri, 20 Nov 2026 08:00:30 GMT", now=now) == 30
    assert retry_after("Fri, 20 Nov 2026 07:00:00 GMT", now=now) == 0
    assert retry_after("999999", now=now) == 3600
    assert retry_after("soon", now=now) is None
    assert retry_after(None, now=now) is None


def test_next_attempt_honours_retry_after_and_the_window() -> None:
    now = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    window_ends = now + timedelta(seconds=60)
    throttled = AttemptResult(status_code=429, latency_ms=3, error="HTTP 429", retry_after_s=20)
    at = next_attempt(throttled, attempts=1, now=now, window_ends=window_ends, initial_s=1, maximum_s=5)
    assert at == now + timedelta(seconds=20)
    late = AttemptResult(status_code=503, latency_ms=3, error="HTTP 503", retry_after_s=120)
    assert next_attempt(late, attempts=1, now=now, window_ends=window_ends, initial_s=1, maximum_s=5) is None
    broken = AttemptResult(status_code=500, latency_ms=3, error="HTTP 500")
    at = next_attempt(broken, attempts=3, now=now, window_ends=window_ends, initial_s=1, maximum_s=5)
    assert at is not None and now + timedelta(seconds=2) <= at <= now + timedelta(seconds=4)


def test_outcomes() -> None:
    assert AttemptResult(204, 1, None).outcome == "delivered"
    assert AttemptResult(410, 1, "HTTP 410").outcome == "gone"
    assert AttemptResult(404, 1, "HTTP 404").outcome == "retry"
    assert AttemptResult(302, 1, "redirect").outcome == "retry"
    assert AttemptResult(None, 1, "timed out").outcome == "retry"
